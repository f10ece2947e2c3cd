"""The policy registry: every policy parses its documented specs, round-trips through a router folder, and
appears in --help and in compare's default set; --policies takes ';' and repeated flags; a policy another
package registers through the `streamvlm.routers` entry-point group works with --routing."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from streamvlm import StreamVLM, StreamVLMError
from streamvlm.routers import registry
from streamvlm.routers.policy import Arg, Policy
from streamvlm.routers.registry import (BUILTIN, GROUP, build_router, default_compare_policies,
                                        default_quality_policies, load_router, parse_routing, policies,
                                        save_router, split_policy_specs)
from support import random_frames

ROOT = Path(__file__).parents[1]
NAMES = [policy.name for policy in policies()]


@pytest.fixture(scope="module")
def vlm(checkpoints):
    return StreamVLM.from_pretrained(checkpoints["mqa_deep"])  # 4 layers, 9 tokens per frame


@pytest.fixture
def fresh_registry():
    """Read the entry points again in this test (after it changes sys.path or entry_points), and again after."""
    registry._registry.cache_clear()
    yield
    registry._registry.cache_clear()


def test_the_builtin_policies_are_the_entry_points_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][GROUP]
    assert declared == BUILTIN
    installed = {e.name: e.value for e in entry_points(group=GROUP) if e.name in BUILTIN}
    assert installed == BUILTIN, "the installed metadata is stale: run `pip install -e .`"
    assert NAMES[:len(BUILTIN)] == list(BUILTIN)


def _minimal_and_explicit(policy: Policy) -> tuple[str, str]:
    """The shortest prefix of the example that parses, and the same with the documented defaults of the
    arguments after it written out (up to the first one without a single-value default)."""
    words = policy.example.split(":")
    for used in range(1, len(words) + 1):
        minimal = ":".join(words[:used])
        try:
            policy.parse(minimal)
            break
        except StreamVLMError:
            continue
    explicit = minimal
    for arg in policy.args[used - 1:]:
        if arg.default is None:
            break
        explicit += f":{arg.default}"
    return minimal, explicit


@pytest.mark.parametrize("name", NAMES)
def test_every_policy_parses_its_documented_specs(name):
    policy = registry.get_policy(name)
    assert policy.grammar.startswith(name) and policy.summary
    if policy.made_by is not None:  # a measured config: no spec, and the error says which command makes one
        assert policy.example is None
        with pytest.raises(StreamVLMError, match=policy.made_by):
            parse_routing(name)
        return
    config = parse_routing(policy.example)
    assert isinstance(config, policy.config) and config.policy == name
    assert config.spec() == policy.example  # examples are written the way spec() writes them
    assert parse_routing(config.spec()) == config
    minimal, explicit = _minimal_and_explicit(policy)
    assert parse_routing(minimal) == parse_routing(explicit), f"{name}: documented defaults disagree with parse"
    assert parse_routing(minimal).spec() == parse_routing(parse_routing(minimal).spec()).spec()


def _randomised(router):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return router


def test_every_policy_default_and_example_round_trips_through_a_router_folder(vlm, tmp_path):
    parts = vlm.adapter.decoder
    layers, hidden = parts.num_layers, parts.hidden_size
    defaults = default_compare_policies(vlm, random_frames(2, seed=1), "What is moving?")
    assert len(defaults) == len(NAMES)  # every policy is in compare's default set, in registry order
    configs = [parse_routing(d) if isinstance(d, str) else d for d in defaults]
    assert [c.policy for c in configs] == NAMES
    configs += [parse_routing(p.example) for p in policies() if p.example is not None]
    for i, config in enumerate(configs):
        policy = registry.get_policy(config.policy)
        router = build_router(config, layers, hidden)
        if policy.trainable:
            _randomised(router)
        folder = save_router(router, tmp_path / f"{i}-{config.policy}", layers, hidden)
        loaded = load_router(folder, layers, hidden)
        assert type(loaded) is type(router) and loaded.config == config and loaded.spec() == router.spec()
        state = router.state_dict()
        assert set(loaded.state_dict()) == set(state)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
        if config.policy != "dense":
            assert vlm.with_routing(folder).router.spec() == router.spec()
    assert any(isinstance(c, registry.get_policy("head_prune").config) for c in configs)


def test_bench_quality_default_rows_come_from_the_registry(vlm):
    # the rows bench quality ran before the registry, for a 4-layer model such as the built-in one
    assert default_quality_policies(vlm) == ["dense", "mod:0.5", "mod:0.2", "random:0.2", "uniform:0.2",
                                             "layer_drop:2", "fastv", "cls_knee"]


def _commands() -> dict[str, argparse.ArgumentParser]:
    from streamvlm.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_every_policy_is_in_the_routing_help_and_the_unknown_policy_error(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    commands = _commands()
    for command in ("ask", "live", "caption", "serve", "compare", "calibrate"):
        routing_help = _option(commands[command], "--routing").help
        text = " ".join(commands[command].format_help().split())
        for policy in policies():
            shown = policy.grammar if policy.made_by is None else f"{policy.name} from `{policy.made_by}"
            assert shown in routing_help, (command, policy.name)
            assert policy.name in text, (command, policy.name)

    with pytest.raises(StreamVLMError, match="unknown routing 'fancy:1'") as error:
        parse_routing("fancy:1")
    for policy in policies():
        assert (policy.grammar if policy.made_by is None else policy.made_by) in str(error.value)


def test_compare_help_describes_every_policy_and_bench_help_its_default_rows(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    commands = _commands()
    compare_help = commands["compare"].format_help()
    for policy in policies():
        assert f"\n  {policy.grammar}\n" in compare_help and policy.summary[:40] in " ".join(compare_help.split())
    assert compare_help.count("compare runs:") == len(NAMES)
    quality_help = _option(commands["bench"], "--policies").help
    assert "dense;mod:0.5;mod:0.2;random:0.2;uniform:0.2;layer_drop:<half the depth>;fastv;cls_knee" in quality_help


@pytest.mark.parametrize("values, specs", [
    (["dense;mod:0.2"], ["dense", "mod:0.2"]),
    (["dense", "schedule:1,0.5,0.5,0.25"], ["dense", "schedule:1,0.5,0.5,0.25"]),
    (["schedule:1,0.5,0.5; pdrop:0.5:1,3;", "mod:1,0.5,0.25,0.12"],
     ["schedule:1,0.5,0.5", "pdrop:0.5:1,3", "mod:1,0.5,0.25,0.12"]),
    (None, []), ([" ; "], []),
])
def test_policies_split_on_semicolons_and_repeated_flags_never_commas(values, specs):
    assert split_policy_specs(values) == specs


@pytest.mark.parametrize("value, hint", [
    ("dense,mod:0.2", "dense;mod:0.2"), ("fastv,dense", "fastv;dense"),
    ("dense,schedule:1,0.5,fastv:1", "dense;schedule:1,0.5;fastv:1"),
])
def test_the_old_comma_form_is_refused_with_the_semicolon_form(value, hint):
    with pytest.raises(StreamVLMError, match=f"separate policies with ';'.*'{hint}'"):
        split_policy_specs([value])


def test_compare_and_bench_take_semicolons_and_repeated_policies(checkpoints, tmp_path, capsys, monkeypatch):
    from streamvlm.cli import main
    from streamvlm.video.files import write_video

    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "cache"))
    video = write_video(tmp_path / "v.mp4", random_frames(8, height=64, width=64), fps=8)
    common = ["--model", str(checkpoints["mqa_deep"]), "--video", str(video), "--num-frames", "2",
              "--max-new-tokens", "3", "--repeats", "1", "--json"]
    assert main(["compare", *common, "--policies", "schedule:1,0.5,0.5,0.25;dense", "--policies", "fastv:1:0.5"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == ["schedule:1,0.5,0.5,0.25", "dense", "fastv:1:0.5"]
    assert rows[0]["flops_fraction"] < 1.0 and rows[1]["flops_fraction"] == pytest.approx(1.0)
    assert main(["compare", *common, "--policies", "dense,mod:0.2"]) == 2
    assert "--policies 'dense;mod:0.2'" in capsys.readouterr().err
    assert main(["bench", "quality", "--policies", "dense,fastv"]) == 2
    assert "--policies 'dense;fastv'" in capsys.readouterr().err


def test_a_policy_without_its_metadata_still_loads_from_the_builtin_list(monkeypatch, fresh_registry):
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    assert [p.name for p in policies()] == list(BUILTIN)
    assert parse_routing("fastv:1:0.5").spec() == "fastv:1:0.5"


def test_a_broken_entry_point_fails_only_its_own_spec(monkeypatch, fresh_registry, caplog):
    from importlib.metadata import EntryPoint

    real = list(entry_points(group=GROUP))
    extra = [EntryPoint("broken", "no_such_module_for_streamvlm:POLICY", GROUP),
             EntryPoint("fastv", "no_such_module_for_streamvlm:FASTV", GROUP),  # may not replace a built-in
             EntryPoint("misnamed", "streamvlm.routers.fastv:POLICY", GROUP)]  # declares 'fastv', not 'misnamed'
    monkeypatch.setattr(registry, "entry_points", lambda group: extra + real)
    assert [p.name for p in policies()] == list(BUILTIN)
    assert parse_routing("fastv:1:0.5").spec() == "fastv:1:0.5"
    with pytest.raises(StreamVLMError, match="'broken = no_such_module_for_streamvlm:POLICY' failed to load: "
                                             "ModuleNotFoundError"):
        parse_routing("broken:1")
    with pytest.raises(StreamVLMError, match="declares the policy 'fastv', not 'misnamed'"):
        parse_routing("misnamed")
    _commands()  # the command line still builds its help
    assert "is ignored: 'fastv' is a built-in policy" in caplog.text and "broken" in caplog.text


def test_a_policy_must_name_its_arguments_in_its_grammar():
    with pytest.raises(ValueError, match=r"\['N'\] do not appear"):
        Policy(name="p", summary="s", grammar="p:K", config=object, parse=str, build=print, default="p:1",
               args=(Arg("N", "n"),))


THIRD_PARTY = '''
"""A test-only policy: vision tokens skip every layer from START on (another package's file)."""

from dataclasses import dataclass, field

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.routers import Arg, Policy, RouteDecision, Router


@dataclass(frozen=True)
class TextFromConfig:
    start: int
    policy: str = field(default="mytest", init=False)

    def spec(self) -> str:
        return f"mytest:{self.start}"


class TextFromRouter(Router):
    def __init__(self, config):
        super().__init__()
        self.config = config

    def decide(self, layer, hidden, chunk):
        if layer < self.config.start or chunk.num_frames == 0:
            return None
        return RouteDecision(torch.nonzero(chunk.text_mask).squeeze(1))


def parse(spec):
    words = spec.split(":")
    if len(words) != 2:
        raise StreamVLMError(f"routing {spec!r}: expected mytest:START")
    return TextFromConfig(int(words[1]))


POLICY = Policy(name="mytest", summary="test-only: vision tokens skip every layer from START on",
                grammar="mytest:START", config=TextFromConfig, parse=parse,
                build=lambda config, num_layers, hidden_size: TextFromRouter(config), default="mytest:1",
                args=(Arg("START", "the first layer vision tokens skip"),), example="mytest:1")
'''


def _third_party_package(folder: Path) -> Path:
    """A module and the *.dist-info folder an installed package would have, declaring one entry point."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mytest_policy.py").write_text(textwrap.dedent(THIRD_PARTY))
    dist = folder / "mytest_policy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mytest-policy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{GROUP}]\nmytest = mytest_policy:POLICY\n")
    return folder


def test_a_third_party_policy_joins_the_help_and_compare(vlm, tmp_path, monkeypatch, fresh_registry):
    monkeypatch.syspath_prepend(str(_third_party_package(tmp_path)))
    monkeypatch.delitem(sys.modules, "mytest_policy", raising=False)
    assert [p.name for p in policies()] == [*BUILTIN, "mytest"]
    assert "mytest:START" in _option(_commands()["ask"], "--routing").help
    assert "test-only: vision tokens skip" in _commands()["compare"].format_help()
    assert default_compare_policies(vlm, random_frames(1), "What?")[-1] == "mytest:1"
    assert vlm.with_routing("mytest:3").router.spec() == "mytest:3"
    monkeypatch.delitem(sys.modules, "mytest_policy", raising=False)


def test_a_third_party_policy_works_with_routing_on_the_command_line(checkpoints, tmp_path):
    """`python -m streamvlm ask --routing mytest:2`, the policy found only through its entry point."""
    from streamvlm.video.files import write_video

    package = _third_party_package(tmp_path / "site")
    video = write_video(tmp_path / "v.mp4", random_frames(8, height=64, width=64), fps=8)
    paths = [str(package), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths),
           "STREAMVLM_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "streamvlm", "ask", str(video), "--model", str(checkpoints["mqa_deep"]),
                          "--routing", "mytest:2", "--num-frames", "2", "--max-new-tokens", "2", "-q", "What?",
                          "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.splitlines()[-1])
    assert stats["routing"] == "mytest:2"  # the router's own spec, from the session's stats
    entries = stats["kv_entries_per_layer"]
    # layers 0 and 1 hold every token; from layer 2 on the two frames' 9 vision tokens each are skipped
    assert entries[0] == entries[1] == entries[2] + 2 * 9 and entries[2] == entries[3]
