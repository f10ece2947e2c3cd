"""Qwen2-VL and Qwen2.5-VL: patches, dense logits and greedy text equal transformers' on checkpoints saved by
transformers; frame pairs and M-RoPE positions survive any chunking; routing; live and caption."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from streamvlm import StreamVLM
from streamvlm.cli import main
from streamvlm.models.qwen2_5_vl import patchify
from streamvlm.routers import RoutingConfig
from streamvlm.tiny.qwen import QWEN_FAMILIES, write_tiny_qwen
from streamvlm.types import VISION
from support import check_caption_and_live, random_frames, record_chunk_rope

QUESTION = "What happens in the video?"
FPS = 4.0  # timestamps of the test frames: 2 frames a pair -> 0.5 s a pair -> 1 temporal position at 2 tokens/s


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qwen")
    return {family: write_tiny_qwen(root / family, family, seed=i) for i, family in enumerate(QWEN_FAMILIES)}


@pytest.fixture(scope="module")
def hf_models(qwen_dirs) -> dict:
    import transformers

    classes = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
               "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}
    return {f: classes[f].from_pretrained(d, dtype=torch.float32).eval() for f, d in qwen_dirs.items()}


def _times(count: int, start: int = 0) -> list[float]:
    return [(start + i) / FPS for i in range(count)]


def _hf_inputs(vlm: StreamVLM, ids: list[int], videos: list[torch.Tensor]) -> dict:
    """transformers' inputs for our token ids and the given uint8 videos, each padded to whole pairs by
    repeating its last frame (transformers' rule for an odd frame count), patchified independently of the
    adapter's own path."""
    cfg = vlm.adapter.model.config
    v = cfg.vision_config
    patches, grids = [], []
    for frames in videos:
        if len(frames) % 2:
            frames = torch.cat([frames, frames[-1:]])
        flat, grid = patchify(vlm.preprocess(frames), v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
        patches.append(flat)
        grids.append(grid)
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids),
           "mm_token_type_ids": (input_ids == cfg.video_token_id).int() * 2}
    if vlm.adapter.family == "qwen2_5_vl":
        out["second_per_grid_ts"] = torch.tensor([2 / FPS] * len(videos))
    return out


def test_patches_follow_transformers_layout(qwen_dirs):
    """Our patch order and per-patch (channel, time, y, x) layout equal transformers' Qwen2-VL image
    processor's, frame by frame (it repeats one image over the temporal patch; a pair holds two frames)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = torch.randn(2, 3, 32, 48)
    flat, grid = patchify(pixels, 4, 2, 2)
    assert grid == (1, 8, 12) and flat.shape == (96, 3 * 2 * 4 * 4)
    ours = flat.view(96, 3, 2, 4, 4)
    proc = Qwen2VLImageProcessorPil()
    for t in range(2):
        theirs, h, w = proc.patchify(pixels[t].numpy(), patch_size=4, merge_size=2, temporal_patch_size=2)
        assert (h, w) == (8, 12)
        theirs = torch.from_numpy(np.ascontiguousarray(theirs)).view(96, 3, 2, 4, 4)
        assert torch.equal(ours[:, :, t], theirs[:, :, t])


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_dense_logits_equal_transformers_forward_over_two_turns(qwen_dirs, hf_models, family):
    vlm = StreamVLM.from_pretrained(qwen_dirs[family])
    first, second = random_frames(7, seed=1), random_frames(3, seed=2)  # odd counts: last frames padded
    answer = torch.randint(10, 300, (6,), generator=torch.Generator().manual_seed(3)).tolist()
    session = vlm.session()
    session.append_frames(first, _times(7))
    session.ask("What is there?", max_new_tokens=4, ignore_stop=True)
    session.append_frames(second, _times(3, 7))
    ours = session.score(QUESTION, answer)  # (7, vocab)
    ids = session.token_ids()
    end = len(ids) - len(vlm.adapter.tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"])
    tpf = vlm.tokens_per_frame
    assert ids.count(vlm.adapter.model.config.video_token_id) == (4 + 2) * tpf  # 7 -> 4 pairs, 3 -> 2 pairs
    with torch.no_grad():
        theirs = hf_models[family](**_hf_inputs(vlm, ids[:end], [first, second])).logits[0]
    theirs = theirs[-(len(answer) + 1):]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert theirs.std() > 0.1


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_prompt_equals_the_processor_expansion(qwen_dirs, family):
    """The ids we feed are the chat template's text with <|video_pad|> repeated once per frame token, as
    transformers' Qwen-VL processors expand it (video_grid_thw.prod() // merge**2 pads)."""
    vlm = StreamVLM.from_pretrained(qwen_dirs[family])
    session = vlm.session()
    session.append_frames(random_frames(5, seed=4), _times(5))
    session.score(QUESTION, [])
    tok = vlm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
                                   tokenize=False, add_generation_prompt=True)
    pads = 3 * 4 * 4  # 5 frames -> 3 pairs of a 4 x 4 merged grid
    expected = tok(text.replace("<|video_pad|>", "<|video_pad|>" * pads))["input_ids"]
    assert session.token_ids()[:len(expected)] == expected


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_greedy_text_equals_transformers_generate(qwen_dirs, hf_models, family):
    vlm = StreamVLM.from_pretrained(qwen_dirs[family])
    frames = random_frames(8, seed=5)
    session = vlm.session()
    session.append_frames(frames, _times(8))
    session.ask(QUESTION, max_new_tokens=24, ignore_stop=True)
    ours = list(session.turns[-1].answer_ids)
    prompt_len = session.turns[-1].context_tokens
    inputs = _hf_inputs(vlm, session.token_ids()[:prompt_len], [frames])
    with torch.no_grad():
        out = hf_models[family].generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=None)
    theirs = out[0, prompt_len:].tolist()
    assert len(theirs) == 24 and ours == theirs
    assert len(set(theirs)) > 3  # an informative comparison, not one token repeated


