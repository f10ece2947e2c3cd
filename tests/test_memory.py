"""Memory budget: the cache stops growing at the budget, positions stay inside the context, answers work."""

from __future__ import annotations

import pytest
import torch

from streamvlm import StreamVLM, StreamVLMError
from streamvlm.rope import apply_rope, shift_rope
from streamvlm.memory import MemoryBudget
from streamvlm.tiny import TinySpec, write_tiny_checkpoint
from streamvlm.types import TEXT, VISION
from support import random_frames


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    # 4 tokens per frame, 2 layers, a 96-token context.
    return write_tiny_checkpoint(tmp_path_factory.mktemp("short") / "m", TinySpec(max_position_embeddings=96))


def test_shifting_rope_equals_rotating_at_the_new_position(tiny_dir):
    vlm = StreamVLM.from_pretrained(tiny_dir)
    rotary, hd = vlm.adapter.decoder.rotary, vlm.adapter.decoder.head_dim
    keys = torch.randn(2, 5, hd)
    old = torch.tensor([3, 10, 50, 51, 400])
    new = torch.tensor([0, 1, 2, 7, 30])
    cos_o, sin_o = rotary(keys, old[None])
    cos_n, sin_n = rotary(keys, new[None])
    shifted = shift_rope(apply_rope(keys, cos_o[0], sin_o[0]), new - old, rotary.inv_freq)
    # float32 angles of a few hundred radians carry ~1e-5 of rounding; the shift adds no more than that
    assert (shifted - apply_rope(keys, cos_n[0], sin_n[0])).abs().max() < 1e-4


def test_cache_stops_growing_at_the_budget_and_answers_work(short_context):
    vlm = StreamVLM.from_pretrained(short_context)
    session = vlm.session(memory_budget=60)
    frames = random_frames(60, seed=1)
    sizes = []
    for i in range(60):
        session.append_frames(frames[i:i + 1])
        sizes.append(max(session.stats()["kv_entries_per_layer"]))
        if i % 15 == 14:
            session.ask("What is new?", max_new_tokens=4, ignore_stop=True)
            sizes.append(max(session.stats()["kv_entries_per_layer"]))
    stats = session.stats()
    assert max(sizes) <= 60 and sizes[-1] >= 40  # it fills up to the budget and stays there
    per_entry = session.cache.bytes_per_entry
    assert stats["kv_bytes_peak"] <= 60 * 2 * per_entry
    assert stats["evicted_entries"] > 0 and stats["tokens_seen"] > 96  # longer than the model's context
    assert stats["tokens"] <= 96  # renumbered positions stay inside it
    assert len(session.turns) == 4 and all(len(t.answer_ids) == 4 for t in session.turns)
    cache = session.cache
    for layer in range(2):
        pos = cache.positions(layer)
        assert torch.all(pos[1:] > pos[:-1]) and int(pos[-1]) < stats["tokens"]
        # The prefix (sinks) is still there, and the cache holds text and recent vision.
        assert pos[:8].tolist() == list(range(8))
        assert int((cache.kinds(layer) == TEXT).sum()) >= 4  # at least the last answer
        assert 0 < int((cache.kinds(layer) == VISION).sum()) < 60 * 4


def test_without_a_budget_the_same_stream_overflows_the_context(short_context):
    session = StreamVLM.from_pretrained(short_context).session()
    with pytest.raises(StreamVLMError, match="context"):
        for i in range(60):
            session.append_frames(random_frames(1, seed=i))


def test_a_budget_that_is_never_reached_changes_nothing(tiny_dir):
    vlm = StreamVLM.from_pretrained(tiny_dir)
    frames = random_frames(5, seed=2)
    plain = vlm.generate(frames, "What?", max_new_tokens=12, ignore_stop=True)
    session = vlm.session(memory_budget="10MB")
    session.append_frames(frames)
    assert session.ask("What?", max_new_tokens=12, ignore_stop=True) == plain
    assert session.stats()["evicted_entries"] == 0


def test_budget_with_routing_counts_each_layer(short_context):
    vlm = StreamVLM.from_pretrained(short_context, routing="mod:0.5")
    session = vlm.session(memory_budget=40)
    for i in range(40):
        session.append_frames(random_frames(1, seed=i))
    entries = session.stats()["kv_entries_per_layer"]
    assert max(entries) <= 40 and session.stats()["evicted_entries"] > 0
    session.ask("Still there?", max_new_tokens=3)


@pytest.mark.parametrize("spec, tokens, nbytes", [
    ("20000", 20000, None), (512, 512, None), ("64KB", None, 64_000), ("2GiB", None, 2 * 1024**3),
    ("1.5MB", None, 1_500_000),
])
def test_parse(spec, tokens, nbytes):
    budget = MemoryBudget.parse(spec)
    assert (budget.max_tokens, budget.max_bytes) == (tokens, nbytes)


@pytest.mark.parametrize("spec", ["lots", "12 parsecs", "0", "-5"])
def test_parse_rejects(spec):
    with pytest.raises(StreamVLMError):
        MemoryBudget.parse(spec)


def test_budget_too_small_for_the_answer_is_a_clear_error(short_context):
    session = StreamVLM.from_pretrained(short_context).session(memory_budget=30)
    session.append_frames(random_frames(4))
    with pytest.raises(StreamVLMError, match="memory budget"):
        session.ask("What?", max_new_tokens=40)


@pytest.mark.parametrize("budget", ["16MB", 10_000, "auto"])
def test_a_budget_past_the_context_is_clamped_and_the_stream_lives(short_context, budget):
    """A budget is an upper bound: one larger than the 96-token context holds the context at most, and a
    stream three times longer than the context keeps going (it died with "context full" before)."""
    vlm = StreamVLM.from_pretrained(short_context)
    session = vlm.session(memory_budget=budget)
    limit = session.stats()["memory_budget_entries_per_layer"]
    assert limit == (48 if budget == "auto" else 96)
    frames = random_frames(75, seed=2)
    for i in range(0, 75, 3):
        session.append_frames(frames[i:i + 3])
    session.ask("What is new?", max_new_tokens=4, ignore_stop=True)
    stats = session.stats()
    assert stats["tokens_seen"] > 3 * 96 and stats["tokens"] <= 96
    assert max(stats["kv_entries_per_layer"]) <= limit and len(session.turns[-1].answer_ids) == 4


@pytest.mark.parametrize("spec, expected", [
    ("none", None), (None, None), ("NONE", None),
    ("auto", MemoryBudget(context_fraction=0.5)), ("20000", MemoryBudget(max_tokens=20000)),
    (512, MemoryBudget(max_tokens=512)), ("64MB", MemoryBudget(max_bytes=64_000_000)),
    ("2GiB", MemoryBudget(max_bytes=2 * 1024**3)),
])
def test_every_budget_form_is_parsed_in_one_place(spec, expected):
    assert MemoryBudget.parse(spec) == expected


@pytest.mark.parametrize("spec", ["lots", "-5", "0", "12 parsecs", True])
def test_bad_budgets_say_what_to_send(spec):
    with pytest.raises(StreamVLMError, match="budget"):
        MemoryBudget.parse(spec)
