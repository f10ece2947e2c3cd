"""Each method's core as its paper defines it, on hand-made tensors, and wired through the runtime: CLS-knee's
knee, its CLS / MAP-head / mean-token references; G-Search's nesting, previous-layer ranking and dense first
layer."""

from __future__ import annotations

import pytest
import torch

from streamvlm import StreamVLM, StreamVLMError
from streamvlm.routers.cls_knee import (cls_scores, keep_before_knee, knee_index, map_scores, mean_scores,
                                        parse as parse_cls_knee, tower_kind)
from streamvlm.types import VISION
from support import random_frames


@pytest.fixture(scope="module")
def vlm(checkpoints):
    return StreamVLM.from_pretrained(checkpoints["mqa_deep"])  # 4 layers, 9 tokens per frame


def test_knee_of_a_known_curve():
    # y = 1 / (1 + 10 x) sampled on 11 points: after scaling, the farthest point below the chord y = 1 - x is
    # x = 0.2 (index 2), where the tail begins
    x = torch.linspace(0, 1, 11)
    curve = 1 / (1 + 10 * x)
    scaled = (curve - curve[-1]) / (curve[0] - curve[-1])
    assert knee_index(curve) == int(((1 - x) - scaled).argmax()) == 2
    # a step: two high tokens, then a flat tail -> keep the two
    assert knee_index(torch.tensor([1.0, 0.98, 0.1, 0.09, 0.08, 0.07, 0.06])) == 2


def test_keep_before_knee_keeps_the_high_scores_and_honours_the_floor():
    scores = torch.tensor([[0.1, 0.9, 0.12, 0.95, 0.11, 0.1, 0.13, 0.1],
                           [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.9]])
    kept = keep_before_knee(scores, floor=1)
    assert kept[0].tolist() == [1, 3]  # the two outliers, in ascending order
    assert kept[1].tolist() == [7]
    assert keep_before_knee(scores, floor=3)[0].tolist() == [1, 3, 6]  # the floor adds the next best


def test_cls_reference_is_similarity_to_the_class_token():
    cls = torch.tensor([1.0, 0.0, 0.0])
    patches = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.1, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    scores = cls_scores(torch.cat([cls[None], patches])[None])
    assert scores.shape == (1, 4)
    assert torch.allclose(scores[0], torch.tensor([0.0, 2.0 / (4.01 ** 0.5), -1.0, 2 ** -0.5]))