@pytest.mark.parametrize("chunking", [[1, 2, 3, 1], [3, 4], [7]])
def test_chunked_frames_equal_one_shot(qwen_dirs, chunking):
    vlm = StreamVLM.from_pretrained(qwen_dirs["qwen2_5_vl"])
    frames = random_frames(7, seed=6)
    answer = [40, 50, 60]
    results = []
    for plan in ([7], chunking):
        session = vlm.session()
        start = 0
        for size in plan:
            session.append_frames(frames[start:start + size], _times(size, start))
            start += size
        results.append((session.score(QUESTION, answer), session.token_ids()))
    assert results[0][1] == results[1][1]
    assert (results[0][0] - results[1][0]).abs().max().item() <= 1e-5


def test_rope_positions_follow_absolute_time(qwen_dirs, hf_models):
    """Qwen2.5-VL's temporal positions are the pair's time in tokens_per_second units; every vision token
    sits where transformers' get_rope_index puts it, and text after the video continues at the largest
    position + 1 (the original Qwen-VL rule; transformers 5.23's get_rope_index starts it at
    start + max(h, w), which differs only once the temporal positions outgrow the grid, and its generate()
    continues at max + 1, as we do)."""
    vlm = StreamVLM.from_pretrained(qwen_dirs["qwen2_5_vl"])
    seen = record_chunk_rope(vlm)
    frames = random_frames(12, seed=7)
    session = vlm.session()
    session.append_frames(frames, [i * 1.0 for i in range(12)])  # 1 fps: 2 s a pair -> 4 positions a pair
    session.score(QUESTION, [])
    ours = torch.cat([r for r in seen if r is not None], dim=1)
    ids = torch.tensor(session.token_ids())
    video = torch.nonzero(ids == vlm.adapter.model.config.video_token_id).squeeze(1)
    inputs = _hf_inputs(vlm, ids.tolist()[:ours.shape[1]], [frames])
    inputs["second_per_grid_ts"] = torch.tensor([2.0])
    theirs, _ = hf_models["qwen2_5_vl"].model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"])
    theirs = theirs[:, 0]
    start = int(video[0])
    assert torch.equal(ours[:, :start], theirs[:, :start])  # the text before the video
    assert torch.equal(ours[:, video], theirs[:, video])  # every vision token
    assert ours[0, video].unique().tolist() == [start + 4 * k for k in range(6)]
    after = int(video[-1]) + 1
    assert ours[:, after].tolist() == [int(ours[:, video].max()) + 1] * 3


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_mod_routing_exact_at_one_and_formula_at_0_2(qwen_dirs, family):
    frames = random_frames(6, seed=8)
    dense = StreamVLM.from_pretrained(qwen_dirs[family])
    full = dense.with_routing("mod:1.0")
    outs = []
    for vlm in (dense, full):
        s = vlm.session()
        s.append_frames(frames, _times(6))
        outs.append(s.score(QUESTION, [5, 6, 7]))
    assert torch.equal(outs[0], outs[1])

    routed = dense.with_routing("mod:0.2")
    s = routed.session()
    s.append_frames(frames, _times(6))
    s.score(QUESTION, [5, 6, 7])
    stats = s.stats()
    tpf, pairs, layers = routed.tokens_per_frame, 3, routed.adapter.decoder.num_layers
    text = stats["tokens"] - pairs * tpf
    ratios = RoutingConfig.parse("mod:0.2").layer_keep_ratios(layers)
    expected = [text + pairs * (tpf if r is None else math.ceil(r * tpf - 1e-9)) for r in ratios]
    assert stats["kv_entries_per_layer"] == expected
    assert expected != [stats["tokens"]] * layers  # some layer is routed
    for layer, ratio in enumerate(ratios):
        per_frame = torch.bincount(s.cache.frames(layer)[s.cache.kinds(layer) == VISION].long(), minlength=pairs)
        assert per_frame.tolist() == [tpf if ratio is None else math.ceil(ratio * tpf - 1e-9)] * pairs


