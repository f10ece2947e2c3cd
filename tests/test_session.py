"""Sessions: any chunking equals one shot, later questions see the dialogue, exact byte accounting."""

from __future__ import annotations

import pytest
import torch

from streamvlm import StreamVLM
from streamvlm.errors import StreamVLMError
from support import Exchange, Frames, feed_in_chunks, random_frames

QUESTION = "What is on the table?"


@pytest.fixture(scope="module")
def vlm(checkpoints):
    return StreamVLM.from_pretrained(checkpoints["mqa_deep"])


@pytest.mark.parametrize("chunking", [[1] * 6, [2, 2, 2], [6], [1, 4, 1], [5, 1]])
def test_any_chunking_gives_the_one_shot_answer(vlm, chunking):
    frames = random_frames(6, seed=7)
    one_shot = vlm.generate(frames, QUESTION, max_new_tokens=24, ignore_stop=True)

    session = vlm.session()
    feed_in_chunks(session, frames, chunking)
    assert session.ask(QUESTION, max_new_tokens=24, ignore_stop=True) == one_shot
    assert session.stats()["frames"] == 6


def test_chunk_size_inside_the_runtime_does_not_matter(checkpoints):
    frames = random_frames(5, seed=8)
    answers = {
        size: StreamVLM.from_pretrained(checkpoints["gqa"], max_chunk_frames=size).generate(
            frames, QUESTION, max_new_tokens=16, ignore_stop=True)
        for size in (1, 2, 8)
    }
    assert len(set(answers.values())) == 1


def test_later_questions_see_the_dialogue_and_new_frames(vlm, checkpoints, hf_model):
    frames = random_frames(6, seed=9)
    session = vlm.session()
    session.append_frames(frames[:3])
    first = session.ask("What is moving?", max_new_tokens=6, ignore_stop=True)
    session.append_frames(frames[3:])
    second = session.ask("And now?", max_new_tokens=6, ignore_stop=True)
    third_logits = session.score("Where did it go?", [11, 12, 13])
    assert [t.question for t in session.turns] == ["What is moving?", "And now?", "Where did it go?"]
    assert session.turns[0].frames_seen == 3 and session.turns[1].frames_seen == 6

    # The cache holds exactly the dialogue: transformers' forward over the whole sequence, with the
    # two videos in place of their placeholders, gives the same logits for the third answer.
    ids = session.token_ids()
    text = vlm.tokenizer.decode(ids)
    assert text.index("What is moving?") < text.index(first) < text.index("And now?") < text.index("Where did it go?")
    assert second in text
    pixels = torch.stack([vlm.preprocess(frames[:3]), vlm.preprocess(frames[3:])])  # (2 videos, 3, 3, h, w)
    with torch.no_grad():
        logits = hf_model(checkpoints["mqa_deep"])(input_ids=torch.tensor([ids]), pixel_values_videos=pixels).logits[0]
    # The score call closed its turn with "<|im_end|>\n" after the 3 answer tokens.
    closing = len(vlm.tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"])
    theirs = logits[-(closing + 4):-closing]
    assert (third_logits - theirs).abs().max().item() <= 1e-4

    # Dialogue rendered whole by the chat template equals what the session appended turn by turn.
    video = vlm.tokenizer.convert_tokens_to_ids("<video>")
    rendered = vlm.tokenizer.apply_chat_template([
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is moving?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "\ue000"}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And now?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "\ue000"}]},
        {"role": "user", "content": [{"type": "text", "text": "Where did it go?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "\ue000"}]},
    ], tokenize=False)
    pieces = rendered.split("\ue000")
    answers = [list(t.answer_ids) for t in session.turns]
    expected = []
    for i, piece in enumerate(pieces):
        for j, part in enumerate(piece.split("<video>")):
            if j:
                expected += [video] * (3 * vlm.tokens_per_frame + 1)
            expected += vlm.tokenizer(part, add_special_tokens=False)["input_ids"]
        if i < len(answers):
            expected += answers[i]
    assert ids == expected


def test_question_without_frames_and_frames_after_questions(vlm):
    session = vlm.session()
    text = session.ask("Hello?", max_new_tokens=4, ignore_stop=True)
    assert isinstance(text, str) and session.stats()["frames"] == 0
    session.append_frames(random_frames(2, seed=3))
    session.ask("What now?", max_new_tokens=4)
    assert session.turns[-1].frames_seen == 2


def test_ask_stream_pieces_join_to_ask_and_early_stop_closes_the_turn(vlm):
    frames = random_frames(2, seed=5)
    full = vlm.generate(frames, QUESTION, max_new_tokens=12, ignore_stop=True)
    session = vlm.session()
    session.append_frames(frames)
    pieces = list(session.ask_stream(QUESTION, max_new_tokens=12, ignore_stop=True))
    assert "".join(pieces) == full and len(pieces) > 1

    session = vlm.session()
    session.append_frames(frames)
    stream = session.ask_stream(QUESTION, max_new_tokens=12, ignore_stop=True)
    next(stream)
    stream.close()  # the caller stops reading after one piece
    turn = session.turns[0]
    assert len(session.turns) == 1 and 1 <= len(turn.answer_ids) < 12 and turn.stop_reason == "cancelled"
    tokens = session.stats()["tokens"]
    assert session.token_ids()[-2 - len(turn.answer_ids):-2] == list(turn.answer_ids)  # every answer token is cached
    session.ask("Go on.", max_new_tokens=2, ignore_stop=True)  # the session is still usable
    assert session.stats()["tokens"] > tokens


def test_sampling_is_seeded(vlm):
    frames = random_frames(2, seed=6)
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, ignore_stop=True)
    a = vlm.generate(frames, QUESTION, seed=1, **kwargs)
    assert a == vlm.generate(frames, QUESTION, seed=1, **kwargs)
    assert a != vlm.generate(frames, QUESTION, seed=2, **kwargs)
    assert a != vlm.generate(frames, QUESTION, max_new_tokens=16, ignore_stop=True)


