"""Building, saving and loading routers.

A router directory holds `routing.json` (the RoutingConfig and the shape of the model it was made for)
and `router.safetensors` (its weights). `resolve_routing` turns whatever a user passes as `routing=` into
a Router for a given model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.routers.base import DenseRouter, Router
from streamvlm.routers.baselines import BaselineRouter
from streamvlm.routers.config import RoutingConfig
from streamvlm.routers.mod import MoDRouter
from streamvlm.routers.pruning import PRUNING_CONFIGS, PRUNING_POLICIES, build_pruning, parse_pruning

FORMAT = "streamvlm-router/1"


def parse_routing(spec: str):
    """A --routing string -> its config (RoutingConfig, or a pruning policy's config)."""
    if spec.split(":")[0] in PRUNING_POLICIES:
        return parse_pruning(spec)
    return RoutingConfig.parse(spec)


def build_router(config, num_layers: int, hidden_size: int) -> Router:
    """A fresh router (a learned one starts zero-initialised) for a model of this shape."""
    if config.policy in PRUNING_POLICIES:
        return build_pruning(config, num_layers)
    if config.policy == "dense":
        return DenseRouter()
    if config.policy == "mod":
        return MoDRouter(config, num_layers, hidden_size)
    if config.policy in ("random", "uniform"):
        return BaselineRouter(config, num_layers)
    raise StreamVLMError(f"no router for policy {config.policy!r}")


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
    config = router.config.to_dict() if isinstance(router.config, RoutingConfig) else asdict(router.config)
    meta = {"format": FORMAT, "spec": router.spec(), "config": config,
            "model": {"num_layers": num_layers, "hidden_size": hidden_size}}
    state = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in router.state_dict().items()}
    if state:
        save_file(state, str(out / "router.safetensors"))
    (out / "routing.json").write_text(json.dumps(meta, indent=2))
    return out


def _config_from_dict(d: dict):
    fields = {k: v for k, v in d.items() if k != "policy"}
    if d.get("policy") in PRUNING_CONFIGS:
        cls = PRUNING_CONFIGS[d["policy"]]
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        except TypeError as e:
            raise StreamVLMError(f"routing.json config does not fit {d['policy']}: {e}") from None
    return RoutingConfig.from_dict(d)


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
    config = _config_from_dict(meta.get("config") or {}) if meta.get("config") else parse_routing(meta["spec"])
    router = build_router(config, num_layers, hidden_size)
    weights = path / "router.safetensors"
    if isinstance(router, MoDRouter):
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
    if hasattr(routing, "policy") and hasattr(routing, "spec"):  # a RoutingConfig or a pruning config
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
