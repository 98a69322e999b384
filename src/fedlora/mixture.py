"""Mixtures of LoRA experts in an adapted layer, described by data (named tensors among a plan's extras).

An adapted layer holds its live LoRA adapter (B̃, A), the one PEFT trains, reads and writes, plus E further experts
(B̃_e, A_e) (canonical: the scale folded into B̃). Its update for an input x (one token) is

    Δ(x) = w_live(x) · B̃ A x' + Σ_e w_e(x) · B̃_e A_e x'          (x' = x after LoRA dropout)

with weights from one of two routings:

- a router (FedLEASE, arXiv 2509.15087): logits R x over S slots (R is (S, k)), softmax, the top E + 1 slots kept
  and renormalised to sum to 1; slot j points at expert ``slots[j]`` (−1: the live adapter), and an expert's weight
  is the sum of its kept slots' weights. Computed per token, on x before dropout (as the official code does);
- a task table: every example of task t uses only expert ``task_expert[t]`` (−1: the live adapter), weight 1
  (FL-TAC's task adapters, evaluated together; the examples' task ids are passed to the forward pass).

Extras of module m (shapes for rank r, a (d, k) layer, E experts, S slots, T tasks):

    <m>.lora_experts.A   (E, r, k)      <m>.lora_experts.B   (E, d, r)
    <m>.lora_router      (S, k) float   <m>.lora_slots       (S,) int     (router routing)
    <m>.lora_task_expert (T,) int                                          (task routing)

This module is the math and the checks; ``fedlora.peft_io`` binds a mixture to PEFT's LoRA layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

EXPERTS_A, EXPERTS_B = ".lora_experts.A", ".lora_experts.B"
ROUTER, SLOTS, TASK_EXPERT = ".lora_router", ".lora_slots", ".lora_task_expert"
SUFFIXES = (EXPERTS_A, EXPERTS_B, ROUTER, SLOTS, TASK_EXPERT)


@dataclass(frozen=True)
class LayerMixture:
    """One layer's experts (beside the live adapter) and routing: a router with its slots, or a task table."""

    A: Tensor
    B: Tensor
    router: Tensor | None = None
    slots: Tensor | None = None
    task_expert: Tensor | None = None

    @property
    def num_experts(self) -> int:
        """Experts besides the live adapter."""
        return int(self.A.shape[0])


def is_mixture_key(name: str) -> bool:
    return name.endswith(SUFFIXES)


def pack(module: str, mixture: LayerMixture) -> dict[str, Tensor]:
    """The extras of one layer's mixture."""
    out = {f"{module}{EXPERTS_A}": mixture.A, f"{module}{EXPERTS_B}": mixture.B}
    for suffix, value in ((ROUTER, mixture.router), (SLOTS, mixture.slots), (TASK_EXPERT, mixture.task_expert)):
        if value is not None:
            out[f"{module}{suffix}"] = value
    return out


def split(
    extras: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]], rank: int
) -> tuple[dict[str, Tensor], dict[str, LayerMixture]]:
    """(the extras that are not a mixture, {module: its mixture}), every mixture checked against the layers'
    (d, k) ``shapes`` and ``rank``: all adapted modules or none, one routing each, consistent shapes, slot and
    table entries that name an expert. Errors name the module and the key."""
    plain = {n: t for n, t in extras.items() if not is_mixture_key(n)}
    parts: dict[str, dict[str, Tensor]] = {}
    for name, t in extras.items():
        if is_mixture_key(name):
            suffix = next(s for s in SUFFIXES if name.endswith(s))
            parts.setdefault(name[: -len(suffix)], {})[suffix] = t
    if not parts:
        return plain, {}
    unknown, missing = sorted(set(parts) - set(shapes)), sorted(set(shapes) - set(parts))
    if unknown or missing:
        raise ValueError(
            f"mixture extras: modules {unknown[:3]} are not adapted and adapted modules {missing[:3]} have none; "
            "a mixture covers every adapted module"
        )
    return plain, {m: _layer(m, parts[m], shapes[m], rank) for m in sorted(parts)}


