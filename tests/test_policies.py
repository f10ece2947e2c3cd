"""Training-free policies (layer_drop, fastv, pdrop): no-op settings equal dense, real settings cut FLOPs
and KV by what their config implies, streaming works; and the compare command."""

from __future__ import annotations

import json

import pytest
import torch

from streamvlm import StreamVLM, StreamVLMError
from streamvlm.routers.config import tokens_kept
from streamvlm.routers.ranking import frame_attention_ranking
from streamvlm.types import VISION
from support import feed_in_chunks, random_frames

QUESTION = "What is moving?"


@pytest.fixture(scope="module")
def vlm(checkpoints):
    return StreamVLM.from_pretrained(checkpoints["mqa_deep"])  # 4 layers, 9 tokens per frame


@pytest.mark.parametrize("spec", ["layer_drop:4", "fastv:2:0", "pdrop:1.0", "skip:block:4:4", "schedule:1,1,1,1",
                                  "cls_knee:1.0", "random:1.0", "uniform:1.0", "mod:1.0"])
def test_no_op_settings_equal_dense(vlm, spec):
    frames = random_frames(3, seed=1)
    routed = vlm.with_routing(spec)
    outs = []
    for model in (vlm, routed):
        session = model.session()
        session.append_frames(frames)
        outs.append(session.score(QUESTION, [5, 6, 7]))
    assert torch.equal(outs[0], outs[1])


def _vision_per_frame(session, layer, frames):
    cache = session.cache
    vision = cache.kinds(layer) == VISION
    return torch.bincount(cache.frames(layer)[vision].long(), minlength=frames).tolist()


@pytest.mark.parametrize("spec, kept", [
    ("layer_drop:2", [9, 9, 0, 0]),
    ("fastv:2:0.5", [9, 9, 5, 5]),          # keep ceil(0.5 * 9) from layer 2 on
    ("fastv:1:0.7", [9, 3, 3, 3]),
    ("pdrop:0.5", [9, 5, 3, 2]),             # stages at layers 1, 2, 3: 9 -> 5 -> 3 -> 2
    ("pdrop:0.5:2", [9, 9, 5, 5]),
])
def test_real_settings_keep_what_the_config_says_frame_by_frame(vlm, spec, kept):
    model = vlm.with_routing(spec)
    session = model.session()
    frames = random_frames(4, seed=2)
    for i in range(4):
        session.append_frames(frames[i:i + 1])
        if i == 1:
            session.ask(QUESTION, max_new_tokens=3, ignore_stop=True)  # questions in between
    session.ask("And now?", max_new_tokens=3, ignore_stop=True)
    stats = session.stats()
    for layer in range(4):
        assert _vision_per_frame(session, layer, 4) == [kept[layer]] * 4
    text = stats["tokens"] - 4 * 9
    assert stats["kv_entries_per_layer"] == [text + 4 * k for k in kept]
    per_entry = session.cache.bytes_per_entry
    assert stats["kv_bytes"] == sum(text + 4 * k for k in kept) * per_entry
    assert stats["flops"]["llm"] < stats["flops"]["llm_dense"]


@pytest.mark.parametrize("spec", ["fastv:2:0.5", "pdrop:0.5", "layer_drop:1"])
def test_policies_are_chunking_invariant(vlm, spec):
    model = vlm.with_routing(spec)
    frames = random_frames(4, seed=3)
    answers = []
    for chunking in ([4], [1, 1, 1, 1], [3, 1]):
        session = model.session()
        feed_in_chunks(session, frames, chunking)
        answers.append((session.ask(QUESTION, max_new_tokens=12, ignore_stop=True),
                        [session.cache.positions(l).tolist() for l in range(4)]))
    assert answers[0] == answers[1] == answers[2]


