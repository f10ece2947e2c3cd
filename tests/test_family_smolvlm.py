"""SmolVLM2 (Idefics3: SigLIP, pixel shuffle, Llama): ours equals transformers on a tiny random checkpoint.

The prompt's tokens equal SmolVLMProcessor's apart from the streaming intro line; dense logits and greedy
text equal transformers' forward and generate; any chunking equals one shot; routing keeps exactly the K/V
the formula says; the live and caption commands run on the checkpoint.
"""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch

from streamvlm import RoutingConfig, StreamVLM
from streamvlm.models.smolvlm import VIDEO_INTRO
from streamvlm.routers import MoDRouter
from streamvlm.routers.config import tokens_kept
from streamvlm.tiny.smolvlm import TinySmolVLMSpec, write_tiny_smolvlm
from streamvlm.types import VISION
from support import check_caption_and_live, random_frames

QUESTION = "What happens in the video?"
TIMES = [0.0, 1.5, 59.9, 61.0]  # stamps 00:00, 00:01, 00:59, 01:01
SPEC = TinySmolVLMSpec()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_smolvlm(tmp_path_factory.mktemp("smolvlm") / "tiny", seed=0)


@pytest.fixture(scope="module")
def vlm(model_dir):
    return StreamVLM.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import SmolVLMForConditionalGeneration

    return SmolVLMForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def _pixel_inputs(vlm, frames) -> dict:
    """Our preprocessed frames as transformers takes one video's frames: (1, T, 3, h, w) and an all-ones
    pixel mask (no frame is padded)."""
    pixels = vlm.preprocess(frames)[None]
    return {"pixel_values": pixels, "pixel_attention_mask": torch.ones(pixels.shape[:2] + pixels.shape[3:],
                                                                      dtype=torch.long)}


def _session(vlm, frames, chunking=None):
    session = vlm.session()
    start = 0
    for size in chunking or [len(frames)]:
        session.append_frames(frames[start:start + size], TIMES[start:start + size])
        start += size
    return session


class _VideoProcessorStandIn:
    """SmolVLM's video processor needs torchvision, which has no CPU build here; this hands the processor
    our pixels and the frames' timestamps, and its own text expansion and tokenization run."""

    def __init__(self, pixels: torch.Tensor, times: list[float]):
        self.pixels, self.times = pixels, times

    def __call__(self, videos, **kwargs):
        from transformers import BatchFeature
        from transformers.video_utils import VideoMetadata

        # timestamps = frames_indices / fps
        metadata = VideoMetadata(total_num_frames=len(self.times), fps=1.0, frames_indices=list(self.times),
                                 duration=self.times[-1])
        return BatchFeature({"pixel_values": self.pixels[None], "video_metadata": [metadata]})


def _processor_ids(model_dir, pixels, times, question) -> list[int]:
    """input_ids of SmolVLMProcessor for one video and one question, with its intro line replaced by ours."""
    from transformers import AutoTokenizer, SmolVLMProcessor
    from transformers.models.smolvlm import processing_smolvlm
    from transformers.processing_utils import ProcessorMixin

    tok = AutoTokenizer.from_pretrained(model_dir)
    seq_len = json.loads((model_dir / "processor_config.json").read_text())["image_seq_len"]
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    # Our template lays a video turn out exactly as the processor's own video template.
    assert text == tok.apply_chat_template(conversation, chat_template=processing_smolvlm.DEFAULT_CHAT_TEMPLATE,
                                           add_generation_prompt=True, tokenize=False)
    # num2words (not installed) only spells the frame count, which the streaming intro drops.
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None), \
            mock.patch.object(processing_smolvlm, "num2words", str), \
            mock.patch.object(processing_smolvlm, "DEFAULT_VIDEO_INTRO", VIDEO_INTRO):
        proc = SmolVLMProcessor(image_processor=None, tokenizer=tok,
                                video_processor=_VideoProcessorStandIn(pixels, times), image_seq_len=seq_len)
        out = proc(text=text, videos=[pixels.numpy()], return_tensors="pt")
    return out["input_ids"][0].tolist()


def test_shape_tokens_and_preprocessing(vlm):
    adapter = vlm.adapter
    assert adapter.family == "smolvlm" and adapter.frames_per_step == 1 and not adapter.mrope
    assert adapter.vision.grid == (4, 4) and vlm.tokens_per_frame == SPEC.tokens_per_frame == 16
    assert adapter.frame_token == "<image>" and adapter.video_token == "<video>"
    assert adapter.assumed_fps == 1.0  # the video processor config's fps
    cfg = adapter.preprocess_config
    assert (cfg.height, cfg.width, cfg.mean, cfg.std) == (32, 32, (0.5,) * 3, (0.5,) * 3)
    assert vlm.preprocess(random_frames(2, height=40, width=52)).shape == (2, 3, 32, 32)
    assert adapter.video_tail().shape == (0, 64)
    assert adapter.stop_token_ids == (vlm.tokenizer.convert_tokens_to_ids("<end_of_utterance>"),)
    assert adapter.frame_text(3, 61.9) == ("\nFrame from 01:01:<fake_token_around_image><global-img>",
                                           "<fake_token_around_image>")


