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

from streamvlm import StreamVLM, kernels
from streamvlm.kernels import MIN_WEIGHT, Linear, linear, onednn_linears, stock_linears, use_onednn_linears

from support import SPECS, hf_inputs, random_frames

ONEDNN_OP = "mkldnn::_linear_pointwise"
PROMPT = "What happens in the video?"


def ops_run(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


IN, OUT = 512, MIN_WEIGHT // 512  # the smallest weight that goes to oneDNN


@pytest.mark.parametrize("shape", [(5, IN), (2, 7, IN), (0, IN), (1, IN)])
def test_linear_is_f_linear_through_onednn_in_inference(shape):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(*shape, generator=g), torch.randn(OUT, IN, generator=g), torch.randn(OUT, generator=g)
    with torch.inference_mode():
        out = linear(x, w, b)
        assert ONEDNN_OP in ops_run(lambda: linear(x, w, b))
    # the first columns of a wider weight (a view with strides), as YOPO's sparse FFN passes down_proj's
    part = torch.randn(OUT, 2 * IN, generator=g)[:, :IN]
    with torch.inference_mode():
        sliced = linear(x, part)
        assert ONEDNN_OP in ops_run(lambda: linear(x, part))
    for ours, theirs in ((out, F.linear(x, w, b)), (sliced, F.linear(x, part))):
        assert ours.shape == theirs.shape
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-4)


def test_small_weights_stay_on_f_linear():
    x, w = torch.randn(3, IN), torch.randn(OUT - 1, IN)
    with torch.inference_mode():
        assert ONEDNN_OP not in ops_run(lambda: linear(x, w))
        assert torch.equal(linear(x, w), F.linear(x, w))


def test_linear_takes_f_linear_where_a_gradient_is_wanted():
    x, w = torch.randn(3, IN, requires_grad=True), torch.randn(OUT, IN)
    assert ONEDNN_OP not in ops_run(lambda: linear(x, w))
    linear(x, w).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(3, IN), atol=1e-4)
    frozen_input_trained_weight = torch.randn(OUT, IN, requires_grad=True)
    assert ONEDNN_OP not in ops_run(lambda: linear(torch.randn(3, IN), frozen_input_trained_weight))
    with torch.no_grad():  # nothing wants a gradient
        assert ONEDNN_OP in ops_run(lambda: linear(x, w))


def test_stock_linears_is_f_linear_for_the_block_only():
    x, w = torch.randn(3, IN), torch.randn(OUT, IN)
    assert onednn_linears()
    with stock_linears():
        assert not onednn_linears()
        assert ONEDNN_OP not in ops_run(lambda: linear(x, w))
    assert onednn_linears() and ONEDNN_OP in ops_run(lambda: linear(x, w))


def test_use_onednn_linears_switches_plain_linears_only():
    class Own(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(IN, OUT), nn.ReLU(), Own(OUT, 4), nn.Sequential(nn.Linear(4, 2, bias=False)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, IN)
    expected = model(x)
    assert use_onednn_linears(model) == 2
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [Linear, Own, Linear]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.inference_mode():
        assert ONEDNN_OP in ops_run(lambda: model(x))
        assert (model(x) - expected).abs().max().item() <= 1e-4


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


def test_an_unknown_environment_value_is_named_and_onednn_kept():
    code = "from streamvlm.kernels import onednn_linears; print(onednn_linears())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "STREAMVLM_CPU_LINEAR": "mkl"})
    assert out.stdout.strip() == "True"
    assert "STREAMVLM_CPU_LINEAR='mkl' is neither 'onednn' nor 'torch'" in out.stderr


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_linear_through_onednn_still_equals_transformers(checkpoints, hf_model, monkeypatch, name):
    """The tiny checkpoints' weights are below MIN_WEIGHT; with it at 0 every linear layer goes to oneDNN, and
    logits and greedy text still equal stock transformers' (F.linear)."""
    monkeypatch.setattr(kernels, "MIN_WEIGHT", 0)
    vlm = StreamVLM.from_pretrained(checkpoints[name])
    frames = random_frames(3, seed=4)
    ref = hf_inputs(checkpoints[name], vlm.preprocess(frames), PROMPT)
    with torch.no_grad(), stock_linears():
        out = hf_model(checkpoints[name]).generate(**ref, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                                   output_scores=True, return_dict_in_generate=True)
    theirs = out.sequences[0, ref["input_ids"].shape[1]:].tolist()
    session = vlm.session()
    session.append_frames(frames)
    ops = ops_run(lambda: session.ask(PROMPT, max_new_tokens=16, ignore_stop=True))
    assert ONEDNN_OP in ops and "aten::linear" not in ops
    assert list(session.turns[-1].answer_ids) == theirs and len(set(theirs)) > 1
    ours = vlm.session()
    ours.append_frames(frames)
    logits = ours.score(PROMPT, theirs[:1])[0]  # the first answer token's logits
    assert (logits - out.scores[0][0]).abs().max().item() <= 1e-4
