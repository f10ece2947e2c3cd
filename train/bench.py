"""`streamvlm-train bench`: one training step (forward + backward) routed vs dense, in one run.

The same sample (N frames and one exchange) goes through the runtime's decoder with the language model
trainable, once with routing off and once with the MoD router; each is timed (median of repeats after a
warm-up) and its activation memory is measured as the bytes of the tensors autograd saves for the
backward pass (counted once per storage), which is what routing shrinks. Peak GPU memory is added on CUDA.

Without --model it runs on a random checkpoint of --family (LLaVA-OneVision or Qwen2.5-VL) in a real small
model's shape, --layers x --hidden (12 x 640), made once in the cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from streamvlm.errors import StreamVLMError

FAMILIES = ("llava_onevision", "qwen2_5_vl")
QWEN_SIDE = 128
"""Frame side of the random Qwen2.5-VL: 4 px patches merged 2 x 2 give 16 x 16 = 256 tokens per pair of frames,
what the runtime's 448 px frames give a real Qwen2.5-VL."""


def bench_checkpoint(family: str = "llava_onevision", layers: int = 12, hidden: int = 640) -> Path:
    """A random `family` checkpoint with a decoder of `layers` x `hidden`, made once in the cache folder.

    LLaVA-OneVision: `TinySpec.real_small` (hidden / 64 heads, MLP 4 x hidden, 196 tokens per frame); at 12 x 640
    it is the checkpoint `streamvlm bench` measures. Qwen2.5-VL: `write_tiny_qwen` at QWEN_SIDE px, whose
    builder fixes 4 heads, 2 KV heads, an MLP 2 x hidden and a 2-block vision tower of width 32 (the tower runs
    before the timed step, so only the decoder's shape matters here).
    """
    from streamvlm.bench.common import bench_model_dir
    from streamvlm.paths import cache_dir

    if family not in FAMILIES:
        raise StreamVLMError(f"--family: choose one of {', '.join(FAMILIES)}, got {family!r}")
    width = 64 if family == "llava_onevision" else 8  # LLaVA: 64 per head; Qwen: 4 heads of an even width
    if layers < 1 or hidden < width or hidden % width:
        raise StreamVLMError(f"--layers must be at least 1 and --hidden a multiple of {width} for {family}, got "
                             f"{layers} and {hidden}")
    if family == "llava_onevision" and (layers, hidden) == (12, 640):
        return bench_model_dir()
    target = cache_dir() / f"bench-train-{family}-{layers}x{hidden}"
    if not (target / "config.json").is_file():
        tmp = target.with_name(f".{target.name}-{os.getpid()}")
        if family == "llava_onevision":
            from streamvlm.tiny import TinySpec, write_tiny_checkpoint

            write_tiny_checkpoint(tmp, TinySpec.real_small(num_layers=layers, hidden_size=hidden))
        else:
            from streamvlm.tiny.qwen import write_tiny_qwen

            write_tiny_qwen(tmp, family, side=QWEN_SIDE, num_layers=layers, hidden_size=hidden)
        try:
            os.replace(tmp, target)
        except OSError:  # another bench made it first
            if not (target / "config.json").is_file():
                raise
    return target


