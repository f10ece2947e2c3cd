"""Linear layers on CPU through oneDNN rather than MKL.

torch sends a float32 `F.linear` on CPU to MKL's sgemm. On this project's CPUs (AMD EPYC, AVX-512) oneDNN's
matmul (`torch.ops.mkldnn._linear_pointwise`) runs the same products faster where the weight is large and the
rows few: 1.5x-1.9x for one row at 1024x1024 and 2560x640, 1.2x-1.8x up to 196 rows at 1024x1024, about even
at 512x512; a decode step of the real-small shape took 19-21 ms against MKL's 22-35 ms. It needs no extra
memory (it reads the weight where it lies), while MKL repacks the whole weight at every call, which is much of
why a frame appended alone cost more than its share of one call for all frames. A call costs oneDNN more to
set up, so small weights stay on MKL (MIN_WEIGHT). Figures: docs/performance.md, "Linear layers through
oneDNN".

So a model loaded onto the CPU has its `nn.Linear` modules switched to `Linear` (`use_onednn_linears`): the
same module with the same parameters and state dict, whose forward calls oneDNN when the input is float32 and
no gradient is wanted, and `F.linear` otherwise (training; other dtypes). The sums run in another order than
MKL's, so outputs differ from stock transformers in the last bits (the parity tests bound them).

STREAMVLM_CPU_LINEAR=torch, set before streamvlm is imported, keeps `F.linear` everywhere; `stock_linears()`
does the same for one block of code (a benchmark's transformers baseline).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN costs about 15 us a call against MKL's 3 (2 threads): below about 512x512 weights MKL is as fast or
# faster, and at 128x128 five times faster for one row (the built-in model decoded at 0.53x through oneDNN).
MIN_WEIGHT = 512 * 1024
"""Weights of fewer elements stay on F.linear."""


def _from_environment() -> bool:
    value = os.environ.get("STREAMVLM_CPU_LINEAR", "onednn").strip().lower()
    if value not in ("onednn", "torch"):
        warnings.warn(f"STREAMVLM_CPU_LINEAR={value!r} is neither 'onednn' nor 'torch'; using onednn",
                      stacklevel=2)
    return value != "torch" and torch.backends.mkldnn.is_available()


# A plain global, not a ContextVar: torch.compile traces `linear` and cannot read a ContextVar.
_onednn = _from_environment()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through oneDNN for float32 on CPU when the weight has MIN_WEIGHT elements or
    more and no gradient is wanted (and not under torch.compile, whose CPU backend lowers the op only for weights
    it packed itself)."""
    # the size first: on a small model it is the one test every call pays
    if (weight.numel() >= MIN_WEIGHT and _onednn and x.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` (oneDNN on CPU in inference); made by `use_onednn_linears`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Switch every plain nn.Linear in `model` to `Linear`, in place; the number switched. Subclasses (LoRA's,
    quantized ones) keep their own forward."""
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
            switched += 1
    return switched


@contextlib.contextmanager
def stock_linears() -> Iterator[None]:
    """Within the block `linear` is plain F.linear (MKL on CPU), in every thread: for a benchmark's baseline,
    not for code that runs beside other work."""
    global _onednn
    before, _onednn = _onednn, False
    try:
        yield
    finally:
        _onednn = before


def onednn_linears() -> bool:
    """Whether `linear` goes to oneDNN here (for float32 CPU inputs without gradients)."""
    return _onednn


def linear_backend(device: torch.device) -> str:
    """What a model's large linear layers run on, on `device`: "onednn" or "torch" (F.linear)."""
    return "onednn" if _onednn and device.type == "cpu" else "torch"
