"""Loggers that write under the run's root folder and keep a run's history across `--ckpt_path` resumes.

Lightning's `CSVLogger` deletes the metrics.csv of a fixed version folder when a new run starts in it, so
`streamvlm-train fit ... --ckpt_path last` used to leave only the rows logged after the resume. Ours keeps
the rows the resumed checkpoint already covers and appends the new ones after them. `ContinueMetrics`
(a callback `streamvlm-train` adds to every run) tells it where the checkpoint stands.

Both loggers take `save_dir` as optional: `streamvlm-train` fills it from `--trainer.default_root_dir`, so
two runs with different root folders never write into each other's logs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def _need_save_dir(save_dir: str | Path | None, logger: str) -> str | Path:
    if save_dir is None:
        raise ValueError(f"{logger} needs a save_dir; streamvlm-train fills it from --trainer.default_root_dir")
    return save_dir


class _ContinuedWriter(ExperimentWriter):
    """Lightning's writer, except that what happens to an existing metrics.csv waits for the first save.

    By then the trainer has restored its checkpoint (whatever the strategy's order of restoring and logging
    hyperparameters), so `keep_before` says whether this run starts afresh (None: the old rows go, as in
    Lightning) or continues a run whose checkpoint stands before step `keep_before` (older rows stay).
    """

    def __init__(self, log_dir: str) -> None:
        self.keep_before: int | None = None
        self._old_rows_settled = False
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning deletes metrics.csv here, before anyone knows whether the run resumes.
        pass

    def save(self) -> None:
        if not self._old_rows_settled and self.metrics:
            self._settle_old_rows()
        super().save()

    def _settle_old_rows(self) -> None:
        self._old_rows_settled = True
        if not self._fs.isfile(self.metrics_file_path):
            return
        if self.keep_before is None:
            self._fs.rm_file(self.metrics_file_path)
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            # Rows at the checkpoint's step or later were logged after it was saved (a killed run, or a
            # resume from an older checkpoint): the resumed run logs those steps again.
            rows = [row for row in reader if row.get("step") and float(row["step"]) < self.keep_before]
        # The parent merges the header with keys it has not seen and rewrites the file when new ones appear.
        self.metrics_keys = sorted(set(header) | set(self.metrics_keys))
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, at `save_dir/name/version/metrics.csv`, continued across resumes.

    The defaults give one file per root folder, `ROOT/csv/metrics.csv`. A run resumed with `--ckpt_path`
    keeps the rows logged before the checkpoint's step and drops any logged after it (a killed run flushed
    them: the trainer saves its loggers after every log call), then appends its own; a run that does not
    resume starts the file afresh. `ContinueMetrics`, which streamvlm-train adds to every run, tells it
    which; without that callback in the trainer every run starts afresh, as with Lightning's logger.
    """

    def __init__(self, save_dir: str | Path | None = None, name: str = "csv", version: int | str | None = "",
                 prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(_need_save_dir(save_dir, "CSVLogger"), name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._keep_before: int | None = None

    def continue_before(self, step: int | None) -> None:
        """Keep the rows of an existing metrics.csv logged before `step`; None starts the file afresh."""
        self._keep_before = step
        if self._experiment is not None:
            self._experiment.keep_before = step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
            self._experiment.keep_before = self._keep_before
        return self._experiment


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger with `save_dir` filled in by `streamvlm-train` (`ROOT/tensorboard`).

    A resumed run writes a new event file in the same folder; TensorBoard shows both.
    """

    def __init__(self, save_dir: str | Path | None = None, name: str = "tensorboard",
                 version: int | str | None = "", log_graph: bool = False, default_hp_metric: bool = True,
                 prefix: str = ""):
        super().__init__(_need_save_dir(save_dir, "TensorBoardLogger"), name=name, version=version,
                         log_graph=log_graph, default_hp_metric=default_hp_metric, prefix=prefix)


class ContinueMetrics(L.Callback):
    """Tells our CSV loggers, before the first row of a fit is saved, whether it resumed and from which step.

    The step is Lightning's count of stepped batches, the value it writes in the `step` column, as it stands
    at the first training batch: every row the checkpoint covers was logged at a lower step, and the resumed
    run logs every later step again. It is read there and not in `on_train_start` because Lightning adds 1
    to the restored count after that hook when the checkpoint was saved inside a step (at a validation or a
    batch end). The attribute is private; trainer.global_step is not the same count under manual
    optimization.
    """

    def __init__(self) -> None:
        self._pending = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self._pending = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._pending:
            return
        self._pending = False
        step = trainer.fit_loop.epoch_loop._batches_that_stepped if trainer.ckpt_path else None
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.continue_before(step)