def test_fastv_ranks_by_the_attention_of_the_frames_last_token(vlm):
    """The ranking equals attention computed from the dense cache: the last frame token's query at layer K-1
    against that layer's cached (post-RoPE) keys of the frame."""
    frames = random_frames(1, seed=4)
    recorded = {}
    model = vlm.with_routing("fastv:2:0.5")
    original = model.router.decide

    def spy(layer, hidden, chunk):
        if layer == 1 and chunk.num_frames:
            recorded["ranking"] = frame_attention_ranking(vlm.adapter.decoder, 1, hidden, chunk)
            recorded["hidden"], recorded["chunk"] = hidden, chunk
        return original(layer, hidden, chunk)

    model.router.decide = spy
    session = model.session()
    session.append_frames(frames)
    dense = vlm.session()
    dense.append_frames(frames)
    parts, chunk = vlm.adapter.decoder, recorded["chunk"]
    vision = chunk.vision_index[0]
    keys = dense.cache.keys(1)[:, vision]  # (KV, 9, hd)
    lp = parts.layers[1]
    h = lp.input_norm(recorded["hidden"][vision[-1:]])
    q = lp.q_proj(h).view(1, parts.num_heads, parts.head_dim).transpose(0, 1)
    cos, sin = parts.rotary(h, chunk.positions[vision[-1:]][None])
    from streamvlm.rope import apply_rope

    q = apply_rope(q, cos[0], sin[0])
    keys = keys.repeat_interleave(parts.num_heads // parts.num_kv_heads, 0)
    expected = ((q @ keys.transpose(1, 2)) * parts.head_dim ** -0.5).softmax(-1).mean(0)[0]
    assert torch.allclose(recorded["ranking"][0], expected, atol=1e-5)
    kept = set(session.cache.positions(2)[session.cache.kinds(2) == VISION].tolist())
    top = set(chunk.positions[vision[torch.topk(expected, tokens_kept(0.5, 9)).indices]].tolist())
    assert kept == top


@pytest.mark.parametrize("spec, error", [
    ("layer_drop", "layer_drop:LAYER"), ("layer_drop:-1", ">= 0"), ("fastv:0", "K must be >= 1"),
    ("fastv:2:1.5", r"\[0, 1\)"), ("fastv:9", "past the model"), ("pdrop:0", r"\(0, 1\]"),
    ("pdrop:0.5:3,1", "increasing"), ("fastv:x", "do not parse"),
])
def test_bad_specs(vlm, spec, error):
    with pytest.raises(StreamVLMError, match=error):
        vlm.with_routing(spec)


def test_compare_table_for_all_policies(tiny_dir, tmp_path, capsys, monkeypatch):
    from streamvlm.cli import main
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint
    from streamvlm.video.files import write_video

    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "cache"))
    model = write_tiny_checkpoint(tmp_path / "m", TinySpec(num_layers=4, image_size=56, patch_size=7))
    video = write_video(tmp_path / "v.mp4", random_frames(16, height=64, width=64), fps=8)
    assert main(["compare", "--model", str(model), "--video", str(video), "--num-frames", "4",
                 "--max-new-tokens", "6", "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"].split(":")[0].split("(")[0] for r in rows] == [
        "dense", "mod", "random", "uniform", "layer_drop", "fastv", "pdrop", "skip", "neighbor_attention", "cls_knee",
        "schedule", "head_prune", "yopo"]
    assert rows[4]["policy"] == "layer_drop:2" and rows[5]["policy"] == "fastv:2:0.5"
    for r in rows:
        assert set(r) >= {"policy", "flops_fraction", "kv_fraction", "time_ratio", "kl", "top1_agreement"}
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-9) and rows[0]["top1_agreement"] == 1.0
    reducing = [r for r in rows[1:] if not r["policy"].startswith("head_prune")]  # heads cut reads, not FLOPs much
    assert all(r["flops_fraction"] < 1.0 and r["kl"] > 0 for r in reducing)
    assert all(r["kv_fraction"] < 1.0 for r in reducing if not r["policy"].startswith("neighbor"))
    assert main(["compare", "--model", str(model), "--video", str(video), "--policies", "dense;fastv:1:0.5",
                 "--num-frames", "2", "--repeats", "1"]) == 0
    assert "fastv:1:0.5" in capsys.readouterr().out


