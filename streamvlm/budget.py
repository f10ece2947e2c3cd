"""`--budget F`: every policy set to spend the same fraction F of the language model's dense FLOPs.

Each policy declares one monotone knob in the registry (`streamvlm.routers.registry.KNOBS`: a keep ratio, a
drop layer, a window, a head count, a knee floor, a schedule scale, ...). `solve` measures the FLOPs fraction
a setting spends on a calibration set (encoded clips and the questions asked about them, answered teacher-
forced so that one forward measures each), and sets the knob by bisection, or by trying every value of a
whole-number knob with few values. FLOPs are the runtime's analytic counter, so a measurement is exact for the
calibration set; adaptive policies (cls_knee's knee) spend a little differently on other videos.

A policy whose range of FLOPs does not include F (a window can only cut attention; a 4-layer model's layer
drop moves in quarters) is returned at its nearest point, with `reached` False and a note that says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.routers.policy import ModelSample

TOLERANCE = 0.03
"""How close to F a row must land to count as set to F."""


@dataclass(frozen=True)
class Question:
    text: str
    answer_ids: tuple[int, ...]
    """The answer scored teacher-forced (its tokens' FLOPs count as a generated answer's would)."""
    frames: int | None = None
    """Frames streamed before it is asked (None: all of the clip's)."""


@dataclass(frozen=True)
class Calibration:
    """What FLOPs are measured on: clips, encoded once, each with the questions asked about it."""

    clips: tuple[tuple[torch.Tensor, tuple[float, ...] | None, tuple[Question, ...]], ...]
    """(features (T, tokens_per_frame, feature_dim), timestamps or None, questions) per clip."""
    frames: torch.Tensor | None = None
    """uint8 frames of one clip, for knobs calibrated on data (head_prune's head ratios)."""

    def sample(self, vlm) -> ModelSample:
        question = self.clips[0][2][0].text if self.clips and self.clips[0][2] else None
        return ModelSample(vlm, self.frames, question)


def flops_fraction(vlm, calibration: Calibration) -> float:
    """LLM FLOPs of `vlm`'s router over the calibration set, as a fraction of the same sessions run dense."""
    spent = dense = 0.0
    for features, times, questions in calibration.clips:
        for q in questions:
            upto = features.shape[0] if q.frames is None else q.frames
            session = vlm.session()
            session.append_encoded(features[:upto], None if times is None else list(times[:upto]))
            session.score(q.text, list(q.answer_ids))
            flops = session.stats()["flops"]
            spent += flops["llm"]
            dense += flops["llm_dense"]
    if dense == 0:
        raise StreamVLMError("the budget's calibration set asked no questions")
    return spent / dense


@dataclass
class Solved:
    """A policy set to a budget (or as near as it gets)."""

    policy: str
    routing: Any
    """The spec string or config to run (for a router folder or a policy without a knob: as given)."""
    target: float
    flops_fraction: float
    """Measured on the calibration set."""
    knob: str | None = None
    value: float | None = None
    reached: bool | None = True
    """Within the tolerance of the target (None for dense, the reference at every budget)."""
    note: str = ""
    tried: dict = field(default_factory=dict)
    """value -> measured fraction, every setting tried."""

    @property
    def spec(self) -> str:
        return self.routing if isinstance(self.routing, str) else self.routing.spec()


def solve(vlm, spec: str | None, target: float, calibration: Calibration, tolerance: float = TOLERANCE,
          steps: int = 14) -> Solved:
    """Set the knob of `spec`'s policy (or, for a bare policy name, of its default form) so that it spends
    `target` of dense LLM FLOPs on `calibration`. Policies without a knob (dense, a router folder) are
    measured as given."""
    from streamvlm.routers.registry import get_policy, is_router_dir, knob as knob_of

    if not 0.0 < target <= 1.0:
        raise StreamVLMError(f"--budget must be a fraction of dense FLOPs in (0, 1], got {target}")
    name = spec.split(":")[0] if spec and not is_router_dir(spec) and "/" not in spec else None
    declared = knob_of(name) if name else None
    if name == "dense":
        return Solved("dense", "dense", target, 1.0, reached=None, note="")  # the reference, at every budget
    if declared is None:
        measured = flops_fraction(vlm.with_routing(spec), calibration)
        reached = abs(measured - target) <= tolerance
        why = "a router folder" if name is None else f"{name} has no knob"
        return Solved(name or str(spec), spec, target, measured, reached=reached,
                      note="" if reached else f"{why}: run as given, at {measured:.2f} of dense FLOPs")
    get_policy(name)  # an unknown or broken policy fails here, with its message
    sample = calibration.sample(vlm)
    user = spec if spec and ":" in spec else None
    low, high = declared.bounds(sample)
    tried: dict[float, float] = {}

    def measure(value: float) -> float:
        value = float(int(round(value))) if declared.integer else value
        if value not in tried:
            tried[value] = flops_fraction(vlm.with_routing(declared.make(sample, value, user)), calibration)
        return tried[value]

    if declared.integer and high - low <= 16:
        for value in range(int(low), int(high) + 1):
            measure(value)
    else:
        # Regula falsi with the Illinois step (FLOPs are close to linear in most knobs, so this lands in a few
        # measurements), falling back to bisection when interpolation stalls; whole-number knobs bisect.
        lo, hi = low, high
        f_lo, f_hi = measure(lo), measure(hi)
        if min(f_lo, f_hi) <= target <= max(f_lo, f_hi):
            side = 0
            for step in range(steps):
                if declared.integer:
                    if int(hi) - int(lo) <= 1:
                        break
                    mid = float((int(lo) + int(hi)) // 2)
                else:
                    mid = lo + (target - f_lo) * (hi - lo) / (f_hi - f_lo) if f_hi != f_lo else (lo + hi) / 2
                    if not lo + 0.02 * (hi - lo) < mid < hi - 0.02 * (hi - lo) or step % 4 == 3:
                        mid = (lo + hi) / 2
                f_mid = measure(mid)
                if abs(f_mid - target) <= tolerance / 3:
                    break
                if (f_mid < target) == declared.rising:
                    lo, f_lo = mid, f_mid
                    if side == -1:
                        f_hi = target + (f_hi - target) / 2  # Illinois: halve the stale end's pull
                    side = -1
                else:
                    hi, f_hi = mid, f_mid
                    if side == 1:
                        f_lo = target + (f_lo - target) / 2
                    side = 1
    best = min(tried, key=lambda v: (abs(tried[v] - target), -v if declared.rising else v))
    measured = tried[best]
    reached = abs(measured - target) <= tolerance
    note = ""
    if not reached and min(tried.values()) <= target <= max(tried.values()):
        note = (f"its {declared.name} moves in steps here: the nearest, {best:g}, spends {measured:.2f} of dense "
                "FLOPs")
    elif not reached:
        lowest, highest = min(tried.values()), max(tried.values())
        note = (f"cannot reach {target:.2f}: over its {declared.name} it spends {lowest:.2f} to {highest:.2f} of "
                f"dense FLOPs here; reported at its nearest point")
    return Solved(name, declared.make(sample, best, user), target, measured, declared.name, best, reached, note,
                  dict(sorted(tried.items())))


def solve_all(vlm, specs: Sequence[str | None], target: float, calibration: Calibration,
              tolerance: float = TOLERANCE) -> list[Solved]:
    return [solve(vlm, spec, target, calibration, tolerance) for spec in specs]


def budget_policies() -> list[str]:
    """With no --policies, --budget runs dense and every registered policy that has a knob, in registry order
    (mod with the checkpoint's shipped router when it has one)."""
    from streamvlm.routers.registry import KNOBS, policies

    return ["dense"] + [p.name for p in policies() if p.name in KNOBS]
