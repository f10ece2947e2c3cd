"""YOPO's sparse FFN: vision tokens go through only the first part of the MLP's intermediate neurons.

The families' language models all use a gated SiLU MLP, down(act(gate(x)) * up(x)), with `gate_proj`,
`up_proj` (d -> I) and `down_proj` (I -> d). Keeping the first k neurons is slicing rows 0..k-1 of gate and
up and columns 0..k-1 of down: the k-neuron MLP costs k / I of the dense one, and nothing is computed and
masked afterwards. With k = I the same three matmuls run on the whole weights, so the result is the dense
MLP's bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from streamvlm.errors import StreamVLMError
from streamvlm.kernels import linear

_GATED = ("gate_proj", "up_proj", "down_proj", "act_fn")


def vision_neurons(intermediate_size: int, fraction: float) -> int:
    """k = ceil(fraction * I) neurons (at least 1), robust to float error (0.5 * 384 is 192, not 193)."""
    if not 0.0 < fraction <= 1.0:
        raise StreamVLMError(f"the FFN fraction must be in (0, 1], got {fraction}")
    return max(1, min(intermediate_size, math.ceil(fraction * intermediate_size - 1e-9)))


def check_gated_mlp(mlp: nn.Module, layer: int) -> None:
    """Raise unless `mlp` is a gated MLP whose neurons can be sliced (gate_proj, up_proj, down_proj, act_fn)."""
    missing = [name for name in _GATED if not hasattr(mlp, name)]
    if missing:
        raise StreamVLMError(f"layer {layer}: YOPO's sparse FFN slices a gated MLP's neurons, but this model's "
                             f"{type(mlp).__name__} has no {', '.join(missing)}; use an FFN fraction of 1")


def sparse_mlp(mlp: nn.Module, x: torch.Tensor, neurons: int) -> torch.Tensor:
    """x (m, d) normed hidden states -> (m, d): the gated MLP restricted to its first `neurons` intermediate
    neurons (rows of gate/up, columns of down). Slices are views, so gradients reach the full weights."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    g = linear(x, gate.weight[:neurons], None if gate.bias is None else gate.bias[:neurons])
    u = linear(x, up.weight[:neurons], None if up.bias is None else up.bias[:neurons])
    return linear(mlp.act_fn(g) * u, down.weight[:, :neurons], down.bias)
