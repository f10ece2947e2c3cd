"""Sessions batched in shared forwards answer exactly as they do alone (streamvlm.batching).

Each session runs on its own thread, as the server runs requests; the batcher's step thread runs what they
hand in together. Greedy answers must be the same tokens as alone. Logits and cached keys are not bit for bit
the same in float32: a matmul over many rows may sum in another order than over one row (BLAS picks its
kernel by shape), so they are bounded at 1e-5 (measured differences are in the last bits).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from streamvlm import StreamVLM
from streamvlm.batching import Batcher
from streamvlm.cores import one_core
from streamvlm.decoder import Work, forward_batch
from streamvlm.sequence import TextPiece
from streamvlm.types import VISION
from support import encode, indexed_frames, random_frames, tiny_family_checkpoint

LOGIT_BOUND = 1e-5


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_5_vl", "qwen3_vl"])
def family_vlm(request, tmp_path_factory):
    return StreamVLM.from_pretrained(tiny_family_checkpoint(request.param, tmp_path_factory.mktemp("batching")))


def _times(count: int) -> list[float]:
    return [0.5 * i for i in range(count)]


def _answer(vlm, frames: int, seed: int, question: str, tokens: int = 10):
    """One request: frames, a question, a greedy answer of `tokens` tokens; (answer ids, scored logits)."""
    session = vlm.session(max_new_tokens=tokens)
    session.append_frames(random_frames(frames, seed=seed), _times(frames))
    session.ask(question, ignore_stop=True)
    logits = session.score("And then?", [7, 8, 9])
    return session.turns[-2].answer_ids, logits, session.stats()


def _in_threads(jobs) -> list:
    out = [None] * len(jobs)
    errors = []

    def run(i):
        try:
            out[i] = jobs[i]()
        except BaseException as e:  # noqa: BLE001 - raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


ROUTINGS = ["dense", "uniform:0.5", "fastv:1:0.5", "skip:parallel:1", "neighbor_attention:3"]


def test_sessions_of_different_lengths_and_routings_answer_as_alone(family_vlm):
    models = [family_vlm.with_routing(spec) for spec in ROUTINGS]
    shapes = [(2, 1), (5, 2), (3, 3), (6, 4), (4, 5)]  # (frames, seed): different lengths
    alone = [_answer(vlm, frames, seed, f"What is {seed}?") for vlm, (frames, seed) in zip(models, shapes)]

    batcher = Batcher(max_batch=4)
    try:
        batched = _in_threads([lambda vlm=vlm.batched(batcher), f=f, s=s: _answer(vlm, f, s, f"What is {s}?")
                               for vlm, (f, s) in zip(models, shapes)])
    finally:
        batcher.close()
    assert batcher.batched > batcher.steps  # some steps did run several sessions
    for (ids, logits, stats), (ids_b, logits_b, stats_b) in zip(alone, batched):
        assert ids_b == ids and len(set(ids)) > 1
        assert (logits_b - logits).abs().max().item() <= LOGIT_BOUND
        assert stats_b["kv_entries_per_layer"] == stats["kv_entries_per_layer"]  # routing stayed per session
        assert stats_b["flops"] == stats["flops"]


def test_one_batched_step_equals_each_chunk_alone(family_vlm):
    # forward_batch itself, on chunks of three kinds: frames ingested, a question's prefill, one answer token
    step = family_vlm.adapter.frames_per_step

    def prepared(seed):
        session = family_vlm.session()
        session.append_frames(random_frames(2 * (1 + seed), seed=seed), _times(2 * (1 + seed)))
        return session

    def chunks(sessions):
        ingest, asked, decoding = sessions
        plan = ingest._seq.plan_frames([[9.0 + j for j in range(step)]])
        features = family_vlm.encode(random_frames(step, seed=7))
        question = asked._open_question("Why?", extra_tokens=1)
        decoding.ask("Where?", max_new_tokens=2)
        return [(ingest, ingest._seq.place(ingest._seq.frame_pieces(plan, features)), "none"),
                (asked, asked._seq.place(list(question.pieces)), "last"),
                (decoding, decoding._seq.place([TextPiece((5,))]), "last")]

    alone_sessions = [prepared(s) for s in range(3)]
    batch_sessions = [prepared(s) for s in range(3)]
    with torch.inference_mode():  # as sessions and the batcher run
        alone = [s._decoder.forward(chunk, s.cache, s.flops, logits) for s, chunk, logits in chunks(alone_sessions)]
        batched = forward_batch([Work(s._decoder, chunk, s.cache, s.flops, logits)
                                 for s, chunk, logits in chunks(batch_sessions)])
    assert batched[0] is None and alone[0] is None
    for i in (1, 2):
        assert (batched[i] - alone[i]).abs().max().item() <= LOGIT_BOUND
    for s, t in zip(alone_sessions, batch_sessions):
        assert t.cache.entries_per_layer == s.cache.entries_per_layer
        assert t.flops.as_dict() == s.flops.as_dict()
        for layer in range(s.cache.num_layers):
            assert (t.cache.keys(layer) - s.cache.keys(layer)).abs().max().item() <= LOGIT_BOUND
            assert (t.cache.values(layer) - s.cache.values(layer)).abs().max().item() <= LOGIT_BOUND


@pytest.mark.parametrize("rope_type, calls", [("default", 1), ("dynamic", 3)])
def test_a_step_computes_its_rope_angles_once_unless_they_hang_on_the_longest_position(family_vlm, monkeypatch,
                                                                                      rope_type, calls):
    # one rotary call for every row of the step; per sequence where the angles would follow the batch's longest
    sessions = [family_vlm.session() for _ in range(3)]
    for i, session in enumerate(sessions):
        session.append_frames(random_frames(2 + 2 * i, seed=i), _times(2 + 2 * i))
    rotary = family_vlm.decoder.parts.rotary
    monkeypatch.setattr(rotary, "rope_type", rope_type, raising=False)
    seen = []
    real = rotary.forward
    monkeypatch.setattr(rotary, "forward", lambda x, ids: seen.append(ids.shape[-1]) or real(x, ids))
    with torch.inference_mode():
        chunks = [s._seq.place(list(s._open_question("Why?", extra_tokens=1).pieces)) for s in sessions]
        forward_batch([Work(s._decoder, c, s.cache, s.flops, "last") for s, c in zip(sessions, chunks)])
    assert len(seen) == calls and sum(seen) == sum(len(c) for c in chunks)


def test_a_request_joining_mid_batch_answers_as_alone(family_vlm):
    want_a = _answer(family_vlm, 3, 1, "First?", tokens=24)[0]
    want_b = _answer(family_vlm, 4, 2, "Second?", tokens=8)[0]
    batcher = Batcher(max_batch=4)
    vlm = family_vlm.batched(batcher)
    midway = threading.Event()
    got = {}

    def first():
        session = vlm.session(max_new_tokens=24)
        session.append_frames(random_frames(3, seed=1), _times(3))
        for i, _ in enumerate(session.ask_stream("First?", ignore_stop=True)):
            if i == 4:
                midway.set()  # the second request starts while this one decodes
        session.score("And then?", [7, 8, 9])
        got["a"] = session.turns[-2].answer_ids

    def second():
        midway.wait(30)
        got["b"] = _answer(vlm, 4, 2, "Second?", tokens=8)[0]

    try:
        _in_threads([first, second])
    finally:
        batcher.close()
    assert got["a"] == want_a and got["b"] == want_b
    assert batcher.batched > batcher.steps


def test_a_cancelled_answer_leaves_the_batch_and_the_others_go_on(family_vlm):
    want = _answer(family_vlm, 3, 5, "Keep going?", tokens=16)[0]
    batcher = Batcher(max_batch=4)
    vlm = family_vlm.batched(batcher)
    got = {}

    def cancelled():
        session = vlm.session(max_new_tokens=16)
        session.append_frames(random_frames(2, seed=6), _times(2))
        stream = session.ask_stream("Stop soon?", ignore_stop=True)
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()  # as the server does when the client disconnects
        got["cancelled"] = session.turns[-1]
        got["steps_then"] = batcher.steps

    def kept():
        got["kept"] = _answer(vlm, 3, 5, "Keep going?", tokens=16)[0]

    try:
        _in_threads([cancelled, kept])
    finally:
        batcher.close()
    assert got["kept"] == want
    turn = got["cancelled"]
    assert len(turn.answer_ids) <= 4 and turn.stop_reason == "cancelled"


def test_a_live_stream_and_a_chat_share_forwards(tmp_path):
    from streamvlm.live import LiveSession
    from streamvlm.video.live import FileSource
    from streamvlm.world.builtin import default_model_dir

    builtin = StreamVLM.from_pretrained(default_model_dir())
    path = tmp_path / "live.mp4"
    encode(path, indexed_frames(16))

    both_fed = threading.Barrier(2, timeout=60)  # the two ask together, whatever the threads' timing

    def live_answer(vlm, together=False):
        with LiveSession(vlm, FileSource(path, fps=8, speed=0), memory_budget=None) as live:
            live.wait()
            if together:
                both_fed.wait()
            return live.ask("what is there now ?", max_new_tokens=12).text

    def chat_answer(vlm, together=False):
        session = vlm.session(max_new_tokens=12)
        session.append_frames(random_frames(6, seed=3), _times(6))
        if together:
            both_fed.wait()
        return session.ask("what is there now ?", ignore_stop=True)

    want_live, want_chat = live_answer(builtin), chat_answer(builtin)
    batcher = Batcher(max_batch=4)
    vlm = builtin.batched(batcher)
    try:
        got_live, got_chat = _in_threads([lambda: live_answer(vlm, True), lambda: chat_answer(vlm, True)])
    finally:
        batcher.close()
    assert (got_live, got_chat) == (want_live, want_chat)
    assert batcher.batched > batcher.steps


def test_a_failing_step_fails_each_of_its_sessions_and_the_batcher_goes_on(family_vlm, monkeypatch):
    batcher = Batcher(max_batch=2)
    vlm = family_vlm.batched(batcher)
    session = vlm.session(max_new_tokens=2)
    session.append_frames(random_frames(2, seed=1), _times(2))
    import streamvlm.batching as batching

    real = batching.forward_batch
    monkeypatch.setattr(batching, "forward_batch", lambda work: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        vlm.session().append_frames(random_frames(2, seed=2), _times(2))
    monkeypatch.setattr(batching, "forward_batch", real)
    assert session.ask("Still there?")  # the batcher survived
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.ask("After close?")


class _Sized:
    """A stand-in chunk of n tokens (the batcher only reads its length)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class _Lengths:
    """A stand-in cache: the batcher reads its lengths before a step, to rewind it should the step fail."""

    entries_per_layer: list[int] = []

    def rewind(self, lengths: list[int]) -> None:
        pass