def test_odd_frame_waits_for_its_pair_then_is_padded_at_a_question(qwen_dirs):
    vlm = StreamVLM.from_pretrained(qwen_dirs["qwen2_5_vl"])
    session = vlm.session()
    session.append_frames(random_frames(3, seed=9), _times(3))
    assert session.stats()["frames"] == 3
    video_id = vlm.adapter.model.config.video_token_id
    assert session.token_ids().count(video_id) == vlm.tokens_per_frame  # one pair fed, the third frame held
    session.ask(QUESTION, max_new_tokens=2)
    assert session.token_ids().count(video_id) == 2 * vlm.tokens_per_frame  # held frame fed as a pair


def test_memory_budget_evicts_and_renumbers_an_mrope_cache(qwen_dirs):
    """Under a memory budget an M-RoPE session evicts, stays within its entries per layer, renumbers what it
    holds to consecutive positions, and keeps answering, whatever the chunking."""
    vlm = StreamVLM.from_pretrained(qwen_dirs["qwen2_5_vl"])
    frames = random_frames(40, seed=10)
    answers = []
    for plan in ([40], [10, 7, 23]):
        session = vlm.session(memory_budget=120)
        start = 0
        for size in plan:
            session.append_frames(frames[start:start + size], _times(size, start))
            start += size
        answers.append(session.score(QUESTION, [5, 6]))
        stats = session.stats()
        assert stats["evicted_entries"] > 0
        assert max(stats["kv_entries_per_layer"]) <= stats["memory_budget_entries_per_layer"] == 120
        held = torch.cat([session.cache.positions(l) for l in range(session.cache.num_layers)]).unique()
        assert held.tolist() == list(range(stats["tokens"]))
    assert answers[0].shape == answers[1].shape and torch.isfinite(answers[0]).all()


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_caption_and_live_run_with_a_qwen_checkpoint(qwen_dirs, tmp_path, capsys, family):
    check_caption_and_live(qwen_dirs[family], tmp_path, capsys)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "smolvlm"])
def test_init_tiny_family_then_ask(tmp_path, monkeypatch, capsys, family):
    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "cache"))  # the sample video is written here
    out = tmp_path / family
    sizes = ["--layers", "3"] if family in QWEN_FAMILIES else []
    assert main(["init-tiny", str(out), "--family", family, *sizes]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    if family in QWEN_FAMILIES:
        assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 3
    capsys.readouterr()
    assert main(["ask", "--model", str(out), "--num-frames", "3", "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["frames"] == 3
    assert main(["init-tiny", str(tmp_path / "x"), "--family", family, "--real-small"]) == (0 if family == "llava_onevision" else 2)


def test_bad_input_for_paired_frames_is_refused_with_nothing_fed(qwen_dirs, tmp_path, capsys):
    from streamvlm import StreamVLMError

    vlm = StreamVLM.from_pretrained(qwen_dirs["qwen2_5_vl"])
    session = vlm.session()
    session.append_frames(random_frames(3, seed=11), _times(3))  # one pair fed, one frame held
    before = session.token_ids()
    with pytest.raises(StreamVLMError, match="3 frames but 2 timestamps"):
        session.append_frames(random_frames(3, seed=12), [0.0, 0.5])
    with pytest.raises(StreamVLMError, match="encoded frames must have shape"):
        session.append_encoded(torch.zeros(2, vlm.tokens_per_frame + 1, vlm.adapter.feature_dim))
    with pytest.raises(StreamVLMError, match="2 frames but 3 timestamps"):
        session.append_encoded(vlm.encode(random_frames(3, seed=13)), [0.0, 0.5, 1.0])
    assert session.token_ids() == before and session.stats()["frames"] == 3
    assert main(["init-tiny", str(tmp_path / "s"), "--family", "smolvlm", "--layers", "3"]) == 2
    assert "--layers and --hidden are not supported for smolvlm" in capsys.readouterr().err