def test_map_reference_is_the_pooling_heads_attention_over_patches():
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    d = 4
    head = SiglipMultiheadAttentionPoolingHead(SiglipVisionConfig(hidden_size=d, num_attention_heads=1,
                                                                  intermediate_size=8))
    with torch.no_grad():  # identity projections: the probe's query meets each patch as its own key
        head.attention.in_proj_weight.copy_(torch.cat([torch.eye(d)] * 3))
        head.attention.in_proj_bias.zero_()
        head.probe.copy_(torch.tensor([[[3.0, 0.0, 0.0, 0.0]]]))
    patches = torch.tensor([[[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [-1.0, 0, 0, 0]]])
    scores = map_scores(head, patches)
    expected = ((patches[0] @ head.probe[0, 0]) / d ** 0.5).softmax(-1)
    assert torch.allclose(scores[0], expected, atol=1e-6)
    assert int(scores.argmax()) == 2


def test_mean_reference_ranks_the_most_distinct_tokens_first():
    # a background of near-identical tokens and one object token: the object is farthest from the mean
    background = torch.tensor([1.0, 0.0, 0.0]) + 0.01 * torch.arange(7.0)[:, None]
    tokens = torch.cat([background[:3], torch.tensor([[0.0, 1.0, 0.0]]), background[3:]])[None]
    scores = mean_scores(tokens)
    assert int(scores.argmax()) == 3
    assert keep_before_knee(scores, floor=1)[0].tolist() == [3]


def test_cls_knee_spec_round_trips_and_refuses_a_bad_reference():
    assert parse_cls_knee("cls_knee").spec() == "cls_knee:0.05"
    assert parse_cls_knee("cls_knee:0.1::mean").spec() == "cls_knee:0.1::mean"
    assert parse_cls_knee("cls_knee:0.1:0.5:map").question_keep == 0.5
    with pytest.raises(StreamVLMError, match="auto, cls, map, mean"):
        parse_cls_knee("cls_knee:0.1:0.5:middle")


def test_a_tower_without_cls_or_head_ranks_by_the_mean_and_refuses_map(vlm):
    assert tower_kind(vlm.adapter) == "mean"
    assert vlm.with_routing("cls_knee").router.kind == "mean"
    with pytest.raises(StreamVLMError, match="offers 'mean'"):
        vlm.with_routing("cls_knee:0.1::map")


def test_a_tower_with_a_map_head_ranks_each_frame_by_the_heads_attention(checkpoints):
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    vlm = StreamVLM.from_pretrained(checkpoints["mqa_deep"])  # its own copy: a head is added to its tower
    tower = vlm.adapter.vision_tower()
    torch.manual_seed(0)
    tower.head = SiglipMultiheadAttentionPoolingHead(tower.config).eval()
    tower.use_head = True
    assert tower_kind(vlm.adapter) == "map"
    model = vlm.with_routing("cls_knee:0.1")
    assert model.router.kind == "map"
    frames = random_frames(3, seed=4)
    session = model.session()
    session.append_frames(frames)
    # what the head says, computed here by hand from the tower's last layer, pooled to the 3 x 3 token grid
    inner = vlm.adapter.model.model
    with torch.no_grad():
        hidden = tower(vlm.preprocess(frames), output_hidden_states=True).hidden_states[-1]
        patch = map_scores(tower.head, tower.post_layernorm(hidden))
        pooled = inner.apply_pooling(patch[..., None])[..., 0]
    expected = keep_before_knee(pooled, floor=1)
    cache = session.cache
    vision = cache.kinds(0) == VISION
    kept = [torch.nonzero(cache.frames(0)[vision] == f).numel() for f in range(3)]
    assert kept == [e.numel() for e in expected]
    again = model.router.keep_per_frame(vlm.encode(frames))  # re-encoded frames find their scores by content
    assert [k.tolist() for k in again] == [e.tolist() for e in expected]
    by_mean = keep_before_knee(mean_scores(vlm.encode(frames).float()), floor=1)
    assert any(not torch.equal(a, b) for a, b in zip(expected, by_mean))  # and it is not the mean ranking


def _vision_positions(cache, layer):
    return set(cache.positions(layer)[cache.kinds(layer) == VISION].tolist())


def test_g_search_never_prunes_the_first_layer():
    from streamvlm.routers.schedule import ScheduleConfig, sigmoid_schedule

    with pytest.raises(StreamVLMError, match="R0 must be 1"):
        ScheduleConfig(keep=(0.5, 0.5, 0.25, 0.25))
    keep = sigmoid_schedule(6, steepness=3.0, midpoint=0.0, floor=0.2)  # steep and early: layer 0 would be 0.6
    assert keep[0] == 1.0 and keep[1] < 0.3
    assert all(a >= b for a, b in zip(keep, keep[1:]))


def test_g_search_keeps_nested_sets_ranked_by_the_previous_layers_attention(vlm):
    from streamvlm.routers.ranking import frame_attention_ranking

    model = vlm.with_routing("schedule:1,0.7,0.5,0.2")  # 9 tokens a frame: 9, 7, 5, 2
    router = model.router
    inputs = {}
    decide = router.decide

    def recording(layer, hidden, chunk):
        inputs[layer] = (hidden.clone(), chunk)
        return decide(layer, hidden, chunk)

    router.decide = recording
    session = model.session()
    session.append_frames(random_frames(2, seed=5))
    cache = session.cache
    kept = [_vision_positions(cache, layer) for layer in range(4)]
    assert [len(k) for k in kept] == [18, 14, 10, 4]
    assert kept[3] <= kept[2] <= kept[1] <= kept[0]  # nested
    # layer 1 keeps each frame's 7 tokens most attended at layer 0, ranked with layer 0's weights on its input
    hidden, chunk = inputs[0]
    ranking = frame_attention_ranking(vlm.adapter.decoder, 0, hidden, chunk)  # (F, 9)
    top = ranking.topk(7, dim=-1).indices
    assert kept[1] == set(chunk.positions[chunk.vision_index.gather(1, top)].flatten().tolist())
    # and layer 2 keeps the best 5 of those by layer 1's attention, computed on layer 1's input
    hidden, chunk = inputs[1]
    ranking = frame_attention_ranking(vlm.adapter.decoder, 1, hidden, chunk)
    still = chunk.vision_index.gather(1, top.sort(dim=-1).values)
    best = ranking.gather(1, top.sort(dim=-1).values).topk(5, dim=-1).indices
    assert kept[2] == set(chunk.positions[still.gather(1, best)].flatten().tolist())
