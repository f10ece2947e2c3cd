"""streamvlm.kernels: linear layers through oneDNN on CPU in inference, F.linear where a gradient is wanted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from streamvlm import StreamVLM
from streamvlm.kernels import Linear, linear, onednn_linears, stock_linears, use_onednn_linears

ONEDNN_OP = "mkldnn::_linear_pointwise"


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("shape", [(5, 48), (2, 7, 48), (0, 48), (1, 48)])
def test_linear_is_f_linear_through_onednn_in_inference(shape):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(*shape, generator=g), torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    with torch.inference_mode():
        out = linear(x, w, b)
        assert ONEDNN_OP in ops_run(lambda: linear(x, w, b))
    # a slice of a weight (a view with strides), as YOPO's sparse FFN passes them
    sliced, expected_sliced = linear(x[..., :24], w[:10, :24]), F.linear(x[..., :24], w[:10, :24])
    for ours, theirs in ((out, F.linear(x, w, b)), (sliced, expected_sliced)):
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-5)


def test_linear_takes_f_linear_where_a_gradient_is_wanted():
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(4, 8)
    assert ONEDNN_OP not in ops_run(lambda: linear(x, w))
    linear(x, w).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(3, 8))
    frozen_input_trained_weight = torch.randn(4, 8, requires_grad=True)
    assert ONEDNN_OP not in ops_run(lambda: linear(torch.randn(3, 8), frozen_input_trained_weight))
    with torch.no_grad():  # nothing wants a gradient
        assert ONEDNN_OP in ops_run(lambda: linear(x, w))


def test_stock_linears_is_f_linear_for_the_block_only():
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert onednn_linears()
    with stock_linears():
        assert not onednn_linears()
        assert ONEDNN_OP not in ops_run(lambda: linear(x, w))
    assert onednn_linears() and ONEDNN_OP in ops_run(lambda: linear(x, w))


def test_use_onednn_linears_switches_plain_linears_only():
    class Own(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Own(8, 4), nn.Sequential(nn.Linear(4, 2, bias=False)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8)
    expected = model(x)
    assert use_onednn_linears(model) == 2
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [Linear, Own, Linear]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.inference_mode():
        assert (model(x) - expected).abs().max().item() <= 1e-5


def test_a_model_loaded_on_cpu_has_no_plain_linear_left(tiny_dir):
    vlm = StreamVLM.from_pretrained(tiny_dir)
    linears = [m for m in vlm.adapter.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is Linear for m in linears)
    assert not any(p.requires_grad for p in vlm.adapter.model.parameters())


def test_the_environment_can_keep_stock_linears():
    code = "from streamvlm.kernels import onednn_linears; print(onednn_linears())"
    for value, expected in (("torch", "False"), ("onednn", "True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "STREAMVLM_CPU_LINEAR": value})
        assert out.stdout.strip() == expected
