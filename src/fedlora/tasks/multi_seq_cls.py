"""Multi-task sequence classification (``model.task = "seq_cls"`` with ``data.tasks`` set): several datasets, each
with its own label space, federated over clients that hold different mixtures of them (``fedlora.multitask``).

Model: one ``AutoModelForSequenceClassification`` head with the labels of every task, task t owning the rows
[start_t, stop_t). Encoded examples carry ``task`` (the task id) and ``label_start`` / ``label_stop`` (their task's
rows); the loss is the cross-entropy over the example's own rows only (the other logits are masked to −∞), and the
prediction is the argmax over them, so each task trains and is judged by its own part of the head. The task ids
also reach adapters that route by task (``peft_io.task_routing``).

Metrics: ``accuracy`` and ``loss`` over all examples (accuracy primary), then ``accuracy_<task>`` and
``loss_<task>`` per task, named after the dataset (``fedlora.multitask.task_name``); a split without examples of a
task does not report that task. Baseline: the share of each task's most frequent label, Σ_t max_k n_{t,k} / n.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedlora import data as datamod
from fedlora import devices, multitask, peft_io
from fedlora.config import validation_fraction
from fedlora.tasks.base import Encoded, Sums, TaskData
from fedlora.tasks.seq_cls import EVAL_BATCH, SequenceClassification
from fedlora.training import autocast, to_device, trim


class MultiTaskClassification(SequenceClassification):
    """The multi-task classification of the tasks named ``names`` (in ``data.tasks`` order); the model head, its
    name and direction are those of ``seq_cls``."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def metrics(self, cfg: Any, data: TaskData) -> tuple[str, ...]:
        return ("accuracy", "loss", *(f"accuracy_{n}" for n in self.names), *(f"loss_{n}" for n in self.names))

    def load(self, cfg: Any) -> TaskData:
        d = cfg.data
        datasets = [datamod.load_dataset(spec, d.text_column, d.label_column) for spec in d.tasks]
        examples = multitask.combine(datasets, self.names)
        fed = multitask.federate_tasks(
            examples,
            num_clients=d.num_clients,
            task_alpha=d.task_alpha,
            partition=d.partition,
            alpha=d.alpha,
            min_partition_size=d.min_partition_size,
            test_fraction=d.test_fraction,
            local_test_fraction=d.local_test_fraction,
            seed=cfg.seed,
            val_fraction=validation_fraction(cfg),
        )
        tasks = [{"name": n, "labels": list(span)} for n, span in zip(self.names, examples.spans, strict=True)]
        info = {"label_names": examples.label_names, "tasks": tasks, "task_shares": fed.shares}
        return TaskData(fed.test, list(fed.clients), len(examples.label_names), info, fed.validation)

    def load_examples(
        self, cfg: Any, source: str, info: Mapping[str, Any], task: int | None = None
    ) -> multitask.TaskExamples:
        """All of ``source`` as examples of task ``task`` (an index into ``data.tasks``; required): its labels are
        the task's own label names (``positive``, not ``rotten_tomatoes/positive``) or ids within the task."""
        t = self._required(task, f"--data {source}")
        names, spans = list(info.get("label_names") or []), self._spans(info)
        start, stop = spans[t]
        own = [n.split("/", 1)[1] for n in names[start:stop]]
        ds = super().load_examples(cfg, source, {"label_names": own})
        labels = [start + y for y in ds.labels]
        return multitask.TaskExamples(ds.texts, labels, [t] * len(ds), names, tuple(spans), self.names)

    @torch.inference_mode()
    def predict(
        self,
        model: nn.Module,
        tokenizer: Any,
        texts: list[str],
        cfg: Any,
        info: Mapping[str, Any],
        task: int | None = None,
    ) -> list[dict]:
        """Per text of task ``task`` (an index into ``data.tasks``; required), the most probable of the task's own
        labels and the ``probabilities`` of each (the head's rows of the other tasks take no part)."""
        t = self._required(task, "predict")
        start, stop = self._spans(info)[t]
        names = [n.split("/", 1)[1] for n in list(info.get("label_names") or [])[start:stop]]
        device, out = devices.of(model), []
        model.eval()
        for first in range(0, len(texts), EVAL_BATCH):
            chunk = texts[first : first + EVAL_BATCH]
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=cfg.data.max_length, return_tensors="pt")
            n = len(chunk)
            batch = {k: batch[k] for k in ("input_ids", "attention_mask")} | {
                "task": torch.full((n,), t),
                "label_start": torch.full((n,), start),
                "label_stop": torch.full((n,), stop),
            }
            with autocast(cfg.model.precision, device):
                logits = masked_logits(model, to_device(batch, device))
            for p in torch.softmax(logits[:, start:stop], -1).cpu():
                probabilities = dict(zip(names, p.tolist(), strict=True))
                out.append({"task": self.names[t], "label": names[int(p.argmax())], "probabilities": probabilities})
        return out

    def _required(self, task: int | None, where: str) -> int:
        if task is None:
            raise ValueError(
                f"{where}: the adapter was trained on several tasks {list(self.names)}; name the task with --task"
            )
        return task

    def _spans(self, info: Mapping[str, Any]) -> list[tuple[int, int]]:
        """Each task's label rows [start, stop) as recorded by ``load`` (``info["tasks"][t]["labels"]``)."""
        return [(int(t["labels"][0]), int(t["labels"][1])) for t in info.get("tasks") or []]

    def encode(self, examples: Any, tokenizer: Any, cfg: Any) -> Encoded:
        """Tokens and labels (``fedlora.data.tokenize``), plus each example's task id and its task's label rows."""
        spans = torch.tensor(examples.spans, dtype=torch.long).reshape(-1, 2)
        tasks = torch.tensor(examples.tasks, dtype=torch.long)
        encoded = datamod.tokenize(examples, tokenizer, cfg.data.max_length)
        return encoded | {"task": tasks, "label_start": spans[tasks, 0], "label_stop": spans[tasks, 1]}

    def baseline(self, examples: Any) -> float | None:
        return examples.majority_share()

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        logits = masked_logits(model, batch)
        return nn.functional.cross_entropy(logits, batch["labels"])

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, data: Encoded, tokenizer: Any, cfg: Any, full: bool = True) -> Sums:
        """Per task t: correct predictions, summed cross-entropy and examples (``correct.t``, ``loss.t``, ``n.t``);
        only the tasks present, at ``cfg.model.precision``. Nothing between full evaluations."""
        if not full:
            return {}
        precision = cfg.model.precision
        model.eval()
        n = int(data["labels"].shape[0])
        order = torch.argsort(data["attention_mask"].sum(1), descending=True)
        sums: Sums = {}
        for start in range(0, n, EVAL_BATCH):
            idx = order[start : start + EVAL_BATCH]
            batch = trim({k: v[idx] for k, v in data.items()})
            with autocast(precision):
                logits = masked_logits(model, batch)
            losses = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            right = logits.argmax(-1) == batch["labels"]
            for t in batch["task"].unique().tolist():
                pick = batch["task"] == t
                for key, value in (("correct", right[pick].sum()), ("loss", losses[pick].sum()), ("n", pick.sum())):
                    sums[f"{key}.{t}"] = sums.get(f"{key}.{t}", 0.0) + float(value)
        return sums

    def finish(self, sums: Sums) -> dict[str, float]:
        present = [t for t in range(len(self.names)) if sums.get(f"n.{t}")]
        if not present:
            return {} if not sums else {"accuracy": float("nan"), "loss": float("nan")}
        n = sum(sums[f"n.{t}"] for t in present)
        out = {
            "accuracy": sum(sums[f"correct.{t}"] for t in present) / n,
            "loss": sum(sums[f"loss.{t}"] for t in present) / n,
        }
        out |= {f"accuracy_{self.names[t]}": sums[f"correct.{t}"] / sums[f"n.{t}"] for t in present}
        return out | {f"loss_{self.names[t]}": sums[f"loss.{t}"] / sums[f"n.{t}"] for t in present}


def masked_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The head's logits in float32 with every row outside the example's own task masked to −∞; the forward pass
    knows the examples' task ids (adapters that route by task use them)."""
    with peft_io.task_routing(model, batch["task"]):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    rows = torch.arange(logits.shape[-1], device=logits.device)
    own = (rows >= batch["label_start"][:, None]) & (rows < batch["label_stop"][:, None])
    return logits.masked_fill(~own, float("-inf"))
