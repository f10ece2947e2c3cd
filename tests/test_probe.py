"""The attention probe and the hidden-state recorder: the probe's keys are the decoder's cached keys in every
family, and it reproduces exactly what fastv/pdrop's ranking, cls_knee's question stage, head calibration
and the training's ranking loss computed with their own copies of the formula."""

from __future__ import annotations

import pytest
import torch

from streamvlm import StreamVLM
from streamvlm.probe import HiddenRecorder, attention_probs, layer_keys
from streamvlm.routers.config import tokens_kept
from streamvlm.routers.ranking import frame_attention_ranking
from streamvlm.types import VISION
from support import random_frames


@pytest.fixture(scope="module")
def models(checkpoints, tmp_path_factory) -> dict:
    from streamvlm.tiny.qwen import write_tiny_qwen
    from streamvlm.tiny.qwen3 import write_tiny_qwen3_vl

    root = tmp_path_factory.mktemp("probe")
    dirs = {name: checkpoints[name] for name in ("gqa", "mqa_deep", "odd_grid_mha")}
    dirs["qwen2_5_vl"] = write_tiny_qwen(root / "qwen2_5_vl", "qwen2_5_vl")  # M-RoPE: (3, B, m) position ids
    dirs["qwen3_vl"] = write_tiny_qwen3_vl(root / "qwen3_vl")  # per-head q/k norms
    return {name: StreamVLM.from_pretrained(path) for name, path in dirs.items()}


def _recorded(vlm: StreamVLM, frames: int = 4, seed: int = 0):
    """A session that ingested `frames` frames through a recorder: (session, recorder); every layer's last
    chunk is the frames' chunk, the last n entries of each cache layer."""
    recorder = HiddenRecorder()
    session = vlm.with_routing(recorder).session()
    session.append_frames(random_frames(frames, seed=seed))
    return session, recorder


# The formulas fastv/pdrop/schedule's ranking and cls_knee's question stage used before the probe (their own
# copies of norm -> q/k -> RoPE -> softmax), to check that the probe-based routers compute the same.

