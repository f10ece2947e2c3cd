"""The command line: the main job on the built-in defaults, init-tiny, bench, and clean errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from streamvlm.world.builtin import EXAMPLE_QUESTIONS
from streamvlm.cli import main
from streamvlm.world import sample


def test_ask_on_builtin_defaults(cache, capsys):
    assert main(["ask", "--json"]) == 0
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in events] == ["answer"] * 4 + ["stats"]
    # the built-in model, trained on the procedural world, answers the sample video's default questions
    # (see tests/test_quality.py for what else it knows)
    assert [e["question"] for e in events[:4]] == list(EXAMPLE_QUESTIONS)
    assert [e["text"] for e in events[:3]] == ["two", "square", "right"]
    # The description names both objects rightly; the shipped model says the blue circle moves right, not
    # up (asked which way it moves, it says up: tests/test_quality.py; README)
    assert events[3]["text"].startswith("big red square moving right and small blue circle moving ")
    assert events[4]["frames"] == 8 and events[4]["turns"] == 4
    assert events[0]["t"] is not None and events[0]["t"] > 5.0  # last of 8 frames spread over the sample's 8 s
    assert "knows only its world" in err
    assert (cache / sample.SAMPLE_NAME).is_file() and not (cache / "builtin-tiny-llava-onevision").exists()


def test_ask_text_output_streams_the_answer(cache, capsys):
    # --fps 2 reads 16 frames; the built-in model was trained at 1 fps and miscounts at 2, so the answer is
    # only checked to be a count
    assert main(["ask", "--fps", "2", "--max-new-tokens", "3", "-q", "how many objects are there now?"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Q: how many objects are there now?\nA: ")
    assert out.splitlines()[1].removeprefix("A: ") in {"one", "two", "three"}
    assert "16 frames" in err


def test_init_tiny_then_ask(tmp_path, cache, capsys):
    model = tmp_path / "tiny"
    assert main(["init-tiny", str(model), "--layers", "3", "--hidden", "48"]) == 0
    out = capsys.readouterr().out
    assert "3 layers" in out and str(model) in out and f"--model {model}" in out  # what was written, how to use it
    assert main(["init-tiny", str(model)]) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err
    assert main(["ask", "--model", str(model), "--num-frames", "2", "--max-new-tokens", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["frames"] == 2 and "knows only its world" not in err


@pytest.mark.parametrize("argv, message", [
    (["ask", "--model", "/nonexistent/model"], "does not exist"),
    (["ask", "/nonexistent/video.mp4"], "video.mp4"),
    (["ask", "--fps", "1", "--num-frames", "3"], "not both"),
    (["ask", "--routing", "nonsense"], "unknown routing"),
])
def test_user_errors_exit_2_with_one_line(cache, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_dense_json_runs(tmp_path, cache, capsys):
    from streamvlm.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "m")
    assert main(["bench", "dense", "--model", str(model), "--frames", "2", "--new-tokens", "2", "--repeats", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["phase"] for r in result["rows"]] == ["prefill", "streamed_prefill", "answer", "warm_ask"]
    assert result["linear"] == "onednn"  # ours; theirs runs F.linear (streamvlm.kernels.stock_linears)
    for row in result["rows"]:
        assert row["ours_s"] > 0 and row["transformers_s"] > 0
        assert row["speedup"] == pytest.approx(row["transformers_s"] / row["ours_s"])
    streamed = result["streamed_vs_one_shot"]
    assert len(streamed["per_round"]) == 2 and all(r > 0 for r in streamed["per_round"])
    assert streamed["median"] == pytest.approx(sum(streamed["per_round"]) / 2)


def test_timed_rounds_interleave_the_phases():
    from streamvlm.bench.common import timed_rounds

    calls = []
    times = timed_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 4  # a warm-up, then three rounds of each phase in turn
    assert sorted(times) == ["a", "b"] and all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "streamvlm", "--help"], capture_output=True, text=True, check=True)
    assert "ask" in out.stdout and "init-tiny" in out.stdout and "bench" in out.stdout


def test_ask_with_mod_routing_reports_it(tmp_path, cache, capsys):
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "m", TinySpec(num_layers=4))
    assert main(["ask", "--model", str(model), "--routing", "mod:0.5:interleaved", "--num-frames", "3",
                 "--max-new-tokens", "2", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert stats["routing"] == "mod:0.5:interleaved"
    assert stats["kv_bytes"] < stats["kv_bytes_dense"]
    assert stats["kv_entries_per_layer"][0] > stats["kv_entries_per_layer"][1]


def test_bench_routing_json_rows(tmp_path, cache, capsys):
    from streamvlm.tiny import TinySpec, write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "m", TinySpec(num_layers=4))
    assert main(["bench", "routing", "--model", str(model), "--frames", "2", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert result["linear"] == "onednn"
    assert [(r["keep_ratio"], r["schedule"]) for r in rows] == [
        (k, s) for s in ("interleaved", "all:2") for k in (1.0, 0.5, 0.2)]
    for r in rows:
        assert set(r) >= {"keep_ratio", "schedule", "speedup", "flops_speedup", "efficiency", "kv_ratio"}
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_speedup"])
        assert (r["kv_ratio"] < 1.0) == (r["keep_ratio"] < 1.0)


def test_bench_caption_json_rows(tiny_dir, cache, capsys):
    assert main(["bench", "caption", "--model", str(tiny_dir), "--video-seconds", "4", "--max-batch", "1,3",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["routing"]) for r in result["rows"]] == [
        ("tiny", "dense"), ("tiny", "mod:0.2:interleaved"), ("small", "dense"), ("small", "mod:0.2:interleaved")]
    for r in result["rows"]:
        assert r["video_hours_per_compute_hour"] == pytest.approx(r["video_seconds"] / r["compute_seconds"])
        assert 0 < r["decode_share"] < 1 and r["captions"] == 1
    assert [(r["model"], r["batch"], r["videos"]) for r in result["batching"]] == [("small", 1, 3), ("small", 3, 3)]
    assert result["batching_setting"] == {"fps": 0.2, "segment": 10.0, "max_new_tokens": 64}
    for r in result["batching"]:
        assert r["video_seconds"] == pytest.approx(3 * result["rows"][-1]["video_seconds"])
        assert r["video_hours_per_compute_hour"] == pytest.approx(r["video_seconds"] / r["compute_seconds"])


def test_bench_streams_json(tiny_dir, cache, capsys):
    assert main(["bench", "streams", "--model", str(tiny_dir), "--streams", "3", "--video-seconds", "2",
                 "--stream-fps", "4", "--new-tokens", "4", "--repeats", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    one, together = result["one_at_a_time"], result["together"]
    assert result["streams"] == 3 and result["rounds"] == 2 and one["frames"] == together["frames"] == 2 * 3 * 8
    assert result["same_answers"] is True and 1 <= together["mean_batch"] <= 3
    assert result["speedup"] == pytest.approx(together["frames_per_second"] / one["frames_per_second"])
    rounds = result["speedup_per_round"]
    assert len(rounds) == 2 and all(r > 0 for r in rounds)
    assert result["speedup_median"] == pytest.approx(sum(rounds) / 2)


def test_bench_batching_flags_refuse_bad_values(tiny_dir, cache, capsys):
    assert main(["bench", "streams", "--model", str(tiny_dir), "--streams", "1"]) == 2
    assert "--streams must be at least 2" in capsys.readouterr().err
    assert main(["bench", "serve", "--model", str(tiny_dir), "--max-batch", "1,0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


def test_bench_stream_json(tiny_dir, cache, capsys):
    assert main(["bench", "stream", "--model", str(tiny_dir), "--ages", "0.05,0.1", "--stream-fps", "2",
                 "--memory-budget", "64", "--new-tokens", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model = result["models"][0]
    rows = model["rows"]
    assert result["suite"] == "stream" and [r["age_s"] for r in rows] == [3.0, 6.0]
    assert rows[0]["frames"] >= 6 and rows[1]["frames"] >= 12 and rows[1]["t"] >= 6.0
    # the transformers baseline ran on the same frames as ours had at each age
    assert [r["baseline_frames"] for r in rows] == [r["frames"] for r in rows]
    assert all(r["ours_ttft_s"] > 0 and r["theirs_ttft_s"] > 0 and r["ttft_ratio"] > 0 for r in rows)
    budget_bytes = 64 * model["layers"] * 2 * 2 * 16 * 4  # entries x layers x (K, V) x kv heads x head dim x fp32
    assert max(r["kv_bytes"] for r in rows) <= budget_bytes and model["ingest_fps"] > 0
    assert model["peak_rss_bytes"] > 0 and model["frames"] >= 12


def test_bench_stream_bad_ages(cache, capsys):
    assert main(["bench", "stream", "--ages", "soon"]) == 2
    assert "--ages" in capsys.readouterr().err


def test_a_load_row_sends_past_its_count_until_its_seconds_have_passed():
    import http.server
    import threading

    from streamvlm.bench.serve import run_load

    class Answers(http.server.BaseHTTPRequestHandler):
        finish = "stop"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"usage": {"completion_tokens": 2},
                               "choices": [{"finish_reason": Answers.finish}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        exact = run_load(url, "m", 2, 5, 2)
        assert exact["requests"] == exact["completed"] == 5
        assert exact["mean_decode_steps"] == 2  # ended by the end token: a forward after each of the 2 tokens
        Answers.finish = "length"
        longer = run_load(url, "m", 2, 5, 2, min_seconds=0.3)
        assert longer["requests"] == longer["completed"] > 5 and longer["wall_seconds"] >= 0.3
        assert longer["tokens_per_second"] == pytest.approx(2 * longer["requests_per_second"])
        assert longer["mean_decode_steps"] == 1  # cut at max_tokens: the last token is never fed
    finally:
        server.shutdown()


def test_batching_ratios_are_the_median_over_rounds_of_each_rounds_own_rows():
    from streamvlm.bench.serve import _batching_ratios

    # three rounds; the batched server's rate drifts with the machine, and so does the unbatched one's beside it
    rates = {0: (50.0, 75.0), 1: (80.0, 100.0), 2: (60.0, 120.0)}  # round: (--max-batch 1, --max-batch 8) at 16
    load = [{"workload": "w", "round": n, "max_batch": batch, "clients": clients,
             "requests_per_second": rates[n][batch == 8] if clients == 16 else 10.0,
             "tokens_per_second": 2 * rates[n][batch == 8] if clients == 16 else 20.0,
             "latency_p50_s": (0.01 + 0.001 * n) * (1.1 if batch == 8 else 1.0)}
            for n in rates for clients in (1, 16) for batch in (1, 8)]
    (ratio,) = _batching_ratios(load, [1, 8])
    # each round's own rows: 1.5x, 1.25x, 2.0x; the median is 1.5x (the pooled 295 / 190 would be 1.55x)
    assert [r["requests_per_second"] for r in ratio["per_round"]] == pytest.approx([1.5, 1.25, 2.0])
    assert ratio["requests_per_second"] == pytest.approx(1.5) and ratio["tokens_per_second"] == pytest.approx(1.5)
    assert ratio["latency_p50"] == pytest.approx(1.1) and (ratio["clients"], ratio["p50_at_clients"]) == (16, 1)
    assert _batching_ratios(load, [1]) == [] and _batching_ratios(load, [8]) == []


def test_bench_serve_json(tiny_dir, cache, capsys):
    assert main(["bench", "serve", "--model", str(tiny_dir), "--clients", "1,3", "--requests", "3", "--ages",
                 "0.1", "--stream-fps", "2", "--new-tokens", "2", "--clip-seconds", "1", "--max-batch", "1,3",
                 "--heavy-model", str(tiny_dir), "--abuse-rounds", "1", "--min-seconds", "0", "--rounds", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["suite"] == "serve" and result["min_seconds"] == 0 and result["rounds"] == 1
    # a workload's two servers side by side, every client count's row sent to each in turn (rounds: below)
    assert [(r["workload"], r["round"], r["clients"], r["max_batch"]) for r in result["load"]] == [
        (workload, 0, clients, batch) for workload in ("built-in", "decode-heavy") for clients in (1, 3)
        for batch in (1, 3)]
    for row in result["load"]:
        assert row["completed"] == 3 and row["failed"] == 0 and row["requests_per_second"] > 0
        assert 0 < row["latency_p50_s"] <= row["latency_p90_s"] <= row["latency_p99_s"]
        tokens = 64 if row["workload"] == "decode-heavy" else 2  # the end token ignored: every request's 64
        assert row["tokens_per_second"] == pytest.approx(row["requests_per_second"] * row["mean_completion_tokens"])
        assert row["mean_completion_tokens"] == tokens or row["workload"] == "built-in"
        # a forward per token after the prompt's, but the last token's when cut at max_tokens (never fed): at
        # most the tokens, at least one fewer
        assert row["mean_completion_tokens"] - 1 <= row["mean_decode_steps"] <= row["mean_completion_tokens"]
        assert row["mean_decode_steps"] == 63 or row["workload"] == "built-in"
        # one clip for every request: the server's prefix cache ingested it in the warm-up
        assert (row["prefix_hits"], row["prefix_misses"]) == (3, 0)
        # the server's /health counts its batched steps: none unbatched; at most 3 chunks a step at --max-batch 3
        assert row["mean_batch"] is None if row["max_batch"] == 1 else 1 <= row["mean_batch"] <= 3
        assert row["server_cpu_ms_per_request"] > 0
    assert [r["workload"] for r in result["batching"]] == ["built-in", "decode-heavy"]
    assert all(r["max_batch"] == 3 and r["clients"] == 3 and r["tokens_per_second"] > 0 for r in result["batching"])
    for ratio in result["batching"]:  # the one round's ratio of its rows
        rows = {(r["clients"], r["max_batch"]): r for r in result["load"] if r["workload"] == ratio["workload"]}
        per_round = rows[(3, 3)]["requests_per_second"] / rows[(3, 1)]["requests_per_second"]
        assert [x["requests_per_second"] for x in ratio["per_round"]] == pytest.approx([per_round])
        assert ratio["requests_per_second"] == pytest.approx(per_round)
        assert ratio["latency_p50"] == pytest.approx(rows[(1, 3)]["latency_p50_s"] / rows[(1, 1)]["latency_p50_s"])
    for ratio in result["batching"]:  # what batching can gain at most, measured in process: Amdahl's formula
        b = ratio["bound"]
        rows = [r for r in result["load"] if r["workload"] == ratio["workload"] and r["max_batch"] == 1]
        steps = sum(r["mean_decode_steps"] for r in rows) / 2  # two client counts
        assert b["batch"] == 3 and b["steps"] == pytest.approx(steps)
        assert b["kept"] and 0 < b["question_s"]  # each request forked the kept clip: its fixed cost is the question
        alone = b["question_s"] + steps * b["decode_ms_alone"] / 1e3
        fixed = b["question_s"] + (b["question_ms_batched_step"] / 3 - b["question_ms_alone"]) / 1e3
        assert b["bound"] == pytest.approx(alone / (max(0, fixed) + steps * b["decode_ms_batched_step"] / 3e3))
        assert b["decode_step_gain"] == pytest.approx(3 * b["decode_ms_alone"] / b["decode_ms_batched_step"])
    assert result["batching"][1]["bound"]["frames"] == 2 and result["batching"][1]["bound"]["steps"] == 63
    (live,) = result["live"]
    assert live["age_minutes"] == 0.1 and live["frames_ingested"] == live["frames_in_video"] == 12
    assert 0 < live["ttft_s"] <= live["answer_s"]


def test_serve_user_errors(cache, tmp_path, capsys):
    assert main(["serve", "--allowed-media-dir", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--max-sessions", "0"])
    assert e.value.code == 2 and "--max-sessions" in capsys.readouterr().err
    assert main(["serve", "--max-data-mb", "40", "--max-body-mb", "30"]) == 2
    assert "--max-body-mb must be at least as large as --max-data-mb" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["ask", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["ask", "--temperature", "-1"], "--temperature"),
    (["ask", "--top-p", "2"], "--top-p"),
    (["ask", "--top-p", "0"], "--top-p"),
    (["ask", "--num-frames", "0"], "--num-frames"),
    (["ask", "--fps", "0"], "--fps"),
    (["ask", "--fps", "nan"], "--fps"),
    (["ask", "--max-new-tokens", "many"], "--max-new-tokens"),
    (["live", "--fps", "0"], "--fps"),
    (["live", "--duration", "-3"], "--duration"),
    (["live", "--open-timeout", "0"], "--open-timeout"),
    (["caption", "x.mp4", "--out", "o.jsonl", "--segment", "0"], "--segment"),
    (["caption", "x.mp4", "--out", "o.jsonl", "--num-shards", "0"], "--num-shards"),
    (["caption", "x.mp4", "--out", "o.jsonl", "--batch", "0"], "--batch"),
    (["serve", "--max-batch", "0"], "--max-batch"),
    (["serve", "--max-step-tokens", "0"], "--max-step-tokens"),
    (["bench", "streams", "--streams", "0"], "--streams"),
    (["bench", "streams", "--repeats", "0"], "--repeats"),
    (["serve", "--port", "-5"], "--port"),
    (["serve", "--body-timeout-s", "0"], "--body-timeout-s"),
    (["serve", "--max-connections", "0"], "--max-connections"),
    (["serve", "--max-asks-per-stream", "0"], "--max-asks-per-stream"),
    (["serve", "--prefix-cache-mb", "-1"], "--prefix-cache-mb"),
    (["serve", "--prefix-cache-mb", "lots"], "--prefix-cache-mb"),
    (["bench", "serve", "--prefix-cache-mb", "-1"], "--prefix-cache-mb"),
    (["bench", "serve", "--min-seconds", "-1"], "--min-seconds"),
    (["bench", "serve", "--rounds", "0"], "--rounds"),
    (["serve", "--ended-grace-s", "-1"], "--ended-grace-s"),
    (["serve", "--port", "70000"], "--port"),
])
def test_bad_numbers_exit_2_with_one_line_naming_the_flag(cache, capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert flag in err and "Traceback" not in err and "read_video" not in err


def test_num_frames_zero_is_refused_not_replaced_by_8(cache, capsys):
    # it used to become 8 frames (`args.num_frames or 8`)
    with pytest.raises(SystemExit):
        main(["ask", "--num-frames", "0", "--json"])
    assert "--num-frames" in capsys.readouterr().err