def _layer(module: str, part: Mapping[str, Tensor], shape: tuple[int, int], rank: int) -> LayerMixture:
    d, k = shape
    for suffix in (EXPERTS_A, EXPERTS_B):
        if suffix not in part:
            raise ValueError(f"mixture of module {module!r}: {module}{suffix} is missing")
    A, B = part[EXPERTS_A], part[EXPERTS_B]
    E = int(A.shape[0]) if A.ndim == 3 else -1
    if tuple(A.shape) != (E, rank, k) or tuple(B.shape) != (E, d, rank):
        raise ValueError(
            f"mixture of module {module!r}: experts A {tuple(A.shape)} and B {tuple(B.shape)}, expected "
            f"(E, r, k) = (E, {rank}, {k}) and (E, d, r) = (E, {d}, {rank})"
        )
    has_router, has_table = ROUTER in part or SLOTS in part, TASK_EXPERT in part
    if has_router == has_table:
        raise ValueError(
            f"mixture of module {module!r}: expected either {module}{ROUTER} with {module}{SLOTS} or "
            f"{module}{TASK_EXPERT}, got {sorted(part)}"
        )
    if has_table:
        return LayerMixture(A, B, task_expert=_entries(module, TASK_EXPERT, part[TASK_EXPERT], E))
    if ROUTER not in part or SLOTS not in part:
        raise ValueError(f"mixture of module {module!r}: a router needs both {module}{ROUTER} and {module}{SLOTS}")
    router, slots = part[ROUTER], _entries(module, SLOTS, part[SLOTS], E)
    S = int(slots.shape[0])
    if tuple(router.shape) != (S, k) or not router.is_floating_point():
        raise ValueError(f"mixture of module {module!r}: router {tuple(router.shape)}, expected (S, k) = ({S}, {k})")
    unreachable = sorted(set(range(-1, E)) - set(slots.tolist()))
    if unreachable:
        raise ValueError(f"mixture of module {module!r}: no slot points at expert(s) {unreachable} (−1: the live one)")
    return LayerMixture(A, B, router, slots)


def _entries(module: str, suffix: str, t: Tensor, num_experts: int) -> Tensor:
    if t.ndim != 1 or t.is_floating_point() or not len(t):
        raise ValueError(f"mixture of module {module!r}: {module}{suffix} must be a non-empty 1-D integer tensor")
    if int(t.min()) < -1 or int(t.max()) >= num_experts:
        raise ValueError(
            f"mixture of module {module!r}: {module}{suffix} has entries {sorted(set(t.tolist()))}, expected "
            f"experts in [−1, {num_experts}) (−1: the live adapter)"
        )
    return t.to(torch.long)


def router_weights(x: Tensor, router: Tensor, slots: Tensor, num_experts: int) -> Tensor:
    """Per token, the weight of the live adapter (index 0) and of each expert (index e + 1): softmax of R x over the
    slots in float32, the top E + 1 slots kept and renormalised, summed per expert. Shape (..., E + 1)."""
    probs = torch.softmax(x.float() @ router.float().T, dim=-1)
    top, index = torch.topk(probs, num_experts + 1, dim=-1)
    kept = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
    to_expert = torch.nn.functional.one_hot(slots + 1, num_experts + 1).to(kept.dtype)  # (S, E + 1)
    return kept @ to_expert


def task_weights(tasks: Tensor, task_expert: Tensor, num_experts: int, ndim: int) -> Tensor:
    """Per example, weight 1 on its task's expert (index 0: the live adapter), shaped to broadcast over an input of
    ``ndim`` dimensions whose first is the batch: (N, 1, ..., 1, E + 1)."""
    if int(tasks.max()) >= len(task_expert) or int(tasks.min()) < 0:
        raise ValueError(f"task routing: task ids {sorted(set(tasks.tolist()))}, the table has {len(task_expert)}")
    weights = torch.nn.functional.one_hot(task_expert[tasks] + 1, num_experts + 1).float()
    return weights.reshape(weights.shape[0], *([1] * (ndim - 2)), num_experts + 1)


def expert_outputs(dx: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """B̃_e A_e x' of every expert, (..., E, d), from factors (no d × k matrix)."""
    return torch.einsum("...er,edr->...ed", torch.einsum("...k,erk->...er", dx, A.to(dx.dtype)), B.to(dx.dtype))