def _queued(batcher: Batcher, sizes: list[int], logits: str = "last") -> None:
    from streamvlm.batching import _Ticket

    for i, n in enumerate(sizes):  # as Batcher.run hands a chunk in, from thread i
        batcher._queue.append(_Ticket(Work(None, _Sized(n), _Lengths(), None, logits), thread=i))
        batcher._expected.discard(i)


def test_steps_take_chunks_first_fit_in_arrival_order_within_the_batch_and_token_limits():
    batcher = Batcher(max_batch=3, max_step_tokens=100, gather_s=0.0)
    # decodes, a chunk larger than a step (it runs alone, first in line), decodes behind it: the ones that fit
    # go before it rather than wait behind it; a chunk that does not fit beside the first keeps its place
    _queued(batcher, [1, 1, 300, 1, 1, 1, 1, 60, 60])
    steps = []
    while batcher._queue:
        steps.append([len(t.work.chunk) for t in batcher._take()])
    assert steps == [[1, 1, 1], [300], [1, 1, 1], [60], [60]]


def test_answer_tokens_go_on_in_every_step_however_many_long_prefills_wait():
    # three long prompts in pieces, handed in before three sequences' answer tokens: under a strict order the
    # tokens would wait behind every prompt's piece, a step each; here a piece leaves room for one token of
    # each other sequence of the step, and the tokens run beside the first piece
    batcher = Batcher(max_batch=4, max_step_tokens=100, gather_s=0.0)
    assert batcher.piece_tokens == 97
    _queued(batcher, [97, 97, 97, 1, 1, 1])
    steps = []
    while batcher._queue:
        steps.append([len(t.work.chunk) for t in batcher._take()])
    assert steps == [[97, 1, 1, 1], [97], [97]]
    assert Batcher(max_batch=8, max_step_tokens=4).piece_tokens == 2  # never below half the budget
    assert Batcher(max_batch=8, max_step_tokens=1).piece_tokens == 1


