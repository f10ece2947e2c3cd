"""Where `streamvlm-train fit` writes and how a run resumes: checkpoints and logs under
--trainer.default_root_dir, `--ckpt_path last` exact, metrics.csv continued across the resume.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from streamvlm.train.loggers import CSVLogger


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "csv" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


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
