"""Default prompts: with the built-in model every command asks questions it was trained on (in its 47-word
vocabulary), with another checkpoint plain English ones."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from streamvlm.cli import main
from streamvlm.prompts import BUILTIN_PROMPTS, GENERIC_PROMPTS, default_prompts
from streamvlm.session import Session
from streamvlm.world.builtin import BUILTIN_DIR, default_model_dir


@pytest.fixture
def asked(monkeypatch) -> list[str]:
    """Every question a session is asked (the real ask runs)."""
    questions = []
    ask = Session.ask

    def spy(self, question, **sampling):
        questions.append(question)
        return ask(self, question, **sampling)

    monkeypatch.setattr(Session, "ask", spy)
    return questions


def unknown_words(text: str) -> list[str]:
    tokenizer = Tokenizer.from_file(str(BUILTIN_DIR / "tokenizer.json"))
    unk = tokenizer.token_to_id("[UNK]")
    encoding = tokenizer.encode(text, add_special_tokens=False)
    return [text[start:end] for (start, end), i in zip(encoding.offsets, encoding.ids) if i == unk]


def prompts_of(defaults) -> list[str]:
    return [*defaults.ask, defaults.question, defaults.caption, defaults.summary, *defaults.calibrate]


def test_builtin_defaults_are_in_the_builtin_vocabulary():
    for prompt in prompts_of(BUILTIN_PROMPTS):
        assert unknown_words(prompt) == [], prompt
    # the check bites: every plain English default has words the built-in model cannot read
    assert unknown_words("What objects are visible?") == ["visible"]
    for prompt in prompts_of(GENERIC_PROMPTS):
        assert unknown_words(prompt), prompt


def test_which_defaults_a_model_gets(tiny_dir):
    assert default_prompts(None) is BUILTIN_PROMPTS  # no --model: the built-in model
    assert default_prompts(str(default_model_dir())) is BUILTIN_PROMPTS  # named explicitly
    assert default_prompts(tiny_dir) is GENERIC_PROMPTS


def test_caption_asks_the_builtin_model_what_it_knows(cache, tmp_path, asked):
    out = tmp_path / "captions.jsonl"
    assert main(["caption", str(_sample()), "--out", str(out), "--fps", "1",
                 "--segment", "4", "--max-new-tokens", "12", "--no-progress"]) == 0
    assert asked == [BUILTIN_PROMPTS.caption] * 2 + [BUILTIN_PROMPTS.summary]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    # answers in the world's words, not noise: the big red square is there the whole time
    for text in [s["text"] for s in record["segments"]] + [record["summary"]]:
        assert text.startswith("big red square moving right"), text
        assert unknown_words(text) == []


def test_compare_and_calibrate_ask_the_builtin_model_what_it_knows(cache, tmp_path, asked, capsys):
    assert main(["compare", "--model", str(default_model_dir()), "--num-frames", "2", "--policies", "dense",
                 "--repeats", "1", "--max-new-tokens", "2", "--json"]) == 0
    assert asked == [BUILTIN_PROMPTS.question]
    asked.clear()
    assert main(["calibrate", "vtw", "--num-frames", "2", "--max-new-tokens", "2", "--threshold", "1e9",
                 "--out", str(tmp_path / "vtw"), "--json"]) == 0
    assert asked == list(BUILTIN_PROMPTS.calibrate)  # one clip: each question once (compare's dense answer)


def test_other_models_keep_the_generic_defaults(cache, tiny_dir, asked, capsys):
    assert main(["compare", "--model", str(tiny_dir), "--num-frames", "2", "--policies", "dense", "--repeats", "1",
                 "--max-new-tokens", "2"]) == 0
    assert asked == [GENERIC_PROMPTS.question]


def test_help_says_which_default_goes_with_which_model(capsys):
    for command, flag in (("caption", "--prompt"), ("compare", "--question"), ("calibrate", "--question")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "with the built-in model" in text and "otherwise" in text, command
        assert repr(BUILTIN_PROMPTS.question) in text, command


def _sample():
    from streamvlm.world.sample import sample_video

    return sample_video()
