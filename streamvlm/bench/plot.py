"""The accuracy-vs-FLOPs picture of `streamvlm bench quality --sweep`, drawn with matplotlib (the `plot` extra).

One panel per method: its rows at each budget (accuracy against the LLM FLOPs fraction each actually spent), the
random baseline at the same budgets (grey, dashed) and the dense model (a star at 1.0), so every curve is read
against both. A point that could not reach its budget is drawn hollow.
"""

from __future__ import annotations

import math
from pathlib import Path

from streamvlm.errors import StreamVLMError

BASELINE = "random"


def plot_pareto(result: dict, out: str | Path) -> Path:
    """Draw `result` (run_quality_bench with budgets) to `out` (.svg or .png)."""
    out = Path(out)
    if out.suffix not in (".svg", ".png"):
        raise StreamVLMError(f"--plot {out}: give a .svg or .png file name")
    fig = pareto_figure(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Date": None} if out.suffix == ".svg" else None)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def pareto_figure(result: dict):
    """The matplotlib figure: one panel per method, with the random baseline and dense on each."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise StreamVLMError("--plot needs matplotlib: pip install 'streamvlm[plot]'") from None
    rows = result["rows"]
    dense = next((r for r in rows if r["policy"] == "dense"), None)
    curves: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("budget") is not None:
            curves.setdefault(r["policy"], []).append(r)
    baseline = sorted(curves.get(BASELINE, []), key=lambda r: r["flops_fraction"])
    methods = [m for m in curves if m != BASELINE] or list(curves)
    if not methods:
        raise StreamVLMError("--plot needs budgeted rows: run with --sweep or --budget")
    cols = min(4, len(methods))
    grid_rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(3.2 * cols, 2.8 * grid_rows), sharex=True, sharey=True,
                             squeeze=False)
    for ax, method in zip(axes.flat, methods):
        if baseline and method != BASELINE:
            ax.plot([r["flops_fraction"] for r in baseline], [100 * r["accuracy"] for r in baseline], "--",
                    color="0.6", marker=".", label=BASELINE)
        points = sorted(curves[method], key=lambda r: r["flops_fraction"])
        xs, ys = [r["flops_fraction"] for r in points], [100 * r["accuracy"] for r in points]
        ax.plot(xs, ys, "-", color="C0", label=method)
        for r, x, y in zip(points, xs, ys):
            ax.plot(x, y, "o", color="C0", markerfacecolor="C0" if r.get("reached", True) else "white")
        if dense is not None:
            ax.plot(1.0, 100 * dense["accuracy"], "*", color="C3", markersize=11, label="dense")
        ax.set_title(method, fontsize=10)
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("LLM FLOPs / dense")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    fig.suptitle(f"bench quality --sweep: {result['videos']} held-out world videos (seed {result['seed']}), "
                 f"{result['questions']} questions", fontsize=10)
    fig.tight_layout()
    return fig
