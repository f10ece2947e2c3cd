"""Qwen3-VL: on a checkpoint saved by transformers, our token ids equal Qwen3VLProcessor's expansion (a timestamp
and a <|vision_start|>...<|vision_end|> block per pair of frames), M-RoPE positions equal get_rope_index, dense
logits (DeepStack included) and greedy text equal transformers'; any chunking equals one shot; routing; live and
caption."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from streamvlm import StreamVLM
from streamvlm.routers import RoutingConfig
from streamvlm.routers.config import tokens_kept
from streamvlm.tiny.qwen3 import write_tiny_qwen3_vl
from streamvlm.types import VISION
from support import check_caption_and_live, random_frames, record_chunk_rope

QUESTION = "What happens in the video?"
SOURCE_FPS = 4.0
# Frames sampled unevenly from a 4 fps source: frame k is shown at FIRST[k] / 4 s. 7 frames make 4 pairs (the
# last one the 7th frame twice), 3 make 2; pair timestamps are means: 0.125 -> "0.1", 0.875 -> "0.9", ...
FIRST = [0, 1, 3, 4, 7, 9, 10]
SECOND = [12, 14, 15]


def _times(indices: list[int]) -> list[float]:
    return [i / SOURCE_FPS for i in indices]  # the float transformers computes from frame index and fps


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl") / "tiny", seed=0)


@pytest.fixture(scope="module")
def vlm(ckpt):
    return StreamVLM.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()


def _hf_inputs(vlm: StreamVLM, ids: list[int], videos: list[torch.Tensor]) -> dict:
    """transformers' model inputs for our token ids and uint8 videos: our preprocessing, then transformers'
    own Qwen3-VL patchify (which pads an odd frame count with the last frame), not the adapter's."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    cfg = vlm.adapter.model.config
    v = cfg.vision_config
    patches, grids = [], []
    for frames in videos:
        flat, *grid = Qwen3VLVideoProcessor.patchify(None, vlm.preprocess(frames)[None], patch_size=v.patch_size,
                                                     merge_size=v.spatial_merge_size,
                                                     temporal_patch_size=v.temporal_patch_size)
        patches.append(flat[0])
        grids.append(grid)
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids),
            "mm_token_type_ids": (input_ids == cfg.video_token_id).int() * 2}


class _VideoProcessorStandIn:
    """Qwen3VLVideoProcessor needs torchvision, which has no CPU build here. The processor's own text expansion
    and tokenization still run; this stand-in hands it each video's grid and the metadata its timestamps come
    from (frame indices into the source and the source's fps)."""

    merge_size = 2
    temporal_patch_size = 2

    def __init__(self, grids: list[list[int]], indices: list[list[int]]):
        self.grids, self.indices = grids, indices

    def __call__(self, videos, **kwargs):
        from transformers import BatchFeature
        from transformers.video_utils import VideoMetadata

        metadata = [VideoMetadata(total_num_frames=max(i) + 1, fps=SOURCE_FPS, frames_indices=list(i))
                    for i in self.indices]
        return BatchFeature({"video_grid_thw": torch.tensor(self.grids), "video_metadata": metadata})


@pytest.fixture(scope="module")
def two_turns(ckpt):
    """A session over two user turns, each with new frames (7, then 3) and a scored answer."""
    vlm = StreamVLM.from_pretrained(ckpt)
    seen = record_chunk_rope(vlm)
    tok = vlm.adapter.tokenizer
    answers = ["The red square moves to the left.", "Three objects."]
    videos = [random_frames(len(FIRST), seed=1), random_frames(len(SECOND), seed=2)]
    session = vlm.session()
    scores = []
    for (frames, indices), question, answer in zip(zip(videos, (FIRST, SECOND)), ("What is there?", QUESTION),
                                                   answers):
        session.append_frames(frames, _times(indices))
        scores.append(session.score(question, tok(answer, add_special_tokens=False)["input_ids"]))
    return {"vlm": vlm, "session": session, "scores": scores, "videos": videos, "answers": answers,
            "questions": ["What is there?", QUESTION], "rope": torch.cat(seen, dim=1)}


def test_token_ids_equal_the_qwen3vl_processor_expansion(two_turns):
    """Qwen3VLProcessor keeps the template's <|vision_start|><|video_pad|><|vision_end|> and replaces the pad
    with <{t:.1f} seconds><|vision_start|> pads <|vision_end|> per pair, t the mean of the pair's frame times."""
    from transformers import Qwen3VLProcessor
    from transformers.processing_utils import ProcessorMixin

    vlm, session = two_turns["vlm"], two_turns["session"]
    tok = vlm.adapter.tokenizer
    stand_in = _VideoProcessorStandIn([[4, 8, 8], [2, 8, 8]], [FIRST, SECOND])
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        proc = Qwen3VLProcessor(image_processor=None, tokenizer=tok, video_processor=stand_in,
                                chat_template=tok.chat_template)
    conversation = []
    for question, answer in zip(two_turns["questions"], two_turns["answers"]):
        conversation += [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    text = proc.apply_chat_template(conversation, tokenize=False)
    out = proc(text=text, videos=[v.numpy() for v in two_turns["videos"]], return_tensors="pt")
    ours = session.token_ids()
    assert ours == out["input_ids"][0].tolist()
    rendered = tok.decode(ours)
    assert "<|vision_start|><0.1 seconds><|vision_start|>" in rendered  # frames at 0 and 0.25 s
    assert "<|vision_end|><0.9 seconds><|vision_start|>" in rendered  # 0.75 and 1 s
    assert "<|vision_end|><2.5 seconds><|vision_start|>" in rendered  # the 7th frame (2.5 s) twice
    assert "<|vision_end|><|vision_end|>" in rendered
    # What the parity tests feed transformers for get_rope_index is what the processor returns.
    video_id = vlm.adapter.model.config.video_token_id
    assert torch.equal(out["mm_token_type_ids"][0], (torch.tensor(ours) == video_id).int() * 2)


def test_rope_positions_equal_get_rope_index(two_turns, hf_model):
    """Every pair is its own grid at (s, s + row, s + col), s right after the text before it; text goes on at
    the largest position + 1, which equals get_rope_index's s + max(rows, cols): every position of the
    dialogue is transformers'."""
    vlm = two_turns["vlm"]
    ids = two_turns["session"].token_ids()
    inputs = _hf_inputs(vlm, ids, two_turns["videos"])
    theirs, _ = hf_model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              video_grid_thw=inputs["video_grid_thw"])
    ours = two_turns["rope"]
    assert ours.shape == (3, len(ids))
    assert torch.equal(ours, theirs[:, 0])
    video = torch.tensor(ids) == vlm.adapter.model.config.video_token_id
    assert ours[0, video].unique().numel() == 6  # one temporal position per pair, 4 + 2 pairs


