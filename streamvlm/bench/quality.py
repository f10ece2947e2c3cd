"""`streamvlm bench quality`: what each router costs in answer accuracy, on held-out world videos.

The videos come from the procedural world (`streamvlm.world`) drawn with a seed that no training run uses
(default 1234; any seed works), written as MP4 and read back at 1 frame per second, as in training. Each
video has questions asked mid-stream (answers as of that moment) and questions asked at its end. Every
question is answered by its own fresh session that has streamed the frames up to the question's time, so
an error never carries into the next question and each figure is what a user asking once about a stream
gets.

An answer is right when its first word is the expected word. Frames are encoded once per video and shared
by every policy: the vision tower does not route. `random:KEEP` and `uniform:KEEP` route the layers that
`mod:KEEP` routes (the checkpoint's own router's, when it ships one), so they spend the same budget.
`flops_fraction` and `kv_fraction` are the language model's analytic FLOPs and its KV bytes at the answer,
summed over all sessions, as fractions of the same sessions run dense. `accuracy_by_objects` splits the
accuracy (overall and per kind) by how many objects were in view when the question was asked: with more in
view, an answer must be bound to the object the question names.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_SEED = 1234
"""Held out: training uses seeds 0 (train) and 1 (validation)."""
FPS = 1.0
_WORD = re.compile(r"[a-z]+")


def first_word(text: str) -> str:
    match = _WORD.search(text.lower())
    return match.group(0) if match else ""


def heldout_set(seed: int, num_videos: int) -> Path:
    """The held-out videos and records, generated once per (seed, count) in the cache folder."""
    from streamvlm import world
    from streamvlm.paths import cache_dir

    return world.generate(cache_dir() / "world-heldout" / f"seed-{seed}-n{num_videos}", num_videos, seed)


def chance_by_kind(questions) -> dict[str, float]:
    """Expected accuracy of guessing uniformly among a question template's possible answers, per kind."""
    from streamvlm import world

    totals, counts = defaultdict(float), defaultdict(int)
    for q in questions:
        totals[q.kind] += 1 / len(world.ANSWERS[q.template])
        counts[q.kind] += 1
    return {kind: totals[kind] / counts[kind] for kind in sorted(counts)}


def same_layers_as_mod(base, policy: str) -> str:
    """random:KEEP / uniform:KEEP -> the same baseline on the layers mod:KEEP routes for this model (e.g.
    random:0.2:all:1 when the checkpoint's router leaves layer 0 dense); any other policy unchanged."""
    from dataclasses import replace

    name, *rest = policy.split(":")
    if name not in ("random", "uniform") or len(rest) != 1:
        return policy
    config = base.with_routing(f"mod:{rest[0]}").router.config
    return policy if config.schedule == "explicit" else replace(config, policy=name).spec()


def _answer(vlm, features: torch.Tensor, times: list[float], question, max_new_tokens: int) -> tuple[str, dict, tuple]:
    """A fresh session: the frames up to the question's time, then the question. Returns (answer, stats, (the
    seconds feeding the frames took, its LLM FLOPs, their dense count))."""
    session = vlm.session(max_new_tokens=max_new_tokens)
    upto = sum(1 for t in times if t <= question.time + 1e-6)
    start = time.perf_counter()
    session.append_encoded(features[:upto], times[:upto])
    fed = time.perf_counter() - start
    flops = session.stats()["flops"]
    return session.ask(question.text), session.stats(), (fed, flops["llm"], flops["llm_dense"])


CALIBRATION_SEED = 4321
"""--budget's calibration videos (FLOPs only): neither training's seeds nor the held-out default."""


def world_calibration(base, num_videos: int = 2, seed: int = CALIBRATION_SEED):
    """--budget's calibration set: world videos of another seed, each question answered teacher-forced with its
    expected word, after the frames up to its time (as the bench asks it)."""
    from streamvlm import world
    from streamvlm.budget import Calibration, Question
    from streamvlm.video.files import read_video

    folder = heldout_set(seed, num_videos)
    clips, first = [], None
    for index in range(num_videos):
        _, mid, end = world.make_video(seed, index)
        clip = read_video(folder / world.video_name(index), fps=FPS)
        times = clip.timestamps.tolist()
        questions = tuple(Question(q.text, tuple(base.tokenizer.encode(q.answer, add_special_tokens=False)),
                                   sum(1 for t in times if t <= q.time + 1e-6)) for q in mid + end)
        clips.append((base.encode(clip.frames), tuple(times), questions))
        first = clip.frames if first is None else first
    return Calibration(tuple(clips), first)


