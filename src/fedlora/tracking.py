"""Experiment trackers: each round's metrics, the summary and the resolved config, sent to TensorBoard and/or
MLflow as ``output.trackers`` asks. The run directory's files stay the record; trackers are a view of them.

Usage (the run loop; resume=True when continuing a run from its checkpoint)::

    with tracking.open(cfg, run_dir, resume) as trackers:
        for each finished round:
            trackers.log_round(record)        # the dict written as one line of metrics.jsonl
        trackers.log_summary(summary)         # the dict written as summary.json

With ``output.trackers = []`` every call does nothing. Leaving the ``with`` block through an exception marks the
MLflow run FAILED, else FINISHED.

What is logged. The record's ``round`` is the step. Numbers are scalars; nested dicts flatten to "/"-joined names
(``divergence_per_module/bert.encoder.layer.0.attention.self.query``, ``diagnostics/<module>/p/0``), lists to
indexed names (``clients_local_accuracy/3``), booleans to 0/1; text (``failed_clients/<client>``: the reason) is
logged as text; null values (rounds without evaluation) are skipped; TensorBoard keeps scalars as float32. The
summary's numbers go under ``summary/`` at the step of its last round. The resolved config (dotted keys) is
logged as parameters (MLflow) or hparams and a text table (TensorBoard).

Where. TensorBoard: event files in ``<run_dir>/tensorboard`` (``tensorboard --logdir <run_dir>/tensorboard``); a
resumed run hides what the interrupted session logged from its first resumed round on (TensorBoard's purge
step). MLflow: the tracking store named by ``MLFLOW_TRACKING_URI`` when set, else the SQLite store
``<run_dir>/mlflow.db`` with artifacts in ``<run_dir>/mlartifacts``; experiment ``MLFLOW_EXPERIMENT_NAME`` or
"fedlora"; the MLflow run is named after the run directory, and its id is kept in ``<run_dir>/mlflow_run.json``
so that a resumed run logs into the same MLflow run.

Packages (optional extras): ``pip install "fedlora[tensorboard]"`` (the ``tensorboard`` package; events are
written by ``torch.utils.tensorboard``) and ``pip install "fedlora[mlflow]"`` (``mlflow-skinny`` with SQLAlchemy
and Alembic for the SQLite store).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedlora import config as cfgmod

TRACKERS: tuple[str, ...] = typing.get_args(cfgmod.Tracker)
MLFLOW_RUN_FILE = "mlflow_run.json"


class TrackerUnavailable(RuntimeError):
    """A tracker's optional package is missing; the message names the extra to install."""


def flatten(value: Any, name: str = "") -> Iterator[tuple[str, float | str]]:
    """(name, number or text) leaves of a record: dicts joined with "/", list items indexed, booleans as 0/1,
    None skipped."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from flatten(item, f"{name}/{key}" if name else str(key))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from flatten(item, f"{name}/{i}")
    elif isinstance(value, bool | int | float):
        yield name, float(value)
    elif value is not None:
        yield name, str(value)


def _split(record: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    leaves = list(flatten(record))
    return {k: v for k, v in leaves if isinstance(v, float)}, {k: v for k, v in leaves if isinstance(v, str)}


class _Backend(Protocol):
    def log(self, step: int, scalars: Mapping[str, float], texts: Mapping[str, str]) -> None: ...

    def log_summary(self, step: int, scalars: Mapping[str, float], texts: Mapping[str, str]) -> None: ...

    def close(self, failed: bool) -> None: ...


class Trackers:
    """The trackers of one run (possibly none); a context manager that closes them."""

    def __init__(self, backends: Sequence[_Backend]) -> None:
        self.backends = list(backends)

    def log_round(self, record: Mapping[str, Any]) -> None:
        """One metrics.jsonl record, at step ``record["round"]``."""
        scalars, texts = _split({k: v for k, v in record.items() if k != "round"})
        for backend in self.backends:
            backend.log(int(record["round"]), scalars, texts)

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """The summary.json dict, under ``summary/``, at the step of its last round."""
        scalars, texts = _split({"summary": summary})
        for backend in self.backends:
            backend.log_summary(int(summary.get("rounds", 0)), scalars, texts)

    def close(self, failed: bool = False) -> None:
        for backend in self.backends:
            backend.close(failed)
        self.backends = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self.close(failed=kind is not None)


def open(cfg: cfgmod.ExperimentConfig, run_dir: Path, resume: bool = False) -> Trackers:
    """The trackers ``cfg.output.trackers`` names, logging the run in ``run_dir`` (created if missing); the config
    is logged now unless ``resume``. A missing optional package raises :class:`TrackerUnavailable`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    params = cfgmod.to_flat(cfg)
    opened: list[_Backend] = []
    try:
        for name in cfg.output.trackers:
            opened.append(_BACKENDS[name](run_dir, params, resume))
    except BaseException:
        Trackers(opened).close(failed=True)
        raise
    return Trackers(opened)


