"""YOPO combined (routers/yopo.py): the sparse FFN's neuron subset, the window-with-pruned-heads kernel against
explicit masking, the FLOP counter's charge against a hand count, every part off equals dense and each part
alone equals its own policy, specs, calibration and streaming."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from streamvlm import StreamVLM, StreamVLMError
from streamvlm.attention import yopo_attend, yopo_visits
from streamvlm.ffn import check_gated_mlp, sparse_mlp, vision_neurons
from streamvlm.routers import parse_routing
from streamvlm.routers.head_prune import HeadPruneConfig
from streamvlm.routers.yopo import YopoConfig, heads_to_prune
from streamvlm.types import TEXT, VISION, Chunk
from support import feed_in_chunks, random_frames

QUESTION = "What is moving?"


@pytest.fixture(scope="module")
def vlm(checkpoints):
    return StreamVLM.from_pretrained(checkpoints["mqa_deep"])  # 4 layers, 4 heads, 1 kv head, 3x3 tokens per frame


def _score(model, frames, answer=(5, 6, 7)):
    session = model.session()
    session.append_frames(frames)
    return session.score(QUESTION, list(answer)), session.stats()


# ---------------------------------------------------------------- the sparse FFN


class _GatedMLP(nn.Module):
    """The families' MLP shape: down(act(gate(x)) * up(x))."""

    def __init__(self, d: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, inter, bias=bias), nn.Linear(d, inter, bias=bias)
        self.down_proj = nn.Linear(inter, d, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("bias", [False, True])
def test_the_sparse_ffn_is_the_mlp_with_its_intermediate_weights_sliced(bias):
    torch.manual_seed(0)
    mlp = _GatedMLP(6, 10, bias)
    x = torch.randn(5, 6)
    out = sparse_mlp(mlp, x, 4)
    g, u, dn = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    hidden = F.silu(x @ g.weight[:4].T + (g.bias[:4] if bias else 0)) * (x @ u.weight[:4].T + (u.bias[:4] if bias else 0))
    expected = hidden @ dn.weight[:, :4].T + (dn.bias if bias else 0)
    torch.testing.assert_close(out, expected)
    # The same as the dense MLP with neurons 4..9 cut off (their down-projection columns zeroed).
    cut = _GatedMLP(6, 10, bias)
    cut.load_state_dict(mlp.state_dict())
    with torch.no_grad():
        cut.down_proj.weight[:, 4:] = 0
    torch.testing.assert_close(out, cut(x))
    assert not torch.allclose(out, mlp(x), atol=1e-3)  # the cut neurons did matter
    assert torch.equal(sparse_mlp(mlp, x, 10), mlp(x))  # every neuron: the dense MLP, bit for bit


def test_the_sparse_ffn_on_the_families_mlp_and_its_neuron_count(vlm):
    mlp = vlm.adapter.decoder.layers[0].mlp  # transformers' own MLP class
    x = torch.randn(7, vlm.adapter.decoder.hidden_size)
    assert torch.equal(sparse_mlp(mlp, x, vlm.adapter.decoder.intermediate_size), mlp(x))
    assert vision_neurons(256, 0.5) == 128 and vision_neurons(384, 0.5) == 192 and vision_neurons(10, 0.25) == 3
    assert vision_neurons(10, 0.01) == 1 and vision_neurons(10, 1.0) == 10
    with pytest.raises(StreamVLMError, match=r"\(0, 1\]"):
        vision_neurons(10, 0.0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    with pytest.raises(StreamVLMError, match="gated MLP.*gate_proj"):
        check_gated_mlp(plain, 3)
    check_gated_mlp(mlp, 0)


# ---------------------------------------------------------------- the attention kernel


def _kernel_case():
    """A cache of 17 earlier entries (text, a 3x4 frame, text), then a chunk: 2 text, two 3x4 frames, 3 text."""
    torch.manual_seed(0)
    heads, kv, hd, grid = 4, 2, 8, (3, 4)
    past_kinds = [TEXT] * 3 + [VISION] * 12 + [TEXT] * 2
    chunk_kinds = [TEXT] * 2 + [VISION] * 24 + [TEXT] * 3
    kinds = torch.tensor(past_kinds + chunk_kinds, dtype=torch.uint8)
    L, n = kinds.numel(), len(chunk_kinds)
    positions = torch.arange(L)
    q = torch.randn(heads, n, hd)
    keys, values = torch.randn(kv, L, hd), torch.randn(kv, L, hd)
    chunk = Chunk(torch.zeros(n, 1), positions[L - n:], kinds[L - n:], torch.zeros(n, dtype=torch.int32),
                  ((2, 14), (14, 26)), grid)
    return q, keys, values, chunk, positions, kinds


def _reference(q, keys, values, chunk, kinds, window, pruned):
    """Dense scores under an explicit (H, n, L) mask; pruned heads' vision rows set to 0."""
    heads, n, hd = q.shape
    L = kinds.numel()
    mask = torch.zeros(heads, n, L, dtype=torch.bool)
    for h in range(heads):
        for i in range(n):
            query = L - n + i
            if chunk.kinds[i] == TEXT:
                mask[h, i, : query + 1] = True
                if pruned[h]:
                    mask[h, i] &= kinds != VISION  # text reads no vision entry through a pruned head
                continue
            if pruned[h]:
                mask[h, i, 0] = True  # any key: the row is zeroed below
                continue
            if window is None:
                mask[h, i, : query + 1] = True
                continue
            start = 2 if i < 14 else 14
            first = L - n + start
            mask[h, i, :first] = kinds[:first] != VISION  # the earlier text
            t = i - start
            for j in range(t + 1):  # the causal w x w window of its own 3x4 frame
                if abs(j // 4 - t // 4) <= window // 2 and abs(j % 4 - t % 4) <= window // 2:
                    mask[h, i, first + j] = True
    group = heads // keys.shape[0]
    out = F.scaled_dot_product_attention(q[None], keys.repeat_interleave(group, 0)[None],
                                         values.repeat_interleave(group, 0)[None], attn_mask=mask[None])[0]
    vision = chunk.kinds == VISION
    for h in range(heads):
        if pruned[h]:
            out[h, vision] = 0
    return out


@pytest.mark.parametrize("window", [3, None])
def test_window_attention_with_pruned_heads_equals_explicit_masking(window):
    q, keys, values, chunk, positions, kinds = _kernel_case()
    pruned = (False, True, False, True)
    out = yopo_attend(q, keys, values, chunk, positions, kinds, window, torch.tensor(pruned), 8 ** -0.5)
    reference = _reference(q, keys, values, chunk, kinds, window, pruned)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    vision = chunk.kinds == VISION
    assert torch.all(out[1, vision] == 0) and torch.all(out[3, vision] == 0)  # nothing from pruned heads
    assert torch.all(out[0, vision] != 0)
    # No head pruned: the window alone (or, without it, plain causal attention).
    none = yopo_attend(q, keys, values, chunk, positions, kinds, window, None, 8 ** -0.5)
    torch.testing.assert_close(none, _reference(q, keys, values, chunk, kinds, window, (False,) * 4), atol=1e-5,
                               rtol=1e-5)

    # Pairs scored, in all-heads units. Text queries (2 at entries 17, 18 and 3 at 43..45) see 18 + 19 +
    # 44 + 45 + 46 = 172 earlier entries; through a pruned head only the non-vision ones: 6 + 7 + 8 + 9 + 10.
    # A vision query (entries 19..42) through an active head: with the window, the 7 earlier text entries
    # (3 + 2 + the chunk's 2) and its 3-row band of the frame, 3 x 4 keys; without it, every earlier entry.
    if window is None:
        active = 172 + sum(range(20, 44))
    else:
        active = 172 + 24 * (7 + 3 * 4)
    assert yopo_visits(chunk, positions, kinds, window, pruned) == (2 * active + 2 * 40) // 4
    assert yopo_visits(chunk, positions, kinds, window, ()) == active


# ---------------------------------------------------------------- the decoder and the FLOP counter


MASK = [[False] * 4, [True, False, False, False], [True, True, False, False], [False, True, True, True]]


def test_the_counter_charges_a_chunk_what_a_hand_count_gives(vlm):
    from streamvlm.cache import KVCache
    from streamvlm.decoder import Decoder
    from streamvlm.flops import FlopCounter

    parts = vlm.adapter.decoder
    d, q_dim, kv_dim, inter = 128, 128, 32, 256  # 4 heads of 32, one kv head, MLP 256
    assert (parts.hidden_size, parts.num_heads * parts.head_dim, parts.num_kv_heads * parts.head_dim,
            parts.intermediate_size) == (d, q_dim, kv_dim, inter)
    config = YopoConfig(window=3, head_keep=0.5, ffn=0.5, drop_layer=3, pruned=MASK)
    router = vlm.with_routing(config).router
    # One chunk on an empty cache: 3 text, two 3x3 frames, 2 text (23 tokens).
    feats = vlm.encode(random_frames(2, seed=4)).reshape(-1, d)
    text = parts.embed_tokens(torch.tensor([3, 4, 5, 6, 7]))
    embeds = torch.cat([text[:3], feats, text[3:]]).detach()
    kinds = torch.tensor([TEXT] * 3 + [VISION] * 18 + [TEXT] * 2, dtype=torch.uint8)
    frames = torch.tensor([-1] * 3 + [0] * 9 + [1] * 9 + [-1] * 2, dtype=torch.int32)
    chunk = Chunk(embeds, torch.arange(23), kinds, frames, ((3, 12), (12, 21)), (3, 3))
    cache = KVCache(4, 1, 32, torch.float32)
    counter = FlopCounter.for_decoder(parts)
    with torch.no_grad():
        Decoder(parts, router).forward(chunk, cache, counter, logits="none")

    projections = 2 * d * q_dim + 2 * 2 * d * kv_dim + 2 * q_dim * d  # q, k and v, o per token
    mlp = 3 * 2 * d * inter
    half_mlp = 3 * 2 * d * 128  # a vision token through 128 of the 256 neurons
    # Key visits of one active head: text queries 1 + 2 + 3 and 22 + 23; a vision query the 3 earlier text
    # entries and its 3-row band (3 x 3 keys). A pruned head: text queries 1 + 2 + 3 and 4 + 5 non-vision.
    active = (6 + 45) + 18 * (3 + 9)
    pruned = 6 + 9
    visits = [active, (3 * active + pruned) // 4, (2 * active + 2 * pruned) // 4]
    expected = sum(23 * projections + 4 * q_dim * v + 5 * mlp + 18 * half_mlp for v in visits)
    expected += 5 * projections + 4 * q_dim * 15 + 5 * mlp  # layer 3: vision dropped, 5 text tokens, 1..5 keys
    assert counter.llm == expected
    assert counter.tokens_processed_per_layer == [23, 23, 23, 5]
    assert [cache.length(layer) for layer in range(4)] == [23, 23, 23, 5]


def test_every_part_off_equals_dense(vlm):
    frames = random_frames(3, seed=1)
    dense, dense_stats = _score(vlm, frames)
    off, off_stats = _score(vlm.with_routing("yopo:full:all:1:none"), frames)
    torch.testing.assert_close(off, dense, atol=1e-5, rtol=1e-5)
    assert off_stats["flops"]["llm"] == dense_stats["flops"]["llm"]
    # One frame, a 7x7 window over its 3x3 grid: the window covers everything it can see.
    one = random_frames(1, seed=2)
    covered, _ = _score(vlm.with_routing("yopo:7:all:1:none"), one)
    torch.testing.assert_close(covered, _score(vlm, one)[0], atol=1e-5, rtol=1e-5)


def test_each_part_alone_is_its_own_policy(vlm):
    frames = random_frames(3, seed=1)
    dense, _ = _score(vlm, frames)
    pairs = [("yopo:3:all:1:none", "neighbor_attention:3"), ("yopo:full:all:1:2", "layer_drop:2"),
             (YopoConfig(window=None, ffn=1.0, drop_layer="none", pruned=MASK), HeadPruneConfig(pruned=MASK))]
    for ours, theirs in pairs:
        a, a_stats = _score(vlm.with_routing(ours), frames)
        b, b_stats = _score(vlm.with_routing(theirs), frames)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert a_stats["flops"] == b_stats["flops"] and a_stats["kv_bytes"] == b_stats["kv_bytes"]
        assert not torch.allclose(a, dense, atol=1e-3)
    ffn, stats = _score(vlm.with_routing("yopo:full:all:0.5:none"), frames)
    assert not torch.allclose(ffn, dense, atol=1e-3)
    assert stats["kv_bytes"] == stats["kv_bytes_dense"] and stats["flops"]["llm"] < stats["flops"]["llm_dense"]


def test_the_parts_combined_save_more_than_each_alone(vlm):
    frames = random_frames(3, seed=1)
    whole = _score(vlm.with_routing(YopoConfig(window=3, ffn=0.5, drop_layer=3, pruned=MASK)), frames)[1]["flops"]
    fraction = whole["llm"] / whole["llm_dense"]
    for spec in ("yopo:3:all:1:none", "yopo:full:all:0.5:none", "yopo:full:all:1:3"):
        alone = _score(vlm.with_routing(spec), frames)[1]["flops"]
        assert fraction < alone["llm"] / alone["llm_dense"]


def test_the_sparse_ffn_only_touches_vision_rows(vlm):
    from streamvlm.decoder import _add_split_mlp

    layer = vlm.adapter.decoder.layers[1]
    torch.manual_seed(3)
    x, a = torch.randn(6, 128), torch.randn(6, 128)
    text, vision = torch.tensor([0, 4, 5]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = _add_split_mlp(layer, x, a, text, vision, 64)
        h = layer.post_attention_norm(x + a)
        torch.testing.assert_close(out[text], (x + a + layer.mlp(h))[text])
        torch.testing.assert_close(out[vision], (x + a)[vision] + sparse_mlp(layer.mlp, h[vision], 64))
        assert not torch.allclose(out[vision], (x + a + layer.mlp(h))[vision], atol=1e-3)


@pytest.mark.parametrize("spec", ["yopo:3:all:0.5:2", "yopo:5:all:0.25:3"])
def test_yopo_streams_and_is_chunking_invariant(vlm, spec):
    model = vlm.with_routing(spec)
    frames = random_frames(4, seed=3)
    answers = []
    for chunking in ([4], [1, 1, 1, 1], [3, 1]):
        session = model.session()
        feed_in_chunks(session, frames, chunking)
        answers.append((session.ask(QUESTION, max_new_tokens=8, ignore_stop=True),
                        [session.cache.positions(layer).tolist() for layer in range(4)]))
    assert answers[0] == answers[1] == answers[2]
    session = model.session()
    for i in range(4):  # questions in between frames
        session.append_frames(frames[i:i + 1], [float(i)])
        if i % 2:
            session.ask(QUESTION, max_new_tokens=3, ignore_stop=True)
    stats = session.stats()
    assert stats["turns"] == 2 and stats["flops"]["llm"] < stats["flops"]["llm_dense"]


# ---------------------------------------------------------------- specs, calibration, saving


@pytest.mark.parametrize("spec, config", [
    ("yopo", YopoConfig()),
    ("yopo:3", YopoConfig(window=3)),
    ("yopo:full:all:1:none", YopoConfig(window=None, head_keep=1.0, ffn=1.0, drop_layer="none")),
    ("yopo:5:0.75:0.5:20", YopoConfig(head_keep=0.75, drop_layer=20)),
    ("yopo:3:all:0.25", YopoConfig(window=3, head_keep=1.0, ffn=0.25)),
    ("yopo::all::1", YopoConfig(head_keep=1.0, drop_layer=1)),
])
def test_specs_round_trip(spec, config):
    assert parse_routing(spec) == config
    assert parse_routing(config.spec()) == config


@pytest.mark.parametrize("spec, error", [
    ("yopo:4", "odd window"), ("yopo:0", "odd window"), ("yopo:x", "do not parse"), ("yopo:5:0", r"\(0, 1\]"),
    ("yopo:5:1.5", r"\(0, 1\]"), ("yopo:5:all:0", r"FFN fraction must be in \(0, 1\]"),
    ("yopo:5:all:0.5:-1", ">= 0"), ("yopo:5:all:0.5:deep", "do not parse"),
    ("yopo:5:all:0.5:1:2", r"yopo\[:W\[:HEADS\[:FFN\[:DROP\]\]\]\]"),
])
def test_bad_specs_say_what_is_wrong(spec, error):
    with pytest.raises(StreamVLMError, match=error):
        parse_routing(spec)


def test_specs_that_need_a_model_or_calibration_say_what_to_do(vlm):
    with pytest.raises(StreamVLMError, match="past the model's 4 layers; use 'none'"):
        vlm.with_routing("yopo:5:all:0.5:5")
    with pytest.raises(StreamVLMError, match=r"calibrated mask: run `streamvlm calibrate yopo --spec yopo:5:0.5:0.5 "
                                             r"--out DIR`.*'all'"):
        vlm.with_routing("yopo")
    with pytest.raises(StreamVLMError, match="head mask has 2 layers but the model has 4"):
        vlm.with_routing(YopoConfig(pruned=MASK[:2]))


def test_heads_are_kept_by_how_often_they_are_active_after_the_first_two_layers():
    active = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.5], [0.5, 0.0]])
    ratios = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.3, 0.2], [0.4, 0.9]])
    # Layers 2 and 3 hold 4 heads; keep 2: head (2, 0), then (3, 0) over (2, 1) on its higher mean ratio.
    assert heads_to_prune(active, ratios, 0.5) == [[False, False], [False, False], [False, True], [False, True]]
    assert heads_to_prune(active, ratios, 0.25) == [[False, False], [False, False], [False, True], [True, True]]
    assert heads_to_prune(active, ratios, 1.0) == [[False, False]] * 4


