"""An experiment built from its config: the task's data and partitions, the model with its PEFT adapter, the
tokenised client splits and the method. Every engine builds one (a Flower node builds one with its own partition
only) and every shared step reads it; every bad input fails here, before any training starts.

Randomness: every random choice derives from (``seed``, stream, keys...) through :func:`derive_seed`, so a run
resumed from its last checkpoint, or trained on another engine or with other workers, ends with the same results.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedlora import config as cfgmod
from fedlora import devices, methods, peft_io, schedule, tasks
from fedlora.methods.base import ClientInfo, Method, ModelInfo
from fedlora.tasks import Encoded, Examples, Task, TaskData
from fedlora.training import TrainSettings

SAMPLING, CLIENT, EVAL_SAMPLE, FAULTS, PRIVACY, GLOBAL_SAMPLE = 0, 1, 2, 3, 4, 5
"""Independent random streams: client sampling per round, a client's training per (round, client), the
per-client evaluation subsample, simulated faults per (round, client), the central-DP noise per round and the
global test set's subsample."""


def derive_seed(seed: int, stream: int, *keys: int) -> int:
    """A 31-bit seed from (seed, stream, keys...): independent streams for sampling and per (round, client)."""
    return int(np.random.SeedSequence([seed, stream, *keys]).generate_state(1)[0] >> 1)


@dataclass
class ClientData:
    """A client's tokenised train and test splits (the test split subsampled per ``eval.max_examples``), its
    number of training examples (its aggregation weight), the task's baseline on its test split, and in a
    multi-task federation its training examples per task."""

    train: Encoded
    test: Encoded
    num_examples: int
    baseline: float | None
    task_examples: tuple[int, ...] = ()


@dataclass
class Experiment:
    """Everything a run needs, built and validated before any training starts. ``metrics``: what the task reports
    for this config (the first is primary); ``baseline``: the task's baseline on the global test set (e.g. the
    majority-class share), None when the task has none; ``validation``: the tokenised validation split (None
    without one); ``num_labels`` and ``task_info``: what the task recorded about the data (``TaskData``), saved
    with the adapter."""

    cfg: cfgmod.ExperimentConfig
    task: Task
    metrics: tuple[str, ...]
    method: Method
    model: torch.nn.Module
    info: ModelInfo
    clients: list[ClientData]
    test: Encoded
    ranks: list[int]
    baseline: float | None
    validation: Encoded | None = None
    num_labels: int | None = None
    task_info: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: Any = None

    def client_info(self, c: int) -> ClientInfo:
        data = self.clients[c]
        return ClientInfo(c, self.ranks[c], data.task_examples, data.num_examples)


def train_settings(cfg: cfgmod.ExperimentConfig, rnd: int = 1) -> TrainSettings:
    """``train.*`` for round ``rnd``: the learning rate follows ``train.lr_schedule``."""
    t, precision = cfg.train, cfg.model.precision
    lr = schedule.lr_at(t, rnd, cfg.federation.rounds)
    return TrainSettings(lr, t.weight_decay, t.max_grad_norm, t.batch_size, t.local_steps, t.local_epochs, precision)