def _frames_chunk(vlm, frames: int, seed: int):
    """The chunk a new session places for `frames` frames of tokens (its turn's opening text first), and the
    tokens of a frame."""
    builder = vlm.session()._seq
    step = vlm.adapter.frames_per_step
    plan = builder.plan_frames([[0.5 * (i * step + j) for j in range(step)] for i in range(frames)])
    features = vlm.encode(random_frames(frames * step, seed=seed))
    return builder.place(builder.frame_pieces(plan, features)), builder.tpf


def test_a_chunk_splits_into_pieces_within_the_budget_that_never_cut_a_frame(family_vlm):
    chunk, tpf = _frames_chunk(family_vlm, 4, seed=3)
    frames = chunk.num_frames
    assert frames >= 2 and len(chunk) > tpf * frames  # opening text, then frames
    assert chunk.split(len(chunk)) == [chunk] and len(chunk.split(len(chunk) - 1)) == 2
    for budget in (1, 3, tpf - 1, tpf, tpf + 2, 2 * tpf + 1, len(chunk) - 1):
        pieces = chunk.split(budget)
        # together the pieces are the chunk, token for token
        for field in ("embeds", "positions", "kinds", "frames"):
            assert torch.equal(torch.cat([getattr(p, field) for p in pieces]), getattr(chunk, field))
        if chunk.rope is not None:
            assert torch.equal(torch.cat([p.rope for p in pieces], dim=1), chunk.rope)
        if chunk.deepstack is not None:
            assert torch.equal(torch.cat([p.deepstack for p in pieces], dim=1), chunk.deepstack)
        assert sum(p.num_frames for p in pieces) == frames  # no frame lost, none cut in two
        for p in pieces:
            assert len(p) <= budget or (p.num_frames == 1 and len(p) == tpf > budget)  # only a lone frame is longer
            for start, end in p.frame_spans:
                assert end - start == tpf and bool((p.kinds[start:end] == VISION).all())
                assert p.frames[start:end].unique().numel() == 1
            assert int((p.kinds == VISION).sum()) == p.num_frames * tpf  # every vision token is in a span
    with pytest.raises(ValueError, match="at least 1"):
        chunk.split(0)


