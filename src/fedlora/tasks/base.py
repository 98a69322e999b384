"""The task seam: what one kind of fine-tuning (sequence classification, causal LM) brings to a federated run.

A task owns everything that depends on what is learned: how the dataset is read and partitioned, which model
head is loaded, how examples become tensors, the training loss and the evaluation metrics. The shared steps
(experiment, client round, server round, evaluation) and every engine call these hooks and never branch on the
task; adding a task is one module registered in :mod:`fedlora.tasks`.

Evaluation is additive: ``evaluate`` returns sums over the examples it saw (``{"n": examples, ...}``), so shards
evaluated in different processes combine by adding them, and ``finish`` turns the sums into the reported metrics.
A round of ``eval.every`` (and the last round) evaluates fully (``full=True``: every metric); the rounds between
evaluate only the task's ``every_round`` metrics (none for classification; e.g. a causal LM's cheap
teacher-forced loss beside its costly generation metrics), or nothing when it has none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

Encoded = Mapping[str, Tensor]
"""Tokenised examples: ``input_ids`` and ``attention_mask`` (N, L) plus the task's targets (``labels``)."""

Sums = dict[str, float]
"""Additive evaluation sums; ``n`` is the number of examples."""


class Examples(Protocol):
    """A task's raw examples of one split: sized, and subsettable by index (subsamples, partitions)."""

    def __len__(self) -> int: ...

    def subset(self, indices: Sequence[int]) -> Examples: ...


@dataclass(frozen=True)
class TaskData:
    """A federated dataset as a task prepared it: the global held-out test split, each client's (train, test)
    splits, what the model head needs (``num_labels`` for classification, None otherwise), what the task wants
    recorded with a saved adapter (``info``, JSON-ready: e.g. ``label_names``) and the validation split carved
    from the training data before partitioning (None unless ``data.val_fraction`` or ``output.keep = "best"``)."""

    test: Examples
    clients: list[tuple[Examples, Examples]]
    num_labels: int | None = None
    info: Mapping[str, Any] | None = None
    validation: Examples | None = None


class Task(Protocol):
    """One kind of fine-tuning.

    ``metrics(cfg, data)`` names what ``finish`` may report for that config and data (a causal LM measures exact
    match or pass@1 depending on the data); the first is the primary metric, used for the local-global gap and the
    best round (``higher_is_better`` says its direction). ``evaluate`` gets the tokenizer and the config (the
    precision, and what generation needs) as ``encode`` does. ``every_round``: the metrics
    cheap enough to evaluate every round (a subset of ``metrics``). ``baseline_name`` names what ``baseline``
    measures on a split (e.g. the majority-class share), or is None when the task has none.
    """

    name: ClassVar[str]
    peft_task_type: ClassVar[str]
    higher_is_better: ClassVar[bool]
    every_round: ClassVar[tuple[str, ...]]
    baseline_name: ClassVar[str | None]

    def metrics(self, cfg: Any, data: TaskData) -> tuple[str, ...]: ...

    def load(self, cfg: Any) -> TaskData: ...

    def base_model(self, cfg: Any, data: TaskData) -> nn.Module: ...

    def encode(self, examples: Examples, tokenizer: Any, cfg: Any) -> Encoded: ...

    def baseline(self, examples: Examples) -> float | None: ...

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor: ...

    def evaluate(self, model: nn.Module, data: Encoded, tokenizer: Any, cfg: Any, full: bool) -> Sums: ...

    def finish(self, sums: Sums) -> dict[str, float]: ...

    def load_examples(self, cfg: Any, source: str, info: Mapping[str, Any]) -> Examples:
        """Every example of a data source (``fedlora eval --data``), encoded as the run's were: ``info`` is what
        ``load`` recorded (``TaskData.info``, saved with the adapter), e.g. the label names."""
        ...

    def predict(
        self, model: nn.Module, tokenizer: Any, texts: list[str], cfg: Any, info: Mapping[str, Any]
    ) -> list[dict]:
        """One JSON-ready output per text, in order, computed in batches (``fedlora predict``): for classification
        ``label`` and ``probabilities``; for generation the generated ``text``."""
        ...


def add_sums(parts: Sequence[Sums]) -> Sums:
    """Evaluation sums of shards combined (key by key)."""
    out: Sums = {}
    for part in parts:
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + value
    return out