def test_pixel_shuffle_output_is_row_major_on_the_grid(vlm):
    connector = vlm.adapter.model.model.connector
    s, side = connector.scale_factor, SPEC.image_size // SPEC.patch_size
    rows = cols = side // s
    assert vlm.adapter.vision.grid == (rows, cols)
    # Each patch's one feature is its own index; a token's features are the patches folded into it.
    patches = torch.arange(side * side, dtype=torch.float32).view(1, side * side, 1)
    tokens = connector.pixel_shuffle(patches, s)[0]  # (rows * cols, s * s)
    for t in range(rows * cols):
        r, c = divmod(t, cols)
        block = {(r * s + i) * side + c * s + j for i in range(s) for j in range(s)}
        assert set(tokens[t].long().tolist()) == block


def test_prompt_tokens_equal_smolvlm_processor_apart_from_the_intro(vlm, model_dir):
    frames = random_frames(4, seed=1)
    session = _session(vlm, frames)
    session.score(QUESTION, [])  # feeds the prompt and closes the turn
    expected = _processor_ids(model_dir, vlm.preprocess(frames), TIMES, QUESTION)
    assert session.turns[-1].context_tokens == len(expected)
    assert session.token_ids()[: len(expected)] == expected
    assert expected.count(vlm.tokenizer.convert_tokens_to_ids("<image>")) == 4 * 16
    text = vlm.tokenizer.decode(expected)
    assert text.startswith("<|im_start|>User: " + VIDEO_INTRO + "\nFrame from 00:00:<fake_token_around_image>")
    assert [f"Frame from {m}:" in text for m in ("00:01", "00:59", "01:01")] == [True] * 3


def test_dense_logits_equal_transformers_forward(vlm, hf):
    frames = random_frames(4, seed=2)
    answer = torch.randint(10, 300, (6,), generator=torch.Generator().manual_seed(3)).tolist()
    session = _session(vlm, frames)
    ours = session.score(QUESTION, answer)  # (7, vocab)
    ids = session.token_ids()[: session.turns[-1].context_tokens + len(answer)]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids]), **_pixel_inputs(vlm, frames)).logits[0, -(len(answer) + 1):]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert theirs.std() > 0.1  # informative logits, not near-constant ones


def test_greedy_text_equals_transformers_generate(vlm, hf):
    frames = random_frames(4, seed=4)
    session = _session(vlm, frames)
    text = session.ask(QUESTION, max_new_tokens=24, ignore_stop=True)
    prompt = session.token_ids()[: session.turns[-1].context_tokens]
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([prompt]), **_pixel_inputs(vlm, frames), max_new_tokens=24,
                          do_sample=False, eos_token_id=None)
    theirs = out[0, len(prompt):].tolist()
    assert len(theirs) == 24 and len(set(theirs)) > 1
    assert list(session.turns[-1].answer_ids) == theirs
    assert text == vlm.tokenizer.decode(theirs, skip_special_tokens=True)
    assert vlm.generate(frames, QUESTION, timestamps=TIMES, max_new_tokens=24, ignore_stop=True) == text


@pytest.mark.parametrize("chunking", [[1, 2, 1], [3, 1]])
def test_chunked_streaming_equals_one_shot(vlm, chunking):
    frames = random_frames(4, seed=5)
    answer = [40, 41, 42, 43]
    one, chunked = _session(vlm, frames), _session(vlm, frames, chunking)
    logits = [s.score(QUESTION, answer) for s in (one, chunked)]
    assert chunked.token_ids() == one.token_ids()
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-5


def _routed(model_dir, spec: str, seed: int) -> StreamVLM:
    vlm = StreamVLM.from_pretrained(model_dir, routing=spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking router: scores that differ between tokens
        for scorer in vlm.router.scorers.values():
            scorer.weight.copy_(torch.randn(scorer.weight.shape, generator=g))
            scorer.bias.copy_(torch.randn(scorer.bias.shape, generator=g))
    return vlm


def test_routing_keep_one_equals_dense_and_keep_02_caches_the_formula(vlm, model_dir):
    frames = random_frames(4, seed=6)
    answer = [5, 6, 7, 8]
    routed = StreamVLM.from_pretrained(model_dir, routing="mod:1.0")
    outs = [(_session(v, frames).score(QUESTION, answer),
             v.generate(frames, QUESTION, timestamps=TIMES, max_new_tokens=12, ignore_stop=True))
            for v in (vlm, routed)]
    assert torch.equal(outs[0][0], outs[1][0])  # weight 1 + a*tanh(0) is exactly 1
    assert outs[0][1] == outs[1][1]

    spec, tpf = "mod:0.2", vlm.tokens_per_frame
    sparse = _routed(model_dir, spec, seed=3)
    assert isinstance(sparse.router, MoDRouter)
    session = _session(sparse, frames, [1, 1, 1, 1])
    session.ask(QUESTION, max_new_tokens=4, ignore_stop=True)
    stats = session.stats()
    text = stats["tokens"] - 4 * tpf  # frame markers, timestamps and the dialogue: in every layer
    ratios = RoutingConfig.parse(spec).layer_keep_ratios(SPEC.num_layers)
    expected = [text + 4 * (tpf if r is None else math.ceil(r * tpf - 1e-9)) for r in ratios]
    assert stats["kv_entries_per_layer"] == expected and expected[0] < stats["tokens"]
    cache = session.cache
    for layer, ratio in enumerate(ratios):
        per_frame = torch.bincount(cache.frames(layer)[cache.kinds(layer) == VISION].long(), minlength=4)
        assert per_frame.tolist() == [tpf if ratio is None else tokens_kept(ratio, tpf)] * 4


def test_caption_and_live_run_with_the_checkpoint(model_dir, tmp_path, capsys):
    check_caption_and_live(model_dir, tmp_path, capsys)
