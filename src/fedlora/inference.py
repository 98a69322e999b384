"""Using a saved adapter: ``fedlora eval`` and ``fedlora predict``.

``load`` rebuilds exactly what a run saved in ``adapter/`` (``fedlora.adapter_card``): the base model its config
names (the ``fedlora:`` name, a Hugging Face id or a local path), the base edits when the method made them, the
adapter and the classification head (every tensor checked to have landed), on ``model.device``. ``evaluate``
measures it on the run's own held-out test set (rebuilt from the saved config and seed, so the numbers repeat the
run's) or on another data source; ``predict`` hands texts to the task (classification: a label and the
probability of every label; generation: the generated text).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora import adapter_card, devices, peft_io, tasks
from fedlora import config as cfgmod
from fedlora.experiment import by_length, global_test_set
from fedlora.tasks import Task
from fedlora.tasks.base import TaskData


@dataclass(frozen=True)
class Loaded:
    """A saved adapter in its base model, ready for inference, with the run's config and what the task recorded."""

    directory: Path
    config: cfgmod.ExperimentConfig
    task: Task
    model: Any
    tokenizer: Any
    info: adapter_card.AdapterInfo


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a saved adapter on a data source, the task's baseline there, and what the run recorded for the
    same round on its test set (``recorded``: empty when the source is not the run's test set)."""

    source: str
    examples: int
    metrics: Mapping[str, float]
    baseline: float | None
    round: int | None
    recorded: Mapping[str, float] = field(default_factory=dict)


def adapter_dir(path: str | Path) -> Path:
    """The adapter directory a path names: itself, or a run directory's ``adapter/``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run directory or its adapter/ directory")
    if not (path / adapter_card.INFO_FILE).is_file() and (path / "adapter" / adapter_card.INFO_FILE).is_file():
        return path / "adapter"
    return path


def require_adapter_dir(path: str | Path) -> Path:
    """``path`` itself, refused when it is a run directory (naming its ``adapter/``)."""
    path = Path(path)
    if path.is_dir() and not (path / adapter_card.INFO_FILE).exists() and (path / "adapter").is_dir():
        raise FileNotFoundError(f"{path} is a run directory, not an adapter directory: give {path / 'adapter'}")
    return adapter_dir(path)


def load(path: str | Path, device: str | None = None) -> Loaded:
    """The adapter saved in ``path`` (an adapter directory, or a run directory: its ``adapter/``) in its base
    model on ``device`` (default: the run's ``model.device``, resolved on this machine)."""
    directory = adapter_dir(path)
    info = adapter_card.read(directory)
    cfg = info.config
    if device is not None:
        cfg = cfgmod.with_overrides(cfg, [("model.device", device)])
    peft_io.check_model_available(cfg.model.name)
    task = tasks.for_config(cfg)
    base = task.base_model(cfg, TaskData([], [], info.num_labels, info.task_info))
    model = peft_io.load_adapter_dir(base, directory)
    if info.base_edits is not None:
        peft_io.apply_base_edits(model, [peft_io.read_base_edits(info.base_edits)])
    model = model.to(devices.resolve(cfg.model.device)).eval()
    return Loaded(directory, cfg, task, model, peft_io.load_tokenizer(cfg.model.name), info)


def evaluate(loaded: Loaded, data: str | None = None, task: str | None = None) -> EvalResult:
    """The adapter on ``data`` (a data source the task reads: for classification a local file with the run's
    text and label columns), or on the run's held-out test set when None. ``task``: in a multi-task run, the task
    whose labels ``data`` holds (required with ``data``), or the one task of the test set to evaluate."""
    cfg, model_task = loaded.config, loaded.task
    chosen = task_index(loaded, task)
    if data is None:
        examples = global_test_set(cfg, model_task.load(cfg))
        what = cfg.data.dataset if cfg.data.tasks is None else " + ".join(cfg.data.tasks)
        source = f"the run's held-out test set ({what}, seed {cfg.seed})"
        if chosen is not None:
            examples = examples.subset([i for i, t in enumerate(examples.tasks) if t == chosen])
            source += f", task {task}"
    else:
        extra = {} if not is_multitask(loaded) else {"task": chosen}
        examples, source = model_task.load_examples(cfg, data, loaded.info.task_info, **extra), data
    encoded = by_length(model_task.encode(examples, loaded.tokenizer, cfg))
    metrics = model_task.finish(model_task.evaluate(loaded.model, encoded, loaded.tokenizer, cfg, True))
    recorded = {} if data is not None else _recorded(loaded, metrics)
    return EvalResult(source, len(examples), metrics, model_task.baseline(examples), loaded.info.round, recorded)


def is_multitask(loaded: Loaded) -> bool:
    """Whether the run federated several tasks (``data.tasks``): its task info names them."""
    return bool(loaded.info.task_info.get("tasks"))


def task_index(loaded: Loaded, task: str | None) -> int | None:
    """The index of the task named ``task`` among a multi-task run's tasks (None for None); a name the run does
    not have, or any name for a single-task run, is an error."""
    names = [t["name"] for t in loaded.info.task_info.get("tasks", [])]
    if task is None:
        return None
    if not names:
        raise ValueError(f"--task {task}: the run of {loaded.directory} has one task (data.tasks is not set)")
    if task not in names:
        raise ValueError(f"--task {task}: not a task of the run of {loaded.directory}; its tasks are {names}")
    return names.index(task)


def _recorded(loaded: Loaded, metrics: Mapping[str, float]) -> dict[str, float]:
    """What the run recorded for the saved round on its test set (``global_<metric>``)."""
    saved = loaded.info.metrics
    return {m: saved[f"global_{m}"] for m in metrics if isinstance(saved.get(f"global_{m}"), float | int)}


def predict(loaded: Loaded, texts: Sequence[str], task: str | None = None) -> list[dict[str, Any]]:
    """The task's output for each text, in order (classification: ``label`` and ``probabilities``); ``task``: in
    a multi-task run, the task the texts belong to (required)."""
    if not texts:
        raise ValueError("no text to predict: give texts as arguments or --file")
    chosen = task_index(loaded, task)
    extra = {} if not is_multitask(loaded) else {"task": chosen}
    return loaded.task.predict(
        loaded.model, loaded.tokenizer, list(texts), loaded.config, loaded.info.task_info, **extra
    )


def read_texts(path: str | Path, column: str = "text") -> list[str]:
    """Texts from a file: ``column`` of a csv/json/jsonl/parquet file, else one text per non-empty line."""
    from fedlora import data as datamod

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--file {path} does not exist")
    if datamod._file_format(path) is None:
        return [line for line in path.read_text().splitlines() if line.strip()]
    frame = datamod._read_local(path)
    if column not in frame.columns:
        raise ValueError(f"--file {path}: no column {column!r} (the run's data.text_column); columns {list(frame)}")
    return [str(t) for t in frame[column]]