def test_dense_logits_equal_transformers_forward_over_two_turns(two_turns, hf_model):
    vlm, session = two_turns["vlm"], two_turns["session"]
    ids = session.token_ids()
    video_id = vlm.adapter.model.config.video_token_id
    assert ids.count(video_id) == (4 + 2) * vlm.tokens_per_frame == 96
    with torch.no_grad():
        theirs = hf_model(**_hf_inputs(vlm, ids, two_turns["videos"])).logits[0]
    for turn, ours in zip(session.turns, two_turns["scores"]):
        rows = theirs[turn.context_tokens - 1:turn.context_tokens + len(turn.answer_ids)]
        assert ours.shape == rows.shape
        assert (ours - rows).abs().max().item() <= 1e-4
        assert rows.std() > 0.1
    # DeepStack carries weight here: the tower's extra features are not negligible next to the merged tokens.
    feats = vlm.encode(two_turns["videos"][0][:2])
    d = vlm.adapter.decoder.hidden_size
    assert feats.shape == (1, 16, 3 * d) and feats[..., d:].std() > 0.1


def test_greedy_text_equals_transformers_generate(vlm, hf_model):
    frames = random_frames(len(FIRST), seed=5)
    session = vlm.session()
    session.append_frames(frames, _times(FIRST))
    session.ask(QUESTION, max_new_tokens=24, ignore_stop=True)
    ours = list(session.turns[-1].answer_ids)
    prompt_len = session.turns[-1].context_tokens
    inputs = _hf_inputs(vlm, session.token_ids()[:prompt_len], [frames])
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=None)
    theirs = out[0, prompt_len:].tolist()
    assert len(theirs) == 24 and ours == theirs
    assert len(set(theirs)) > 3  # an informative comparison, not one token repeated


def test_chunked_frames_equal_one_shot(vlm):
    frames, times = random_frames(len(FIRST), seed=6), _times(FIRST)
    answer = [40, 50, 60]
    results = []
    for plan in ([7], [1, 2, 3, 1], [3, 4]):
        session = vlm.session()
        start = 0
        for size in plan:
            session.append_frames(frames[start:start + size], times[start:start + size])
            start += size
        results.append((session.score(QUESTION, answer), session.token_ids()))
    for scores, ids in results[1:]:
        assert ids == results[0][1]
        assert (scores - results[0][0]).abs().max().item() <= 1e-5


def test_mod_routing_exact_at_one_and_formula_at_0_2(vlm):
    frames = random_frames(len(FIRST), seed=8)
    outs = []
    for routed in (vlm, vlm.with_routing("mod:1.0")):
        session = routed.session()
        session.append_frames(frames, _times(FIRST))
        outs.append(session.score(QUESTION, [5, 6, 7]))
    assert torch.equal(outs[0], outs[1])

    # Frame by frame, as a live source feeds them: each pair enters once its second frame arrives. DeepStack
    # adds to every vision token's hidden state, routed through a layer or not; only kept tokens write K/V.
    routed = vlm.with_routing("mod:0.2")
    session = routed.session()
    for k in range(6):
        session.append_frames(frames[k:k + 1], _times(FIRST[k:k + 1]))
    session.ask(QUESTION, max_new_tokens=4, ignore_stop=True)
    stats = session.stats()
    tpf, pairs, layers = routed.tokens_per_frame, 3, routed.adapter.decoder.num_layers
    text = stats["tokens"] - pairs * tpf  # timestamps and markers are text: every layer holds them
    ratios = RoutingConfig.parse("mod:0.2").layer_keep_ratios(layers)
    expected = [text + pairs * (tpf if r is None else math.ceil(r * tpf - 1e-9)) for r in ratios]
    assert stats["kv_entries_per_layer"] == expected
    assert stats["tokens_processed_per_layer"] == expected
    assert expected != [stats["tokens"]] * layers  # some layer is routed
    per_entry = 2 * routed.adapter.decoder.num_kv_heads * routed.adapter.decoder.head_dim * 4
    assert stats["kv_bytes"] == sum(expected) * per_entry < stats["kv_bytes_dense"]
    cache = session.cache
    for layer, ratio in enumerate(ratios):
        per_frame = torch.bincount(cache.frames(layer)[cache.kinds(layer) == VISION].long(), minlength=pairs)
        assert per_frame.tolist() == [tpf if ratio is None else tokens_kept(ratio, tpf)] * pairs
        assert torch.all(cache.positions(layer)[1:] > cache.positions(layer)[:-1])


def test_caption_and_live_run_with_the_checkpoint(ckpt, tmp_path, capsys):
    check_caption_and_live(ckpt, tmp_path, capsys)