def test_a_long_prefill_runs_in_pieces_between_the_others_steps_and_answers_as_alone(family_vlm, monkeypatch):
    # a budget of about one frame: the frames' chunk and the long question both run a piece a step
    long_question = "Describe " + "every little thing you saw there, " * 6 + "please?"
    want_long = _answer(family_vlm, 4, 8, long_question, tokens=6)
    want_short = _answer(family_vlm, 2, 9, "Short?", tokens=12)
    tpf = family_vlm.session()._seq.tpf
    budget = tpf + 4
    import streamvlm.batching as batching

    real = batching.forward_batch
    sizes = []
    monkeypatch.setattr(batching, "forward_batch",
                        lambda work: sizes.append([len(w.chunk) for w in work]) or real(work))
    batcher = Batcher(max_batch=4, max_step_tokens=budget)
    vlm = family_vlm.batched(batcher)
    try:
        got_long, got_short = _in_threads([lambda: _answer(vlm, 4, 8, long_question, tokens=6),
                                           lambda: _answer(vlm, 2, 9, "Short?", tokens=12)])
    finally:
        batcher.close()
    assert max(max(step) for step in sizes) <= budget  # no piece over the budget
    assert max(sum(step) for step in sizes) <= budget  # nor any step
    assert len(family_vlm.tokenizer(long_question)["input_ids"]) > budget  # so the question did run in pieces
    for (ids, logits, stats), (ids_b, logits_b, stats_b) in ((want_long, got_long), (want_short, got_short)):
        assert ids_b == ids and len(set(ids)) > 1
        assert (logits_b - logits).abs().max().item() <= LOGIT_BOUND
        assert stats_b["kv_entries_per_layer"] == stats["kv_entries_per_layer"]
        assert stats_b["flops"] == stats["flops"]  # the pieces cost what the chunk does, dense count included


