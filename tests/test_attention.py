"""Plain causal attention over a layer's cache (streamvlm.attention.causal_attend)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streamvlm.attention import _CACHED_MASK_SIZE, causal_attend


def _reference(q, keys, values, scale):
    """Scores of m queries at the end of L keys, each seeing the entries before its own and itself."""
    m, length = q.shape[1], keys.shape[1]
    group = q.shape[0] // keys.shape[0]
    k, v = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = q @ k.transpose(1, 2) * scale
    sees = torch.arange(length)[None, :] <= torch.arange(length - m, length)[:, None]
    return scores.masked_fill(~sees, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("m, length", [(1, 40), (7, 7), (12, 180), (300, _CACHED_MASK_SIZE // 200)])
def test_a_chunk_attends_to_the_cache_and_causally_to_itself(m, length):
    g = torch.Generator().manual_seed(m)
    q = torch.randn(4, m, 16, generator=g)
    keys, values = torch.randn(2, length, 16, generator=g), torch.randn(2, length, 16, generator=g)
    out = causal_attend(q, keys, values, 0.25)
    assert (out - _reference(q, keys, values, 0.25)).abs().max().item() < 1e-5
    if 1 < m < length:  # the same bits as the boolean mask SDPA turns into the one we keep
        mask = torch.ones(m, length, dtype=torch.bool)
        mask[:, length - m:] = torch.ones(m, m, dtype=torch.bool).tril_()
        want = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=0.25,
                                              enable_gqa=True)[0]
        assert torch.equal(out, want)


def test_a_mask_kept_from_inference_serves_training():
    q = torch.randn(4, 5, 16)
    keys, values = torch.randn(2, 30, 16), torch.randn(2, 30, 16)
    with torch.inference_mode():
        causal_attend(q, keys, values, 0.25)  # keeps the (5, 30) mask
    q.requires_grad_(True)
    causal_attend(q, keys, values, 0.25).sum().backward()  # the kept mask is no inference tensor
    assert q.grad is not None and q.grad.abs().sum().item() > 0
