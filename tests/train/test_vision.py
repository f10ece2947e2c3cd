"""Stage 0 of the world model: per-cell labels from the world's geometry, and the tower training on them."""

from __future__ import annotations

import random

import torch

from streamvlm import StreamVLM, world
from streamvlm.train.cli import main
from streamvlm.train.vision import BACKGROUND, draw_batch, frame_labels


def test_cell_labels_agree_with_the_drawn_pixels():
    rng = random.Random(3)
    size, grid = 96, 6
    cell = size // grid
    checked = 0
    for _ in range(10):
        video = world.draw_video(rng, 8.0)
        t = 4.0
        frame = world.render(video, size, 1.0, count=5)[4].float()
        labels = frame_labels(video, t, size, grid)
        for index in range(grid * grid):
            r, c = divmod(index, grid)
            pixels = frame[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].reshape(-1, 3)
            colour = int(labels["colour"][index])
            if colour == BACKGROUND:
                assert int(labels["shape"][index]) == int(labels["size"][index]) == -100
                assert labels["position"][index].isnan().all()
                # a background cell is mostly background (any object in it covers less than MIN_COVER)
                background = (pixels - torch.tensor(world.BACKGROUND)).abs().max(-1).values < 30
                assert background.float().mean() > 0.8
                continue
            name = list(world.COLOURS)[colour - 1]
            obj = next(o for o in video.objects if o.colour == name)
            assert obj.visible(t)
            assert world.SHAPES[int(labels["shape"][index])] == obj.shape
            assert sorted(world.SIZES)[int(labels["size"][index])] == obj.size
            # the position is the centre of that colour's pixels (cell units), and the cell is near it
            ys, xs = torch.nonzero((frame - torch.tensor(world.COLOURS[name])).abs().max(-1).values < 40,
                                   as_tuple=True)
            drawn = torch.stack([xs.float().mean() + 0.5, ys.float().mean() + 0.5]) / cell
            label = labels["position"][index]
            assert (label - drawn).abs().max() < 0.1, (label, drawn)
            assert abs(float(label[0]) - (c + 0.5)) < 2 and abs(float(label[1]) - (r + 0.5)) < 2
            # the cell shows that colour
            matches = (pixels - torch.tensor(world.COLOURS[name])).abs().max(-1).values < 40
            assert matches.float().mean() > 0.1
            checked += 1
    assert checked > 10


def test_a_batch_has_frames_and_labels_of_matching_shape():
    frames, labels = draw_batch(random.Random(0), 3, 48, 6)
    assert frames.shape == (3, 48, 48, 3) and frames.dtype == torch.uint8
    assert {k: tuple(v.shape) for k, v in labels.items()} == {"colour": (3, 36), "shape": (3, 36), "size": (3, 36),
                                                              "position": (3, 36, 2)}
    assert (labels["colour"] > 0).any()  # every frame shows at least one object


def test_vision_stage_trains_the_tower_only_and_writes_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "cache"))
    from streamvlm.train.world_model import initial_model_dir

    start = StreamVLM.from_pretrained(initial_model_dir()).adapter.model.state_dict()
    out = tmp_path / "vision"
    assert main(["vision", "--steps", "3", "--batch", "4", "--out", str(out)]) == 0
    assert "wrote the model to" in capsys.readouterr().out
    after = StreamVLM.from_pretrained(out).adapter.model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert any(k.startswith("model.vision_tower.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert not any(k.startswith(("model.language_model.", "lm_head.")) for k in changed)
    assert (out / "tokenizer.json").is_file() and (out / "streamvlm_model.json").is_file()

    assert main(["vision", "--steps", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "at least 1" in capsys.readouterr().err