def test_teacher_forced_logits_of_a_long_answer_in_pieces_equal_alone(family_vlm):
    answer_ids = [(7 * i) % 50 + 5 for i in range(40)]

    def scored(vlm):
        session = vlm.session()
        session.append_frames(random_frames(2, seed=4), _times(2))
        return session.score("What is it?", answer_ids)

    want = scored(family_vlm)
    batcher = Batcher(max_batch=2, max_step_tokens=16)
    try:
        got = scored(family_vlm.batched(batcher))
    finally:
        batcher.close()
    assert batcher.steps >= 4  # the frames and the 40-token answer went through in pieces of at most 16
    assert got.shape == want.shape == (41, want.shape[1])
    assert (got - want).abs().max().item() <= LOGIT_BOUND


def test_a_step_waits_for_a_thread_with_more_pieces_to_hand_in():
    from streamvlm.batching import _Ticket

    batcher = Batcher(max_batch=4, gather_s=0.0)
    batcher._queue.append(_Ticket(Work(None, _Sized(50), _Lengths(), None, "none"), thread=1, more=True))
    batcher._queue.append(_Ticket(Work(None, _Sized(50), _Lengths(), None, "none"), thread=2))
    batcher._take()
    assert batcher._expected == {1}  # its next piece comes at once; the finished ingest's thread is not waited for


def test_a_step_waits_for_the_sequences_it_gave_logits_to_but_not_for_ingests():
    batcher = Batcher(max_batch=4, gather_s=0.5)
    _queued(batcher, [1, 1, 196], logits="last")
    first = batcher._take()
    assert batcher._expected == {0, 1, 2}  # every one of them asked for logits: they are generating
    _queued(batcher, [1])  # thread 0 is back at once; 1 and 2 are not: the step waits out gather_s for them
    start = time.perf_counter()
    assert [t.thread for t in batcher._take()] == [0]
    assert time.perf_counter() - start >= 0.4 and len(first) == 3
    _queued(batcher, [1, 1])  # the last step had thread 0 alone, and it is back: no wait
    start = time.perf_counter()
    assert len(batcher._take()) == 2 and time.perf_counter() - start < 0.4
    _queued(batcher, [196], logits="none")  # an ingest: nobody waits for its thread afterwards
    batcher._take()
    assert batcher._expected == set()


def test_a_last_question_leaves_no_step_waiting_for_its_thread(family_vlm):
    # its turn closes without a chunk: its thread, given logits by the last step, must not be waited for
    want = _answer(family_vlm, 2, 6, "Last?", tokens=4)[0]
    batcher = Batcher(max_batch=4, gather_s=60)
    vlm = family_vlm.batched(batcher)
    left = []

    def last():
        session = vlm.session(max_new_tokens=4)
        session.append_frames(random_frames(2, seed=6), _times(2))
        session.ask("Last?", last=True, ignore_stop=True)
        with batcher._lock:
            left.append(threading.get_ident() in batcher._expected)
        return session.turns[-1].answer_ids

    try:
        assert _in_threads([last])[0] == want
    finally:
        batcher.close()
    assert left == [False]