def _require(tracker: str, module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise TrackerUnavailable(
            f'output.trackers includes "{tracker}", whose package is not installed: pip install "fedlora[{tracker}]"'
        ) from None


class TensorBoard:
    """Event files in ``<run_dir>/tensorboard``, written by ``torch.utils.tensorboard``."""

    def __init__(self, run_dir: Path, params: Mapping[str, Any], resume: bool) -> None:
        self.module = _require("tensorboard", "torch.utils.tensorboard")
        self.log_dir, self.resume = str(run_dir / "tensorboard"), resume
        self.hparams = {k: json.dumps(v) if isinstance(v, list) else v for k, v in params.items()}
        self.writer: Any = None
        if not resume:
            table = "\n".join(f"| {k} | {_text(v)} |" for k, v in params.items())
            self._writer(0).add_text("config", "| key | value |\n|---|---|\n" + table, 0)

    def _writer(self, step: int) -> Any:
        """Opened at the first event: a resumed run purges the interrupted session's events from ``step`` on."""
        if self.writer is None:
            self.writer = self.module.SummaryWriter(self.log_dir, purge_step=step if self.resume else None)
        return self.writer

    def log(self, step: int, scalars: Mapping[str, float], texts: Mapping[str, str]) -> None:
        writer = self._writer(step)
        for name, value in scalars.items():
            writer.add_scalar(name, value, step)
        for name, text in texts.items():
            writer.add_text(name, text, step)
        writer.flush()

    def log_summary(self, step: int, scalars: Mapping[str, float], texts: Mapping[str, str]) -> None:
        self.log(step, scalars, texts)
        from torch.utils.tensorboard.summary import hparams

        writer = self._writer(step)
        for summary in hparams(self.hparams, dict(scalars)):
            writer.file_writer.add_summary(summary)
        writer.flush()

    def close(self, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflow:
    """One MLflow run: parameters from the config, metrics per round, text as artifacts."""

    BATCH = 1000  # MLflow's limit of metrics per log_batch call (and of params, 100)

    def __init__(self, run_dir: Path, params: Mapping[str, Any], resume: bool) -> None:
        _require("mlflow", "mlflow")
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow tables"
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        saved = run_dir / MLFLOW_RUN_FILE
        if resume and saved.exists():
            known = json.loads(saved.read_text())
            self.run_id = known["run_id"]
            self.client = MlflowClient(known["tracking_uri"] or _local_store(run_dir))
            self.client.update_run(self.run_id, status="RUNNING")
            return
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(uri or _local_store(run_dir))
        experiment = self._experiment(run_dir if uri is None else None)
        tags = {"fedlora.run_dir": str(run_dir.resolve())}
        self.run_id = self.client.create_run(experiment, run_name=run_dir.name, tags=tags).info.run_id
        saved.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
        items = [Param(k, _text(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def _experiment(self, artifacts_in: Path | None) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fedlora")
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (artifacts_in / "mlartifacts").resolve().as_uri() if artifacts_in else None
        return self.client.create_experiment(name, artifact_location=location)

    def log(self, step: int, scalars: Mapping[str, float], texts: Mapping[str, str]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_metric_name(k), v, now, step) for k, v in scalars.items()]
        for start in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + self.BATCH])
        for name, text in texts.items():
            self.client.log_text(self.run_id, text, f"rounds/{step}/{_metric_name(name)}.txt")

    def log_summary(self, step: int, scalars: Mapping[str, float], texts: Mapping[str, str]) -> None:
        self.log(step, scalars, {})
        for name, text in texts.items():
            self.client.set_tag(self.run_id, name, text)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _text(value: Any) -> str:
    """A config value as text: strings as they are, the rest as JSON (``0.1``, ``true``, ``["query", "value"]``)."""
    return value if isinstance(value, str) else json.dumps(value)


def _local_store(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def _metric_name(name: str) -> str:
    """MLflow names allow letters, digits, "_", "-", ".", " " and "/": anything else becomes "_"."""
    return re.sub(r"[^\w\-. /]", "_", name)


_BACKENDS: dict[str, Any] = {"tensorboard": TensorBoard, "mlflow": MLflow}
