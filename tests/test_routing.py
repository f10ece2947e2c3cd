"""The learned MoD router: exact at keep 1.0, K/V only for kept tokens, per-frame top-k, gradients,
save/load, and the FLOPs counter."""

from __future__ import annotations

import math

import pytest
import torch

from streamvlm import RoutingConfig, StreamVLM, StreamVLMError
from streamvlm.decoder import Decoder
from streamvlm.flops import FlopCounter
from streamvlm.routers import MoDRouter, save_router
from streamvlm.routers.config import tokens_kept
from streamvlm.types import Chunk, TEXT, VISION
from support import feed_in_chunks, random_frames

QUESTION = "What is moving?"


@pytest.fixture(scope="module")
def model_dir(checkpoints):
    return checkpoints["mqa_deep"]  # 4 layers, 9 tokens per frame


def _randomise(router: MoDRouter, seed: int = 0) -> MoDRouter:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scorer in router.scorers.values():
            scorer.weight.copy_(torch.randn(scorer.weight.shape, generator=g))
            scorer.bias.copy_(torch.randn(scorer.bias.shape, generator=g))
    return router


def _routed(model_dir, spec: str, seed: int | None = None) -> StreamVLM:
    vlm = StreamVLM.from_pretrained(model_dir, routing=spec)
    if seed is not None and isinstance(vlm.router, MoDRouter):
        _randomise(vlm.router, seed)
    return vlm


@pytest.mark.parametrize("spec", ["mod:1.0", "mod:1.0:interleaved", "mod:1.0:cosine", "mod:1,1,1,1"])
def test_untrained_router_at_keep_one_equals_dense(model_dir, spec):
    frames = random_frames(3, seed=1)
    dense, routed = StreamVLM.from_pretrained(model_dir), StreamVLM.from_pretrained(model_dir, routing=spec)
    answer = [5, 6, 7, 8]
    outs = []
    for vlm in (dense, routed):
        s = vlm.session()
        s.append_frames(frames)
        outs.append((s.score(QUESTION, answer), vlm.generate(frames, QUESTION, max_new_tokens=24, ignore_stop=True)))
    assert torch.equal(outs[0][0], outs[1][0])  # bit-identical: weight 1 + a*tanh(0) is exactly 1
    assert outs[0][1] == outs[1][1]


def _expected_entries(config: RoutingConfig, layers: int, text: int, frames: int, tpf: int) -> list[int]:
    ratios = config.layer_keep_ratios(layers)
    return [text + frames * (tpf if r is None else math.ceil(r * tpf - 1e-9)) for r in ratios]


@pytest.mark.parametrize("spec", ["mod:0.2", "mod:0.5:interleaved", "mod:0.3:all:2", "mod:0.2:deep",
                                  "mod:0.15:cosine", "mod:1,0.5,0.25,0.12", "random:0.3", "uniform:0.5:interleaved"])
def test_kv_entries_and_bytes_follow_the_formula_frame_by_frame(model_dir, spec):
    vlm = _routed(model_dir, spec, seed=3)
    tpf, layers = vlm.tokens_per_frame, vlm.adapter.decoder.num_layers
    session = vlm.session()
    frames = random_frames(5, seed=2)
    for i in range(5):
        session.append_frames(frames[i:i + 1])
    session.ask(QUESTION, max_new_tokens=4, ignore_stop=True)
    stats = session.stats()
    video_tokens = 5 * tpf
    text = stats["tokens"] - video_tokens  # every text token (and the video tail) is in every layer
    expected = _expected_entries(RoutingConfig.parse(spec), layers, text, 5, tpf)
    assert stats["kv_entries_per_layer"] == expected
    assert stats["tokens_processed_per_layer"] == expected
    per_entry = 2 * vlm.adapter.decoder.num_kv_heads * vlm.adapter.decoder.head_dim * 4
    assert stats["kv_bytes"] == sum(expected) * per_entry
    assert stats["kv_bytes_dense"] == stats["tokens"] * layers * per_entry
    assert stats["kv_bytes"] < stats["kv_bytes_dense"]
    assert stats["flops"]["llm"] < stats["flops"]["llm_dense"]
    # Cached entries of a routed layer are exactly its text tokens plus k tokens of every frame.
    cache = session.cache
    for layer, ratio in enumerate(RoutingConfig.parse(spec).layer_keep_ratios(layers)):
        per_frame = torch.bincount(cache.frames(layer)[cache.kinds(layer) == VISION].long(), minlength=5)
        assert per_frame.tolist() == [tpf if ratio is None else tokens_kept(ratio, tpf)] * 5
        assert torch.all(cache.positions(layer)[1:] > cache.positions(layer)[:-1])  # original order kept


