"""Loading checkpoints and preprocessing frames."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from streamvlm import StreamVLM
from streamvlm.video.preprocess import PreprocessConfig, preprocess
from support import random_frames


def test_sharded_checkpoint_loads_and_answers_the_same(tiny_dir, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_dir, sharded)
    (sharded / "model.safetensors").unlink()
    LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir).save_pretrained(sharded, max_shard_size="50KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    frames = random_frames(2, seed=3)
    a = StreamVLM.from_pretrained(tiny_dir).generate(frames, "What?", max_new_tokens=8, ignore_stop=True)
    b = StreamVLM.from_pretrained(sharded).generate(frames, "What?", max_new_tokens=8, ignore_stop=True)
    assert a == b


def test_a_checkpoint_rewritten_under_a_loaded_model_changes_nothing(tiny_dir, tmp_path):
    """transformers maps CPU weights from the file: cut shorter under a running model, the next forward died
    with SIGBUS. Loaded weights live in memory of their own."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    vlm = StreamVLM.from_pretrained(copy)
    weights = copy / "model.safetensors"
    assert not [line for line in Path("/proc/self/maps").read_text().splitlines() if str(weights) in line]
    frames = random_frames(2, seed=3)
    before = vlm.generate(frames, "What?", max_new_tokens=8, ignore_stop=True)
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 3])  # a save into the same folder, caught half-way
    assert vlm.generate(frames, "What?", max_new_tokens=8, ignore_stop=True) == before


def test_owning_the_weights_keeps_tied_ones_tied():
    from streamvlm.models.base import _own_memory

    embed, head = torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False)
    head.weight = embed.weight
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    old = embed.weight.data_ptr()
    _own_memory(model)
    assert head.weight is embed.weight and embed.weight.data_ptr() != old


def test_preprocess_rescales_and_normalizes():
    cfg = PreprocessConfig(height=4, width=6, mean=(0.5, 0.4, 0.3), std=(0.5, 0.2, 0.1))
    frames = torch.randint(0, 256, (2, 4, 6, 3), dtype=torch.uint8)  # already the target size: no resize
    out = preprocess(frames, cfg)
    assert out.shape == (2, 3, 4, 6) and out.dtype == torch.float32
    expected = (frames.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) \
        / torch.tensor([0.5, 0.2, 0.1]).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)


def test_preprocess_resizes_like_an_image_resize():
    cfg = PreprocessConfig(height=8, width=8, mean=(0, 0, 0), std=(1, 1, 1), rescale_factor=1.0)
    # A left-dark, right-bright frame keeps its layout; a flat colour stays exactly that colour.
    frame = torch.zeros(1, 30, 40, 3, dtype=torch.uint8)
    frame[..., 20:, :] = 200
    out = preprocess(frame, cfg)[0]
    assert out.shape == (3, 8, 8)
    assert torch.all(out[:, :, :3] == 0) and torch.all(out[:, :, 6:] == 200)  # bicubic rings only near the edge
    assert torch.equal(out, out.round())  # resized values are rounded back to whole levels
    flat = torch.full((1, 17, 23, 3), 77, dtype=torch.uint8)
    assert torch.all(preprocess(flat, cfg) == 77)


def test_preprocess_config_reads_the_checkpoint(tiny_dir):
    cfg = PreprocessConfig.from_checkpoint(tiny_dir)
    assert (cfg.height, cfg.width) == (28, 28) and cfg.mean == (0.5, 0.5, 0.5) and cfg.resample == "bicubic"
    vlm = StreamVLM.from_pretrained(tiny_dir)
    assert vlm.preprocess(random_frames(3)).shape == (3, 3, 28, 28)


def test_encode_gives_tokens_per_frame(checkpoints):
    vlm = StreamVLM.from_pretrained(checkpoints["odd_grid_mha"])  # 5x5 patches pooled to 3x3
    feats = vlm.encode(random_frames(2))
    assert feats.shape == (2, 9, 96) and vlm.tokens_per_frame == 9
    # Frames are encoded independently: one frame alone gives the same tokens.
    assert torch.allclose(vlm.encode(random_frames(2)[1:]), feats[1:], atol=1e-5)
