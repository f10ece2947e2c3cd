"""examples/: each runs on its defaults (the sample and the built-in model), asks what that model knows, and
its docstring's usage line gives the defaults its code has."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamvlm.prompts import BUILTIN_PROMPTS
from streamvlm.world.builtin import default_model_dir

EXAMPLES = Path(__file__).parents[1] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


def load(script: Path):
    spec = importlib.util.spec_from_file_location(f"example_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines main(); runs nothing (a __main__ guard)
    return module


def run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)


def test_there_are_examples():
    assert {s.name for s in SCRIPTS} >= {"live_camera.py", "stream_and_ask.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_documented_defaults_are_the_code_defaults(script):
    module = load(script)
    usage = next(line.strip() for line in module.__doc__.splitlines()
                 if line.strip().startswith(f"python examples/{script.name} ["))
    # [--fps 2] shows a default; [--model DIR] names what to give (no default)
    documented = {k: v for k, v in re.findall(r"\[--([\w-]+) ([^\]\s]+)\]", usage) if not v.isupper()}
    defaults = {k.replace("_", "-"): v for k, v in vars(module.parse_args([])).items() if v is not None}
    switches = {k for k, v in defaults.items() if v is False}  # store_true: shown as [--flag], no value
    assert all(f"[--{k}]" in usage for k in switches), (usage, switches)
    defaults = {k: v for k, v in defaults.items() if k not in switches}
    options = {k for k in defaults if f"[{k.upper()}]" not in usage}  # not the positional arguments
    assert documented, usage
    assert set(documented) == options, (usage, defaults)  # every option with a default shows it
    for flag, shown in documented.items():
        value = defaults[flag]
        assert (float(shown) == value) if isinstance(value, float) else (shown == str(value)), (flag, shown, value)
    assert "noise" not in module.__doc__ and "random weights" not in module.__doc__  # the default model is trained


def test_live_camera_watches_the_sample_by_default(cache):
    script = EXAMPLES / "live_camera.py"
    assert load(script).parse_args([]).source == "sample"
    out = run(script, "--seconds", "2", "--every", "1")  # the sample plays in real time: about 2 s
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if " -> " in line]
    assert answers, out.stdout
    for answer in answers:
        assert f"{BUILTIN_PROMPTS.question} -> 'big red square moving right" in answer, answer
    assert "frames in, 0 dropped" in out.stdout


def test_stream_and_ask_runs_on_the_sample(cache):
    out = run(EXAMPLES / "stream_and_ask.py", "--routing", "mod:0.5", "--fps", "1")
    assert out.returncode == 0, out.stderr
    half, end = [line for line in out.stdout.splitlines() if " -> " in line]
    assert f"{BUILTIN_PROMPTS.question} -> big red square moving right" in half
    assert "green triangle" in half and "green triangle" not in end  # it left at 4.5 s
    assert "of dense" in out.stdout


def test_openmp_teams_times_each_setting(cache):
    out = run(EXAMPLES / "openmp_teams.py", "--requests", "1")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.rstrip().endswith("x")]
    assert [line[:26].strip() for line in rows] == ["alone", "beside an idle team", "beside a one-core thread",
                                                    "after it exits", "on a worker thread", "one intra-op thread"]
    assert rows[0].rstrip().endswith("1.00x")


def test_many_questions_forks_answer_as_fresh_sessions(cache):
    out = run(EXAMPLES / "many_questions.py", "--num-frames", "8", "--batch", "2")
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if " -> " in line]
    assert len(answers) == 8 and "how many objects are there now ? -> " in answers[1]
    assert "the same answers: yes" in out.stdout  # the script compares them and exits 1 otherwise


@pytest.mark.parametrize("workload, unit", [("decode-heavy", "tokens/s"), ("built-in", "requests/s")])
def test_engine_throughput_times_each_setting_per_round(cache, workload, unit):
    out = run(EXAMPLES / "engine_throughput.py", "--workload", workload, "--model", str(default_model_dir()),
              "--requests", "2", "--new-tokens", "3", "--rounds", "1")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("round")]
    assert [row[:4] for row in rows] == [["round", "1", "--max-batch", "1"], ["round", "1", "--max-batch", "8"]]
    assert all(row[5] == unit and float(row[4]) > 0 for row in rows)


def test_batched_step_times_both_kinds_both_ways(cache):
    out = run(EXAMPLES / "batched_step.py", "--batch", "2", "--frames", "1", "--steps", "2", "--rounds", "2")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.rstrip().endswith("x")]
    assert [row[:2] for row in rows] == [["1", "decode"], ["1", "question"], ["2", "decode"], ["2", "question"]]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
    assert [line.split(":")[0] for line in out.stdout.splitlines() if "less time than" in line] == \
        ["decode", "question"]


def test_long_prompt_races_an_answer_under_each_budget(cache):
    out = run(EXAMPLES / "long_prompt.py", "--model", str(default_model_dir()), "--prompt-tokens", "200",
              "--prompts", "2", "--budgets", "4096,48", "--new-tokens", "8", "--rounds", "1")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["4096", "48"] and all(float(x) > 0 for row in rows for x in row[1:])
    assert "budget 48 against 4096: A's longest gap" in out.stdout


def test_cpu_linear_times_each_phase_both_ways(tiny_dir, cache):
    out = run(EXAMPLES / "cpu_linear.py", "--model", str(tiny_dir), "--frames", "2", "--new-tokens", "2",
              "--rounds", "1", "--no-shapes")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.rstrip().endswith("x") and len(line.split()) == 4]
    assert [row[0] for row in rows] == ["prefill", "streamed", "answer"]
    assert "streamed prefill against one-shot: onednn" in out.stdout
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)
    assert "decode ms/token: oneDNN" in out.stdout and "the same answer: yes" in out.stdout


def test_streamed_prefill_profile_times_the_parts_and_the_ops(tiny_dir, cache):
    script = EXAMPLES / "streamed_prefill_profile.py"
    out = run(script, "--model", str(tiny_dir), "--frames", "3", "--rounds", "2", "--top", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    parts = [line.split()[0:2] for line in lines if "all at once" in line and line.rstrip().endswith("x)")]
    assert parts == [["vision", "all"], ["language", "model"]]
    assert any(line.startswith("CPU time of every op: one-shot") for line in lines)
    assert len(lines) == lines.index(next(line for line in lines if line.startswith("op "))) + 4  # the top 3
    only = run(script, "--model", str(tiny_dir), "--frames", "3", "--only", "streamed")
    assert only.returncode == 0 and only.stdout == "", only.stderr


@pytest.mark.parametrize("script, flag, value", [
    ("cpu_linear.py", "--frames", "1"), ("cpu_linear.py", "--new-tokens", "1"), ("cpu_linear.py", "--rounds", "0"),
    ("streamed_prefill_profile.py", "--frames", "1"), ("streamed_prefill_profile.py", "--top", "0"),
    ("streamed_prefill_profile.py", "--rounds", "0"), ("streamed_prefill_profile.py", "--only", "both"),
    ("batched_step.py", "--batch", "0"), ("batched_step.py", "--frames", "0"), ("batched_step.py", "--steps", "0"),
    ("batched_step.py", "--rounds", "0"), ("engine_throughput.py", "--workload", "chat"),
    ("long_prompt.py", "--budgets", "0,256"), ("long_prompt.py", "--budgets", "many"),
    ("long_prompt.py", "--new-tokens", "4"), ("long_prompt.py", "--rounds", "0"),
    ("long_prompt.py", "--prompts", "0")])
def test_profiling_examples_refuse_bad_counts(script, flag, value, capsys):
    module = load(EXAMPLES / script)
    with pytest.raises(SystemExit) as e:
        module.parse_args([flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--requests", "--new-tokens", "--rounds"])
def test_engine_throughput_refuses_counts_below_one(flag, capsys):
    module = load(EXAMPLES / "engine_throughput.py")
    with pytest.raises(SystemExit) as e:
        module.parse_args([flag, "0"])
    assert e.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--batch", "--num-frames"])
def test_many_questions_refuses_counts_below_one(flag, capsys):
    module = load(EXAMPLES / "many_questions.py")
    with pytest.raises(SystemExit) as e:
        module.parse_args([flag, "0"])
    assert e.value.code == 2 and flag in capsys.readouterr().err
