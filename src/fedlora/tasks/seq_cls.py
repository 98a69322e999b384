"""Sequence classification (``model.task = "seq_cls"``): texts with labels, a classification head, cross-entropy.

Data: ``fedlora.data`` (packaged datasets, local files, cached Hugging Face sets), a seeded global test split and
a label partition over the clients. Model: ``AutoModelForSequenceClassification`` with ``num_labels`` from the
data; PEFT's ``SEQ_CLS`` task keeps the head in ``modules_to_save`` (trained fully, an extra of the payload).
Metrics: ``accuracy`` (primary) and mean cross-entropy ``loss``, computed in float32 from the logits whatever the
precision. Baseline: the majority-class share of a split (the accuracy of always predicting its most frequent
label).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fedlora import data as datamod
from fedlora import devices, peft_io
from fedlora.config import validation_fraction
from fedlora.tasks import register
from fedlora.tasks.base import Encoded, Sums, TaskData
from fedlora.training import autocast, to_device, trim

EVAL_BATCH = 64


class SequenceClassification:
    name: ClassVar[str] = "seq_cls"
    peft_task_type: ClassVar[str] = "seq_cls"
    higher_is_better: ClassVar[bool] = True
    every_round: ClassVar[tuple[str, ...]] = ()
    baseline_name: ClassVar[str | None] = "majority_share"

    def metrics(self, cfg: Any, data: TaskData) -> tuple[str, ...]:
        return ("accuracy", "loss")

    def load(self, cfg: Any) -> TaskData:
        d = cfg.data
        if d.partition_by not in (None, "label"):
            raise datamod.DataError(
                f"data.partition_by = {d.partition_by!r}: sequence classification partitions by the label; "
                "leave data.partition_by unset (other columns and cluster:K are for model.task = 'causal_lm')"
            )
        for key, value in (("data.eval_dataset", d.eval_dataset), ("data.system_prompt", d.system_prompt)):
            if value is not None:
                raise datamod.DataError(f"{key} = {value!r} is for model.task = 'causal_lm'; leave it unset")
        ds = datamod.load_dataset(d.dataset, d.text_column, d.label_column)
        fed = datamod.federate_as_configured(ds, cfg, val_fraction=validation_fraction(cfg))
        info = {"label_names": list(fed.label_names)}
        return TaskData(fed.test, list(fed.clients), len(fed.label_names), info, fed.validation)

    def base_model(self, cfg: Any, data: TaskData) -> nn.Module:
        return peft_io.load_base_model(cfg.model.name, "seq_cls", num_labels=data.num_labels or 2)

    def load_examples(self, cfg: Any, source: str, info: Mapping[str, Any]) -> datamod.TextDataset:
        """All of ``source`` (a local file with the run's text and label columns, or a dataset name) with its labels
        as the adapter's ids: string labels by name, integer labels as ids; a label the adapter does not know is
        an error naming it."""
        d, names = cfg.data, list(info.get("label_names") or [])
        path = Path(source)
        if path.is_file():
            frame = datamod._read_local(path)
            ds = datamod._frame_to_dataset(frame, d.text_column, d.label_column, source=source, label_names=names)
        else:
            ds = datamod.load_dataset(source, d.text_column, d.label_column)
        unknown = [n for n in ds.label_names if n not in names]
        if unknown:
            raise datamod.DataError(f"{source}: labels {unknown} are not among the adapter's labels {names}")
        return datamod.TextDataset(ds.texts, [names.index(ds.label_names[i]) for i in ds.labels], names)

    @torch.inference_mode()
    def predict(
        self, model: nn.Module, tokenizer: Any, texts: list[str], cfg: Any, info: Mapping[str, Any]
    ) -> list[dict]:
        """Per text, the most probable ``label`` (its name) and the ``probabilities`` of every label, in batches."""
        names, device = list(info.get("label_names") or []), devices.of(model)
        model.eval()
        out: list[dict[str, Any]] = []
        for start in range(0, len(texts), EVAL_BATCH):
            chunk = texts[start : start + EVAL_BATCH]
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=cfg.data.max_length, return_tensors="pt")
            batch = to_device({k: batch[k] for k in ("input_ids", "attention_mask")}, device)
            with autocast(cfg.model.precision, device):
                probs = torch.softmax(model(**batch).logits.float(), -1).cpu()
            labels = names or [str(i) for i in range(probs.shape[1])]
            for p in probs:
                out.append(
                    {"label": labels[int(p.argmax())], "probabilities": dict(zip(labels, p.tolist(), strict=True))}
                )
        return out

    def encode(self, examples: Any, tokenizer: Any, cfg: Any) -> Encoded:
        return datamod.tokenize(examples, tokenizer, cfg.data.max_length)

    def baseline(self, examples: Any) -> float | None:
        """The share of the most frequent label (NaN for no examples)."""
        return max(examples.label_counts()) / len(examples) if len(examples) else float("nan")

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        return model(**batch).loss

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, data: Encoded, tokenizer: Any, cfg: Any, full: bool = True) -> Sums:
        """Correct predictions, summed cross-entropy and examples, at ``cfg.model.precision``; longest-first batches
        keep padding small. Nothing is cheap enough for the rounds between full evaluations (``full=False``: no
        sums)."""
        if not full:
            return {}
        precision = cfg.model.precision
        model.eval()
        n = int(data["labels"].shape[0])
        order = torch.argsort(data["attention_mask"].sum(1), descending=True)
        correct, loss_sum, device = 0, 0.0, devices.of(model)
        for start in range(0, n, EVAL_BATCH):
            idx = order[start : start + EVAL_BATCH]
            batch = to_device(trim({k: v[idx] for k, v in data.items()}), device)
            with autocast(precision, device):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return {"correct": float(correct), "loss": loss_sum, "n": float(n)}

    def finish(self, sums: Sums) -> dict[str, float]:
        if "n" not in sums:
            return {}
        n = sums["n"]
        if not n:
            return {"accuracy": float("nan"), "loss": float("nan")}
        return {"accuracy": sums["correct"] / n, "loss": sums["loss"] / n}


register(SequenceClassification())
