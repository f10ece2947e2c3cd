"""Calibration: choosing a policy's setting from measurements on a few clips.

`heads`: YOPO's inactive-head mask (`calibrate_heads`, which lives with its policy in routers/head_prune.py so
that compare can calibrate its default without importing this module).
`schedule`: a per-layer keep schedule by G-Search (greedy) or P-Sigmoid (Bayesian optimisation: a Gaussian-
process sampler as the paper does, or TPE). Both keep the first layer dense (r_0 = 1): the paper excludes it.

`yopo`: the combined YOPO policy of a spec with its head mask (`calibrate_yopo`, with its policy in
routers/yopo.py): the heads' scores of `heads`, keeping the spec's fraction of heads.

`vtw`: VTW's choice of the layer from which vision tokens are withdrawn: the first layer L at which
dropping vision tokens from L on keeps the answer distribution within a KL threshold of dense, averaged over
calibration clips (VTW used about 20 samples and 0.003 for 7B models). KL is measured on the dense model's
own greedy answer, teacher-forced, as `streamvlm compare` does.
"""

from __future__ import annotations

import logging
from pathlib import Path

from streamvlm.compare import compare
from streamvlm.errors import StreamVLMError
from streamvlm.routers.head_prune import HeadPruneConfig
from streamvlm.routers.schedule import ScheduleConfig, sigmoid_schedule

logger = logging.getLogger(__name__)


def calibrate_vtw(vlm, clips: list, questions: list[str], threshold: float, max_new_tokens: int = 16) -> dict:
    """clips: uint8 frame tensors (T, H, W, 3). Returns {"layer", "threshold", "kl_per_layer"}."""
    if not clips or not questions:
        raise StreamVLMError("calibration needs at least one clip and one question")
    layers = vlm.adapter.decoder.num_layers
    policies = [f"layer_drop:{layer}" for layer in range(1, layers)]
    totals = [0.0] * len(policies)
    count = 0
    for frames in clips:
        for question in questions:
            rows = compare(vlm, frames, question, policies, max_new_tokens=max_new_tokens, repeats=1)
            totals = [t + r["kl"] for t, r in zip(totals, rows)]
            count += 1
    kl = {layer: total / count for layer, total in zip(range(1, layers), totals)}
    chosen = next((layer for layer in kl if kl[layer] <= threshold), layers)
    logger.info("VTW: layer %d (KL %s)", chosen, {k: round(v, 5) for k, v in kl.items()})
    return {"layer": chosen, "threshold": threshold, "kl_per_layer": kl, "samples": count}


def save_vtw(vlm, result: dict, out_dir: str | Path) -> Path:
    from streamvlm.routers import save_router

    parts = vlm.adapter.decoder
    router = vlm.with_routing(f"layer_drop:{result['layer']}").router
    return save_router(router, out_dir, parts.num_layers, parts.hidden_size)


def save_heads(vlm, result: dict, out_dir: str | Path) -> Path:
    from streamvlm.routers import save_router

    parts = vlm.adapter.decoder
    router = vlm.with_routing(HeadPruneConfig(pruned=result["pruned"])).router
    return save_router(router, out_dir, parts.num_layers, parts.hidden_size)


def yopo_spec(spec: str):
    """--spec of `calibrate yopo` -> its YopoConfig, or a StreamVLMError that says what it takes."""
    from streamvlm.routers import parse_routing
    from streamvlm.routers.yopo import GRAMMAR, YopoConfig

    config = parse_routing(spec)
    if not isinstance(config, YopoConfig):
        raise StreamVLMError(f"calibrate yopo: --spec takes a yopo spec, {GRAMMAR}, not {spec!r}")
    return config


def save_yopo(vlm, result: dict, out_dir: str | Path) -> Path:
    from streamvlm.routers import save_router

    parts = vlm.adapter.decoder
    router = vlm.with_routing(result["config"]).router
    return save_router(router, out_dir, parts.num_layers, parts.hidden_size)


GRID = (1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.0625)
"""Keep ratios G-Search tries at each layer."""


def _mean_kl_and_flops(vlm, clips: list, questions: list[str], policies: list[str], max_new_tokens: int):
    """Per policy: (mean KL to dense, mean LLM FLOPs fraction) over every clip and question."""
    kl = [0.0] * len(policies)
    flops = [0.0] * len(policies)
    count = 0
    for frames in clips:
        for question in questions:
            for i, row in enumerate(compare(vlm, frames, question, policies, max_new_tokens, repeats=1)):
                kl[i] += row["kl"]
                flops[i] += row["flops_fraction"]
            count += 1
    return [k / count for k in kl], [f / count for f in flops]


