"""`--budget F`: every policy set to the same fraction of dense LLM FLOPs by solving for its knob (registry
KNOBS, streamvlm/budget.py), on the built-in model; schedule specs in --policies; the sweep's picture; compare's
default mod row on a checkpoint that ships a router."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from streamvlm.cli import main

REACHABLE = {"mod", "random", "uniform", "pdrop", "cls_knee", "schedule"}
"""Policies whose knob reaches 0.5 on the built-in model (4 layers: layer_drop and skip move in steps of
about a quarter; fastv at K=2 cannot go under ~0.55; a window or pruned heads only cut attention)."""


def test_every_registered_policy_but_dense_declares_a_knob():
    from streamvlm.routers.registry import KNOBS, policies

    names = [p.name for p in policies()]
    assert set(KNOBS) <= set(names)
    assert set(names) - set(KNOBS) == {"dense"}
    for name, knob in KNOBS.items():
        assert knob.name and callable(knob.bounds) and callable(knob.make), name


def test_compare_budget_lands_each_policy_within_tolerance(cache, capsys):
    budget = 0.5
    assert main(["compare", "--budget", str(budget), "--num-frames", "4", "--repeats", "1", "--max-new-tokens", "4",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["policy"].split(":")[0].split("(")[0] for r in rows]
    assert names[0] == "dense" and set(names) >= REACHABLE | {"layer_drop", "fastv", "skip", "head_prune"}
    for name, row in zip(names, rows):
        if name == "dense":
            assert row["reached"] is None and row["flops_fraction"] == pytest.approx(1.0)
        elif row["reached"]:
            assert abs(row["flops_fraction"] - budget) <= 0.03, row  # compare's own count, not the solver's
        else:
            assert row["note"] and abs(row["flops_fraction"] - budget) > 0.03, row
        if name in REACHABLE:
            assert row["reached"], row


def test_a_budget_out_of_reach_is_reported_at_the_nearest_point(builtin):
    from streamvlm.budget import Calibration, Question, solve

    frames = torch.randint(0, 255, (3, 96, 96, 3), dtype=torch.uint8)
    calibration = Calibration(((builtin.encode(frames), None, (Question("what is there now?", (5, 6)),)),), frames)
    window = solve(builtin, "neighbor_attention", 0.3, calibration)
    assert window.reached is False and "cannot reach 0.30" in window.note
    assert window.value == 0 and window.spec == "neighbor_attention:1"  # the narrowest window is the nearest
    mod = solve(builtin, "mod:0.9:all:2", 0.6, calibration)  # the user's other arguments stay
    assert mod.reached and mod.spec.endswith(":all:2") and abs(mod.flops_fraction - 0.6) <= 0.03


def test_bench_quality_budget_and_schedule_specs_in_policies(cache, capsys):
    assert main(["bench", "quality", "--json", "--num-videos", "1", "--seed", "5",
                 "--policies", "dense;schedule:1,1,0.5,0.25"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["router"] for r in rows] == ["dense", "schedule:1,1,0.5,0.25"]
    assert rows[1]["flops_fraction"] < 0.9

    assert main(["bench", "quality", "--json", "--num-videos", "1", "--seed", "5", "--budget", "0.5",
                 "--calibration-videos", "1", "--policies", "dense;mod;schedule:1,1,0.5,0.25"]) == 0
    rows = json.loads(capsys.readouterr().out)
    dense, mod, schedule = rows
    assert dense["router"] == "dense" and "budget" not in dense
    assert mod["budget"] == 0.5 and mod["knob"] == "keep ratio" and mod["reached"]
    assert mod["router"].endswith(":all:1")  # the shipped router's layers
    ratios = [float(r) for r in schedule["router"].removeprefix("schedule:").split(",")]
    assert ratios[0] == 1.0 and ratios[1] == pytest.approx(2 * ratios[2], rel=0.01)  # the given shape, scaled
    assert ratios[2] == pytest.approx(2 * ratios[3], rel=0.01)
    for row in (mod, schedule):  # solved on other videos, measured on the held-out one
        assert abs(row["flops_fraction"] - 0.5) <= 0.03, row
        assert row["predicted_ingest_speedup"] > 1.5 and row["measured_ingest_speedup"] > 0


def _row(policy, budget, flops, accuracy, reached=True):
    return {"policy": policy, "budget": budget, "flops_fraction": flops, "accuracy": accuracy, "reached": reached,
            "router": policy, "accuracy_by_kind": {"count": accuracy}, "kv_fraction": flops,
            "predicted_ingest_speedup": 1 / flops, "measured_ingest_speedup": None, "note": ""}


def test_the_pareto_picture_has_dense_and_the_baseline_on_every_panel(tmp_path):
    from streamvlm.bench.plot import pareto_figure, plot_pareto
    from streamvlm.bench.quality import format_quality

    rows = [_row("dense", None, 1.0, 0.98)]
    for budget in (0.3, 0.5):
        rows += [_row("random", budget, budget, 0.5 + budget / 2), _row("mod", budget, budget + 0.01, 0.9),
                 _row("fastv", budget, 0.55, 0.95, reached=budget >= 0.5)]
    result = {"rows": rows, "videos": 1, "seed": 5, "questions": 7, "budgets": [0.3, 0.5], "device": "cpu",
              "dtype": "float32", "questions_by_kind": {"count": 7}, "chance_by_kind": {"count": 0.33}}
    table = format_quality(result)
    assert "mod @0.3" in table and "random @0.5" in table and "ingest x" in table
    assert plot_pareto(result, tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    assert "<svg" in plot_pareto(result, tmp_path / "p.svg").read_text()[:2000]
    fig = pareto_figure(result)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert [ax.get_title() for ax in panels] == ["mod", "fastv"]  # random is the baseline, not a panel
    for ax in panels:
        labels = ax.get_legend_handles_labels()[1]
        assert labels[:1] == ["random"] and "dense" in labels
        dense_star = [line for line in ax.get_lines() if line.get_label() == "dense"][0]
        assert list(dense_star.get_xdata()) == [1.0] and list(dense_star.get_ydata()) == [98.0]
    hollow = [line for line in panels[1].get_lines() if line.get_markerfacecolor() == "white"]
    assert len(hollow) == 1  # fastv's unreached point at 0.3


def test_bad_budget_flags_say_what_to_do(cache, capsys):
    assert main(["bench", "quality", "--num-videos", "1", "--plot", "x.svg"]) == 2
    assert "--sweep" in capsys.readouterr().err
    assert main(["bench", "quality", "--num-videos", "1", "--budget", "0.5", "--sweep", "0.3"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["bench", "quality", "--num-videos", "1", "--sweep", "0.3,1.5"]) == 2
    assert "--sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--budget", "1.5"])
    assert "--budget" in capsys.readouterr().err


def test_compare_default_mod_uses_the_shipped_routers_layers(builtin, caplog):
    from streamvlm.routers.registry import default_compare_policies

    frames = torch.zeros(2, 96, 96, 3, dtype=torch.uint8)
    defaults = default_compare_policies(builtin, frames, "what is there now?")
    shipped = builtin.with_routing("mod:0.2").router.spec()
    assert shipped == "mod:0.2:all:1"
    assert defaults[1:4] == [shipped, "random:0.2:all:1", "uniform:0.2:all:1"]
    trained = builtin.with_routing(defaults[1]).router
    assert sum(float(p.detach().abs().sum()) for p in trained.parameters()) > 0  # the trained weights, not a fresh router
    with caplog.at_level(logging.WARNING):
        untrained = builtin.with_routing("mod:0.2:interleaved").router
    assert sum(float(p.detach().abs().sum()) for p in untrained.parameters()) == 0
    assert "untrained router" in caplog.text and "mod:0.2 for the trained one" in caplog.text
