"""`streamvlm caption`: bad files recorded, resume after kill -9, sharding across processes, flat memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from streamvlm.caption import JsonlOutput, expand_inputs
from streamvlm.cli import main
from streamvlm.video.files import write_video


def _video(path, frames=24, seed=0, codec="mpeg4", size=32):
    g = torch.Generator().manual_seed(seed)
    return write_video(path, torch.randint(0, 256, (frames, size, size, 3), dtype=torch.uint8, generator=g),
                       fps=8, codec=codec)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "videos"
    (d / "nested").mkdir(parents=True)
    _video(d / "a.mp4", seed=1)
    _video(d / "nested" / "b.mkv", seed=2, codec="libx264")
    _video(d / "c.avi", seed=3)
    (d / "corrupt.mp4").write_bytes(os.urandom(3000))
    (d / "empty.mov").write_bytes(b"")
    (d / "letter.mp4").write_text("this is not a video")
    (d / "notes.txt").write_text("not a video and not listed: ignored")
    return d


def _records(path):
    lines = path.read_bytes().splitlines()
    return [json.loads(line) for line in lines]


def _args(model, *extra):
    return ["caption", "--model", str(model), "--fps", "4", "--segment", "2", "--max-new-tokens", "3",
            "--no-progress", *extra]


def test_folder_with_good_and_bad_files(tiny_dir, folder, tmp_path, capsys):
    out = tmp_path / "captions.jsonl"
    assert main(_args(tiny_dir, str(folder), "--out", str(out))) == 1  # some failed
    records = {os.path.basename(r["path"]): r for r in _records(out)}
    assert set(records) == {"a.mp4", "b.mkv", "c.avi", "corrupt.mp4", "empty.mov", "letter.mp4"}
    for name in ("a.mp4", "b.mkv", "c.avi"):
        r = records[name]
        assert "error" not in r and r["duration"] == pytest.approx(3.0)
        assert [(s["start"], s["end"]) for s in r["segments"]] == [(0.0, 2.0), (2.0, 3.0)]
        assert all(isinstance(s["text"], str) for s in r["segments"]) and isinstance(r["summary"], str)
        assert r["stats"]["frames"] == 12 and r["model"] == str(tiny_dir) and r["routing"] == "dense"
    assert "empty" in records["empty.mov"]["error"]
    for name in ("corrupt.mp4", "letter.mp4"):
        assert "cannot read" in records[name]["error"]
    err = capsys.readouterr().err
    assert "captioned 3, failed 3, skipped 0" in err and "h of video per hour" in err
    # A re-run skips everything already recorded.
    assert main(_args(tiny_dir, str(folder), "--out", str(out))) == 0
    assert len(_records(out)) == 6 and "skipped 6" in capsys.readouterr().err


def test_batched_captions_are_the_captions_one_at_a_time(tiny_dir, folder, tmp_path, capsys):
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    assert main(_args(tiny_dir, str(folder), "--out", str(one), "--max-new-tokens", "8")) == 1
    assert main(_args(tiny_dir, str(folder), "--out", str(many), "--max-new-tokens", "8", "--batch", "3")) == 1
    assert "captioned 3, failed 3, skipped 0" in capsys.readouterr().err

    def by_path(path):
        return {r["path"]: (r.get("segments"), r.get("summary"), r.get("error"), r.get("stats", {}).get("frames"))
                for r in _records(path)}

    assert by_path(many) == by_path(one)
    assert len(_records(many)) == 6 and any(r.get("segments") for r in _records(many))


@pytest.mark.parametrize("batch", [1, 3])
def test_killed_run_resumes_with_every_video_exactly_once(tiny_dir, tmp_path, batch):
    videos = tmp_path / "many"
    videos.mkdir()
    for i in range(8):
        _video(videos / f"v{i}.mp4", frames=48, seed=i)
    out = tmp_path / "captions.jsonl"
    cmd = [sys.executable, "-m", "streamvlm", *_args(tiny_dir, str(videos), "--out", str(out), "--fps", "8",
                                                     "--max-new-tokens", "16", "--batch", str(batch))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(out.read_bytes().splitlines())
    assert 2 <= written < 8, "the run was not interrupted in the middle"
    with out.open("ab") as f:  # what a kill in the middle of a write would leave
        f.write(b'{"path": "/half/a/li')
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    paths = [r["path"] for r in _records(out)]
    assert sorted(paths) == sorted(str(p) for p in videos.iterdir()) and len(paths) == len(set(paths))


def test_two_processes_under_accelerate_give_the_same_videos(tiny_dir, folder, tmp_path):
    single, double = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    main(_args(tiny_dir, str(folder), "--out", str(single)))
    # accelerate's --cpu launcher runs multi-process only through MPI; --multi_gpu starts the processes with
    # torchrun, which works on a CPU-only machine (gloo).
    # accelerate's launcher from this interpreter (not whichever `accelerate` is first on PATH), so the
    # processes import the streamvlm under test.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "29533", "-m", "streamvlm", *_args(tiny_dir, str(folder), "--out", str(double))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0  # some videos failed, and the exit status says so
    assert "All distributed" in proc.stderr or "rank" in proc.stderr
    one = {r["path"]: "error" in r for r in _records(single)}
    two = {r["path"]: "error" in r for r in _records(double)}
    assert one == two and len(two) == 6
    assert not list(tmp_path.glob("two.part-*"))  # rank 0 merged the parts and removed them


def test_long_video_is_captioned_in_flat_memory(tiny_dir, tmp_path):
    _video(tmp_path / "long.mp4", frames=240, seed=5)  # 30 s
    out = tmp_path / "c.jsonl"
    assert main(_args(tiny_dir, str(tmp_path / "long.mp4"), "--out", str(out), "--fps", "8", "--segment", "5",
                      "--memory-budget", "80")) == 0
    record = _records(out)[0]
    stats = record["stats"]
    assert stats["frames"] == 240 and len(record["segments"]) == 6
    # 2 layers x 80 entries x (K + V) x 2 KV heads x 16 dims x 4 bytes: the cache never held more.
    assert stats["kv_bytes_peak"] <= 80 * 2 * 2 * 2 * 16 * 4
    assert stats["evicted_entries"] > 240 * 4 - 80


def test_inputs_globs_lists_and_shards(tiny_dir, folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# videos to do\nvideos/a.mp4\n{folder / 'c.avi'}\nvideos/missing.mp4\n")
    found = expand_inputs([str(listing), str(folder / "**" / "*.mkv")])
    assert sorted(p.name for p in found) == ["a.mp4", "b.mkv", "c.avi", "missing.mp4"]
    out = tmp_path / "s.jsonl"
    for index in range(2):
        main(_args(tiny_dir, str(listing), "--out", str(out), "--num-shards", "2", "--shard-index", str(index)))
    parts = [_records(tmp_path / f"s.shard-{i}-of-2.jsonl") for i in range(2)]
    paths = [r["path"] for part in parts for r in part]
    assert sorted(paths) == sorted(str(p) for p in expand_inputs([str(listing)])) and len(set(paths)) == 3
    missing = [r for part in parts for r in part if r["path"].endswith("missing.mp4")][0]
    assert "not found" in missing["error"]


def test_partial_last_line_is_dropped(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_bytes(b'{"path": "/a"}\n{"path": "/b"')
    out = JsonlOutput(path)
    out.write({"path": "/c"})
    out.close()
    assert [r["path"] for r in _records(path)] == ["/a", "/c"] and out.done == {"/a", "/c"}


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("streamvlm: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_second_run_on_one_output_refuses_while_the_first_holds_it(tiny_dir, tmp_path, capsys):
    video = _video(tmp_path / "a.mp4", frames=8)
    out = tmp_path / "o.jsonl"
    running = JsonlOutput(out)  # the first run, still writing
    line = _one_line_error(capsys, _args(tiny_dir, str(video), "--out", str(out)))
    assert "another caption run" in line and f"pid {os.getpid()}" in line and "--out" in line
    running.close()
    for _ in range(2):  # once the first is done, a run (and a re-run) adds each video exactly once
        assert main(_args(tiny_dir, str(video), "--out", str(out))) == 0
    assert [r["path"] for r in _records(out)] == [str(video)]


def test_two_processes_on_one_output_write_each_video_once(tiny_dir, tmp_path):
    videos = [_video(tmp_path / f"v{i}.mp4", frames=8, seed=i) for i in range(3)]
    out = tmp_path / "o.jsonl"
    argv = [sys.executable, "-m", "streamvlm", *_args(tiny_dir, *map(str, videos), "--out", str(out))]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # the second either refused (the first held the lock) or skipped all
    for code, err in results:
        assert code == 0 or "another caption run" in err
    assert sorted(r["path"] for r in _records(out)) == sorted(map(str, videos))


def test_output_that_is_a_folder_or_cannot_be_made_exits_2(tiny_dir, tmp_path, capsys):
    video = _video(tmp_path / "a.mp4", frames=8)
    assert "is a folder" in _one_line_error(capsys, _args(tiny_dir, str(video), "--out", str(tmp_path)))
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    line = _one_line_error(capsys, _args(tiny_dir, str(video), "--out", str(blocker / "sub" / "o.jsonl")))
    assert "cannot create the folder" in line
    out = tmp_path / "new" / "deeper" / "o.jsonl"
    assert main(_args(tiny_dir, str(video), "--out", str(out))) == 0
    assert "created the folder" in capsys.readouterr().err and len(_records(out)) == 1


def test_full_disk_mid_run_exits_2_keeps_what_was_written_and_resumes(tiny_dir, tmp_path, capsys, monkeypatch):
    import errno

    videos = [_video(tmp_path / f"v{i}.mp4", frames=8, seed=i) for i in range(3)]
    out = tmp_path / "o.jsonl"
    real_write, records = os.write, []

    def full_after_one(fd, data):  # the first record fits; half of the second gets out, then ENOSPC
        if not data.startswith(b'{"path"'):
            return real_write(fd, data)
        records.append(data)
        if len(records) == 1:
            return real_write(fd, data)
        real_write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_after_one)
    line = _one_line_error(capsys, _args(tiny_dir, *map(str, videos), "--out", str(out)))
    monkeypatch.setattr(os, "write", real_write)
    assert "No space left" in line and "kept" in line
    assert out.read_bytes().endswith(b"\n") and [r["path"] for r in _records(out)] == [str(videos[0])]
    # a partial last line left by a disk that filled up is repaired by the next run, which resumes
    with open(out, "ab") as f:
        f.write(b'{"path": "/half')
    assert main(_args(tiny_dir, *map(str, videos), "--out", str(out))) == 0
    assert sorted(r["path"] for r in _records(out)) == sorted(map(str, videos))
