"""The live session (capture and ingest threads, questions at any time) and the `streamvlm live` console,
with the tiny model and sources that need no server (lavfi, files played as live)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import pytest
import torch

from streamvlm.cli import main
from streamvlm.errors import StreamVLMError
from streamvlm.live import Console, ConsolePlan, LiveSession
from streamvlm.video.live import FileSource, LiveFrame, Source, open_source
from support import encode, indexed_frames


class Recording(Source):
    """Wraps a source and keeps every frame it gives (to replay them offline)."""

    def __init__(self, inner: Source):
        self.inner, self.name, self.paced = inner, inner.name, inner.paced
        self.frames_seen: list[LiveFrame] = []

    def frames(self, stop, on_event=None):
        for frame in self.inner.frames(stop, on_event):
            self.frames_seen.append(frame)
            yield frame


class Failing(Source):
    """Gives `count` frames, then fails as a source that gave up reconnecting does."""

    name, paced = "failing", True

    def __init__(self, count: int):
        self.count = count

    def frames(self, stop, on_event=None):
        for i in range(self.count):
            yield LiveFrame(float(i), torch.full((32, 32, 3), 10 * i, dtype=torch.uint8), 0.0)
        raise StreamVLMError("could not read failing after 3 attempt(s) in a row")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("live-session") / "clip.mp4", indexed_frames(24))


def test_question_sees_exactly_the_frames_ingested_before_it(tiny_vlm, events):
    # Asked while the source is still playing: the answer equals an offline session's over the frames
    # that were in when it was asked (same ids, greedy), so nothing later leaked in and nothing was lost.
    # The buffer is large enough that a slow machine drops no frame (a drop would make the recorded frames
    # differ from the ingested ones: CI once dropped some while the first encode warmed up).
    source = Recording(open_source("lavfi:testsrc=size=64x48:rate=20", fps=10))
    with LiveSession(tiny_vlm, source, memory_budget=None, buffer_frames=10_000, on_event=events) as live:
        assert live.wait_for_frames(3, timeout=30)
        answer = live.ask("What is in the video?", max_new_tokens=6, ignore_stop=True)
        assert live.wait_for_frames(answer.frames + 2, timeout=30)  # ingestion went on after the answer
        ids = list(live.session.turns[-1].answer_ids)
    assert live.dropped == 0
    frames = source.frames_seen[:answer.frames]
    offline = tiny_vlm.session()
    offline.append_frames(torch.stack([f.frame for f in frames]), [f.time for f in frames])
    offline.ask("What is in the video?", max_new_tokens=6, ignore_stop=True)
    assert list(offline.turns[-1].answer_ids) == ids and len(ids) == 6
    assert answer.t == frames[-1].time and answer.first_token_s is not None


def test_ask_stream_yields_the_answer_in_pieces(tiny_vlm):
    with LiveSession(tiny_vlm, open_source("lavfi:testsrc=size=32x32:rate=20", fps=10)) as live:
        assert live.wait_for_frames(2, timeout=30)
        pieces = list(live.ask_stream("Hi?", max_new_tokens=4, ignore_stop=True))
        assert "".join(pieces) == live.session.turns[-1].answer and len(live.session.turns[-1].answer_ids) == 4


def test_a_stopped_answer_ends_at_its_next_token_and_the_stream_goes_on_as_offline(tiny_vlm, clip):
    # what the server does when a WebSocket asker leaves mid-answer
    source = Recording(FileSource(clip, fps=8, speed=0))
    stop = threading.Event()

    def on_piece(piece):
        if len(pieces) == 1:
            stop.set()  # during the second token
        pieces.append(piece)

    pieces = []
    with LiveSession(tiny_vlm, source, memory_budget=None) as live:
        assert live.wait(60)  # every frame of the file is in
        stopped = live.ask("What is in the video?", on_piece=on_piece, stop=stop, max_new_tokens=50,
                           ignore_stop=True)
        after = live.ask("And now?", max_new_tokens=5, ignore_stop=True)
        turns = live.session.turns
    assert stopped.stop_reason == "cancelled" and len(turns[0].answer_ids) == 2 and len(pieces) == 2
    offline = tiny_vlm.session()
    frames = source.frames_seen
    offline.append_frames(torch.stack([f.frame for f in frames]), [f.time for f in frames])
    answer = offline.ask_stream("What is in the video?", max_new_tokens=50, ignore_stop=True)
    next(answer), next(answer)
    answer.close()  # stopped after two tokens: the turn is closed in the cache
    assert offline.turns[0].answer_ids == turns[0].answer_ids
    assert offline.ask("And now?", max_new_tokens=5, ignore_stop=True) == after.text
    assert offline.turns[1].answer_ids == turns[1].answer_ids


def test_stopping_the_stream_ends_the_answer_in_progress_and_a_later_question_is_answered_in_full(tiny_vlm, clip):
    # as when a server's stream is deleted while it answers; before, the answer ran to its max_new_tokens
    midway = threading.Event()
    live = LiveSession(tiny_vlm, FileSource(clip, fps=8, speed=0), memory_budget=None)
    with live:
        assert live.wait(60)  # every frame of the file is in
        stopper = threading.Thread(target=lambda: (midway.wait(60), live.stop()))
        stopper.start()
        stopped = live.ask("What is in the video?", on_piece=lambda piece: midway.set(), max_new_tokens=2000,
                           ignore_stop=True)
        stopper.join()
        later = live.ask("And now?", max_new_tokens=5, ignore_stop=True)
    assert stopped.stop_reason == "cancelled" and len(live.session.turns[0].answer_ids) < 2000
    assert later.stop_reason == "max_new_tokens" and len(live.session.turns[1].answer_ids) == 5


def test_slow_model_behind_a_fast_source_drops_frames_and_its_lag_stays_bounded(tiny_dir, events):
    from streamvlm.runtime import StreamVLM

    vlm = StreamVLM.from_pretrained(tiny_dir, device="cpu")
    encode_frames = vlm.encode
    vlm.encode = lambda frames: (threading.Event().wait(0.1), encode_frames(frames))[1]  # <= 10 batches/s
    rate, capacity = 50, 4  # a 50 fps source in real time; the model takes at most 20 frames/s
    seen = []  # (newest captured, newest ingested) stream times at each ingested event: one per batch

    def on_event(event):
        events(event)
        if event["type"] == "ingested":
            seen.append((live.source_time, event["t"]))

    source = open_source(f"lavfi:testsrc=size=32x32:rate={rate}")
    live = LiveSession(vlm, source, buffer_frames=capacity, max_batch=2, append_frames=2, on_event=on_event)
    with live:
        assert live.wait_for_frames(20, timeout=60)
        answer = live.ask("What now?", max_new_tokens=2)  # asking holds ingestion back: more drops
        assert live.wait_for_frames(live.ingested + 20, timeout=60)
        stats = live.stats()
    assert stats["dropped"] > stats["ingested"] and events.wait_for(lambda e: e["type"] == "dropped", 5)
    assert stats["captured"] >= stats["ingested"] + stats["dropped"] + stats["buffered"]
    # Bounded lag: a batch is taken after the previous one was reported, when the buffer holds at most
    # `capacity` frames (plus one being put) and the newest captured is at least what the previous report
    # saw. So the frame ingested is never more than capacity + 1 frames behind that. Stream time, not wall
    # time: a capture thread starved on a busy machine catches up in a burst. Queued without bound, frames
    # would instead fall further behind by 30 a second here.
    previous = 0.0
    for captured, ingested in seen:
        assert ingested >= previous - (capacity + 1) / rate - 1e-9, seen
        previous = captured
    assert answer.frames >= 20


def test_long_stream_under_a_memory_budget_stays_flat_and_answers(tiny_vlm, events):
    tpf = tiny_vlm.tokens_per_frame
    budget = 40 * tpf  # entries per layer: 40 frames' worth
    sizes = []

    def on_event(event):
        if event["type"] == "ingested":
            sizes.append(live.session.cache.kv_bytes)

    source = open_source("lavfi:testsrc=size=32x32:rate=25", speed=0)  # as fast as the model takes it
    live = LiveSession(tiny_vlm, source, memory_budget=budget, on_event=on_event)
    with live:
        assert live.wait_for_frames(200, timeout=120)
        answer = live.ask("What is going on?", max_new_tokens=4)
        assert live.wait_for_frames(live.ingested + 40, timeout=120)
        stats = live.stats()
    session = stats["session"]
    limit_bytes = budget * tiny_vlm.adapter.decoder.num_layers * live.session.cache.bytes_per_entry
    assert max(session["kv_entries_per_layer"]) <= budget and max(sizes) <= limit_bytes
    assert session["evicted_entries"] > 0 and session["frames"] >= 240
    assert max(sizes[len(sizes) // 2:]) <= max(sizes[: len(sizes) // 2])  # stopped growing: flat
    assert answer.frames >= 200 and answer.stop_reason in ("max_new_tokens", "stop_token")


def test_source_failure_is_reported_and_the_ingested_frames_stay_answerable(tiny_vlm, events):
    with LiveSession(tiny_vlm, Failing(5), on_event=events) as live:
        assert live.wait(timeout=30)
        answer = live.ask("What was there?", max_new_tokens=2)
    assert isinstance(live.error, StreamVLMError) and answer.frames == 5
    errors = [e for e in events.events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["where"] == "capture" and errors[0]["t"] == 4.0
    assert events.types()[-1] == "done" and events.events[-1]["error"].startswith("could not read failing")


def test_live_session_rejects_bad_settings(tiny_vlm):
    with pytest.raises(StreamVLMError):
        LiveSession(tiny_vlm, Failing(1), buffer_frames=0)
    live = LiveSession(tiny_vlm, Failing(1))
    live.start()
    with pytest.raises(StreamVLMError, match="already started"):
        live.start()
    live.stop()


# -- the console and the command ---------------------------------------------------------------------


def run_console(vlm, source, plan, stdin_lines=None):
    out, err = io.StringIO(), io.StringIO()
    console = Console(lambda on_event: LiveSession(vlm, source, on_event=on_event, max_new_tokens=3), plan,
                      out, err)
    if stdin_lines is not None:
        console.read_lines(io.StringIO("".join(line + "\n" for line in stdin_lines)))
    code = console.run()
    return code, out.getvalue(), err.getvalue()


def test_console_json_asks_every_n_seconds_of_stream_time(tiny_vlm, clip):
    plan = ConsolePlan(questions=("What?", "Where?"), ask_every=1.0, status_every=0, json=True)
    code, out, _ = run_console(tiny_vlm, FileSource(clip, fps=4, speed=0), plan)
    events = [json.loads(line) for line in out.splitlines()]
    answers = [e for e in events if e["type"] == "answer"]
    assert code == 0 and all("t" in e and "type" in e for e in events)
    assert [a["question"] for a in answers] == ["What?", "Where?"] * (len(answers) // 2) and len(answers) >= 4
    assert all(a["t"] >= 1.0 for a in answers) and all(isinstance(a["text"], str) for a in answers)
    assert events[-1]["type"] == "status" and events[-1]["final"] and events[-1]["reason"] == "end"
    assert events[-1]["frames"] == 12 and "end" in [e["type"] for e in events]


def test_console_questions_from_stdin_and_at_the_end(tiny_vlm, clip):
    plan = ConsolePlan(questions=("At the end?",), status_every=0, json=True)
    code, out, _ = run_console(tiny_vlm, FileSource(clip, fps=4, speed=1.0), plan, stdin_lines=["Typed?", ""])
    answers = [e for e in map(json.loads, out.splitlines()) if e["type"] == "answer"]
    assert code == 0 and [a["question"] for a in answers] == ["Typed?", "At the end?"]
    assert answers[-1]["frames"] == 12


def test_console_text_output_and_duration_ends_cleanly(tiny_vlm):
    plan = ConsolePlan(questions=("Seen?",), duration=1.5, status_every=0.5)
    code, out, err = run_console(tiny_vlm, open_source("lavfi:testsrc=size=32x32:rate=10", fps=5), plan)
    assert code == 0
    assert out.startswith("[00:0") and "] Q: Seen?\n[" in out and "] A: " in out
    assert "status: ingest" in err and "ended: duration" in err


def test_console_source_that_fails_before_any_frame_raises(tiny_vlm):
    with pytest.raises(StreamVLMError, match="could not read"):
        run_console(tiny_vlm, Failing(0), ConsolePlan(status_every=0))
    code, _, err = run_console(tiny_vlm, Failing(3), ConsolePlan(status_every=0))
    assert code == 1 and "error: could not read" in err


@pytest.mark.parametrize("kwargs, message", [
    (dict(ask_every=0, questions=("q",)), "--ask-every"), (dict(ask_every=5), "needs at least one"),
    (dict(duration=-1), "--duration"), (dict(status_every=-1), "--status-every"),
    (dict(open_timeout=0), "--open-timeout"),
])
def test_console_plan_checks(kwargs, message):
    with pytest.raises(StreamVLMError, match=message):
        ConsolePlan(**kwargs)


def test_live_command_end_to_end(tiny_dir, clip):
    run = subprocess.run([sys.executable, "-m", "streamvlm", "live", "--model", str(tiny_dir), "--source", str(clip),
                          "--speed", "0", "--fps", "2", "--ask", "What happens?", "--json", "--no-stdin",
                          "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    answer = next(e for e in events if e["type"] == "answer")
    assert answer["question"] == "What happens?" and answer["frames"] == 6 and answer["t"] == pytest.approx(2.5)


@pytest.mark.parametrize("argv, message", [
    (["live", "--source", "ftp://x/y"], "unsupported source"),
    (["live", "--source", "sample", "--ask-every", "5"], "needs at least one"),
    (["live", "--source", "lavfi:testsrc", "--source-option", "novalue"], "KEY=VALUE"),
    (["live", "--source", "rtsp://127.0.0.1:9/x", "--retries", "0", "--open-timeout", "1"], "could not read"),
])
def test_live_command_user_errors_exit_2(tiny_dir, capsys, argv, message):
    assert main(argv + ["--model", str(tiny_dir), "--no-stdin", "--status-every", "0"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _live_run(tiny_dir, *argv):
    return subprocess.run([sys.executable, "-m", "streamvlm", "live", "--model", str(tiny_dir), "--ask",
                           "What happens?", "--no-stdin", "--status-every", "0", "--max-new-tokens", "2", *argv],
                          capture_output=True, text=True, timeout=120)


def _the_one_error(run) -> str:
    assert run.returncode == 2, run.stderr
    assert "Q:" not in run.stdout and "A:" not in run.stdout and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, run.stderr
    return errors[0]


def test_live_source_that_never_opens_exits_2_once_without_answering(tiny_dir):
    # nothing listens on 127.0.0.1 port 1: every open is refused and the source keeps retrying. It used to run
    # far past --duration, answer from 0 frames and exit 0; now the run ends once --open-timeout has passed
    # (the retries are for reconnecting a stream that played), well before --duration
    error = _the_one_error(_live_run(tiny_dir, "--source", "rtsp://127.0.0.1:1/x", "--open-timeout", "1",
                                     "--duration", "60", "--retries", "-1"))
    assert "could not open rtsp://127.0.0.1:1/x within --open-timeout 1 s" in error and "refused" in error


def test_live_duration_bounds_a_run_whose_source_never_opens(tiny_dir):
    error = _the_one_error(_live_run(tiny_dir, "--source", "rtsp://127.0.0.1:1/x", "--open-timeout", "60",
                                     "--duration", "2", "--retries", "-1"))
    assert "no frame came from rtsp://127.0.0.1:1/x (--duration passed)" in error


def test_live_source_failure_before_any_frame_is_printed_once(tiny_dir):
    run = subprocess.run([sys.executable, "-m", "streamvlm", "live", "--model", str(tiny_dir), "--source",
                          "rtsp://127.0.0.1:1/x", "--retries", "0", "--open-timeout", "1", "--ask", "What happens?",
                          "--no-stdin", "--status-every", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("could not read") == 1 and "A:" not in run.stdout