def _frame_ranking_before(parts, layer: int, hidden: torch.Tensor, chunk) -> torch.Tensor:
    from streamvlm.rope import apply_rope

    lp = parts.layers[layer]
    vision = chunk.vision_index  # (F, T)
    frames, tokens = vision.shape
    h = lp.input_norm(hidden[vision])  # (F, T, d)
    cos, sin = parts.rotary(h, chunk.rope_ids(vision))  # (F, T, hd)
    q = lp.q_proj(h[:, -1:]).view(frames, 1, parts.num_heads, parts.head_dim).transpose(1, 2)  # (F, H, 1, hd)
    k = lp.k_proj(h).view(frames, tokens, parts.num_kv_heads, parts.head_dim).transpose(1, 2)  # (F, KV, T, hd)
    q = apply_rope(q, cos[:, None, -1:], sin[:, None, -1:])
    k = apply_rope(k, cos[:, None], sin[:, None])
    k = k.repeat_interleave(parts.num_heads // parts.num_kv_heads, dim=1)
    scores = (q @ k.transpose(-1, -2)) * parts.head_dim ** -0.5  # (F, H, 1, T)
    return scores.softmax(-1).mean(dim=1)[:, 0]


def _question_evictions_before(router, cache, question_embeds, question_rope_ids):
    from streamvlm.rope import apply_rope

    parts = router.parts
    vision = cache.kinds(0) == VISION
    lp = parts.layers[0]
    h = lp.input_norm(question_embeds)
    m = h.shape[0]
    q = lp.q_proj(h).view(m, parts.num_heads, parts.head_dim).transpose(0, 1)
    cos, sin = parts.rotary(h, question_rope_ids)
    q = apply_rope(q, cos[0], sin[0])
    keys = cache.keys(0).repeat_interleave(parts.num_heads // parts.num_kv_heads, 0)
    attention = ((q @ keys.transpose(1, 2)) * parts.head_dim ** -0.5).softmax(-1).mean(dim=(0, 1))  # (L,)
    positions = cache.positions(0)[vision]
    count = tokens_kept(router.config.question_keep, positions.numel())
    return positions[attention[vision].argsort(descending=True)[count:]]


@pytest.mark.parametrize("name", ["gqa", "qwen2_5_vl", "qwen3_vl"])
def test_layer_keys_are_the_keys_the_decoder_caches(models, name):
    vlm = models[name]
    session, recorder = _recorded(vlm)
    parts = vlm.adapter.decoder
    with torch.inference_mode():
        for layer in range(parts.num_layers):
            hidden, chunk = recorder.hidden[layer], recorder.chunks[layer]
            assert chunk.num_frames > 0
            cached = session.cache.keys(layer)[:, -len(chunk):]
            assert torch.allclose(layer_keys(parts, layer, hidden, chunk.rope_ids()), cached, atol=1e-6)


@pytest.mark.parametrize("name", ["gqa", "mqa_deep", "odd_grid_mha", "qwen2_5_vl"])
def test_probe_ranking_reproduces_the_former_frame_attention_ranking(models, name):
    vlm = models[name]
    _, recorder = _recorded(vlm, seed=1)
    parts = vlm.adapter.decoder
    with torch.inference_mode():
        for layer in range(parts.num_layers):
            hidden, chunk = recorder.hidden[layer], recorder.chunks[layer]
            expected = _frame_ranking_before(parts, layer, hidden, chunk)
            got = frame_attention_ranking(parts, layer, hidden, chunk)
            # Equal to rounding, not bit for bit: the old code projects the query from a strided slice of the
            # frame's normed states, the probe from the contiguous normed row (another GEMM path, last bit).
            assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
            # The order is what fastv, pdrop and schedule keep by, and it is the same.
            assert torch.equal(got.sort(descending=True, stable=True).indices,
                               expected.sort(descending=True, stable=True).indices)
    assert expected.shape == chunk.vision_index.shape


@pytest.mark.parametrize("name", ["gqa", "mqa_deep", "qwen2_5_vl"])
def test_probe_reproduces_the_former_cls_knee_question_evictions(models, name):
    vlm = models[name]
    router = vlm.with_routing("cls_knee:1.0:0.5").router
    session = vlm.session()
    session.append_frames(random_frames(4, seed=2))
    session.ask("What is moving?", max_new_tokens=3, ignore_stop=True)  # text entries after the frames too
    ids = vlm.tokenizer("And then, what is on the left?")["input_ids"]
    parts = vlm.adapter.decoder
    start = session.cache.length(0)
    rope_ids = torch.arange(start, start + len(ids))[None]
    if vlm.adapter.mrope:
        rope_ids = rope_ids.expand(3, 1, -1)
    with torch.inference_mode():
        embeds = parts.embed_tokens(torch.tensor(ids))
        expected = _question_evictions_before(router, session.cache, embeds, rope_ids)
        got = router.question_evictions(session.cache, embeds, rope_ids)
    assert expected.numel() > 0 and torch.equal(got, expected)


def test_causal_probe_equals_the_decoders_attention(models):
    """With the chunk's own queries against the layer's cache, causal probabilities times the values give the
    attention output the decoder computed: the layer's output minus its MLP, via o_proj."""
    vlm = models["mqa_deep"]
    session, recorder = _recorded(vlm, seed=3)
    parts = vlm.adapter.decoder
    layer = 1
    hidden, chunk = recorder.hidden[layer], recorder.chunks[layer]
    lp = parts.layers[layer]
    with torch.inference_mode():
        probs = attention_probs(parts, layer, hidden, chunk.rope_ids(), session.cache.keys(layer), causal=True)
        values = session.cache.values(layer).repeat_interleave(parts.num_heads // parts.num_kv_heads, 0)
        attn = (probs @ values).transpose(0, 1).reshape(len(chunk), -1)  # (n, H * hd)
        mid = hidden + lp.o_proj(attn)
        out = mid + lp.mlp(lp.post_attention_norm(mid))
        assert torch.allclose(out, recorder.hidden[layer + 1], atol=1e-5)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
        averaged = attention_probs(parts, layer, hidden, chunk.rope_ids(), session.cache.keys(layer), causal=True,
                                   mean_heads=True)
        assert torch.equal(averaged, probs.mean(dim=0))


def test_recorder_keeps_only_the_chosen_layers_and_routes_dense(models):
    vlm = models["mqa_deep"]
    recorder = HiddenRecorder([1, 3])
    frames = random_frames(2, seed=4)
    outs = []
    for model in (vlm, vlm.with_routing(recorder)):
        session = model.session()
        session.append_frames(frames)
        outs.append(session.score("What?", [5, 6]))
    assert torch.equal(outs[0], outs[1])
    assert set(recorder.hidden) == set(recorder.chunks) == {1, 3}
    assert recorder.hidden[1].shape == (len(recorder.chunks[1]), vlm.adapter.decoder.hidden_size)


# Head calibration and the ranking loss, against copies of the formulas they used before the probe (head
# calibration's since moved from the closing text's queries to the question's and answer's).

def _calibrate_heads_before(vlm, clips, questions, tau=0.07, min_fraction=0.4, dense_layers=2, max_new_tokens=16):
    from streamvlm.rope import apply_rope
    from streamvlm.routers.base import DenseRouter
    from streamvlm.types import TEXT

    parts = vlm.adapter.decoder

    class Recorder(DenseRouter):
        def decide(self, layer, hidden, chunk):
            self.every.setdefault(layer, []).append((hidden, chunk))
            return None

    recorder = Recorder()
    recorder.every = {}
    model = vlm.with_routing(recorder)
    active = torch.zeros(parts.num_layers, parts.num_heads)
    ratio_sum = torch.zeros(parts.num_layers, parts.num_heads)
    samples = 0
    for frames in clips:
        for question in questions:
            session = model.session()
            session.append_frames(frames)
            reference = vlm.session()
            reference.append_frames(frames)
            reference.ask(question, max_new_tokens=max_new_tokens, ignore_stop=True)
            answer = list(reference.turns[-1].answer_ids)
            recorder.every = {}
            session.score(question, answer)
            last = session.turns[-1].context_tokens + len(answer) - 1
            with torch.no_grad():
                for layer in range(parts.num_layers):
                    hidden, chunk = [(h, c) for h, c in recorder.every[layer] if int(c.positions[-1]) == last][0]
                    text = chunk.kinds == TEXT
                    lp = parts.layers[layer]
                    h = lp.input_norm(hidden[text])
                    m = h.shape[0]
                    q = lp.q_proj(h).view(m, parts.num_heads, parts.head_dim).transpose(0, 1)
                    cos, sin = parts.rotary(h, chunk.positions[text][None])
                    q = apply_rope(q, cos[0], sin[0])
                    keys = session.cache.keys(layer).repeat_interleave(parts.num_heads // parts.num_kv_heads, 0)
                    scores = (q @ keys.transpose(1, 2)) * parts.head_dim ** -0.5  # (H, m, L)
                    causal = session.cache.positions(layer)[None] <= chunk.positions[text][:, None]
                    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
                    vision = session.cache.kinds(layer) == VISION
                    ratio = (probs[..., vision].sum(-1) / probs[..., ~vision].sum(-1).clamp_min(1e-12)).mean(-1)
                    ratio_sum[layer] += ratio
                    active[layer] += (ratio > tau).float()
            samples += 1
    keep = active / samples > min_fraction
    keep[:dense_layers] = True
    return {"pruned": (~keep).tolist(), "ratios": (ratio_sum / samples).tolist(), "samples": samples,
            "tau": tau, "min_fraction": min_fraction}


def test_head_calibration_numbers_equal_those_before_the_probe(models):
    from streamvlm.routers.head_prune import calibrate_heads

    vlm = models["mqa_deep"]
    clips = [random_frames(3, seed=5), random_frames(2, seed=6)]
    questions = ["What is moving?", "What colour is it?"]
    result = calibrate_heads(vlm, clips, questions, tau=0.02, max_new_tokens=4)
    active = result.pop("active")  # added since, for yopo's keep-a-fraction rule
    assert result == _calibrate_heads_before(vlm, clips, questions, tau=0.02, max_new_tokens=4)
    assert result["pruned"] == [[layer > 1 and a <= 0.4 for a in row] for layer, row in enumerate(active)]
    assert result["samples"] == 4 and any(map(any, result["ratios"]))


@pytest.mark.parametrize("name", ["mqa_deep", "qwen2_5_vl"])
def test_head_calibration_probes_the_question_and_answer_not_the_closing_text(models, name, monkeypatch):
    """YOPO's r is the attention the prompt's and answer's text pays to vision: every layer's probed queries are
    the text tokens fed after the frames up to the answer's last one (not the 1-2 tokens that close the turn,
    which is what a recorder's last chunk holds after `score`)."""
    import streamvlm.routers.head_prune as head_prune
    from streamvlm.types import TEXT

    vlm = models[name]
    frames = random_frames(2, seed=7)
    probed = {}

    def spy(parts, layer, hidden, rope_ids, keys, **options):
        probed[layer] = rope_ids[..., 0, :] if rope_ids.dim() == 3 else rope_ids[0]  # (m,) or (3, m)
        return attention_probs(parts, layer, hidden, rope_ids, keys, **options)

    monkeypatch.setattr(head_prune, "attention_probs", spy)
    head_prune.calibrate_heads(vlm, [frames], ["What is moving?"], max_new_tokens=3)

    session = vlm.session()
    session.append_frames(frames)
    after_frames = int(session.cache.positions(0)[-1]) + 1
    session.ask("What is moving?", max_new_tokens=3, ignore_stop=True)
    turn = session.turns[-1]
    last = turn.context_tokens + len(turn.answer_ids) - 1
    positions, kinds = session.cache.positions(0), session.cache.kinds(0)
    expected = positions[(kinds == TEXT) & (positions >= after_frames) & (positions <= last)]
    assert len(expected) > len(turn.answer_ids) + 2  # the question's turn and the answer, more than a closing
    assert sorted(probed) == list(range(vlm.adapter.decoder.num_layers))
    for layer, ids in probed.items():
        if ids.dim() == 2:  # M-RoPE: text tokens' three ids are equal; their order is the positions' order
            assert torch.equal(ids[0], ids[1]) and torch.equal(ids[0], ids[2])
            assert len(ids[0]) == len(expected)
        else:
            assert ids.tolist() == expected.tolist()


def _rank_loss_before(module, chunk, cache, hidden):
    import torch.nn.functional as F

    from streamvlm.rope import apply_rope

    parts = module.teacher.parts
    vision = chunk.vision_index
    last_frame_end = int(vision[-1, -1]) + 1
    queries = torch.nonzero(chunk.text_mask[last_frame_end:]).squeeze(1) + last_frame_end
    cos, sin = parts.rotary(chunk.embeds, chunk.rope_ids())
    terms = []
    for layer, scores in module.router.recorded.items():
        lp = parts.layers[layer]
        h = lp.input_norm(hidden[layer][queries])
        q = lp.q_proj(h).view(len(queries), parts.num_heads, parts.head_dim).transpose(0, 1)
        q = apply_rope(q, cos[0, queries], sin[0, queries])
        keys = cache.keys(layer)[:, vision.flatten()]
        keys = keys.repeat_interleave(parts.num_heads // parts.num_kv_heads, dim=0)
        logits = (q @ keys.transpose(1, 2)) * parts.head_dim ** -0.5
        received = logits.softmax(-1).mean(dim=(0, 1)).view(vision.shape)
        target = received / received.sum(-1, keepdim=True)
        terms.append(F.kl_div(scores.float().log_softmax(-1), target.log(), log_target=True, reduction="batchmean"))
    return torch.stack(terms).mean()


def test_rank_loss_equals_the_formula_before_the_probe(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "cache"))
    from streamvlm.train.data import Exchange, Frames, Sample
    from streamvlm.train.module import RouterTrainingModule

    module = RouterTrainingModule(tiny=True, routing="mod:0.25:all:1", rank_weight=1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    module.train()  # the router records its scores in training mode
    size = module.vlm.adapter.preprocess_config
    pixels = module.vlm.preprocess(torch.randint(0, 256, (4, size.height, size.width, 3), dtype=torch.uint8,
                                                 generator=g))
    sample = Sample(id="s", video="", pixels=pixels, timestamps=torch.arange(4, dtype=torch.float64),
                    events=[Frames(0, 4), Exchange("What happens?", "A square moves left.")], feature_path=None)
    chunk, _, _ = module.sequence(sample)
    with torch.no_grad():
        module.router.recorded.clear()
        module._run(module.student, chunk)
        _, cache, hidden = module._teacher(chunk)
        assert set(hidden) == set(module.router.recorded) and len(hidden) > 1
        loss = module._rank_loss(chunk, cache, hidden)
        assert torch.equal(loss, _rank_loss_before(module, chunk, cache, hidden))
    assert float(loss) > 0