@pytest.mark.parametrize("spec", ["mod:0.3", "mod:0.5:interleaved", "random:0.3", "uniform:0.4"])
def test_routed_chunked_ingestion_equals_one_shot(model_dir, spec):
    vlm = _routed(model_dir, spec, seed=4)
    frames = random_frames(6, seed=5)
    answers, positions = [], []
    for chunking in ([6], [1] * 6, [2, 3, 1]):
        session = vlm.session()
        feed_in_chunks(session, frames, chunking)
        answers.append(session.ask(QUESTION, max_new_tokens=24, ignore_stop=True))
        positions.append([session.cache.positions(l).tolist() for l in range(vlm.adapter.decoder.num_layers)])
    assert answers[0] == answers[1] == answers[2]
    assert positions[0] == positions[1] == positions[2]  # the same tokens kept at every layer
    stats = session.stats()
    assert sum(stats["kv_entries_per_layer"]) < stats["tokens"] * len(positions[0])  # routing dropped entries


def test_kept_tokens_follow_the_scores(model_dir):
    vlm = _routed(model_dir, "mod:0.34", seed=6)  # 9 tokens per frame -> 4 kept
    router = vlm.router
    seen = []
    original = router.decide

    def recording(layer, hidden, chunk):
        decision = original(layer, hidden, chunk)
        seen.append((layer, hidden.clone(), chunk, decision))
        return decision

    router.decide = recording
    session = vlm.session()
    session.append_frames(random_frames(3, seed=7))
    frame_chunks = [(l, h, c, d) for l, h, c, d in seen if c.num_frames]
    assert len(frame_chunks) == vlm.adapter.decoder.num_layers
    for layer, hidden, chunk, decision in frame_chunks:
        scorer = router.scorers[str(layer)]
        with torch.no_grad():
            scores = hidden[chunk.vision_index] @ scorer.weight[0] + scorer.bias[0]  # (frames, 9)
        expected = set()
        for f in range(chunk.num_frames):
            top = torch.topk(scores[f], 4).indices
            expected |= set(chunk.vision_index[f, top].tolist())
        kept_vision = {i for i in decision.keep_index.tolist() if chunk.kinds[i] == VISION}
        assert kept_vision == expected
        text = set(torch.nonzero(chunk.kinds == TEXT).squeeze(1).tolist())
        assert text <= set(decision.keep_index.tolist())
        # Weights are 1 + a tanh(score) for vision, 1 for text.
        w = dict(zip(decision.keep_index.tolist(), decision.weight.tolist()))
        for i in kept_vision:
            f, j = divmod(i - int(chunk.vision_index[0, 0]), 9)
            assert w[i] == pytest.approx(1 + 0.2 * math.tanh(float(scores[f, j])), rel=1e-5)
    # A different router keeps different tokens.
    other = _routed(model_dir, "mod:0.34", seed=7)
    s1, s2 = vlm.session(), other.session()
    router.decide = original
    for s in (s1, s2):
        s.append_frames(random_frames(3, seed=7))
    assert not torch.equal(s1.cache.positions(2), s2.cache.positions(2))


