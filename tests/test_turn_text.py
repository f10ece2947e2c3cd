"""Text a user writes before or between the frames of a turn stays where it stands (`Session.say`).

Before the video it is the turn's preface, placed by the chat template exactly as transformers' processor
places a text part before a video part; between frames it is written as is, between them.
"""

from __future__ import annotations

import pytest

from streamvlm import StreamVLM
from streamvlm.errors import StreamVLMError
from support import hf_inputs, random_frames

PROMPT = "What happens in the video?"
PREFACE = "Watch this clip closely."

# The tiny checkpoints' template with the user's parts written in the order given (as Qwen2-VL's and
# SmolVLM's templates do), instead of media first (as LLaVA-OneVision's does).
IN_ORDER = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'video' %}{{ '<video>' }}"
    "{% elif part['type'] == 'text' %}{{ '\\n' + part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def vlm(tiny_dir):
    return StreamVLM.from_pretrained(tiny_dir)


@pytest.mark.parametrize("template", ["media-first", "in-order"])
def test_a_preface_is_placed_as_the_processor_places_text_before_a_video(vlm, tiny_dir, template):
    chat_template = IN_ORDER if template == "in-order" else None
    if chat_template:
        vlm.tokenizer.chat_template = chat_template
    frames = random_frames(3, seed=1)
    session = vlm.session()
    session.say(PREFACE)
    session.append_frames(frames)
    session.score(PROMPT, [])
    expected = hf_inputs(tiny_dir, vlm.preprocess(frames), PROMPT, (PREFACE,), chat_template)["input_ids"][0].tolist()
    ids = session.token_ids()
    assert ids[:len(expected)] == expected
    preface = vlm.tokenizer(PREFACE, add_special_tokens=False)["input_ids"]
    video = vlm.tokenizer.convert_tokens_to_ids("<video>")
    at = next(i for i in range(len(ids)) if ids[i:i + len(preface)] == preface)
    assert (video in ids[:at]) == (template == "media-first")  # the template decides the side


def test_a_preface_stays_in_the_history_the_next_turn_is_rendered_after(vlm):
    # the next turn's text is the template's rendering after the first turn as it was fed, preface included
    frames = random_frames(2, seed=2)
    session = vlm.session()
    session.say(PREFACE)
    session.append_frames(frames)
    session.score(PROMPT, [5, 6])
    session.score("And then?", [])
    text = vlm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": PREFACE}, {"type": "video"},
                                      {"type": "text", "text": PROMPT}]},
         {"role": "assistant", "content": [{"type": "text", "text": vlm.tokenizer.decode([5, 6])}]},
         {"role": "user", "content": [{"type": "text", "text": "And then?"}]}],
        tokenize=False, add_generation_prompt=True)
    tail = vlm.tokenizer(text.split("<|im_end|>\n", 2)[2], add_special_tokens=False)["input_ids"]
    assert session.token_ids()[-len(tail) - 2:-2] == tail  # the second turn, before its (empty) closing


def test_text_between_frames_is_written_between_them(vlm):
    frames = random_frames(5, seed=3)
    plain = vlm.session()
    plain.append_frames(frames[:2])
    plain.append_frames(frames[2:])
    plain.score(PROMPT, [])
    said = vlm.session()
    said.append_frames(frames[:2])
    said.say("Now the second part:")
    said.append_frames(frames[2:])
    said.score(PROMPT, [])
    between = vlm.tokenizer("Now the second part:", add_special_tokens=False)["input_ids"]
    ids = plain.token_ids()
    video = vlm.tokenizer.convert_tokens_to_ids("<video>")
    after_two = [i for i, tok in enumerate(ids) if tok == video][2 * vlm.adapter.vision.tokens_per_frame - 1] + 1
    assert said.token_ids() == ids[:after_two] + between + ids[after_two:]


def test_text_as_the_question_or_as_a_preface_with_no_question_reads_the_same(vlm):
    # a media-first template writes the text after the video either way: the same prompt, the same answer
    frames = random_frames(3, seed=4)
    asked = vlm.session(max_new_tokens=6)
    asked.append_frames(frames)
    first = asked.ask(PROMPT, ignore_stop=True)
    said = vlm.session(max_new_tokens=6)
    said.say(PROMPT)
    said.append_frames(frames)
    assert said.ask("", ignore_stop=True) == first
    assert said.token_ids() == asked.token_ids()


def test_a_turn_with_no_text_at_all_is_refused(vlm):
    session = vlm.session()
    session.append_frames(random_frames(2, seed=5))
    with pytest.raises(StreamVLMError, match="question is empty"):
        session.ask("")
    with pytest.raises(StreamVLMError, match="takes text"):
        session.say(3)