def test_vtw_calibration_writes_a_router_that_loads(tmp_path, capsys, monkeypatch):
    from streamvlm.cli import main
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint
    from streamvlm.video.files import write_video

    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "cache"))
    model = write_tiny_checkpoint(tmp_path / "m", TinySpec(num_layers=4, image_size=56, patch_size=7))
    videos = [str(write_video(tmp_path / f"v{i}.mp4", random_frames(8, height=64, width=64, seed=i), fps=8))
              for i in range(2)]
    out = out_path = tmp_path / "vtw"
    args = ["calibrate", "vtw", "--model", str(model), "--videos", *videos, "--num-frames", "3",
            "--max-new-tokens", "4", "--out", str(out), "--json"]
    assert main(args + ["--threshold", "1e9"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["layer"] == 1 and result["samples"] == 2 * 3  # any KL passes: drop from the first layer
    kl = {int(k): v for k, v in result["kl_per_layer"].items()}
    assert sorted(kl) == [1, 2, 3] and all(v >= 0 for v in kl.values())
    threshold = (kl[2] + kl[3]) / 2 if kl[3] < kl[2] else kl[3]
    assert main(args + ["--threshold", str(threshold)]) == 0
    chosen = json.loads(capsys.readouterr().out)["layer"]
    assert chosen == min(layer for layer in kl if kl[layer] <= threshold)
    loaded = StreamVLM.from_pretrained(model, routing=str(out))
    assert loaded.router.spec() == f"layer_drop:{chosen}"
    assert min(kl.values()) > 0  # so that a threshold of 0 is met by no layer
    # nothing passes: it used to write layer_drop:4, which drops nothing, and say nothing of it
    assert main(args + ["--threshold", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no layer met --threshold 0" in err and "--write-anyway" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert StreamVLM.from_pretrained(model, routing=str(out_path)).router.spec() == f"layer_drop:{chosen}"
    assert main(args + ["--threshold", "0", "--write-anyway"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["layer"] == 4 and "drops nothing" in err
    assert StreamVLM.from_pretrained(model, routing=str(out_path)).router.spec() == "layer_drop:4"


@pytest.mark.parametrize("spec", ["skip:block", "skip:attn:2", "skip:mlp:1:3", "skip:parallel:0:4:2", "skip:attn::4:2"])
def test_skip_specs_round_trip(spec):
    from streamvlm.routers import parse_routing

    assert parse_routing(spec).spec() == spec


@pytest.mark.parametrize("mode, vision_entries, mlp_tokens", [
    # 4 layers, skipping on layers 2 and 3; 2 frames of 9 vision tokens.
    ("block", [18, 18, 0, 0], "text"),
    ("attn", [18, 18, 0, 0], "all"),
    ("mlp", [18, 18, 18, 18], "text"),
    ("parallel", [18, 18, 18, 18], "all"),
])
def test_skip_modes_cost_and_cache_what_they_say(vlm, mode, vision_entries, mlp_tokens):
    model = vlm.with_routing(f"skip:{mode}:2")
    session = model.session()
    session.append_frames(random_frames(2, seed=6))
    stats = session.stats()
    text = stats["tokens"] - 18
    assert [e - text for e in stats["kv_entries_per_layer"]] == vision_entries
    # FLOPs: start from dense and take out what the skipped parts of layers 2 and 3 would have cost.
    from streamvlm.flops import FlopCounter

    c = FlopCounter.for_decoder(vlm.adapter.decoder)
    n = stats["tokens"]
    expected = 0
    for layer in range(4):
        attended = n - 18 + vision_entries[layer]
        c2 = FlopCounter.for_decoder(vlm.adapter.decoder)
        c2.add_attention(0, attended, attended * (attended + 1) // 2)
        expected += c2.llm + (n if layer < 2 or mlp_tokens == "all" else n - 18) * c.mlp_flops
    assert stats["flops"]["llm"] == expected
    outputs = []
    for model_ in (vlm, model):
        s = model_.session()
        s.append_frames(random_frames(2, seed=6))
        outputs.append(s.score(QUESTION, [3, 4]))
    assert not torch.equal(outputs[0], outputs[1])  # the skipped computation really changed something


def test_attention_skip_runs_only_the_mlp_for_vision_tokens(vlm):
    """On a skipped layer, a vision token's hidden state becomes h + MLP(LN(h)), with no attention."""
    model = vlm.with_routing("skip:attn:2:3")
    seen = {}
    original = model.router.decide

    def spy(layer, hidden, chunk):
        seen[layer] = (hidden.clone(), chunk)
        return original(layer, hidden, chunk)

    model.router.decide = spy
    model.session().append_frames(random_frames(2, seed=7))
    h2, chunk = seen[2]
    h3, _ = seen[3]
    vision = chunk.vision_index.flatten()
    layer = vlm.adapter.decoder.layers[2]
    with torch.no_grad():
        expected = h2[vision] + layer.mlp(layer.post_attention_norm(h2[vision]))
    assert torch.allclose(h3[vision], expected, atol=1e-5)
    assert not torch.allclose(h3[chunk.text_mask], h2[chunk.text_mask])  # text ran the whole block


def test_neighbour_attention_equals_masked_dense_attention():
    """The linear-cost path computes exactly softmax attention under YOPO's mask."""
    from streamvlm.attention import neighbour_attend as _neighbour_attend, neighbour_visits as _neighbour_visits
    from streamvlm.types import TEXT, Chunk

    torch.manual_seed(0)
    heads, kv, hd, grid = 4, 2, 8, (3, 4)
    past_kinds = [TEXT] * 3 + [VISION] * 12 + [TEXT] * 2  # earlier text, an earlier frame, more text
    chunk_kinds = [TEXT] * 2 + [VISION] * 12 + [VISION] * 12  # the chunk: text, then two frames
    kinds = torch.tensor(past_kinds + chunk_kinds, dtype=torch.uint8)
    L, n = kinds.numel(), len(chunk_kinds)
    positions = torch.arange(L)
    q = torch.randn(heads, n, hd)
    keys, values = torch.randn(kv, L, hd), torch.randn(kv, L, hd)
    chunk = Chunk(torch.zeros(n, 1), positions[L - n:], kinds[L - n:], torch.zeros(n, dtype=torch.int32),
                  ((2, 14), (14, 26)), grid)
    out = _neighbour_attend(q, keys, values, chunk, positions, kinds, 3, hd ** -0.5)
    visits = _neighbour_visits(chunk, positions, kinds, 3)

    mask = torch.zeros(n, L, dtype=torch.bool)
    for i in range(n):
        qpos = int(chunk.positions[i])
        if chunk.kinds[i] == TEXT:
            mask[i, : qpos + 1] = True
            continue
        span = 0 if i < 14 else 1
        first = L - n + (2, 14)[span]
        mask[i, :first] = kinds[:first] != VISION  # earlier text only
        t = i - (2, 14)[span]
        for j in range(t + 1):  # causal window of 3x3 in the same frame
            if abs(j // 4 - t // 4) <= 1 and abs(j % 4 - t % 4) <= 1:
                mask[i, first + j] = True
    reference = torch.nn.functional.scaled_dot_product_attention(
        q[None], keys.repeat_interleave(2, 0)[None], values.repeat_interleave(2, 0)[None], attn_mask=mask)[0]
    assert torch.allclose(out, reference, atol=1e-5)
    # Pairs scored: text queries see every earlier entry; a vision query scores the 7 earlier text entries
    # and its 3-row band of the frame (3 x 4 keys), a fraction of the 17..42 keys dense attention scores.
    text_pairs = int(mask[chunk.kinds == TEXT].sum())
    assert visits == text_pairs + 24 * (7 + 3 * 4)


def test_neighbour_attention_is_exact_when_the_window_covers_a_single_frame(vlm):
    frames = random_frames(1, seed=8)  # 3x3 tokens; a 7x7 window covers the frame, no earlier frame exists
    outs = []
    for model in (vlm, vlm.with_routing("neighbor_attention:7")):
        session = model.session()
        session.append_frames(frames)
        outs.append(session.score(QUESTION, [4, 5, 6]))
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


def test_neighbour_attention_shrinks_attention_and_streams(vlm):
    model = vlm.with_routing("neighbor_attention:3:1")
    frames = random_frames(6, seed=9)
    answers = []
    for chunking in ([6], [1] * 6, [4, 2]):
        session = model.session()
        feed_in_chunks(session, frames, chunking)
        answers.append(session.ask(QUESTION, max_new_tokens=10, ignore_stop=True))
    assert answers[0] == answers[1] == answers[2]
    stats = session.stats()
    assert stats["kv_entries_per_layer"] == [stats["tokens"]] * 4  # K/V are kept; attention is what shrinks
    assert stats["flops"]["llm"] < stats["flops"]["llm_dense"]
    with pytest.raises(StreamVLMError, match="odd window"):
        vlm.with_routing("neighbor_attention:4")


def test_head_pruned_attention_equals_masked_attention():
    from streamvlm.attention import head_pruned_attend as _head_pruned_attend, head_pruned_visits as _head_pruned_visits
    from streamvlm.types import TEXT, Chunk

    torch.manual_seed(1)
    heads, kv, hd = 4, 2, 8
    kinds = torch.tensor([TEXT] * 3 + [VISION] * 6 + [TEXT] * 2 + [VISION] * 4 + [TEXT] * 3, dtype=torch.uint8)
    L, n = kinds.numel(), 9  # the chunk: 2 text, 4 vision, 3 text
    q, keys, values = torch.randn(heads, n, hd), torch.randn(kv, L, hd), torch.randn(kv, L, hd)
    chunk = Chunk(torch.zeros(n, 1), torch.arange(L - n, L), kinds[L - n:], torch.zeros(n, dtype=torch.int32),
                  ((2, 6),))
    pruned = torch.tensor([False, True, False, True])
    out = _head_pruned_attend(q, keys, values, chunk, kinds, pruned, hd ** -0.5)
    causal = torch.ones(n, L, dtype=torch.bool).tril_(L - n)
    full = torch.nn.functional.scaled_dot_product_attention(
        q[None], keys.repeat_interleave(2, 0)[None], values.repeat_interleave(2, 0)[None], attn_mask=causal)[0]
    text_only = causal & (kinds != VISION)[None]
    no_vision = torch.nn.functional.scaled_dot_product_attention(
        q[None], keys.repeat_interleave(2, 0)[None], values.repeat_interleave(2, 0)[None], attn_mask=text_only)[0]
    is_text = chunk.kinds == TEXT
    for h in range(heads):
        if not pruned[h]:
            assert torch.allclose(out[h], full[h], atol=1e-5)
        else:
            assert torch.allclose(out[h, is_text], no_vision[h, is_text], atol=1e-5)
            assert torch.all(out[h, ~is_text] == 0)
    # Pairs scored, per head-average: active heads every causal pair, pruned heads text against non-vision.
    pairs = 2 * int(causal.sum()) + 2 * int(text_only[is_text].sum())
    assert _head_pruned_visits(chunk, kinds, pruned) == pairs // heads


def test_head_calibration_writes_a_mask_that_loads_and_prunes(tmp_path, capsys, monkeypatch):
    from streamvlm.cli import main
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint
    from streamvlm.video.files import write_video

    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "cache"))
    model = write_tiny_checkpoint(tmp_path / "m", TinySpec(num_layers=4, image_size=56, patch_size=7))
    video = str(write_video(tmp_path / "v.mp4", random_frames(8, height=64, width=64), fps=8))
    base = ["calibrate", "heads", "--model", str(model), "--videos", video, "--num-frames", "3",
            "--max-new-tokens", "4", "--question", "What?", "--json"]
    assert main(base + ["--tau", "0", "--out", str(tmp_path / "none")]) == 0
    none = json.loads(capsys.readouterr().out)
    assert none["samples"] == 1 and not any(map(any, none["pruned"]))  # every head looks at vision a bit
    assert main(base + ["--tau", "1e9", "--out", str(tmp_path / "all")]) == 0
    everything = json.loads(capsys.readouterr().out)
    assert everything["pruned"] == [[False] * 4] * 2 + [[True] * 4] * 2  # the first two layers keep all heads
    ratios = torch.tensor(everything["ratios"])
    assert ratios.shape == (4, 4) and torch.all(ratios > 0)

    dense = StreamVLM.from_pretrained(model)
    frames = random_frames(3, height=64, width=64)
    outs = {}
    for name in ("none", "all"):
        routed = StreamVLM.from_pretrained(model, routing=str(tmp_path / name))
        session = routed.session()
        session.append_frames(frames)
        outs[name] = session.score("What?", [5, 6])
        if name == "all":
            assert routed.router.spec() == "head_prune(8/16 heads pruned)"
    reference = dense.session()
    reference.append_frames(frames)
    ref = reference.score("What?", [5, 6])
    assert torch.allclose(outs["none"], ref, atol=1e-5)  # no pruned head: dense
    assert not torch.allclose(outs["all"], ref, atol=1e-3)


def test_knee_of_a_long_tailed_curve():
    from streamvlm.routers.cls_knee import knee_index

    assert knee_index(torch.tensor([1.0, 0.95, 0.3, 0.1, 0.05, 0.0])) == 2
    assert knee_index(torch.tensor([1.0, 0.2, 0.1, 0.05, 0.0])) == 1
    assert knee_index(torch.tensor([1.0, 0.5])) == 2  # too short to have a knee: keep everything


def test_cls_knee_keeps_tokens_before_each_frames_knee(vlm):
    model = vlm.with_routing("cls_knee:0.1")
    frames = random_frames(3, seed=10)
    frames[1, :, : frames.shape[2] // 2] = 0  # a frame with structure next to noisy ones
    session = model.session()
    session.append_frames(frames)
    expected = [k.numel() for k in model.router.keep_per_frame(vlm.encode(frames).float())]
    for layer in range(4):
        assert _vision_per_frame(session, layer, 3) == expected  # the same tokens at every layer
    assert all(1 <= e < 9 for e in expected)  # adaptive and really pruning
    full = vlm.with_routing("cls_knee:1.0")
    outs = []
    for m in (vlm, full):
        s = m.session()
        s.append_frames(frames)
        outs.append(s.score(QUESTION, [3, 4]))
    assert torch.equal(outs[0], outs[1])  # keeping every token is the dense model


def test_cls_knee_second_stage_drops_cached_vision_at_question_time(vlm):
    model = vlm.with_routing("cls_knee:1.0:0.5")  # stage 1 keeps all; stage 2 keeps half at the question
    session = model.session()
    session.append_frames(random_frames(4, seed=11))
    before = _vision_per_frame(session, 0, 4)
    assert before == [9] * 4
    session.ask(QUESTION, max_new_tokens=3, ignore_stop=True)
    after = [sum(_vision_per_frame(session, layer, 4)) for layer in range(4)]
    assert after == [18] * 4 and session.stats()["evicted_entries"] == 4 * 18
    session.ask("And then?", max_new_tokens=3, ignore_stop=True)  # later questions still work
    assert session.stats()["turns"] == 2


def test_schedule_router_keeps_nested_shrinking_sets(vlm):
    model = vlm.with_routing("schedule:1,0.7,0.5,0.2")  # 9 tokens: 9, 7, 5, 2
    session = model.session()
    session.append_frames(random_frames(2, seed=12))
    counts = [_vision_per_frame(session, layer, 2) for layer in range(4)]
    assert counts == [[9, 9], [7, 7], [5, 5], [2, 2]]
    kept = [set(session.cache.positions(l)[session.cache.kinds(l) == VISION].tolist()) for l in range(4)]
    assert kept[3] <= kept[2] <= kept[1] <= kept[0]  # nested
    with pytest.raises(StreamVLMError, match="must not increase"):
        vlm.with_routing("schedule:1,0.5,0.7,0.2")


def _calibration_args(tmp_path, monkeypatch):
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint
    from streamvlm.video.files import write_video

    monkeypatch.setenv("STREAMVLM_CACHE", str(tmp_path / "cache"))
    model = write_tiny_checkpoint(tmp_path / "m", TinySpec(num_layers=4, image_size=56, patch_size=7))
    video = str(write_video(tmp_path / "v.mp4", random_frames(8, height=64, width=64), fps=8))
    return model, ["--model", str(model), "--videos", video, "--num-frames", "2", "--max-new-tokens", "4",
                   "--question", "What?", "--json"]


def test_greedy_schedule_search(tmp_path, capsys, monkeypatch):
    from streamvlm.cli import main

    model, common = _calibration_args(tmp_path, monkeypatch)
    assert main(["calibrate", "schedule", "--search", "greedy", "--threshold", "1e9",
                 "--out", str(tmp_path / "loose"), *common]) == 0
    loose = json.loads(capsys.readouterr().out)
    assert loose["keep"] == [1.0] + [0.0625] * 3  # anything passes: the smallest ratio past the dense first layer
    assert main(["calibrate", "schedule", "--search", "greedy", "--threshold", "0",
                 "--out", str(tmp_path / "strict"), *common]) == 0
    strict = json.loads(capsys.readouterr().out)
    assert strict["keep"] == [1.0] * 4 and strict["flops_fraction"] == pytest.approx(1.0)
    tol = loose["kl"] / 2
    assert main(["calibrate", "schedule", "--search", "greedy", "--threshold", str(tol),
                 "--out", str(tmp_path / "mid"), *common]) == 0
    mid = json.loads(capsys.readouterr().out)
    assert all(a >= b for a, b in zip(mid["keep"], mid["keep"][1:]))
    assert mid["kl"] <= tol or mid["keep"][1] == 1.0
    loaded = StreamVLM.from_pretrained(model, routing=str(tmp_path / "mid"))
    assert loaded.router.spec().startswith("schedule:")


@pytest.mark.parametrize("sampler", ["gp", "tpe"])
def test_sigmoid_schedule_search_respects_the_flops_budget(tmp_path, capsys, monkeypatch, sampler):
    from streamvlm.cli import main

    model, common = _calibration_args(tmp_path, monkeypatch)
    assert main(["calibrate", "schedule", "--search", "sigmoid", "--flops-budget", "0.9", "--trials", "8",
                 "--sampler", sampler, "--out", str(tmp_path / "sig"), *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sampler"] == sampler and result["keep"][0] == 1.0
    assert result["flops_fraction"] <= 0.9 and len(result["keep"]) == 4
    assert all(a >= b for a, b in zip(result["keep"], result["keep"][1:]))
    assert set(result["params"]) == {"steepness", "midpoint", "floor"}
    StreamVLM.from_pretrained(model, routing=str(tmp_path / "sig")).generate(random_frames(2), "What?",
                                                                             max_new_tokens=2)
    assert main(["calibrate", "schedule", "--search", "sigmoid", "--flops-budget", "0.01", "--trials", "3",
                 "--out", str(tmp_path / "none"), *common]) == 2  # no schedule that cheap: a clear error
    assert "flops-budget" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["mod:0.3", "random:0.3", "uniform:0.3", "layer_drop:2", "fastv:2:0.5", "pdrop:0.5",
                                  "skip:parallel:2", "neighbor_attention:3", "cls_knee:0.1:0.5", "schedule:1,0.6,0.4,0.2"])
def test_every_policy_streams_frame_by_frame_with_questions_in_between(vlm, spec):
    model = vlm.with_routing(spec)
    session = model.session()
    frames = random_frames(4, seed=13)
    for i in range(4):
        session.append_frames(frames[i:i + 1], [float(i)])
        if i % 2:
            session.ask(QUESTION, max_new_tokens=3, ignore_stop=True)
    stats = session.stats()
    assert stats["turns"] == 2 and stats["frames"] == 4 and session.turns[-1].stream_time == 3.0
    if spec.startswith("skip:parallel"):  # parallel attention + MLP changes the math, not the FLOPs
        assert stats["flops"]["llm"] == stats["flops"]["llm_dense"]
    else:
        assert stats["flops"]["llm"] < stats["flops"]["llm_dense"]
