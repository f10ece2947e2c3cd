"""What a routing policy declares, so that one registry can serve the command line, compare and the benches.

A policy lives in one file under routers/ and ends with one `Policy` object (`POLICY`, or `RANDOM` and
`UNIFORM` in baselines.py, which share a router). pyproject.toml names that object in the entry-point
group `streamvlm.routers`; `streamvlm.routers.registry` loads the group. A package of someone else's adds a
policy the same way, with nothing edited here:

    [project.entry-points."streamvlm.routers"]
    mypolicy = "mypackage.mypolicy:POLICY"

The config a policy parses is a frozen dataclass with a `policy` field holding the policy's name and a
`spec()` method giving back the --routing string. Its fields are JSON values (numbers, strings, bools, None,
tuples of them), so a router folder can store it; a config with `to_dict`/`from_dict` methods stores itself.
"""

from __future__ import annotations

import contextlib
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from streamvlm.errors import StreamVLMError


@dataclass(frozen=True)
class Arg:
    """One argument of a policy's spec, in grammar order."""

    name: str
    """As the grammar writes it, e.g. "K" in fastv[:K[:R]]."""
    help: str
    """What it means, and what leaving it out means when that is not one value ("half the depth")."""
    default: str | None = None
    """The value leaving it out stands for, as spec text ("2", "all"); None when the argument is required
    or leaving it out means something no single value says."""


@dataclass(frozen=True)
class ModelSample:
    """What a default-setting hook may look at: the model, and for policies calibrated on data one clip
    and one question (compare passes the clip it compares on; bench quality passes none)."""

    vlm: Any
    """A StreamVLM (not imported here: routers import only torch and streamvlm core types)."""
    frames: Any = None
    """uint8 frames (T, H, W, 3) of the clip, or None."""
    question: str | None = None

    @property
    def num_layers(self) -> int:
        return self.vlm.adapter.decoder.num_layers


@dataclass(frozen=True)
class PerModel:
    """A default setting that depends on the model (or on a clip): `make(sample)` gives a spec or a config."""

    label: str
    """How help texts show it, e.g. "layer_drop:<half the depth>"."""
    make: Callable[[ModelSample], Any]


@dataclass(frozen=True)
class Knob:
    """A policy's one monotone setting, which `--budget F` solves for so that the policy spends F of the
    language model's dense FLOPs (streamvlm/budget.py). The registry declares one per policy (KNOBS)."""

    name: str
    """What it sets, for output: "keep ratio", "drop layer", "window", ..."""
    bounds: Callable[[ModelSample], tuple[float, float]]
    """The values to search between, for this model."""
    make: Callable[[ModelSample, float, str | None], Any]
    """(sample, value, the spec the user gave or None) -> a spec or config at that value, keeping the user's
    other arguments (fastv's K, skip's mode, an explicit schedule's shape)."""
    integer: bool = False
    """Only whole values (a layer, a window, a head count)."""
    rising: bool = True
    """FLOPs rise with the value (a keep ratio); False where they fall (a drop ratio)."""


@dataclass(frozen=True)
class Policy:
    """A routing policy: its name, how its --routing spec reads, its config and its router."""

    name: str
    """The spec's first word: --routing NAME[:ARGS]."""
    summary: str
    """One line for --help: what it does and where it comes from."""
    grammar: str
    """The spec's form, e.g. "fastv[:K[:R]]"; every Arg name appears in it."""
    config: type
    """The config dataclass `parse` returns and `build` takes."""
    parse: Callable[[str], Any]
    """A spec starting with `name` -> a config; StreamVLMError for a spec that does not fit."""
    build: Callable[[Any, int, int], Any]
    """(config, num_layers, hidden_size) -> a Router for a model of that shape."""
    default: str | PerModel
    """The setting `streamvlm compare` runs by default: a spec, or a hook that makes one for the model."""
    args: tuple[Arg, ...] = ()
    """The spec's arguments, in grammar order."""
    example: str | None = None
    """A spec with its arguments spelt out, for help texts and tests; None for a policy that takes no spec."""
    quality: tuple[str | PerModel, ...] = ()
    """The specs `streamvlm bench quality` runs by default (a PerModel here must make a spec, not a config);
    none: not in its default rows."""
    trainable: bool = False
    """Its router has weights: a router folder must hold router.safetensors, and loading fills them in."""
    made_by: str | None = None
    """For a policy whose config comes only from measurement (no spec): the command that writes its router
    folder, e.g. "streamvlm calibrate heads"."""

    def __post_init__(self):
        if not self.name or not self.grammar.startswith(self.name):
            raise ValueError(f"policy {self.name!r}: its grammar {self.grammar!r} must start with its name")
        missing = [a.name for a in self.args if a.name not in self.grammar]
        if missing:
            raise ValueError(f"policy {self.name!r}: arguments {missing} do not appear in {self.grammar!r}")

    def default_for(self, sample: ModelSample):
        """The compare default for this model (and clip): a spec string or a config."""
        return self.default.make(sample) if isinstance(self.default, PerModel) else self.default

    def describe(self, args_as: str | None = None, width: int = 100) -> str:
        """Grammar, summary, arguments and compare default, indented, for a --help epilog. args_as: the name
        of a policy listed before with the same arguments, to say "as for NAME" instead of repeating them."""
        def wrap(text: str, indent: str) -> str:
            return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent + "  ")

        lines = [f"  {self.grammar}", wrap(self.summary, " " * 6)]
        if args_as is not None:
            lines.append(wrap(f"{', '.join(a.name for a in self.args)}: as for {args_as}", " " * 6))
        else:
            for arg in self.args:
                default = f" (default {arg.default})" if arg.default is not None else ""
                lines.append(wrap(f"{arg.name}: {arg.help}{default}", " " * 6))
        compared = self.default.label if isinstance(self.default, PerModel) else self.default
        lines.append(wrap(f"compare runs: {compared}", " " * 6))
        return "\n".join(lines)


def spec_parts(spec: str, grammar: str, most: int, least: int = 0) -> list[str]:
    """spec -> its arguments (the words after the name), checked to number between least and most."""
    args = spec.split(":")[1:]
    if not least <= len(args) <= most:
        raise StreamVLMError(f"routing {spec!r}: expected {grammar}")
    return args


@contextlib.contextmanager
def numbers(spec: str) -> Iterator[None]:
    """Turns a ValueError from int()/float() on a spec's words into a StreamVLMError that names the spec."""
    try:
        yield
    except ValueError:
        raise StreamVLMError(f"routing {spec!r}: its numbers do not parse") from None