def build(cfg: cfgmod.ExperimentConfig, clients: Collection[int] | None = None) -> Experiment:
    """Load data and model, partition, tokenise, build the method.

    ``clients``: tokenise only these clients' splits (a Flower node loads only its own partition, the Flower
    server none); the others keep their example count and empty data. None: every client.
    """
    peft_io.check_model_available(cfg.model.name)  # before the data loads: a missing model is the common failure
    torch.manual_seed(cfg.seed)
    device = devices.resolve(cfg.model.device)
    task = tasks.for_config(cfg)
    method = methods.build(cfg.federation.method, cfg.method)
    data = task.load(cfg)
    if cfgmod.validation_fraction(cfg) and data.validation is None:  # a task that does not carve one
        raise ValueError(
            f"data.val_fraction / output.keep = 'best' need a validation split, which this task ({cfg.model.task}"
            f"{' with data.tasks' if cfg.data.tasks else ''}) does not make yet; use output.keep = 'last'"
        )
    lora = cfg.model.lora
    ranks = list(lora.ranks) if lora.ranks is not None else [lora.r] * cfg.data.num_clients
    tokenizer = peft_io.load_tokenizer(cfg.model.name)
    base = task.base_model(cfg, data)
    if cfg.train.gradient_checkpointing:
        peft_io.enable_activation_checkpointing(base)
    model = _peft_model(cfg, base, task, max(ranks)).to(device)
    info = _model_info(cfg, model, max(ranks), data)

    def encode(examples: Examples) -> Encoded:
        return task.encode(examples, tokenizer, cfg)

    keep = set(range(cfg.data.num_clients)) if clients is None else set(clients)
    parts = []
    for c, (train, test) in enumerate(data.clients):
        test = eval_subsample(test, cfg.eval.max_examples, derive_seed(cfg.seed, EVAL_SAMPLE, c))
        tensors = (encode(train), by_length(encode(test))) if c in keep else ({}, {})
        task_examples = train.task_counts() if hasattr(train, "task_counts") else ()
        parts.append(ClientData(*tensors, len(train), task.baseline(test), task_examples))
    global_test = global_test_set(cfg, data)
    metrics = task.metrics(cfg, data)
    baseline = task.baseline(global_test)
    test = by_length(encode(global_test))
    validation = by_length(encode(data.validation)) if data.validation is not None else None
    return Experiment(
        cfg,
        task,
        metrics,
        method,
        model,
        info,
        parts,
        test,
        ranks,
        baseline,
        validation,
        data.num_labels,
        dict(data.info or {}),
        tokenizer,
    )


def _peft_model(cfg: cfgmod.ExperimentConfig, base: torch.nn.Module, task: Task, rank: int) -> Any:
    lora = cfg.model.lora
    return peft_io.make_peft_model(
        base,
        r=rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        rslora=lora.rslora,
        target_modules=list(lora.target_modules) or peft_io.default_target_modules(base),
        variant=lora.variant,
        task=task.peft_task_type,  # type: ignore[arg-type]
    )


def _model_info(cfg: cfgmod.ExperimentConfig, model: Any, rank: int, data: TaskData) -> ModelInfo:
    """What the method may know of the model: module shapes, the broadcast rank, the initial extras (head), the
    head rows of each task of a multi-task federation, and for methods that need them the frozen base weights and
    scales."""
    _, extras = peft_io.read_adapter(model)
    spans = tuple(tuple(t["labels"]) for t in (data.info or {}).get("tasks", ()))
    info = ModelInfo(peft_io.module_specs(model), rank, extras, task_labels=spans)  # type: ignore[arg-type]
    if methods.capabilities(cfg.federation.method).needs_base_weights:
        scales = {m: peft_io.lora_scale(model, m) for m in info.specs}
        info = replace(info, base_weights=peft_io.base_weights(model), scales=scales)
    return info


def global_test_set(cfg: cfgmod.ExperimentConfig, data: Any) -> Examples:
    """The global held-out test set the run evaluates on: ``data.test`` (``TaskData``), subsampled to
    ``eval.max_global_examples``."""
    return eval_subsample(data.test, cfg.eval.max_global_examples, derive_seed(cfg.seed, GLOBAL_SAMPLE))


def eval_subsample(examples: Examples, max_examples: int | None, seed: int) -> Examples:
    """At most ``max_examples`` of ``examples``, drawn without replacement by ``seed`` (all when unset)."""
    if max_examples is None or len(examples) <= max_examples:
        return examples
    rng = np.random.default_rng(seed)
    return examples.subset(sorted(int(i) for i in rng.choice(len(examples), size=max_examples, replace=False)))


def by_length(data: Encoded) -> Encoded:
    """The examples longest first, so that evaluation batches (and the evaluation tasks of a worker pool, which
    are slices) hold sequences of similar length and carry little padding. Evaluation sums do not depend on the
    order."""
    if not data or not len(data["attention_mask"]):
        return data
    order = torch.argsort(data["attention_mask"].sum(1), descending=True, stable=True)
    return {k: v[order] for k, v in data.items()}