def test_calibration_writes_a_router_that_loads_and_prunes(tmp_path, capsys, monkeypatch):
    from streamvlm.cli import main
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint
    from streamvlm.video.files import write_video

    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "cache"))
    model = write_tiny_checkpoint(tmp_path / "m", TinySpec(num_layers=4, image_size=56, patch_size=7))
    video = str(write_video(tmp_path / "v.mp4", random_frames(8, height=64, width=64), fps=8))
    out = tmp_path / "yopo"
    assert main(["calibrate", "yopo", "--spec", "yopo:3:0.5:0.5:3", "--model", str(model), "--videos", video,
                 "--num-frames", "3", "--max-new-tokens", "4", "--question", "What?", "--json",
                 "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    pruned = result["pruned"]
    assert pruned[0] == pruned[1] == [False] * 4  # the first two layers keep every head
    assert sum(map(sum, pruned)) == 4  # half of the 8 heads of layers 2 and 3
    assert result["spec"] == "yopo:3:0.5:0.5:3" and result["samples"] == 1

    routed = StreamVLM.from_pretrained(model, routing=str(out))
    assert routed.router.config.pruned == tuple(tuple(layer) for layer in pruned)
    assert routed.router.spec() == "yopo:3:0.5:0.5:3"
    frames = random_frames(3, height=64, width=64)
    unpruned = StreamVLM.from_pretrained(model, routing="yopo:3:all:0.5:3")
    a, b = _score(routed, frames, [5, 6])[0], _score(unpruned, frames, [5, 6])[0]
    assert not torch.allclose(a, b, atol=1e-4)  # the mask is applied

    assert main(["calibrate", "yopo", "--spec", "mod:0.5", "--model", str(model), "--videos", video,
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--spec takes a yopo spec" in capsys.readouterr().err
