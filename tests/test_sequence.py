"""The sequence builder lays out a whole dialogue exactly as a session feeds it, for every family.

Training places a dialogue as one chunk; a session places it piece by piece (frames as they come, each
answer token on its own). Both must give the same tokens, embeddings, positions, M-RoPE grids, frame
indices and DeepStack features, or training would not see what inference sees.
"""

from __future__ import annotations

import pytest
import torch

from streamvlm import StreamVLM
from streamvlm.sequence import SequenceBuilder, lay_out_dialogue
from support import Exchange, Frames, random_frames, tiny_family_checkpoint


def _recorded_chunks(vlm) -> list:
    seen = []
    original = vlm.decoder.forward

    def recording(chunk, *args, **kwargs):
        seen.append(chunk)
        return original(chunk, *args, **kwargs)

    vlm.decoder.forward = recording
    return seen


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm"])
def test_builder_lays_out_a_dialogue_as_the_session_feeds_it(family, tmp_path):
    vlm = StreamVLM.from_pretrained(tiny_family_checkpoint(family, tmp_path))
    tok = vlm.tokenizer
    # Odd runs (5 and 3 frames): Qwen-VL pairs the last frame of each with a copy of itself.
    frames = random_frames(8, seed=3)
    times = [0.5 * i for i in range(8)]
    events = [Frames(0, 5), Exchange("What is moving?", "a red square"), Exchange("Where?", "left"),
              Frames(5, 8), Exchange("And now?", "up")]

    chunks = _recorded_chunks(vlm)
    session = vlm.session()
    session.append_frames(frames[:5], times[:5])
    for question, answer in (("What is moving?", "a red square"), ("Where?", "left")):
        session.score(question, tok(answer, add_special_tokens=False)["input_ids"])
    session.append_frames(frames[5:8], times[5:8])
    session.score("And now?", tok("up", add_special_tokens=False)["input_ids"])

    builder = SequenceBuilder(vlm.adapter)
    pixels = vlm.preprocess(frames)
    pieces = lay_out_dialogue(builder, events, times, lambda a, b: vlm.adapter.encode_frames(pixels[a:b]),
                              set(vlm.adapter.stop_token_ids))
    whole = builder.place(pieces)

    assert builder.token_ids() == session.token_ids()
    assert torch.equal(whole.positions, torch.cat([c.positions for c in chunks]))
    assert torch.equal(whole.kinds, torch.cat([c.kinds for c in chunks]))
    assert torch.equal(whole.frames, torch.cat([c.frames for c in chunks]))
    assert torch.allclose(whole.embeds, torch.cat([c.embeds for c in chunks]), atol=1e-5)
    offsets = [0]
    for c in chunks:
        offsets.append(offsets[-1] + len(c))
    spans = [(start + offset, end + offset) for c, offset in zip(chunks, offsets) for start, end in c.frame_spans]
    assert list(whole.frame_spans) == spans
    if vlm.adapter.mrope:
        assert torch.equal(whole.rope, torch.cat([c.rope for c in chunks], dim=1))
    else:
        assert whole.rope is None and all(c.rope is None for c in chunks)
    if vlm.adapter.vision.deepstack:
        assert torch.allclose(whole.deepstack, torch.cat([c.deepstack for c in chunks if c.deepstack is not None],
                                                         dim=1), atol=1e-5)
    else:
        assert whole.deepstack is None
    assert len(chunks) > 5  # the session fed it in pieces: frames, prompts, closings