def _saved_bytes(fn) -> int:
    """Run fn() and return the bytes of distinct storages autograd saved for backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def run(model_dir: str | os.PathLike, frames: int, routing: str, repeats: int, device: str | None) -> dict:
    from streamvlm.cache import KVCache
    from streamvlm.decoder import Decoder
    from streamvlm.flops import FlopCounter
    from streamvlm.routers import DenseRouter
    from streamvlm.runtime import resolve_device
    from streamvlm.train.data import Exchange, Frames, Sample
    from streamvlm.train.module import RouterTrainingModule

    dev = resolve_device(device)
    module = RouterTrainingModule(model_dir=str(model_dir), routing=routing,
                                  trainable="router", loss="lm").to(dev)
    module.vlm.adapter.language_model().requires_grad_(True)  # a fine-tuning step: the LM's weights get grads
    module.vlm.adapter.lm_head().requires_grad_(True)
    vlm = module.vlm
    size = vlm.adapter.preprocess_config
    g = torch.Generator().manual_seed(0)
    pixels = vlm.preprocess(torch.randint(0, 256, (frames, size.height, size.width, 3), dtype=torch.uint8, generator=g))
    sample = Sample(id="bench", video="", pixels=pixels, timestamps=torch.arange(frames, dtype=torch.float64),
                    events=[Frames(0, frames), Exchange("What happens in the video?",
                                                          "A red square moves to the left and a circle appears.")],
                    feature_path=None)
    chunk, rows, targets = module.sequence(sample)
    chunk = type(chunk)(chunk.embeds.detach(), chunk.positions, chunk.kinds, chunk.frames, chunk.frame_spans)
    parts = vlm.adapter.decoder
    params = [p for p in module.parameters() if p.requires_grad]

    def step(router):
        cache = KVCache(parts.num_layers, parts.num_kv_heads, parts.head_dim, chunk.embeds.dtype, dev)
        counter = FlopCounter.for_decoder(parts)
        logits = Decoder(parts, router).forward(chunk, cache, counter, logits="all")
        loss = F.cross_entropy(logits[rows].float(), targets)
        loss.backward()
        for p in params:
            p.grad = None
        return counter

    def timed(router) -> tuple[float, int, float | None]:
        step(router)
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step(router)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
        return statistics.median(times), _saved_bytes(lambda: step(router)), peak

    dense_s, dense_saved, dense_peak = timed(DenseRouter())
    routed_s, routed_saved, routed_peak = timed(module.router)
    counter = step(module.router)
    result = {
        "suite": "train", "family": vlm.adapter.family, "device": str(dev), "routing": module.router.spec(),
        "frames": frames,
        "tokens": len(chunk), "layers": parts.num_layers, "hidden": parts.hidden_size, "repeats": repeats,
        "dense_s": dense_s, "routed_s": routed_s, "time_ratio": routed_s / dense_s,
        "dense_saved_bytes": dense_saved, "routed_saved_bytes": routed_saved,
        "memory_ratio": routed_saved / dense_saved,
        "forward_flops_fraction": counter.llm / counter.llm_dense,
    }
    if dense_peak is not None:
        result.update(dense_peak_bytes=dense_peak, routed_peak_bytes=routed_peak,
                      peak_ratio=routed_peak / dense_peak)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamvlm-train bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: a random one, see --family)")
    parser.add_argument("--family", choices=FAMILIES, default=None,
                        help="without --model: the random checkpoint's family (default llava_onevision)")
    parser.add_argument("--layers", type=int, default=None, help="without --model: its decoder layers (default 12)")
    parser.add_argument("--hidden", type=int, default=None, help="without --model: its decoder width (default 640)")
    parser.add_argument("--frames", type=int, default=8, help="frames in the sample (default 8)")
    parser.add_argument("--routing", default="mod:0.2:interleaved", help="router to compare with dense")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.model is not None and (args.family, args.layers, args.hidden) != (None, None, None):
        parser.error("--family, --layers and --hidden shape the random checkpoint; --model names one")
    model_dir = args.model or bench_checkpoint(args.family or "llava_onevision", args.layers or 12, args.hidden or 640)
    result = run(model_dir, args.frames, args.routing, args.repeats, args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"train step, {result['family']}, {result['layers']} layers, hidden {result['hidden']}, "
              f"{result['tokens']} tokens, {result['device']}, median of {result['repeats']}")
        width = max(len("dense"), len(result["routing"])) + 2
        print(f"{'dense':<{width}}{result['dense_s']:.3f} s, activations {result['dense_saved_bytes'] / 2**20:.1f} MiB")
        print(f"{result['routing']:<{width}}{result['routed_s']:.3f} s, activations "
              f"{result['routed_saved_bytes'] / 2**20:.1f} MiB")
        print(f"time {result['time_ratio']:.2f}x, activation memory {result['memory_ratio']:.2f}x, "
              f"forward FLOPs {result['forward_flops_fraction']:.2f}x of dense")
    return 0
