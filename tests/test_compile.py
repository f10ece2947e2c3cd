"""The compiled decode step: one graph serves every decode step as the cache grows (its buffers doubling
included), answers and figures equal eager's, and the FLOP counter stays outside the graph."""

from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

from streamvlm import StreamVLM
from support import random_frames

QUESTION = "What is moving?"


def _compare(model_dir, routing) -> None:
    """Eager and compiled sessions on the same frames and questions: the compiled one adds exactly one graph
    over 63 + 199 decode steps (its buffers doubling in between), and answers and figures are equal."""
    eager = StreamVLM.from_pretrained(model_dir, routing=routing)
    compiled = StreamVLM.from_pretrained(model_dir, routing=routing, compile=True)
    if routing is not None:  # random scorers, so the routed prefill really drops tokens
        with torch.no_grad():
            for model in (eager, compiled):
                g = torch.Generator().manual_seed(0)
                for p in model.router.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
    frames = random_frames(3, seed=1)
    sessions = []
    for model in (eager, compiled):
        s = model.session()
        s.append_frames(frames)
        sessions.append(s)
    before = counters["stats"]["unique_graphs"]
    answers = [s.ask(QUESTION, max_new_tokens=64, ignore_stop=True) for s in sessions]
    assert counters["stats"]["unique_graphs"] - before == 1
    reserved = sessions[1].cache.reserved_bytes
    # A longer answer grows every layer past its buffer: new shapes and strides, still the same graph.
    answers += [s.ask("And then?", max_new_tokens=200, ignore_stop=True) for s in sessions]
    assert sessions[1].cache.reserved_bytes > reserved
    assert counters["stats"]["unique_graphs"] - before == 1
    assert not counters["graph_break"]
    assert answers[0] == answers[1] and answers[2] == answers[3]
    stats = [s.stats() for s in sessions]
    for key in ("flops", "tokens_processed_per_layer", "kv_entries_per_layer", "kv_bytes"):
        assert stats[0][key] == stats[1][key]
    if routing is not None:
        assert stats[1]["flops"]["llm"] < stats[1]["flops"]["llm_dense"]
    assert compiled.with_routing(None).decoder.compiled  # a model made from a compiled one stays compiled


@pytest.mark.slow
def test_compiled_decode_compiles_once_per_model_and_answers_as_eager(checkpoints):
    torch._dynamo.reset()  # a graph of an earlier test's model would be a cache hit here
    # Two models in one process share `_layer_step`'s compiled graphs: the second (other head counts) gets
    # its own graph, with static head dims (automatic dynamic shapes would make them symbolic).
    _compare(checkpoints["mqa_deep"], "mod:0.5:interleaved")
    _compare(checkpoints["gqa"], None)


@pytest.mark.slow
def test_bench_dense_reports_decode_eager_and_compiled(checkpoints, capsys):
    from streamvlm.cli import main

    assert main(["bench", "dense", "--model", str(checkpoints["gqa"]), "--frames", "1", "--new-tokens", "3",
                 "--repeats", "1", "--compile", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    decode = result["decode_ms_per_token"]
    assert set(decode) == {"eager", "compiled", "step_ms", "kernel_ms", "kernel_share", "compile_bound",
                           "compile_s", "break_even_tokens"}
    assert decode["compile_s"] >= 0  # 0 where this process compiled the step already (an earlier test)
    gain = decode["eager"] - decode["compiled"]
    assert decode["break_even_tokens"] == (round(decode["compile_s"] * 1e3 / gain) if gain > 0 else None)
    assert 0 < decode["kernel_ms"] and 0 < decode["kernel_share"] <= 1
    assert decode["compile_bound"] == pytest.approx(1 / decode["kernel_share"])