def test_gradients_reach_the_router_through_the_weights(model_dir):
    vlm = _routed(model_dir, "mod:0.5:interleaved", seed=8)
    feats = vlm.encode(random_frames(2, seed=9))
    tpf, d = vlm.tokens_per_frame, vlm.adapter.decoder.hidden_size
    text = vlm.adapter.decoder.embed_tokens(torch.tensor([3, 4, 5]))
    embeds = torch.cat([text, feats.reshape(-1, d), text]).detach()
    n = embeds.shape[0]
    kinds = torch.tensor([TEXT] * 3 + [VISION] * 2 * tpf + [TEXT] * 3, dtype=torch.uint8)
    frames = torch.tensor([-1] * 3 + [0] * tpf + [1] * tpf + [-1] * 3, dtype=torch.int32)
    chunk = Chunk(embeds, torch.arange(n), kinds, frames, ((3, 3 + tpf), (3 + tpf, 3 + 2 * tpf)))
    router = vlm.router.train()
    from streamvlm.cache import KVCache

    parts = vlm.adapter.decoder
    cache = KVCache(parts.num_layers, parts.num_kv_heads, parts.head_dim, torch.float32)
    logits = Decoder(parts, router).forward(chunk, cache, FlopCounter.for_decoder(parts), logits="all")
    logits.logsumexp(-1).sum().backward()
    routed = [l for l, r in enumerate(router.layer_keep) if r is not None]
    assert routed == [1, 3]
    for layer in routed:
        grad = router.scorers[str(layer)].weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in parts.embed_tokens.parameters())  # the model stays frozen


def test_save_load_round_trip_and_shape_check(model_dir, checkpoints, tmp_path):
    vlm = _routed(model_dir, "mod:0.3:interleaved", seed=10)
    out = save_router(vlm.router, tmp_path / "router")
    assert (out / "routing.json").is_file() and (out / "router.safetensors").is_file()
    loaded = StreamVLM.from_pretrained(model_dir, routing=str(out))
    frames = random_frames(3, seed=11)
    assert loaded.generate(frames, QUESTION, max_new_tokens=16, ignore_stop=True) == \
        vlm.generate(frames, QUESTION, max_new_tokens=16, ignore_stop=True)
    assert loaded.router.spec() == "mod:0.3:interleaved"
    for key, value in vlm.router.state_dict().items():
        assert torch.equal(loaded.router.state_dict()[key], value)

    with pytest.raises(StreamVLMError, match="made for a model with 4 layers of width 128.*2 layers of width 64"):
        StreamVLM.from_pretrained(checkpoints["gqa"], routing=out)
    with pytest.raises(StreamVLMError, match="not a router directory"):
        StreamVLM.from_pretrained(model_dir, routing=str(tmp_path))


@pytest.mark.parametrize("spec, error", [
    ("mod", "expected mod:KEEP"), ("mod:0", r"\(0, 1\]"), ("mod:1.5", r"\(0, 1\]"), ("mod:0.2:zigzag", "schedule"),
    ("mod:x", "must be a number"), ("dense:0.2", "no arguments"), ("fancy:0.2", "unknown routing"),
    ("mod:0.2:all:9", "leaves no layer"), ("mod:1,0.5", "lists 2 layers but the model has 4"),
])
def test_bad_routing_specs(model_dir, spec, error):
    with pytest.raises(StreamVLMError, match=error):
        StreamVLM.from_pretrained(model_dir, routing=spec)


def test_specs_round_trip():
    for spec in ["dense", "mod:0.2:all", "mod:0.5:interleaved", "mod:0.3:all:2", "mod:0.15:cosine", "mod:1,0.5,0.25"]:
        assert RoutingConfig.parse(spec).spec() == spec
    assert RoutingConfig.parse("mod:0.2") == RoutingConfig(policy="mod", keep_ratio=0.2)
    cosine = RoutingConfig.parse("mod:0.15:cosine").layer_keep_ratios(8)
    assert cosine[0] == 1.0 and cosine[4] == pytest.approx(0.5) and cosine[7] == pytest.approx(0.15)