def test_stats_bytes_equal_the_cache_tensors(vlm):
    session = vlm.session()
    session.append_frames(random_frames(3, seed=1))
    session.ask(QUESTION, max_new_tokens=5, ignore_stop=True)
    stats = session.stats()
    cache = session.cache
    tensor_bytes = sum(cache.keys(l).nbytes + cache.values(l).nbytes for l in range(cache.num_layers))
    assert stats["kv_bytes"] == tensor_bytes
    parts = vlm.adapter.decoder
    per_entry = 2 * parts.num_kv_heads * parts.head_dim * 4  # float32 keys and values
    assert stats["kv_bytes"] == stats["tokens"] * parts.num_layers * per_entry == stats["kv_bytes_dense"]
    assert stats["kv_entries_per_layer"] == [stats["tokens"]] * parts.num_layers
    assert stats["tokens"] == len(session.token_ids())
    assert stats["kv_bytes_reserved"] >= stats["kv_bytes"]
    assert set(stats["flops"]) == {"vision", "llm", "llm_dense"}
    assert stats["flops"]["llm"] == stats["flops"]["llm_dense"] > 0 and stats["flops"]["vision"] > 0


def test_training_layout_is_what_the_session_feeds(vlm):
    """Training lays a whole dialogue out with the SequenceBuilder; it must equal what a session appends."""
    from streamvlm.sequence import SequenceBuilder, TextPiece, lay_out_dialogue

    tok = vlm.tokenizer
    frames = random_frames(5, seed=4)
    events = [Frames(0, 3), Exchange("What is moving?", "a red square"), Exchange("Where?", "left"),
              Frames(3, 5), Exchange("And now?", "")]
    session = vlm.session()
    session.append_frames(frames[:3])
    session.score("What is moving?", tok("a red square", add_special_tokens=False)["input_ids"])
    session.score("Where?", tok("left", add_special_tokens=False)["input_ids"])
    session.append_frames(frames[3:])
    session.score("And now?", [])

    stops = set(vlm.adapter.stop_token_ids)
    builder = SequenceBuilder(vlm.adapter)
    features = vlm.encode(frames)
    pieces = lay_out_dialogue(builder, events, [float(i) for i in range(5)], lambda a, b: features[a:b], stops)
    builder.place(pieces)
    assert builder.token_ids() == session.token_ids()
    # Targets: the answer tokens and the end-of-turn token after each, nothing else.
    targets = [t for p in pieces if isinstance(p, TextPiece) for t, flag in zip(p.ids, p.targets) if flag]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = (tok("a red square", add_special_tokens=False)["input_ids"] + [im_end]
                + tok("left", add_special_tokens=False)["input_ids"] + [im_end] + [im_end])
    assert targets == expected


