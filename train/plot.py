"""`streamvlm-train plot METRICS_CSV OUT.svg`: the loss curves of a run as an SVG picture.

Reads the CSVLogger's metrics.csv (columns step, train/..., val/...) and draws every loss column
against the step. Plain SVG written by hand, so no plotting library is needed.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from streamvlm.errors import StreamVLMError

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_W, _H, _PAD = 640, 360, 48


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    if not path.is_file():
        raise StreamVLMError(f"{path} does not exist; pass the metrics.csv a CSVLogger wrote")
    curves: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None) and ("loss" in key or "distill" in key):
                    curves.setdefault(key, []).append((int(step), float(value)))
    if not curves:
        raise StreamVLMError(f"{path} has no loss columns")
    return curves


def render_svg(curves: dict[str, list[tuple[int, float]]], title: str) -> str:
    points = [p for c in curves.values() for p in c]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = 0.0, max(p[1] for p in points) * 1.05
    sx = (_W - 2 * _PAD) / max(1, x1 - x0)
    sy = (_H - 2 * _PAD) / max(1e-12, y1 - y0)

    def xy(step: int, value: float) -> str:
        return f"{_PAD + (step - x0) * sx:.1f},{_H - _PAD - (value - y0) * sy:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{_W / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="black"/>',
             f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="black"/>',
             f'<text x="{_W / 2}" y="{_H - 12}" text-anchor="middle">step</text>']
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        y = _H - _PAD - (value - y0) * sy
        parts.append(f'<text x="{_PAD - 6}" y="{y + 4:.1f}" text-anchor="end">{value:.3g}</text>')
        parts.append(f'<line x1="{_PAD}" y1="{y:.1f}" x2="{_W - _PAD}" y2="{y:.1f}" stroke="#ddd"/>')
    for i in range(5):
        step = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{_PAD + (step - x0) * sx:.1f}" y="{_H - _PAD + 16}" text-anchor="middle">'
                     f'{step:.0f}</text>')
    for i, (name, curve) in enumerate(sorted(curves.items())):
        colour = _COLOURS[i % len(_COLOURS)]
        path = " ".join(xy(s, v) for s, v in sorted(curve))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.append(f'<text x="{_W - _PAD - 4}" y="{_PAD + 16 * i}" text-anchor="end" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamvlm-train plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.csv written by the CSVLogger")
    parser.add_argument("out", help="SVG file to write")
    parser.add_argument("--title", default="router training", help="title on the picture")
    args = parser.parse_args(argv)
    svg = render_svg(read_curves(Path(args.metrics)), args.title)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(svg)
    print(f"wrote {args.out}")
    return 0