def test_flops_counter_matches_a_hand_calculation():
    # d=8, 2 heads of 4 (q_dim 8), 1 kv head (kv_dim 4), MLP 16, vocab 10, 2 layers.
    c = FlopCounter(num_layers=2, hidden_size=8, q_dim=8, kv_dim=4, intermediate_size=16, vocab_size=10)
    per_token = 2 * 8 * 8 + 2 * 2 * 8 * 4 + 2 * 8 * 8 + 3 * 2 * 8 * 16  # q, k+v, o, MLP = 1152
    assert c.projection_flops + c.mlp_flops == per_token == 1152
    # A 3-token chunk on an empty cache: keys visited 1 + 2 + 3 = 6 per layer.
    c.add_dense(tokens=3, past=0)
    assert c.llm_dense == 2 * (3 * 1152 + 4 * 8 * 6)
    # Then 2 more tokens after 3: key visits 4 + 5 = 9.
    c.add_dense(tokens=2, past=3)
    assert c.llm_dense == 2 * (3 * 1152 + 4 * 8 * 6) + 2 * (2 * 1152 + 4 * 8 * 9)
    c.add_layer(1, tokens=1, key_visits=2)
    assert c.llm == 1152 + 4 * 8 * 2 and c.tokens_processed_per_layer == [0, 1]
    c.add_logits(1)
    assert c.llm == 1152 + 64 + 2 * 8 * 10


def test_session_flops_agree_with_the_counter_formula(model_dir):
    vlm = _routed(model_dir, "mod:0.34:interleaved", seed=12)
    session = vlm.session()
    session.append_frames(random_frames(2, seed=13))
    stats = session.stats()
    parts = vlm.adapter.decoder
    c = FlopCounter.for_decoder(parts)
    n = stats["tokens"]  # one chunk on an empty cache: layer l processed m_l tokens, keys 1..m_l
    expected = sum(c.layer_flops(m, m * (m + 1) // 2) for m in stats["tokens_processed_per_layer"])
    assert stats["flops"]["llm"] == expected
    assert stats["flops"]["llm_dense"] == parts.num_layers * c.layer_flops(n, n * (n + 1) // 2)


def test_baselines_choose_as_documented(model_dir):
    uniform = _routed(model_dir, "uniform:0.34")  # 9 tokens per frame -> 4 kept: positions 0, 2, 4, 6
    session = uniform.session()
    session.append_frames(random_frames(2, seed=1))
    cache = session.cache
    for layer in range(4):
        vision = cache.kinds(layer) == VISION
        first = int(torch.nonzero(vision)[0])
        within = (cache.positions(layer)[vision] - cache.positions(layer)[first]) % 9
        assert within.tolist() == [0, 2, 4, 6] * 2
    rand = _routed(model_dir, "random:0.34")
    session = rand.session()
    session.append_frames(random_frames(2, seed=1))
    per_layer = [session.cache.positions(l)[session.cache.kinds(l) == VISION].tolist() for l in range(4)]
    assert all(len(p) == 8 for p in per_layer) and len({tuple(p) for p in per_layer}) > 1  # differs by layer


def test_a_checkpoints_own_router_serves_every_keep_ratio(model_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    trained = _routed(model, "mod:0.3:all:1", seed=12).router
    save_router(trained, model / "router")
    for spec, keep in (("mod:0.5", 0.5), ("mod:0.2", 0.2)):
        router = StreamVLM.from_pretrained(model, routing=spec).router
        assert router.spec() == f"mod:{keep:g}:all:1"  # the trained layers, at the keep asked for
        for key, value in trained.state_dict().items():
            assert torch.equal(router.state_dict()[key], value)
    # naming the trained layers also takes the trained weights; other layers get a fresh router
    same = StreamVLM.from_pretrained(model, routing="mod:0.7:all:1").router
    assert torch.equal(same.scorers["1"].weight, trained.scorers["1"].weight)
    other = StreamVLM.from_pretrained(model, routing="mod:0.5:interleaved").router
    assert other.spec() == "mod:0.5:interleaved" and float(other.scorers["1"].weight.abs().sum()) == 0.0
    vlm = StreamVLM.from_pretrained(model)
    assert float(vlm.with_routing("mod:0.2").router.scorers["2"].weight.abs().sum()) > 0
    # without a router folder, mod:KEEP is a fresh (zero) router on every layer, as before
    plain = StreamVLM.from_pretrained(model_dir, routing="mod:0.5").router
    assert plain.spec() == "mod:0.5:all" and float(plain.scorers["0"].weight.abs().sum()) == 0.0
