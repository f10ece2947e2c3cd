"""Where `streamvlm-train fit` writes and how a run resumes: checkpoints and logs under
--trainer.default_root_dir, `--ckpt_path last` exact, metrics.csv continued across the resume.

Every fit here is train/configs/tiny_cpu.yaml (the kill -9 test also tiny_qwen2_5_vl_cpu.yaml) with a smaller
data block (8 videos of 4 frames, 2 steps an epoch), run in a scratch working folder so that anything written to a
fixed relative path would show up there.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from streamvlm.train.cli import main
from streamvlm.train.loggers import CSVLogger

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"
CONFIG = {"llava_onevision": CONFIGS / "tiny_cpu.yaml", "qwen2_5_vl": CONFIGS / "tiny_qwen2_5_vl_cpu.yaml"}


@pytest.fixture(scope="module")
def cwd(workdir):
    folder = workdir / "cwd"
    folder.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        yield folder


def _args(cwd: Path, root: str, epochs: int, *extra: str, family: str = "llava_onevision") -> list[str]:
    return ["fit", "--config", str(CONFIG[family]), "--trainer.default_root_dir", root, "--trainer.max_epochs", str(epochs),
            "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--data.synthetic", '{"num_videos": 8, "val_videos": 2, "seed": 0}', "--data.num_frames", "4",
            # shared by every run here: the cache is keyed by the videos, sampling and tower
            "--data.feature_cache", str(cwd.parent / "features"), *extra]


def _fit(cwd: Path, root: str, epochs: int, *extra: str, family: str = "llava_onevision") -> None:
    assert main(_args(cwd, root, epochs, *extra, family=family)) == 0


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "csv" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def _assert_same_rows(rows: list[dict[str, str]], expected: list[dict[str, str]]) -> None:
    def filled(rows):
        return [sorted(key for key, value in row.items() if value) for row in rows]

    assert filled(rows) == filled(expected)  # the same steps, each with the same columns
    for row, want in zip(rows, expected):
        for key, value in want.items():
            if value:
                assert float(row[key]) == pytest.approx(float(value), abs=1e-7), (key, row, want)


def _epoch_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"]


STRAIGHT_ROOT = {"llava_onevision": "S", "qwen2_5_vl": "S-qwen2_5_vl"}


@pytest.fixture(scope="module")
def straight_runs(cwd):
    """family -> the metrics.csv rows of an uninterrupted 4-epoch run of its config, run on first use."""
    runs: dict[str, list[dict[str, str]]] = {}

    def rows_of(family: str) -> list[dict[str, str]]:
        if family not in runs:
            root = STRAIGHT_ROOT[family]
            _fit(cwd, root, 4, family=family)
            rows = _rows(cwd / root)
            assert {r["epoch"] for r in rows} == {"0", "1", "2", "3"} and any(r["val/loss"] for r in rows)
            runs[family] = rows
        return runs[family]

    return rows_of


@pytest.fixture(scope="module")
def straight(straight_runs) -> list[dict[str, str]]:
    """The uninterrupted LLaVA-OneVision run, under S."""
    return straight_runs("llava_onevision")


def test_runs_with_different_root_dirs_write_separate_checkpoints_and_logs(cwd, straight):
    before = (cwd / "S" / "checkpoints" / "last.ckpt").read_bytes()
    _fit(cwd, "A", 1)
    assert _epoch_of(cwd / "A" / "checkpoints" / "last.ckpt") == 0
    assert (cwd / "S" / "checkpoints" / "last.ckpt").read_bytes() == before  # A's run left S's alone
    assert {r["epoch"] for r in _rows(cwd / "A")} == {"0"} and len(_rows(cwd / "S")) == len(straight)
    assert any((cwd / "A" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (cwd / "runs").exists()  # the config's own root, runs/tiny_cpu, is not written to

    # A dirpath given on the command line still wins over the root folder (it applies to the config's last
    # callback, the one that writes last.ckpt; the best checkpoint stays under the root).
    _fit(cwd, "C", 1, "--trainer.callbacks.dirpath", str(cwd / "elsewhere"))
    assert (cwd / "elsewhere" / "last.ckpt").is_file() and not (cwd / "C" / "checkpoints" / "last.ckpt").exists()
    assert (cwd / "C" / "csv" / "metrics.csv").is_file()


def test_resume_from_last_keeps_the_earlier_rows_and_logs_what_a_straight_run_logs(cwd, straight):
    _fit(cwd, "R", 2)
    assert {r["epoch"] for r in _rows(cwd / "R")} == {"0", "1"}
    # last.ckpt is the latest epoch even where val/loss got worse (it does here after epoch 0)
    assert _epoch_of(cwd / "R" / "checkpoints" / "last.ckpt") == 1
    _fit(cwd, "R", 4, "--ckpt_path", "last")
    _assert_same_rows(_rows(cwd / "R"), straight)
    for root in ("R", "S"):
        assert _epoch_of(cwd / root / "checkpoints" / "last.ckpt") == 3


def test_resume_from_an_older_checkpoint_drops_the_rows_logged_after_it(cwd, straight):
    _fit(cwd, "O", 2)
    shutil.copy(cwd / "O" / "checkpoints" / "last.ckpt", cwd / "epoch2.ckpt")
    _fit(cwd, "O", 3, "--ckpt_path", "last")  # its third epoch is logged, then abandoned
    _fit(cwd, "O", 4, "--ckpt_path", str(cwd / "epoch2.ckpt"))
    _assert_same_rows(_rows(cwd / "O"), straight)


KILLER = '''
import os
import signal

import lightning as L


class KillInThirdEpoch(L.Callback):
    """SIGKILL in the second step of epoch 2, after the checkpoint of epoch 1 and the first step's row."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_a_killed_run_resumes_to_the_rows_of_a_straight_run(cwd, straight_runs, family, tmp_path):
    straight = straight_runs(family)
    root = f"K-{family}"
    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    args = _args(cwd, root, 4, "--trainer.callbacks+=killer.KillInThirdEpoch", family=family)
    run = subprocess.run([sys.executable, "-m", "streamvlm.train", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == -9, run.stderr[-3000:]
    # The trainer flushes every row as it logs it: the first step of epoch 2 is on disk, after the checkpoint.
    assert [r["step"] for r in _rows(cwd / root) if r["epoch"] == "2"] == ["4"]
    assert _epoch_of(cwd / root / "checkpoints" / "last.ckpt") == 1
    _fit(cwd, root, 4, "--ckpt_path", "last", family=family)
    _assert_same_rows(_rows(cwd / root), straight)


def test_the_csv_logger_keeps_rows_before_the_resume_and_merges_new_columns(tmp_path):
    first = CSVLogger(tmp_path)
    for step in range(4):
        first.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    first.finalize("success")

    resumed = CSVLogger(tmp_path)
    resumed.continue_before(2)
    resumed.log_metrics({"train/loss": 0.9, "train/rank": 0.1}, step=2)
    resumed.finalize("success")
    rows = _rows(tmp_path)
    assert [(r["step"], r["train/loss"], r["train/rank"]) for r in rows] == [
        ("0", "1.0", ""), ("1", "0.5", ""), ("2", "0.9", "0.1")]

    fresh = CSVLogger(tmp_path)  # not resumed: the file starts afresh, as Lightning's does
    fresh.log_metrics({"train/loss": 2.0}, step=0)
    fresh.finalize("success")
    assert [(r["step"], r["train/loss"]) for r in _rows(tmp_path)] == [("0", "2.0")]

    with pytest.raises(ValueError, match="default_root_dir"):
        CSVLogger()
