"""`streamvlm compare`: routing policies side by side on the same model, video and question.

The frames are encoded once (vision is the same for every policy) and each policy ingests them in its own
session, timed. Fidelity to dense is measured on the dense model's own greedy answer, teacher-forced
through each policy: KL(dense || policy) of the next-token distributions over the answer, and the
fraction of answer positions where both put the same token first (top-1 agreement).
"""

from __future__ import annotations

import statistics
import time

import torch

from streamvlm.errors import StreamVLMError
from streamvlm.routers.registry import default_compare_policies


def default_policies(vlm, frames: torch.Tensor, question: str) -> list:
    """Every registered policy at its default setting for this model (Policy.default), in registry order: e.g.
    layer_drop from half the depth, schedule a P-Sigmoid falling to 0.25 at mid-depth, head_prune calibrated
    on the compared clip itself with YOPO's defaults (a real run calibrates on other clips: `streamvlm
    calibrate heads`). The registry, not this module, knows how: compare never imports calibrate, which
    imports compare."""
    return default_compare_policies(vlm, frames, question)


def compare(vlm, frames: torch.Tensor, question: str, policies: list, max_new_tokens: int = 16,
            repeats: int = 3) -> list[dict]:
    """Rows of policy, flops_fraction, kv_fraction, time_ratio, kl, top1_agreement (plus raw figures).

    policies: --routing strings, configs, router folders or Routers."""
    if not policies:
        raise StreamVLMError("no policies to compare")
    models = [vlm.with_routing(policy) for policy in policies]  # before encoding: a router may record the tower
    features = vlm.encode(frames)
    dense = vlm.with_routing("dense")
    reference = dense.session()
    reference.append_encoded(features)
    reference.ask(question, max_new_tokens=max_new_tokens, ignore_stop=True)
    answer = list(reference.turns[-1].answer_ids)

    def run(model) -> tuple[float, torch.Tensor, dict]:
        times = []
        for _ in range(repeats):
            session = model.session()
            start = time.perf_counter()
            session.append_encoded(features)
            times.append(time.perf_counter() - start)
        logits = session.score(question, answer)[:-1].float()  # row i predicts answer token i
        return statistics.median(times), logits, session.stats()

    run(dense)  # warm-up
    dense_s, dense_logits, _ = run(dense)
    dense_logp = dense_logits.log_softmax(-1)
    rows = []
    for model in models:
        seconds, logits, stats = run(model)
        logp = logits.log_softmax(-1)
        kl = (dense_logp.exp() * (dense_logp - logp)).sum(-1).mean()
        rows.append({
            "policy": model.router.spec(), "flops_fraction": stats["flops"]["llm"] / stats["flops"]["llm_dense"],
            "kv_fraction": stats["kv_bytes"] / stats["kv_bytes_dense"], "time_ratio": seconds / dense_s,
            "kl": float(kl), "top1_agreement": float((logits.argmax(-1) == dense_logits.argmax(-1)).float().mean()),
            "ingest_s": seconds, "dense_ingest_s": dense_s, "answer_tokens": len(answer),
        })
    return rows


def solve_budget(vlm, frames: torch.Tensor, question: str, specs: list[str], budget: float,
                 max_new_tokens: int = 16) -> list:
    """--budget: each spec's knob set so that the policy spends `budget` of dense LLM FLOPs on this clip and
    question, measured as `compare` measures (the frames, then the dense model's own answer teacher-forced).
    Returns `streamvlm.budget.Solved` per spec."""
    from streamvlm.budget import Calibration, Question, solve

    features = vlm.encode(frames)
    reference = vlm.with_routing("dense").session()
    reference.append_encoded(features)
    reference.ask(question, max_new_tokens=max_new_tokens, ignore_stop=True)
    answer = tuple(reference.turns[-1].answer_ids)
    calibration = Calibration(((features, None, (Question(question, answer),)),), frames)
    return [solve(vlm, spec, budget, calibration) for spec in specs]


def format_rows(rows: list[dict]) -> str:
    width = max([26] + [len(r["policy"]) + 2 for r in rows])
    lines = [f"{'policy':<{width}}{'LLM FLOPs':>10}{'KV':>7}{'time':>7}{'KL':>9}{'top-1':>7}"]
    notes = []
    for r in rows:
        mark = " *" if r.get("reached") is False else ""
        lines.append(f"{r['policy']:<{width}}{r['flops_fraction']:>10.2f}{r['kv_fraction']:>7.2f}{r['time_ratio']:>7.2f}"
                     f"{r['kl']:>9.4f}{r['top1_agreement']:>7.0%}{mark}")
        if r.get("note"):
            notes.append(f"* {r['policy']}: {r['note']}")
    return "\n".join(lines + notes)