def _entries(base, policies, budgets, calibration_videos: int) -> list[dict]:
    """The rows to run: {"key", "policy", "routing", and for a budget "budget", "knob", "knob_value",
    "reached", "note", "calibration_flops"}. Dense runs once and serves every budget."""
    if not budgets:
        return [{"key": p, "policy": p, "routing": same_layers_as_mod(base, p)} for p in policies]
    from streamvlm.budget import budget_policies, solve

    calibration = world_calibration(base, calibration_videos)
    specs = list(policies or budget_policies())
    entries = [{"key": "dense", "policy": "dense", "routing": "dense"}] if "dense" in specs else []
    for budget in budgets:
        for spec in specs:
            if spec == "dense":
                continue
            solved = solve(base, spec, budget, calibration)
            logger.info("budget %.2f: %s -> %s (%.3f)", budget, spec, solved.spec, solved.flops_fraction)
            entries.append({"key": f"{spec}@{budget:g}", "policy": spec, "routing": solved.routing,
                            "budget": budget, "knob": solved.knob, "knob_value": solved.value,
                            "reached": solved.reached, "note": solved.note,
                            "calibration_flops": solved.flops_fraction})
    return entries


def run_quality_bench(model_dir: Path, policies: tuple[str, ...] | None, seed: int, num_videos: int, device, dtype,
                      max_new_tokens: int = 4, budgets: tuple[float, ...] = (), calibration_videos: int = 2) -> dict:
    """policies: --routing specs, or None for the registry's default rows for this model (each policy's
    `quality` settings: dense, mod:0.5, mod:0.2, random:0.2, uniform:0.2, layer_drop at half the depth, fastv,
    cls_knee for the built-in policies). budgets: run each policy (default: dense and every policy with a knob)
    set to each fraction of dense LLM FLOPs (`streamvlm.budget`), its knob solved on `calibration_videos` world
    videos of another seed."""
    from tqdm import tqdm

    from streamvlm import world
    from streamvlm.routers.registry import default_quality_policies
    from streamvlm.runtime import StreamVLM
    from streamvlm.video.files import read_video

    started = time.perf_counter()
    folder = heldout_set(seed, num_videos)
    base = StreamVLM.from_pretrained(model_dir, device=device, dtype=dtype)
    if not budgets:
        policies = tuple(policies or default_quality_policies(base))
    entries = _entries(base, policies, budgets, calibration_videos)
    models = {e["key"]: base.with_routing(e["routing"]) for e in entries}
    # A policy that cannot reach several budgets lands on the same setting for each: run it once.
    first_of: dict[str, str] = {}
    same = {key: first_of.setdefault(repr(model.router.config), key) if not list(model.router.parameters()) else key
            for key, model in models.items()}  # a router with weights is its own (two folders, one config)
    keys = list(models)
    runs = {key: models[key] for key in keys if same[key] == key}
    right = {p: defaultdict(int) for p in keys}
    right_template = {p: defaultdict(int) for p in keys}
    asked = defaultdict(int)
    asked_template = defaultdict(int)
    # (kind, objects in view when asked): where more objects are in view, an answer must be bound to
    # the one the question names
    right_crowd = {p: defaultdict(int) for p in keys}
    asked_crowd = defaultdict(int)
    flops = {p: [0.0, 0.0] for p in keys}  # [llm, llm_dense]
    ingest = {p: [0.0, 0.0, 0.0] for p in keys}  # [seconds, llm FLOPs, llm_dense FLOPs] of feeding the frames
    kv = {p: [0, 0] for p in keys}  # [kv_bytes, kv_bytes_dense]
    seconds = {p: 0.0 for p in keys}
    all_questions = []
    for index in tqdm(range(num_videos), desc="quality", unit="video", disable=num_videos < 20):
        video, mid, end = world.make_video(seed, index)
        clip = read_video(folder / world.video_name(index), fps=FPS)
        features = base.encode(clip.frames)
        times = clip.timestamps.tolist()
        for q in mid + end:
            all_questions.append(q)
            asked[q.kind] += 1
            asked_template[q.template] += 1
            crowd = (q.kind, len(video.visible(q.time)))
            asked_crowd[crowd] += 1
            for policy, vlm in runs.items():
                start = time.perf_counter()
                answer, stats, fed = _answer(vlm, features, times, q, max_new_tokens)
                seconds[policy] += time.perf_counter() - start
                correct = first_word(answer) == q.answer
                right[policy][q.kind] += correct
                right_template[policy][q.template] += correct
                right_crowd[policy][crowd] += correct
                flops[policy][0] += stats["flops"]["llm"]
                flops[policy][1] += stats["flops"]["llm_dense"]
                kv[policy][0] += stats["kv_bytes"]
                kv[policy][1] += stats["kv_bytes_dense"]
                for i, value in enumerate(fed):
                    ingest[policy][i] += value
    total = sum(asked.values())
    dense_ingest = ingest["dense"][0] if "dense" in ingest else None
    rows = []
    for entry in entries:
        policy, vlm = same[entry["key"]], models[entry["key"]]
        seconds_in, llm_in, dense_in = ingest[policy]
        rows.append({
            "policy": entry["policy"],
            "router": vlm.router.spec(),
            **{k: entry[k] for k in ("budget", "knob", "knob_value", "reached", "note", "calibration_flops")
               if k in entry},
            "accuracy": sum(right[policy].values()) / total,
            "accuracy_by_kind": {kind: right[policy][kind] / asked[kind] for kind in sorted(asked)},
            "accuracy_by_question": {t: right_template[policy][t] / asked_template[t] for t in sorted(asked_template)},
            "accuracy_by_objects": _by_objects(right_crowd[policy], asked_crowd),
            "flops_fraction": flops[policy][0] / flops[policy][1],
            "kv_fraction": kv[policy][0] / kv[policy][1],
            "ingest_flops_fraction": llm_in / dense_in,
            "predicted_ingest_speedup": dense_in / llm_in,
            "measured_ingest_speedup": dense_ingest / seconds_in if dense_ingest else None,
            "seconds": seconds[policy],
            "questions": total, "questions_by_kind": dict(sorted(asked.items())),
            "questions_by_objects": _by_objects(asked_crowd),
            "chance_by_kind": chance_by_kind(all_questions), "seed": seed, "videos": num_videos,
        })
    parts = base.adapter.decoder
    return {
        "suite": "quality", "device": str(base.adapter.device), "dtype": str(base.adapter.dtype).replace("torch.", ""),
        "model": {"dir": str(model_dir), "layers": parts.num_layers, "hidden": parts.hidden_size,
                  "tokens_per_frame": base.tokens_per_frame},
        "seed": seed, "videos": num_videos, "fps": FPS, "questions": total, "budgets": list(budgets),
        "questions_by_kind": dict(sorted(asked.items())), "chance_by_kind": chance_by_kind(all_questions),
        "questions_by_objects": _by_objects(asked_crowd), "run_seconds": time.perf_counter() - started,
        "rows": rows,
    }


