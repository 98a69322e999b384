"""The one client training loop every engine shares.

Method-specific behaviour arrives as data in a ``TrainPlan`` (initial factors, base edits, which factors train, a
named regulariser, elementwise gradient masks, tri-factor cores), never as a trainer subclass; task-specific
behaviour arrives as the task's loss function. The loop touches the PEFT edge twice: ``peft_io.load_plan`` on the
way in (the handle on the adapter in the model) and ``LiveAdapter.read`` on the way out.

AdamW, a fixed number of optimizer steps (or epochs), gradient clipping, batches drawn by a seeded generator;
every random choice derives from the seed the caller passes. Batches are padded when tokenised and trimmed here to
their longest sequence, which changes no result (attention masks hide padding) and saves most of the compute on
short texts. ``precision = "bf16"`` runs forward passes under ``torch.autocast`` to bfloat16 (mixed precision:
parameters, gradients and AdamW state stay float32).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedlora import devices, peft_io
from fedlora.types import FEATURE_MEAN, FEATURE_VAR, Adapter, Regularizer, TrainPlan

Encoded = Mapping[str, Tensor]
"""Tokenised examples: input_ids, attention_mask (N, L) and the task's labels ((N,) or (N, L))."""

LossFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]
"""(model, batch) -> the task's scalar training loss (the forward pass runs under the loop's autocast)."""


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
    """What a client's training produced: canonical factors (a tri-factor core folded into B̃), the fully trained
    tensors (head, DoRA magnitudes, trained cores as ``<module>.lora_core``), and how it went."""

    adapter: Adapter
    extras: Mapping[str, Tensor]
    loss: float
    steps: int
    seconds: float


def autocast(precision: str, device: torch.device | str = "cpu") -> torch.autocast:
    """The forward-pass context of ``model.precision`` on ``device`` (the model's): bfloat16 autocast for
    ``bf16``, a no-op for ``fp32``."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"model.precision = {precision!r}: expected 'fp32' or 'bf16'")
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A batch on the model's device (the tokenised data stays on the CPU; a no-op there)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


TOKEN_KEYS = ("input_ids", "attention_mask", "labels")
"""The right-padded token tensors; other tensors of a batch (a causal LM's left-padded prompts, its references)
are passed through as they are."""


def trim(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Cut padding columns no example in the batch uses from the token tensors (ids, mask, token labels)."""
    length = int(batch["attention_mask"].sum(1).max())
    return {k: (v[:, :length] if k in TOKEN_KEYS and v.ndim == 2 else v) for k, v in batch.items()}


def batches(data: Encoded, batch_size: int, gen: torch.Generator) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled mini-batches (a new permutation each epoch), drawn from ``gen``."""
    n = int(data["input_ids"].shape[0])
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield trim({k: v[idx] for k, v in data.items()})


def num_steps(settings: TrainSettings, num_examples: int) -> int:
    if settings.local_steps is not None:
        return settings.local_steps
    assert settings.local_epochs is not None
    return settings.local_epochs * math.ceil(num_examples / settings.batch_size)


def penalty(factors: Mapping[str, tuple[Tensor, Tensor]], reg: Regularizer) -> Tensor | float:
    """HetLoRA's rank self-pruning penalty λ Σ_m ‖B_m[:, ⌊γr⌋:]‖_F · ‖A_m[⌊γr⌋:, :]‖_F over the live (A, B) of
    every module."""
    if reg.name != "hetlora_tail":
        raise ValueError(f"unknown regulariser {reg.name!r}: expected 'hetlora_tail'")
    lam, gamma = reg.params["lambda"], reg.params["gamma"]
    total: Tensor | float = 0.0
    for A, B in factors.values():
        start = int(gamma * A.shape[0])
        total = total + B[:, start:].norm() * A[start:, :].norm()
    return lam * total


def train_client(
    model: nn.Module, loss_fn: LossFn, plan: TrainPlan, data: Encoded, settings: TrainSettings, seed: int
) -> TrainResult:
    """Load ``plan`` into the model, run the local AdamW steps on the task's loss, return what was trained."""
    started = time.perf_counter()
    live = peft_io.load_plan(model, plan, seed)
    statistics = feature_statistics(model, data, settings.precision) if plan.feature_statistics else {}
    torch.manual_seed(seed)  # dropout; after the plan, so a rank change (PEFT re-init) cannot shift the stream
    optimizer = torch.optim.AdamW(live.parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    stream = batches(data, settings.batch_size, torch.Generator().manual_seed(seed))
    steps = num_steps(settings, int(data["input_ids"].shape[0]))
    device = devices.of(model)
    total = 0.0
    for _ in range(steps):
        with autocast(settings.precision, device):
            loss = loss_fn(model, to_device(next(stream), device))
        if plan.regularizer is not None:
            loss = loss + penalty(live.factors(), plan.regularizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        live.mask_gradients()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(live.parameters, settings.max_grad_norm)
        optimizer.step()
        live.restore_masked()
        total += float(loss.detach())
    adapter, extras = live.read()
    return TrainResult(adapter, extras | statistics, total / max(steps, 1), steps, time.perf_counter() - started)


FEATURE_BATCH = 64


@torch.inference_mode()
def feature_statistics(model: nn.Module, data: Encoded, precision: str) -> dict[str, Tensor]:
    """``data.feature_mean`` and ``data.feature_var`` (h,): the mean and (population) variance over the examples of
    their last hidden state mean-pooled over the attended tokens, under the model as it stands (evaluation mode,
    float32 sums)."""
    model.eval()
    n, device = int(data["input_ids"].shape[0]), devices.of(model)
    total: Tensor | float = 0.0
    squares: Tensor | float = 0.0
    for start in range(0, n, FEATURE_BATCH):
        batch = to_device(trim({k: v[start : start + FEATURE_BATCH] for k, v in data.items()}), device)
        with autocast(precision, device), peft_io.task_routing(model, batch.get("task")):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (out.hidden_states[-1].float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        total = total + pooled.double().sum(0)
        squares = squares + (pooled.double() ** 2).sum(0)
    mean = torch.as_tensor(total) / max(n, 1)
    var = (torch.as_tensor(squares) / max(n, 1) - mean**2).clamp(min=0.0)
    return {FEATURE_MEAN: mean.float().cpu(), FEATURE_VAR: var.float().cpu()}