def test_yopo_layers_run_per_session_inside_a_batched_step(family_vlm):
    # a variant layer (YOPO's window, pruned heads and sparse FFN; vision dropped from layer 1) beside dense
    models = [family_vlm.with_routing("yopo:3:all:0.5:1"), family_vlm]
    alone = [_answer(vlm, 3 + i, i, "Which?") for i, vlm in enumerate(models)]
    batcher = Batcher(max_batch=2)
    try:
        batched = _in_threads([lambda vlm=vlm.batched(batcher), i=i: _answer(vlm, 3 + i, i, "Which?")
                               for i, vlm in enumerate(models)])
    finally:
        batcher.close()
    for (ids, logits, stats), (ids_b, logits_b, stats_b) in zip(alone, batched):
        assert ids_b == ids and (logits_b - logits).abs().max().item() <= LOGIT_BOUND
        assert stats_b["flops"] == stats["flops"]


def _fake_steps(monkeypatch, gate: dict[int, threading.Event] | None = None) -> list:
    """forward_batch replaced: records (running thread, [chunk sizes], intra-op threads) per step and returns
    each chunk's size as its result; a step whose first chunk's size is in `gate` waits for that event."""
    import streamvlm.batching as batching

    steps = []

    def fake(work):
        steps.append((threading.get_ident(), [len(item.chunk) for item in work], torch.get_num_threads()))
        if gate and len(work[0].chunk) in gate:
            gate[len(work[0].chunk)].wait(5)
        return [torch.tensor(len(item.chunk)) for item in work]

    monkeypatch.setattr(batching, "forward_batch", fake)
    return steps


def _hand_in(batcher: Batcher, size: int, logits: str = "none"):
    return batcher.run(Work(None, _Sized(size), _Lengths(), None, logits))


def test_forwards_run_on_the_step_thread_with_every_core_and_the_sessions_threads_on_one(family_vlm,
                                                                                        monkeypatch):
    import streamvlm.batching as batching

    real_forward, real_encode = batching.forward_batch, family_vlm.adapter.encode_frames
    ran = {"forward": set(), "encode": set()}  # (thread, its intra-op threads)

    def forward(work):
        ran["forward"].add((threading.get_ident(), torch.get_num_threads()))
        return real_forward(work)

    def encode(pixels):
        ran["encode"].add((threading.get_ident(), torch.get_num_threads()))
        return real_encode(pixels)

    monkeypatch.setattr(batching, "forward_batch", forward)
    monkeypatch.setattr(family_vlm.adapter, "encode_frames", encode)
    batcher = Batcher(max_batch=4, threads=2)
    callers = set()

    def request(i):
        callers.add(threading.get_ident())
        one_core()  # as the server's, caption's and live streams' threads start
        return _answer(family_vlm.batched(batcher), 2 + i, i, "Hm?")

    try:
        _in_threads([lambda i=i: request(i) for i in range(2)])
    finally:
        batcher.close()
    step_thread = batcher._thread.ident
    assert ran["forward"] == {(step_thread, 2)}
    # each session's own thread encodes its frames, on one core
    assert {t for t, _ in ran["encode"]} == callers and step_thread not in callers
    assert {n for _, n in ran["encode"]} == {1} and not batcher._thread.is_alive()  # close() ended it


