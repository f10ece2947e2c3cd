"""Ours equals transformers: the prompt's tokens, dense logits, and greedy text, at several tiny sizes."""

from __future__ import annotations

import pytest
import torch

from streamvlm import StreamVLM
from support import SPECS, hf_inputs, random_frames

PROMPT = "What happens in the video?"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_prompt_tokens_equal_transformers_processor(checkpoints, name):
    vlm = StreamVLM.from_pretrained(checkpoints[name])
    frames = random_frames(3, seed=1)
    ref = hf_inputs(checkpoints[name], vlm.preprocess(frames), PROMPT)
    session = vlm.session()
    session.append_frames(frames)
    session.score(PROMPT, [])  # feeds the prompt, no answer
    expected = ref["input_ids"][0].tolist()
    # The session also closes the turn after the (empty) answer; the prompt is the prefix.
    assert session.token_ids()[: len(expected)] == expected
    tpf = SPECS[name].tokens_per_frame
    assert expected.count(vlm.tokenizer.convert_tokens_to_ids("<video>")) == 3 * tpf + 1


@pytest.mark.parametrize("name", sorted(SPECS))
def test_dense_logits_equal_transformers_forward(checkpoints, hf_model, name):
    vlm = StreamVLM.from_pretrained(checkpoints[name])
    frames = random_frames(4, seed=2)
    pixels = vlm.preprocess(frames)
    ref = hf_inputs(checkpoints[name], pixels, PROMPT)
    answer = torch.randint(10, 200, (6,), generator=torch.Generator().manual_seed(3)).tolist()

    session = vlm.session()
    session.append_frames(frames)
    ours = session.score(PROMPT, answer)  # (7, vocab)

    ids = torch.cat([ref["input_ids"], torch.tensor([answer])], dim=1)
    with torch.no_grad():
        theirs = hf_model(checkpoints[name])(input_ids=ids, pixel_values_videos=ref["pixel_values_videos"]).logits[0]
    theirs = theirs[-(len(answer) + 1):]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert theirs.std() > 0.1  # the comparison is between informative logits, not near-constant ones


@pytest.mark.parametrize("name", sorted(SPECS))
def test_greedy_text_equals_transformers_generate(checkpoints, hf_model, name):
    vlm = StreamVLM.from_pretrained(checkpoints[name])
    frames = random_frames(3, seed=4)
    ref = hf_inputs(checkpoints[name], vlm.preprocess(frames), PROMPT)
    with torch.no_grad():
        out = hf_model(checkpoints[name]).generate(**ref, max_new_tokens=24, do_sample=False, eos_token_id=None)
    theirs = out[0, ref["input_ids"].shape[1]:].tolist()
    assert len(theirs) == 24

    session = vlm.session()
    session.append_frames(frames)
    text = session.ask(PROMPT, max_new_tokens=24, ignore_stop=True)
    assert list(session.turns[-1].answer_ids) == theirs
    assert text == vlm.tokenizer.decode(theirs, skip_special_tokens=True)
    assert len(set(theirs)) > 1  # not a degenerate single-token answer

    # The one-shot API builds the same prompt and gives the same text.
    assert vlm.generate(frames, PROMPT, max_new_tokens=24, ignore_stop=True) == text


def test_generation_stops_at_end_of_turn_like_transformers(tiny_dir, hf_model):
    vlm = StreamVLM.from_pretrained(tiny_dir)
    # Look for a clip whose greedy answer ends early at the end-of-turn token, and check the stop.
    for seed in range(40):
        frames = random_frames(2, seed=100 + seed)
        ref = hf_inputs(tiny_dir, vlm.preprocess(frames), PROMPT)
        with torch.no_grad():
            out = hf_model(tiny_dir).generate(**ref, max_new_tokens=40, do_sample=False)
        theirs = out[0, ref["input_ids"].shape[1]:].tolist()
        if len(theirs) < 40:
            break
    else:
        pytest.fail("no clip in 40 ended before 40 tokens; the stop path was not exercised")
    assert theirs[-1] in vlm.adapter.stop_token_ids
    session = vlm.session()
    session.append_frames(frames)
    session.ask(PROMPT, max_new_tokens=40)
    assert list(session.turns[-1].answer_ids) == theirs[:-1]  # the stop token is not part of the answer
    assert session.turns[-1].stop_reason == "stop_token"