def _by_objects(counts: dict, asked: dict | None = None) -> dict[str, dict[str, float]]:
    """Counts keyed by (kind, objects in view) -> {"all" or a kind: {objects in view: count}}, or with
    `asked` (the questions' counts, same keys), {...: {...: accuracy}}."""
    totals: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for (kind, n), count in (asked or counts).items():
        for group in ("all", kind):
            totals[group][str(n)][0] += counts.get((kind, n), 0)
            totals[group][str(n)][1] += count
    return {group: {n: (r / a if asked else r) for n, (r, a) in sorted(by_n.items())}
            for group, by_n in sorted(totals.items(), key=lambda kv: kv[0] != "all")}


def _label(row: dict) -> str:
    return row["policy"] if row.get("budget") is None else f"{row['policy']} @{row['budget']:g}"


def format_quality(result: dict) -> str:
    kinds = list(result["questions_by_kind"])
    budgeted = bool(result.get("budgets"))
    width = max([14] + [len(_label(r)) + 2 for r in result["rows"]]) if budgeted else 14
    head = f"{'policy':<{width}}{'accuracy':>9}" + "".join(f"{k:>11}" for k in kinds) + f"{'LLM FLOPs':>11}{'KV':>7}"
    if budgeted:
        head += f"{'ingest x':>10}{'FLOPs x':>9}  setting"
    lines = [f"bench quality: {result['videos']} held-out world videos (seed {result['seed']}), "
             f"{result['questions']} questions, {result['device']} {result['dtype']}", head]
    notes = []
    for r in result["rows"]:
        line = (f"{_label(r):<{width}}{r['accuracy']:>9.1%}"
                + "".join(f"{r['accuracy_by_kind'][k]:>11.1%}" for k in kinds)
                + f"{r['flops_fraction']:>11.2f}{r['kv_fraction']:>7.2f}")
        if budgeted:
            measured = r.get("measured_ingest_speedup")
            line += (f"{measured:>10.2f}" if measured else f"{'':>10}") + f"{r['predicted_ingest_speedup']:>9.2f}"
            line += f"  {r['router']}" + (" *" if r.get("reached") is False else "")
            if r.get("note"):
                notes.append(f"* {_label(r)}: {r['note']}")
        lines.append(line)
    lines.append(f"{'chance':<{width}}{'':>9}" + "".join(f"{result['chance_by_kind'][k]:>11.1%}" for k in kinds))
    if budgeted:
        lines.append("ingest x: measured ingest speed-up against dense on this machine; FLOPs x: what the ingest's "
                     "FLOPs predict")
    return "\n".join(lines + notes)