def test_chunks_handed_in_during_a_step_run_together_in_the_next(monkeypatch):
    gate = {5: threading.Event()}
    steps = _fake_steps(monkeypatch, gate)
    batcher = Batcher(max_batch=4, gather_s=0.0, threads=2)
    results, after = {}, {}

    def hand_in(size):
        results[size] = _hand_in(batcher, size).item()
        after[size] = torch.get_num_threads()

    first = threading.Thread(target=hand_in, args=(5,))
    first.start()
    while not steps:
        time.sleep(0.01)
    others = [threading.Thread(target=hand_in, args=(size,)) for size in (1, 2)]
    for queued, t in enumerate(others, 1):  # one at a time, so that they queue in this order
        t.start()
        while len(batcher._queue) < queued:
            time.sleep(0.01)
    gate[5].set()
    for t in [first, *others]:
        t.join(5)
    batcher.close()
    # the first step had the first chunk only; the two that came during it ran together, on the same thread
    assert [sizes for _, sizes, _ in steps] == [[5], [1, 2]]
    assert len({thread for thread, _, _ in steps}) == 1 and [n for _, _, n in steps] == [2, 2]
    assert results == {5: 5, 1: 1, 2: 2} and (batcher.steps, batcher.batched) == (2, 3)
    assert after == {5: 1, 1: 1, 2: 1}  # the threads that hand in run on one core


@pytest.mark.parametrize("bad", [{"threads": -1}, {"max_batch": 0}, {"max_step_tokens": 0}])
def test_a_batcher_refuses_counts_below_one_when_made(bad):
    # threads=-1 used to be refused only on the step thread, which then died with every caller waiting on it
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(**bad)


def test_close_fails_what_waits_and_a_gathering_step(monkeypatch):
    _fake_steps(monkeypatch)
    batcher = Batcher(max_batch=4, gather_s=5.0)
    batcher._expected = {-1}  # a thread that never comes back: the step thread gathers for 5 s
    errors = []

    def hand_in():
        try:
            _hand_in(batcher, 1)
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=hand_in)
    start = time.perf_counter()
    t.start()
    while not batcher._queue:
        time.sleep(0.01)
    batcher.close()
    t.join(5)
    assert errors == ["the batcher was closed"] and time.perf_counter() - start < 4
    with pytest.raises(RuntimeError, match="closed"):
        _hand_in(batcher, 1)


def test_a_sequence_failing_inside_a_step_fails_alone_and_the_others_run_as_alone(family_vlm):
    """One sequence's error in a batched step (its router raising at layer 1 here; a failed allocation for its
    own cache's growth would do the same) fails that sequence only. The step's other sequences run again,
    alone, from where they were before the step: their caches hold their chunk once, with what they hold
    alone, and their logits are alone's."""
    import copy

    from streamvlm.batching import _Ticket
    from streamvlm.decoder import Decoder

    class Failing(type(family_vlm.decoder.router)):
        def decide(self, layer, hidden, chunk):
            if layer == 1:
                raise RuntimeError("boom at layer 1")
            return super().decide(layer, hidden, chunk)

    sessions = []
    for i in range(3):
        session = family_vlm.session()
        session.append_frames(random_frames(1 + i, seed=10 + i), _times(1 + i))
        sessions.append(session)
    alone = [s.fork() for s in sessions]
    failing = Decoder(family_vlm.decoder.parts, Failing())
    before = [s.cache.entries_per_layer for s in sessions]
    flops_before = [copy.deepcopy(s.flops) for s in sessions]

    def work(session, decoder=None):
        return Work(decoder or session._decoder, session._seq.place([TextPiece((5, 6, 7))]), session.cache,
                    session.flops)

    with torch.inference_mode():
        tickets = [_Ticket(work(s, failing if i == 1 else None), thread=i) for i, s in enumerate(sessions)]
        Batcher(max_batch=3)._step(tickets)
        expected = [forward_batch([work(s)])[0] for s in alone]

    assert isinstance(tickets[1].error, RuntimeError) and "boom" in str(tickets[1].error)
    assert sessions[1].cache.entries_per_layer == before[1]  # nothing of its chunk is left in its cache
    assert sessions[1].flops == flops_before[1]
    for i in (0, 2):
        assert tickets[i].error is None
        assert torch.allclose(tickets[i].result, expected[i], atol=LOGIT_BOUND, rtol=0)
        assert sessions[i].cache.entries_per_layer == alone[i].cache.entries_per_layer == [n + 3 for n in before[i]]
        assert sessions[i].flops == alone[i].flops
