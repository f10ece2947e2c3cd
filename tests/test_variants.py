"""Layer variants are chosen when the decoder is built, and each runs its own path."""

from __future__ import annotations

import pytest
import torch

from streamvlm import StreamVLM
from streamvlm.routers import DenseRouter, PrunedHeads, RouteDecision, WindowAttention
from support import random_frames


@pytest.fixture(scope="module")
def vlm(checkpoints):
    return StreamVLM.from_pretrained(checkpoints["gqa"])


class Counting(DenseRouter):
    """Asks for a variant on some layers and counts how often it is asked."""

    def __init__(self, variants: dict):
        super().__init__()
        self.variants = variants
        self.asked = 0

    def variant(self, layer):
        self.asked += 1
        return self.variants.get(layer)

    def spec(self):
        return "counting"


def _score(model, frames):
    session = model.session()
    session.append_frames(frames)
    return session.score("What is there?", [5, 6, 7])


def test_variants_are_asked_once_per_layer_when_the_decoder_is_built(vlm):
    router = Counting({1: WindowAttention(3)})
    model = vlm.with_routing(router)
    layers = vlm.adapter.decoder.num_layers
    assert router.asked == layers
    for seed in range(3):
        _score(model, random_frames(3, seed=seed))
    assert router.asked == layers  # not per forward, not per layer call


def test_a_variant_from_a_custom_router_equals_the_built_in_policy(vlm):
    frames = random_frames(3, seed=5)
    custom = _score(vlm.with_routing(Counting({layer: WindowAttention(1) for layer in range(99)})), frames)
    builtin = _score(vlm.with_routing("neighbor_attention:1"), frames)  # only itself in its frame
    assert torch.equal(custom, builtin)
    assert not torch.allclose(builtin, _score(vlm, frames), atol=1e-4)  # the window changed the answer's logits


def test_pruning_no_head_is_the_dense_model(vlm):
    heads = vlm.adapter.decoder.num_heads
    frames = random_frames(2, seed=6)
    none_pruned = _score(vlm.with_routing(Counting({0: PrunedHeads((False,) * heads)})), frames)
    assert torch.allclose(none_pruned, _score(vlm, frames), atol=1e-5)
    one_pruned = _score(vlm.with_routing(Counting({0: PrunedHeads((True,) + (False,) * (heads - 1))})), frames)
    assert not torch.allclose(one_pruned, none_pruned, atol=1e-4)


def test_a_token_choice_on_a_variant_layer_is_refused(vlm):
    class Both(Counting):
        def decide(self, layer, hidden, chunk):
            return RouteDecision(torch.arange(len(chunk))) if layer == 1 else None

    with pytest.raises(ValueError, match="processes every token"):
        _score(vlm.with_routing(Both({1: WindowAttention(3)})), random_frames(1))


def test_an_unknown_variant_or_a_wrong_head_mask_fails_when_the_decoder_is_built(vlm):
    with pytest.raises(TypeError, match="unknown layer variant"):
        vlm.with_routing(Counting({0: "window"}))
    with pytest.raises(ValueError, match="head mask"):
        vlm.with_routing(Counting({0: PrunedHeads((True,))}))
