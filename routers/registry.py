"""The one registry of routing policies, and building, saving and loading routers through it.

Every policy is a `Policy` (routers/policy.py) named in the Python entry-point group `streamvlm.routers`:
the built-in ones by streamvlm's own pyproject.toml, more by any installed package that declares an entry
point in the same group. Everything that lists or parses policies reads this registry: --routing parsing and
its error message, the --routing help, `compare`'s default set and `bench quality`'s default rows.

The group is read once, on first use. An entry point that fails to load (an import error, an object that
is not a Policy, a name that differs from the policy's) is logged and left out, and only a spec naming it
fails, with an error that names the entry point; every other command works. An entry point named after a
built-in policy but pointing elsewhere is ignored with a warning: built-ins cannot be replaced.

Fallback: a built-in policy the installed metadata does not list (a source tree used without `pip install
-e .`, or metadata written before the policy was added) is loaded from BUILTIN, so the package still works;
re-running `pip install -e .` makes the metadata list it again.

A router directory holds `routing.json` (the policy's config and the shape of the model it was made for)
and `router.safetensors` (the weights of a trainable policy's router). `resolve_routing` turns whatever a
user passes as `routing=` into a Router for a given model.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, replace
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.routers.base import DenseRouter, Router
from streamvlm.routers.config import RoutingConfig
from streamvlm.routers.mod import MoDRouter
from streamvlm.routers.policy import Knob, ModelSample, PerModel, Policy

logger = logging.getLogger(__name__)

FORMAT = "streamvlm-router/1"
GROUP = "streamvlm.routers"

BUILTIN = {
    "dense": "streamvlm.routers.dense:POLICY",
    "mod": "streamvlm.routers.mod:POLICY",
    "random": "streamvlm.routers.baselines:RANDOM",
    "uniform": "streamvlm.routers.baselines:UNIFORM",
    "layer_drop": "streamvlm.routers.layer_drop:POLICY",
    "fastv": "streamvlm.routers.fastv:POLICY",
    "pdrop": "streamvlm.routers.pdrop:POLICY",
    "skip": "streamvlm.routers.skip:POLICY",
    "neighbor_attention": "streamvlm.routers.neighbor_attention:POLICY",
    "cls_knee": "streamvlm.routers.cls_knee:POLICY",
    "schedule": "streamvlm.routers.schedule:POLICY",
    "head_prune": "streamvlm.routers.head_prune:POLICY",
    "yopo": "streamvlm.routers.yopo:POLICY",
}
"""The built-in policies' entry points, in the order help texts, compare and bench quality list them (other
packages' policies follow, by name). pyproject.toml declares the same entry points (tests/test_registry.py
checks); this copy is the fallback described above."""


# -- the knob each policy's FLOPs are set by, for --budget -------------------------------------------------


def _args(spec: str | None, name: str) -> list[str]:
    """The user's spec's arguments (after the name), or none."""
    return spec.split(":")[1:] if spec and spec.split(":")[0] == name else []


def _first_arg(name: str, fmt=lambda v: f"{v:.4g}"):
    """A knob whose value is the spec's first argument; the user's other arguments stay."""
    def make(sample: ModelSample, value: float, spec: str | None) -> str:
        rest = _args(spec, name)[1:]
        return ":".join([name, fmt(value), *rest])
    return make


def _like_mod(name: str):
    """random/uniform at a keep ratio, on the layers mod:KEEP routes for this model (its shipped router's)."""
    def make(sample: ModelSample, value: float, spec: str | None) -> str:
        rest = _args(spec, name)[1:]
        if rest:
            return ":".join([name, f"{value:.4g}", *rest])
        config = sample.vlm.with_routing(f"mod:{value:.4g}").router.config
        return config.spec().replace("mod:", f"{name}:", 1) if config.schedule != "explicit" else f"{name}:{value:.4g}"
    return make


def _fastv(sample: ModelSample, value: float, spec: str | None) -> str:
    args = _args(spec, "fastv")
    layer = args[0] if args and args[0] else str(min(2, sample.num_layers - 1))
    return f"fastv:{layer}:{value:.4g}"


def _skip(sample: ModelSample, value: float, spec: str | None) -> str:
    args = _args(spec, "skip") or ["block"]
    tail = args[2:]  # END, INTERVAL
    return ":".join(["skip", args[0], str(int(value)), *tail])


def _neighbour(sample: ModelSample, value: float, spec: str | None) -> str:
    args = _args(spec, "neighbor_attention")
    return ":".join(["neighbor_attention", str(2 * int(value) + 1), *args[1:]])


def _neighbour_bounds(sample: ModelSample) -> tuple[float, float]:
    grid = sample.vlm.adapter.vision.grid
    return 0.0, float(max(grid) - 1)  # half-windows: w = 1 .. 2 * side - 1 (the whole frame)


def _schedule(sample: ModelSample, value: float, spec: str | None) -> str:
    """The given schedule (or the default P-Sigmoid) with every ratio past layer 0 scaled by `value`."""
    from streamvlm.routers.schedule import ScheduleConfig, sigmoid_schedule

    layers = sample.num_layers
    base = (parse_routing(spec).keep if spec and spec.startswith("schedule:")
            else sigmoid_schedule(layers, 1.0, layers / 2, 0.25))
    return ScheduleConfig(keep=(1.0, *(min(1.0, max(0.01, value * r)) for r in base[1:]))).spec()


_HEAD_RATIOS: dict[int, torch.Tensor] = {}


def _head_ratios(sample: ModelSample) -> torch.Tensor:
    """(layers, heads) YOPO's vision/text attention ratio per head, calibrated once per model on the sample."""
    from streamvlm.routers.head_prune import calibrate_heads

    key = id(sample.vlm.adapter)
    if key not in _HEAD_RATIOS:
        if sample.frames is None:
            raise StreamVLMError("head_prune's budget needs a calibration clip")
        _HEAD_RATIOS[key] = torch.tensor(calibrate_heads(sample.vlm, [sample.frames], [sample.question or "what?"])
                                         ["ratios"])
    return _HEAD_RATIOS[key]


_DENSE_HEAD_LAYERS = 2  # YOPO: the first two layers keep every head


def _head_bounds(sample: ModelSample) -> tuple[float, float]:
    parts = sample.vlm.adapter.decoder
    total = parts.num_layers * parts.num_heads
    return float(min(total, _DENSE_HEAD_LAYERS * parts.num_heads)), float(total)


def _heads(sample: ModelSample, value: float, spec: str | None):
    """Keep `value` heads: every head of the first two layers, then the most vision-active by YOPO's ratio."""
    from streamvlm.routers.head_prune import HeadPruneConfig

    ratios = _head_ratios(sample).clone()
    ratios[:_DENSE_HEAD_LAYERS] = float("inf")
    order = ratios.flatten().argsort(descending=True)
    pruned = torch.ones(ratios.numel(), dtype=torch.bool)
    pruned[order[:int(value)]] = False
    return HeadPruneConfig(pruned=pruned.view_as(ratios).tolist())


def _yopo(sample: ModelSample, value: float, spec: str | None) -> str:
    """YOPO with its drop layer at `value`, its other parts as given (default: window 5, every head, half the
    FFN: a head fraction needs a calibration run, which a budget search cannot repeat per step)."""
    args = _args(spec, "yopo") or ["5", "all", "0.5"]
    args = (args + ["", "", ""])[:3]
    return ":".join(["yopo", *args, str(int(value))])


def _layers(sample: ModelSample) -> tuple[float, float]:
    return 0.0, float(sample.num_layers)


KNOBS: dict[str, Knob] = {
    "mod": Knob("keep ratio", lambda s: (0.01, 1.0), _first_arg("mod")),
    "random": Knob("keep ratio", lambda s: (0.01, 1.0), _like_mod("random")),
    "uniform": Knob("keep ratio", lambda s: (0.01, 1.0), _like_mod("uniform")),
    "layer_drop": Knob("drop layer", _layers, lambda s, v, spec: f"layer_drop:{int(v)}", integer=True),
    "fastv": Knob("drop ratio", lambda s: (0.0, 0.99), _fastv, rising=False),
    "pdrop": Knob("stage keep", lambda s: (0.01, 1.0), _first_arg("pdrop")),
    "skip": Knob("first skipped layer", _layers, _skip, integer=True),
    "neighbor_attention": Knob("half window", _neighbour_bounds, _neighbour, integer=True),
    "cls_knee": Knob("knee floor", lambda s: (0.01, 1.0), _first_arg("cls_knee")),
    "schedule": Knob("schedule scale", lambda s: (0.01, 8.0), _schedule),
    "head_prune": Knob("heads kept", _head_bounds, _heads, integer=True),
    "yopo": Knob("drop layer", _layers, _yopo, integer=True),
}
"""Per policy, the knob `--budget` sets (streamvlm/budget.py solves for it). A policy not listed (dense) is run
as given. Another policy adds its knob with one entry here."""


def knob(name: str) -> Knob | None:
    return KNOBS.get(name)


@dataclass(frozen=True)
class _Registry:
    policies: dict[str, Policy]
    broken: dict[str, str]
    """name -> why its entry point did not load."""


def _load(entry: EntryPoint) -> Policy:
    policy = entry.load()
    if not isinstance(policy, Policy):
        raise TypeError(f"it is a {type(policy).__name__}, not a streamvlm.routers.policy.Policy")
    if policy.name != entry.name:
        raise ValueError(f"it declares the policy {policy.name!r}, not {entry.name!r}")
    return policy


def _origin(entry: EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    return f"entry point '{entry.name} = {entry.value}'" + (f" of {dist.name} {dist.version}" if dist else "")


@functools.cache
def _registry() -> _Registry:
    found: dict[str, Policy] = {}
    broken: dict[str, str] = {}
    for entry in entry_points(group=GROUP):
        if entry.name in BUILTIN and entry.value != BUILTIN[entry.name]:
            logger.warning("%s is ignored: %r is a built-in policy", _origin(entry), entry.name)
            continue
        if entry.name in found or entry.name in broken:
            logger.warning("%s is ignored: another package registers %r too", _origin(entry), entry.name)
            continue
        try:
            found[entry.name] = _load(entry)
        except Exception as e:  # whatever a third-party module raises on import: only its own spec fails
            broken[entry.name] = f"{_origin(entry)} failed to load: {type(e).__name__}: {e}"
            logger.warning("%s", broken[entry.name])
    for name, value in BUILTIN.items():
        if name not in found:  # the fallback; a built-in that fails to load here is a bug, and raises
            logger.debug("built-in policy %s is not in the installed metadata; loading %s", name, value)
            found[name] = _load(EntryPoint(name, value, GROUP))
            broken.pop(name, None)
    order = [*BUILTIN, *sorted(set(found) - set(BUILTIN))]
    return _Registry({name: found[name] for name in order}, broken)


def policies() -> list[Policy]:
    """Every registered policy: the built-ins in BUILTIN's order, then other packages' by name."""
    return list(_registry().policies.values())


def get_policy(name: str) -> Policy:
    registry = _registry()
    if name in registry.policies:
        return registry.policies[name]
    if name in registry.broken:
        raise StreamVLMError(f"routing policy {name!r} is not available: {registry.broken[name]}")
    raise StreamVLMError(f"unknown routing policy {name!r} (is the package that provides it installed?); "
                         f"use {_choices()}")


def _choices() -> str:
    grammars = "; ".join(p.grammar for p in policies() if p.made_by is None)
    made = ", ".join(f"{p.name} from `{p.made_by} --out DIR`" for p in policies() if p.made_by is not None)
    return f"{grammars}; or a router folder (a trained mod router, {made})"


def routing_help() -> str:
    """The --routing help: every policy's grammar, from the registry (argparse %-formats help strings)."""
    return (f"which vision tokens each layer processes (default dense): {_choices()}. "
            "`streamvlm compare --help` describes each policy").replace("%", "%%")


def describe_policies() -> str:
    """Every policy's grammar, summary, arguments and compare default, for a --help epilog."""
    described, first_with = [], {}
    for p in policies():
        args_as = first_with.setdefault(p.args, p.name) if p.args else None
        described.append(p.describe(args_as if args_as != p.name else None))
    return "\n".join(described)


def quality_labels() -> list[str]:
    """bench quality's default rows as its --help shows them."""
    return [entry.label if isinstance(entry, PerModel) else entry for p in policies() for entry in p.quality]


def default_quality_policies(vlm) -> list[str]:
    """bench quality's default rows for this model: every policy's `quality` settings, in registry order."""
    sample = ModelSample(vlm)
    return [entry.make(sample) if isinstance(entry, PerModel) else entry for p in policies() for entry in p.quality]


def default_compare_policies(vlm, frames, question: str) -> list:
    """compare's default set: every policy at its `default` for this model, calibrated ones on this clip."""
    sample = ModelSample(vlm, frames, question)
    return [p.default_for(sample) for p in policies()]


def parse_routing(spec: str):
    """A --routing spec -> its policy's config."""
    spec = spec.strip()
    name = spec.split(":")[0]
    registry = _registry()
    if name in registry.broken:
        raise StreamVLMError(f"routing {spec!r}: {registry.broken[name]}")
    if name not in registry.policies:
        raise StreamVLMError(f"unknown routing {spec!r}; use {_choices()}")
    return registry.policies[name].parse(spec)


def split_policy_specs(values: list[str] | None) -> list[str]:
    """--policies values (the flag repeated, each value ';'-separated) -> the specs, in order.

    A comma never separates policies: mod:R0,R1,..., schedule:R0,R1,... and pdrop's stages hold commas. A value
    in the old comma-separated form ("dense,mod:0.2": a word after a comma names a policy) is refused with
    the ';' form to use instead."""
    specs = []
    for value in values or ():
        for spec in value.split(";"):
            spec = spec.strip()
            if not spec:
                continue
            words = [w.strip() for w in spec.split(",")]
            if len(words) > 1 and any(_names_a_policy(w) for w in words[1:]):
                regrouped = words[0]
                for word in words[1:]:
                    regrouped += (";" if _names_a_policy(word) else ",") + word
                raise StreamVLMError(f"--policies {value!r}: separate policies with ';' (quoted in a shell) or "
                                     f"repeat --policies, e.g. --policies '{regrouped}'")
            specs.append(spec)
    return specs


def _names_a_policy(word: str) -> bool:
    registry = _registry()
    name = word.split(":")[0]
    return name in registry.policies or name in registry.broken


def build_router(config, num_layers: int, hidden_size: int) -> Router:
    """A fresh router (a learned one starts zero-initialised) for a model of this shape."""
    return get_policy(config.policy).build(config, num_layers, hidden_size)


def save_router(router: Router, out_dir: str | Path, num_layers: int | None = None,
                hidden_size: int | None = None) -> Path:
    """Write routing.json (and router.safetensors for a router with weights) into out_dir.

    A learned router knows the model shape it was built for; a training-free one is told it.
    """
    from safetensors.torch import save_file

    num_layers = getattr(router, "num_layers", num_layers)
    hidden_size = getattr(router, "hidden_size", hidden_size)
    if num_layers is None or hidden_size is None:
        raise ValueError("save_router needs the model's num_layers and hidden_size for this router")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = router.config.to_dict() if hasattr(router.config, "to_dict") else asdict(router.config)
    meta = {"format": FORMAT, "spec": router.spec(), "config": config,
            "model": {"num_layers": num_layers, "hidden_size": hidden_size}}
    state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in router.state_dict().items()}
    if state:
        save_file(state, str(out / "router.safetensors"))
    (out / "routing.json").write_text(json.dumps(meta, indent=2))
    return out


def config_from_dict(d: dict):
    """routing.json's config -> the config of the policy it names (whose class may read it: from_dict)."""
    name = d.get("policy", "dense")
    cls = get_policy(name).config
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    fields = {k: v for k, v in d.items() if k != "policy"}
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except TypeError as e:
        raise StreamVLMError(f"routing.json config does not fit {name}: {e}") from None


def is_router_dir(path: str | Path) -> bool:
    return (Path(path) / "routing.json").is_file()


def load_router(path: str | Path, num_layers: int, hidden_size: int) -> Router:
    """Load a router directory for a model with `num_layers` decoder layers of width `hidden_size`."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / "routing.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StreamVLMError(f"cannot read {path / 'routing.json'}: {e}") from None
    if meta.get("format") != FORMAT:
        raise StreamVLMError(f"{path} is not a streamvlm router directory (format {meta.get('format')!r})")
    shape = meta.get("model", {})
    if (shape.get("num_layers"), shape.get("hidden_size")) != (num_layers, hidden_size):
        raise StreamVLMError(
            f"the router in {path} was made for a model with {shape.get('num_layers')} layers of width "
            f"{shape.get('hidden_size')}, but this model has {num_layers} layers of width {hidden_size}; "
            "train or export a router for this model")
    config = config_from_dict(meta.get("config") or {}) if meta.get("config") else parse_routing(meta["spec"])
    policy = get_policy(config.policy)
    router = policy.build(config, num_layers, hidden_size)
    weights = path / "router.safetensors"
    if policy.trainable:
        if not weights.is_file():
            raise StreamVLMError(f"{path} has no router.safetensors")
        try:
            router.load_state_dict(load_file(str(weights)))
        except RuntimeError as e:
            raise StreamVLMError(f"{weights} does not match its routing.json: {e}") from None
    return router


CHECKPOINT_ROUTER = "router"
"""A checkpoint folder may ship a trained MoD router in this subfolder (a router directory)."""


def trained_mod_router(spec: str, model_dir: str | Path | None, num_layers: int, hidden_size: int) -> Router | None:
    """The checkpoint's own trained router for a `mod:KEEP[...]` spec, run at the spec's keep ratio.

    A router's scorers rank tokens whatever k is, so one trained router serves every keep ratio. "mod:KEEP"
    takes the trained router's layers; a spec that names a schedule gets the trained weights only when its
    routed layers are the trained ones. None when the checkpoint ships no router or the layers differ.
    """
    if model_dir is None or spec.split(":")[0] != "mod" or "," in spec:
        return None
    folder = Path(model_dir) / CHECKPOINT_ROUTER
    if not is_router_dir(folder):
        return None
    trained = load_router(folder, num_layers, hidden_size)
    if not isinstance(trained, MoDRouter):
        return None
    asked = RoutingConfig.parse(spec)
    if len(spec.split(":")) == 2:
        config = replace(trained.config, keep_ratio=asked.keep_ratio)
    else:
        config = replace(asked, weight_scale=trained.config.weight_scale)
    router = MoDRouter(config, num_layers, hidden_size)
    if set(router.scorers) != set(trained.scorers):
        logger.warning("%s routes layers %s, but the checkpoint's trained router (%s) routes %s: this runs an "
                       "untrained router; give mod:%g for the trained one", spec, sorted(map(int, router.scorers)),
                       folder, sorted(map(int, trained.scorers)), asked.keep_ratio)
        return None
    router.load_state_dict(trained.state_dict())
    return router


def resolve_routing(routing, num_layers: int, hidden_size: int, model_dir: str | Path | None = None) -> Router:
    """routing: None, a spec string ("dense", "mod:0.2:interleaved", "fastv:2:0.5", ...), a config, a router
    directory (str or Path), or a Router instance. model_dir: the checkpoint, whose own trained router (if
    it ships one) a "mod:..." spec uses instead of a fresh, untrained one."""
    if routing is None:
        return DenseRouter()
    if isinstance(routing, Router):
        return routing
    if hasattr(routing, "policy") and hasattr(routing, "spec"):  # a policy's config
        return build_router(routing, num_layers, hidden_size)
    if isinstance(routing, (str, Path)):
        if isinstance(routing, Path) or "/" in routing or Path(routing).is_dir():
            if not is_router_dir(routing):
                raise StreamVLMError(f"{routing} is not a router directory (no routing.json)")
            return load_router(routing, num_layers, hidden_size)
        trained = trained_mod_router(routing, model_dir, num_layers, hidden_size)
        if trained is not None:
            return trained
        return build_router(parse_routing(routing), num_layers, hidden_size)
    raise StreamVLMError(f"routing must be a string, a RoutingConfig, a directory or a Router, got {type(routing).__name__}")