@pytest.mark.parametrize("with_video", [True, False])
def test_system_prompt_is_fed_as_the_template_renders_it(vlm, with_video):
    tok = vlm.tokenizer
    messages = [{"role": "system", "content": [{"type": "text", "text": "You watch closely."}]},
                {"role": "user", "content": ([{"type": "video"}] if with_video else [])
                 + [{"type": "text", "text": QUESTION}]}]
    rendered = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))["input_ids"]
    video = tok.convert_tokens_to_ids("<video>")
    expected = []
    for i in rendered:  # the placeholder stands for 2 frames' tokens and the video's closing tail
        expected += [video] * (2 * vlm.tokens_per_frame + 1) if i == video else [i]
    session = vlm.session(system="You watch closely.")
    if with_video:
        session.append_frames(random_frames(2, seed=5))
    session.score(QUESTION, [])
    assert "You watch closely." in tok.decode(expected)
    assert session.token_ids()[:len(expected)] == expected
    assert session.turns[-1].context_tokens == len(expected)


@pytest.mark.parametrize("routing", [None, "mod:0.5", "fastv:2:0.5"])
def test_a_fork_answers_as_a_fresh_session_and_leaves_the_original_alone(vlm, routing):
    model = vlm if routing is None else vlm.with_routing(routing)
    frames = random_frames(5, seed=21)

    def fed():
        session = model.session()
        session.append_frames(frames[:3])
        session.say("Look closely.")
        session.append_frames(frames[3:])
        return session

    original = fed()
    fork = original.fork(max_new_tokens=9)
    # the fork goes first and further: its question, new frames, a second question
    first = fork.ask(QUESTION, ignore_stop=True)
    fork.append_frames(frames[:2])
    fork.ask("And now?", max_new_tokens=5, ignore_stop=True)
    assert first == fed().ask(QUESTION, max_new_tokens=9, ignore_stop=True)
    assert fork.turns[0].answer == first and len(fork.turns[0].answer_ids) == 9  # its own sampling default
    # the original is where it was: its answer is a fresh session's, its figures too
    fresh = fed()
    assert original.ask("What moved?", max_new_tokens=7, ignore_stop=True) == \
        fresh.ask("What moved?", max_new_tokens=7, ignore_stop=True)
    assert original.stats() == fresh.stats()
    assert len(original.turns) == 1 and fork.stats()["frames"] == 7


def test_a_fork_reserves_room_for_its_question_and_answer_but_no_more(vlm):
    from streamvlm.session import FORK_ROOM

    session = vlm.session()
    session.append_frames(random_frames(3, seed=23))
    fork = session.fork(max_new_tokens=8)
    buffers = [fork.cache.keys(layer).data_ptr() for layer in range(fork.cache.num_layers)]
    fork.ask(QUESTION, ignore_stop=True)  # question, 8 tokens, the closing text: no layer's buffers regrow
    assert [fork.cache.keys(layer).data_ptr() for layer in range(fork.cache.num_layers)] == buffers
    huge = session.fork(max_new_tokens=2**31 - 1)  # a client's max_tokens does not size the reservation
    assert huge.cache.reserved_bytes == session.cache.copy(room=FORK_ROOM).reserved_bytes


@pytest.mark.parametrize("ignore_stop", [True, False])  # stopped by max_new_tokens; by the end token
def test_a_last_question_answers_the_same_with_one_forward_fewer_and_ends_the_session(vlm, ignore_stop,
                                                                                         monkeypatch):
    from streamvlm.session import Session

    frames = random_frames(3, seed=24)
    kept, last = vlm.session(), vlm.session()
    for session in (kept, last):
        session.append_frames(frames)
    runs = []
    real = Session._run
    monkeypatch.setattr(Session, "_run", lambda self, *a, **k: runs.append(self) or real(self, *a, **k))
    answer = kept.ask(QUESTION, max_new_tokens=6, ignore_stop=ignore_stop)
    assert last.ask(QUESTION, last=True, max_new_tokens=6, ignore_stop=ignore_stop) == answer
    assert runs.count(last) == runs.count(kept) - 1 and last.turns == kept.turns
    assert last.stats()["kv_entries_per_layer"][0] < kept.stats()["kv_entries_per_layer"][0]
    for more in (lambda: last.ask("And?"), lambda: last.append_frames(frames[:1]), lambda: last.say("Hi"),
                 lambda: last.fork(), lambda: last.score("And?", [3])):
        with pytest.raises(StreamVLMError, match="last question"):
            more()


