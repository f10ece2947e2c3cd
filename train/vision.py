"""Stage 0 of the world model: the vision tower learns to see objects before the language model learns to
talk about them (as LLaVA's tower is pretrained before the language model is attached).

Why: trained end to end from a random start, through the language model's answers only, the world model's
tower never learned shapes, sizes or where objects are. Measured on the shipped model's training run
(96 px frames, 36 tokens each): after 1250 steps a linear probe on the tokens the language model reads
named the shape of a lone object 48% of the time (chance 33%; 43% at the random start), every token looked
alike (the largest token norm of a frame 1.2x the median), and the model answered every shape question
"circle" and every motion question "down".

Here every one of a frame's tokens is told what covers its cell: which colour (or background), that
object's shape and size, and where its centre is (regressed in cell units). The labels come from the
world's geometry (the fraction of the cell each object's shape covers), so the tower must keep each object
in its own tokens and tell the shapes apart there, which is what the language model needs to bind "the red
object" to its shape. After 600 steps of 32 frames (4 minutes on one core) without the position label, the
same probe named the shape 98% of the time and the largest token norm was 2.4x the median. Stage 1 must
then keep the tower frozen (`freeze_vision`): trained on, it was back to 48% by step 625.

The position label is for motion. An object moves 0.4 to 0.6 of a token's cell a second, so from tokens
that only say "red square here", two frames a second apart often look the same, and the model trained
without it answered motion questions near chance (32.9%, chance 25%). With it, a token says where inside
its cell the object is: after 600 steps the centre is off by 0.13 cells (2 px) on average. Measured on the
held-out bench after the same stage 1: motion 38.9%, and 74.0% overall (71.2% without). It cost the cell
head shape accuracy at 600 steps (85%, against 96% without); 1200 steps win it back (100% of a batch's
cells, centre off by 0.11 cells); with them and a longer stage 1, shape answers on the held-out bench
were right every time.

    streamvlm-train vision --steps 1200 --out runs/world_vision/model
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from streamvlm import world
from streamvlm.errors import StreamVLMError

log = logging.getLogger(__name__)

BACKGROUND = 0
"""Colour class 0 is the background; colour c of world.COLOURS is class 1 + its index."""
MIN_COVER = 0.15
"""A cell is labelled with the object that covers the largest fraction of it, if that is at least this."""


def frame_labels(video: world.WorldVideo, t: float, size: int, grid: int) -> dict[str, torch.Tensor]:
    """Per-cell labels of the frame at time t, cells in row-major order (grid * grid):
    colour (class, 0 = background), shape and size (indices into world.SHAPES / sorted world.SIZES; -100
    where the cell is background, so the losses skip it), and position: the (x, y) centre of the object
    covering the cell in cell units (0..grid; NaN on background)."""
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    x, y = coords.view(1, -1), coords.view(-1, 1)
    cover = torch.zeros(len(video.objects) + 1, grid, grid, dtype=torch.float64)
    cover[0] = MIN_COVER  # the background wins unless an object covers enough of the cell
    for n, obj in enumerate(video.objects, start=1):
        if not obj.visible(t):
            continue
        cx, cy = obj.centre(t)
        mask = world.shape_mask(obj.shape, obj.radius, x - cx, y - cy).to(torch.float64)
        cover[n] = F.adaptive_avg_pool2d(mask[None], grid)[0]
    owner = cover.argmax(0).flatten()  # 0 = background, n = objects[n - 1]
    colours, shapes, sizes, centres = [BACKGROUND], [-100], [-100], [(math.nan, math.nan)]
    for obj in video.objects:
        colours.append(1 + list(world.COLOURS).index(obj.colour))
        shapes.append(world.SHAPES.index(obj.shape))
        sizes.append(sorted(world.SIZES).index(obj.size))
        centres.append(tuple(grid * c for c in obj.centre(t)) if obj.visible(t) else (math.nan, math.nan))
    return {"colour": torch.tensor(colours)[owner], "shape": torch.tensor(shapes)[owner],
            "size": torch.tensor(sizes)[owner], "position": torch.tensor(centres, dtype=torch.float32)[owner]}


def draw_batch(rng: random.Random, count: int, size: int, grid: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """count random world frames (uint8 (count, size, size, 3)) with their per-cell labels (count, grid^2)."""
    frames, labels = [], []
    for _ in range(count):
        video = world.draw_video(rng, 8.0)
        second = rng.randrange(8)
        frames.append(world.render(video, size, 1.0, count=1, start=second)[0])
        labels.append(frame_labels(video, float(second), size, grid))
    return torch.stack(frames), {k: torch.stack([lab[k] for lab in labels]) for k in labels[0]}


class CellHead(torch.nn.Module):
    """Per-token classifiers (colour, shape, size) and a regression of the object's centre (position) on
    the tokens the language model reads."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = torch.nn.Linear(width, 1 + len(world.COLOURS))
        self.shape = torch.nn.Linear(width, len(world.SHAPES))
        self.size = torch.nn.Linear(width, len(world.SIZES))
        self.position = torch.nn.Linear(width, 2)

    def losses(self, tokens: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name in ("colour", "shape", "size"):
            logits = getattr(self, name)(tokens).flatten(0, 1)
            target = labels[name].flatten()
            out[name] = F.cross_entropy(logits, target, ignore_index=-100)
            kept = target != -100
            out[f"{name}_acc"] = (logits[kept].argmax(-1) == target[kept]).float().mean()
        target = labels["position"].flatten(0, 1)  # (N, 2) cell units
        kept = ~target[:, 0].isnan()
        error = self.position(tokens).flatten(0, 1)[kept] - target[kept]
        out["position"] = F.smooth_l1_loss(error, torch.zeros_like(error), beta=0.1)
        out["position_err"] = error.detach().abs().mean()  # cells
        return out


def pretrain_tower(model_dir: str | Path, out_dir: str | Path, steps: int = 1200, batch: int = 32, lr: float = 2e-3,
                   seed: int = 0, log_every: int = 50) -> dict:
    """Train the vision tower and projector of the checkpoint at model_dir on per-cell labels of random world
    frames, and write the checkpoint with them to out_dir (the language model is copied unchanged).
    Returns the last logged losses and accuracies."""
    from streamvlm.runtime import StreamVLM
    from streamvlm.train.world_model import save_weights

    if steps < 1 or batch < 1:
        raise StreamVLMError(f"steps and batch must be at least 1, got {steps} and {batch}")
    torch.manual_seed(seed)
    vlm = StreamVLM.from_pretrained(model_dir, device="cpu", dtype=torch.float32)
    adapter = vlm.adapter
    side = adapter.vision.grid[0]
    size = adapter.preprocess_config.height
    if adapter.vision.grid[0] != adapter.vision.grid[1] or size % side:
        raise StreamVLMError(f"{model_dir}: the vision stage needs square frames split into whole cells")
    head = CellHead(adapter.feature_dim)
    tower = [adapter.model.model.vision_tower, adapter.model.model.multi_modal_projector]
    params = [p for m in tower for p in m.parameters()] + list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = random.Random(seed)
    start, last = time.perf_counter(), {}
    for step in range(1, steps + 1):
        for group in opt.param_groups:  # linear warm-up over 50 steps, then cosine to 0
            group["lr"] = lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        frames, labels = draw_batch(rng, batch, size, side)
        tokens = adapter.frame_features(vlm.preprocess(frames))  # (batch, side * side, d)
        out = head.losses(tokens, labels)
        loss = out["colour"] + out["shape"] + out["size"] + out["position"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            last = {k: round(float(v.detach()), 4) for k, v in out.items()}
            log.info("vision step %d/%d (%.0f s): %s", step, steps, time.perf_counter() - start, last)
    save_weights(model_dir, adapter.model, out_dir, {"stage": "vision", "steps": steps, "batch": batch, **last})
    return last