def _schedule_spec(keep) -> str:
    return ScheduleConfig(keep=tuple(keep)).spec()


def search_greedy(vlm, clips: list, questions: list[str], tolerance: float, max_new_tokens: int = 16,
                  grid: tuple[float, ...] = GRID) -> dict:
    """G-Search: from shallow to deep, the smallest keep ratio at each layer (no larger than the layer
    before's, the later layers following it) whose schedule keeps the mean KL to dense within tolerance. The
    first layer stays dense (the paper excludes it), so the search starts at layer 1."""
    layers = vlm.adapter.decoder.num_layers
    keep = [1.0] * layers
    for layer in range(1, layers):
        candidates = [r for r in grid if r <= keep[layer - 1]]
        trials = [keep[:layer] + [r] * (layers - layer) for r in candidates]
        kls, _ = _mean_kl_and_flops(vlm, clips, questions, [_schedule_spec(t) for t in trials], max_new_tokens)
        passing = [r for r, k in zip(candidates, kls) if k <= tolerance]
        keep[layer] = min(passing) if passing else candidates[0]
        keep[layer + 1:] = [keep[layer]] * (layers - layer - 1)
    kl, flops = _mean_kl_and_flops(vlm, clips, questions, [_schedule_spec(keep)], max_new_tokens)
    return {"method": "greedy", "keep": keep, "kl": kl[0], "flops_fraction": flops[0], "tolerance": tolerance}


SAMPLERS = ("gp", "tpe")
"""P-Sigmoid's Bayesian optimisation: "gp", a Gaussian-process sampler with expected improvement (optuna's
GPSampler, the paper's kind of BO), or "tpe", optuna's tree-structured Parzen estimator."""


def search_sigmoid(vlm, clips: list, questions: list[str], flops_budget: float, trials: int = 20,
                   max_new_tokens: int = 16, seed: int = 0, sampler: str = "gp") -> dict:
    """P-Sigmoid with Bayesian optimisation: the sigmoid schedule with the lowest calibration loss (mean KL to
    dense on the dense model's own answers) among those whose LLM FLOPs stay within `flops_budget` of dense.
    A trial over the budget scores its loss plus a penalty that grows with the excess, so the sampler learns
    where the budget's edge is."""
    if sampler not in SAMPLERS:
        raise StreamVLMError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    try:
        import optuna
        if sampler == "gp":
            import scipy  # noqa: F401  (optuna's GPSampler optimises its acquisition with scipy)
    except ImportError:
        raise StreamVLMError("the sigmoid search needs optuna (and scipy for --sampler gp): "
                             "pip install 'streamvlm[calibrate]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    layers = vlm.adapter.decoder.num_layers
    results: dict[int, tuple[float, float, list[float]]] = {}

    def objective(trial) -> float:
        keep = sigmoid_schedule(layers, trial.suggest_float("steepness", 0.1, 5.0, log=True),
                                trial.suggest_float("midpoint", 0.0, layers - 1.0),
                                trial.suggest_float("floor", 0.05, 0.9))
        kl, flops = _mean_kl_and_flops(vlm, clips, questions, [_schedule_spec(keep)], max_new_tokens)
        results[trial.number] = (kl[0], flops[0], keep)
        return kl[0] if flops[0] <= flops_budget else kl[0] + 10.0 + (flops[0] - flops_budget)  # over budget

    chosen = (optuna.samplers.GPSampler(seed=seed) if sampler == "gp"
              else optuna.samplers.TPESampler(seed=seed))
    study = optuna.create_study(direction="minimize", sampler=chosen)
    study.optimize(objective, n_trials=trials)
    within = {n: r for n, r in results.items() if r[1] <= flops_budget}
    if not within:
        raise StreamVLMError(f"no sigmoid schedule in {trials} trials stayed within {flops_budget:.0%} of dense "
                             "FLOPs; raise --flops-budget or --trials")
    best = min(within, key=lambda n: within[n][0])
    kl, flops, keep = within[best]
    return {"method": "sigmoid", "keep": keep, "kl": kl, "flops_fraction": flops, "flops_budget": flops_budget,
            "params": study.trials[best].params, "trials": trials, "sampler": sampler}


def save_schedule(vlm, result: dict, out_dir: str | Path) -> Path:
    from streamvlm.routers import save_router

    parts = vlm.adapter.decoder
    router = vlm.with_routing(_schedule_spec(result["keep"])).router
    return save_router(router, out_dir, parts.num_layers, parts.hidden_size)