def test_a_fork_keeps_a_frame_held_for_its_pair(tmp_path):
    from support import tiny_family_checkpoint

    model = StreamVLM.from_pretrained(tiny_family_checkpoint("qwen2_5_vl", tmp_path))
    frames = random_frames(3, seed=22)
    session = model.session()
    session.append_frames(frames)  # Qwen folds frames in pairs: the third waits for its pair
    fork = session.fork()
    fork.append_frames(frames[:1])  # pairs the held frame in the fork only
    alone = model.session()
    alone.append_frames(torch.cat([frames, frames[:1]]))
    assert fork.ask(QUESTION, max_new_tokens=6, ignore_stop=True) == alone.ask(QUESTION, max_new_tokens=6,
                                                                               ignore_stop=True)
    assert session.ask(QUESTION, max_new_tokens=6, ignore_stop=True) == \
        model.generate(frames, QUESTION, max_new_tokens=6, ignore_stop=True)


def test_a_fork_refuses_another_routing(vlm):
    session = vlm.session()
    session.append_frames(random_frames(2, seed=23))
    with pytest.raises(StreamVLMError, match="cannot go on under"):
        session.fork(decoder=vlm.with_routing("mod:0.5").decoder)
    stats, mine = session.fork(decoder=vlm.fork().decoder).stats(), session.stats()
    # a fork's buffers are trimmed to its entries; everything else it reports is the original's
    assert stats.pop("kv_bytes_reserved") < mine.pop("kv_bytes_reserved")
    assert stats == mine


def test_a_fork_under_a_memory_budget_evicts_from_its_own_cache(vlm):
    session = vlm.session(memory_budget=40)
    session.append_frames(random_frames(3, seed=24))
    fork = session.fork()
    before = session.stats()
    fork.append_frames(random_frames(6, seed=25))  # past the budget: the fork evicts
    assert fork.stats()["evicted_entries"] > before["evicted_entries"]
    assert session.stats() == before and fork._memory.cache is fork.cache
    again = session.fork()
    again.append_frames(random_frames(6, seed=25))
    assert again.ask(QUESTION, max_new_tokens=5, ignore_stop=True) == fork.ask(QUESTION, max_new_tokens=5,
                                                                                ignore_stop=True)



@pytest.mark.parametrize("where", ["frames", "answer"])
def test_a_forward_stopped_part_way_leaves_a_session_that_refuses_more(vlm, where):
    """A forward that stops part-way (Ctrl-C, an error) leaves the cache holding part of a chunk: some layers
    have it, the others not. The session then feeds nothing more (not even the interrupted answer's closing
    text) and refuses to go on, naming what happened, rather than answer from that cache; a fork of it too. A
    cancelled request (`streamvlm.cancel`) stops before its forward and is not this."""
    session = vlm.session(max_new_tokens=3)
    session.append_frames(random_frames(2, seed=3))
    real, calls, at_failure = session.cache.extend, [], []

    def interrupted(layer, *args):
        calls.append(layer)
        # frames: the next forward; answer: the one after the question's (the first answer token's)
        if layer == 1 and calls.count(1) == (1 if where == "frames" else 2):
            at_failure.append(session.cache.entries_per_layer)
            raise KeyboardInterrupt
        return real(layer, *args)

    session.cache.extend = interrupted
    with pytest.raises(KeyboardInterrupt):
        if where == "frames":
            session.append_frames(random_frames(1, seed=4))
        else:
            session.ask("What now?", ignore_stop=True)
    session.cache.extend = real
    lengths = session.cache.entries_per_layer
    assert lengths == at_failure[0] and lengths[0] > lengths[1]  # layer 0 holds the chunk, the others not
    for go_on in (lambda: session.ask("What now?"), lambda: session.append_frames(random_frames(1, seed=5)),
                  session.fork):
        with pytest.raises(StreamVLMError, match="part-way.*KeyboardInterrupt"):
            go_on()
