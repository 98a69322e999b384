"""The one client training loop and the evaluation every engine shares.

Method-specific behaviour arrives as data in a ``TrainPlan`` (initial factors, base edits, which factors train,
a named regulariser, elementwise gradient masks), never as a trainer subclass. AdamW, a fixed number of optimizer
steps (or epochs), gradient clipping, batches drawn by a seeded generator; every random choice derives from the
seed the caller passes. Batches are padded to ``data.max_length`` when tokenised and trimmed here to their longest
sequence, which changes no result (attention masks hide padding) and saves most of the compute on short texts.
``precision = "bf16"`` runs forward passes under ``torch.autocast`` to bfloat16 (mixed precision: parameters,
gradients and AdamW state stay float32).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora import peft_io
from fedlora.types import Adapter, Regularizer, TrainPlan

Encoded = Mapping[str, Tensor]
"""Tokenised examples: input_ids, attention_mask (N, max_length) and labels (N,)."""


@dataclass(frozen=True)
class TrainSettings:
    """``train.*`` of the config: AdamW with ``lr`` and ``weight_decay``, ``max_grad_norm`` clipping,
    ``local_steps`` optimizer steps or ``local_epochs`` passes (exactly one is set); and ``model.precision``."""

    lr: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 16
    local_steps: int | None = 10
    local_epochs: int | None = None
    precision: str = "fp32"


@dataclass(frozen=True)
class TrainResult:
    """What a client's training produced: canonical factors, fully trained tensors, and how it went."""

    adapter: Adapter
    extras: Mapping[str, Tensor]
    loss: float
    steps: int
    seconds: float


def apply_plan(model: torch.nn.Module, plan: TrainPlan, seed: int) -> None:
    """Base edits first (idempotent by version), then the adapter at the plan's rank, then trainable flags."""
    peft_io.apply_base_edits(model, plan.base_edits)
    peft_io.write_adapter(model, plan.adapter, plan.extras, rank=plan.rank, seed=seed)
    peft_io.set_trainable(model, plan.trainable)


def autocast(precision: str) -> torch.autocast:
    """The forward-pass context of ``model.precision``: bfloat16 autocast for ``bf16``, a no-op for ``fp32``."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"model.precision = {precision!r}: expected 'fp32' or 'bf16'")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def _trim(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Cut padding columns no example in the batch uses."""
    length = int(batch["attention_mask"].sum(1).max())
    return {k: (v[:, :length] if v.ndim == 2 else v) for k, v in batch.items()}


def batches(data: Encoded, batch_size: int, gen: torch.Generator) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled mini-batches (a new permutation each epoch), drawn from ``gen``."""
    n = int(data["labels"].shape[0])
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield _trim({k: v[idx] for k, v in data.items()})


def num_steps(settings: TrainSettings, num_examples: int) -> int:
    if settings.local_steps is not None:
        return settings.local_steps
    assert settings.local_epochs is not None
    return settings.local_epochs * math.ceil(num_examples / settings.batch_size)


def regularization(model: torch.nn.Module, reg: Regularizer | None) -> Tensor | float:
    """HetLoRA's rank self-pruning penalty λ Σ_m ‖B_m[:, ⌊γr⌋:]‖_F · ‖A_m[⌊γr⌋:, :]‖_F (0 when none)."""
    if reg is None:
        return 0.0
    if reg.name != "hetlora_tail":
        raise ValueError(f"unknown regulariser {reg.name!r}: expected 'hetlora_tail'")
    lam, gamma = reg.params["lambda"], reg.params["gamma"]
    total: Tensor | float = 0.0
    for A, B in peft_io.lora_parameters(model).values():
        start = int(gamma * A.shape[0])
        total = total + B[:, start:].norm() * A[start:, :].norm()
    return lam * total


@dataclass(frozen=True)
class _Frozen:
    """Entries of one live LoRA parameter that must not move: ``keep`` marks those that train."""

    param: torch.nn.Parameter
    keep: Tensor
    initial: Tensor


def frozen_entries(model: torch.nn.Module, masks: Mapping[str, tuple[Tensor, Tensor]] | None) -> list[_Frozen]:
    """The plan's ``grad_masks`` bound to the live PEFT parameters (checked: known modules, exact shapes)."""
    if not masks:
        return []
    live = peft_io.lora_parameters(model)
    unknown = sorted(set(masks) - set(live))
    if unknown:
        raise ValueError(f"TrainPlan.grad_masks: modules {unknown[:4]} are not adapted (adapted: {sorted(live)[:4]} …)")
    out = []
    for module, pair in sorted(masks.items()):
        for factor, param, mask in zip("AB", live[module], pair, strict=True):
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(
                    f"TrainPlan.grad_masks[{module!r}] {factor}: mask shape {tuple(mask.shape)}, expected the "
                    f"parameter's {tuple(param.shape)}"
                )
            out.append(_Frozen(param, mask.to(torch.bool), param.detach().clone()))
    return out


def mask_gradients(frozen: list[_Frozen]) -> None:
    """Zero the gradients of frozen entries (before clipping, so they do not count in the norm)."""
    for f in frozen:
        if f.param.grad is not None:
            f.param.grad.mul_(f.keep)


@torch.no_grad()
def restore_frozen(frozen: list[_Frozen]) -> None:
    """Put frozen entries back, bit for bit: AdamW's decoupled weight decay moves entries with zero gradient."""
    for f in frozen:
        f.param.copy_(torch.where(f.keep, f.param, f.initial))


def train_client(
    model: torch.nn.Module, plan: TrainPlan, data: Encoded, settings: TrainSettings, seed: int
) -> TrainResult:
    """Apply ``plan`` to the model, run the local AdamW steps, return the trained canonical factors."""
    started = time.perf_counter()
    apply_plan(model, plan, seed)
    torch.manual_seed(seed)  # dropout; after the plan, so a rank change (PEFT re-init) cannot shift the stream
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = frozen_entries(model, plan.grad_masks)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    stream = batches(data, settings.batch_size, torch.Generator().manual_seed(seed))
    steps = num_steps(settings, int(data["labels"].shape[0]))
    total = 0.0
    for _ in range(steps):
        with autocast(settings.precision):
            loss = model(**next(stream)).loss
        loss = loss + regularization(model, plan.regularizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mask_gradients(frozen)
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        restore_frozen(frozen)
        total += float(loss.detach())
    adapter, extras = peft_io.read_adapter(model)
    return TrainResult(adapter, extras, total / max(steps, 1), steps, time.perf_counter() - started)


@torch.inference_mode()
def evaluate_sums(
    model: torch.nn.Module, data: Encoded, precision: str = "fp32", batch_size: int = 64
) -> tuple[int, float, int]:
    """(correct predictions, summed cross-entropy, examples) of a sequence classifier; longest-first batches
    keep padding small. Sums, so that shards evaluated apart combine exactly. The loss is computed in float32
    from the logits whatever the ``precision``."""
    model.eval()
    n = int(data["labels"].shape[0])
    order = torch.argsort(data["attention_mask"].sum(1), descending=True)
    correct, loss_sum = 0, 0.0
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = _trim({k: v[idx] for k, v in data.items()})
        with autocast(precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct, loss_sum, n


def accuracy_loss(sums: tuple[int, float, int]) -> tuple[float, float]:
    correct, loss_sum, n = sums
    return (correct / n, loss_sum / n) if n else (float("nan"), float("nan"))


def evaluate(
    model: torch.nn.Module, data: Encoded, precision: str = "fp32", batch_size: int = 64
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a sequence classifier on ``data``."""
    return accuracy_loss(evaluate_sums(model, data, precision, batch_size))
