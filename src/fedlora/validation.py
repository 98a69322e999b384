"""Checks on what clients send, with errors that name the client, the module and what was expected.

One bad update must fail loudly before any aggregation math runs, so nothing half-aggregated is kept or written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedlora.types import Adapter


def check_updates(adapters: Sequence[Adapter], clients: Sequence[int | str]) -> None:
    """Same module set and (d, k) per module for every client, 2-D finite factors, at least one client."""
    if not adapters:
        raise ValueError("no client updates to aggregate: the client list is empty")
    ref_client, ref = clients[0], adapters[0]
    if not ref:
        raise ValueError(f"client {ref_client}: the update has no adapted modules")
    for client, adapter in zip(clients, adapters, strict=True):
        missing, extra = sorted(set(ref) - set(adapter)), sorted(set(adapter) - set(ref))
        if missing or extra:
            raise ValueError(
                f"client {client}: module set differs from client {ref_client}'s: "
                f"missing {missing or 'none'}, unexpected {extra or 'none'}"
            )
        for module, lr in adapter.items():
            if lr.shape != ref[module].shape:
                raise ValueError(
                    f"client {client}, module {module}: update shape (d, k) = {lr.shape}, expected "
                    f"{ref[module].shape} as sent by client {ref_client} (mismatched model or weight layout)"
                )
            check_tensor(lr.A, f"client {client}, module {module}: lora A")
            check_tensor(lr.B, f"client {client}, module {module}: lora B")


def check_tensor(t: Tensor, what: str) -> None:
    """A floating-point tensor of finite values; the error names ``what``, the bad value and its index."""
    if not t.is_floating_point():
        raise ValueError(f"{what} has dtype {t.dtype}; expected a floating-point tensor")
    bad = ~torch.isfinite(t)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{what} has {int(bad.sum())} NaN/Inf values (first {float(t[first])} at index {first}); expected finite"
        )


def check_extras(extras: Sequence[Mapping[str, Tensor]], clients: Sequence[int | str]) -> None:
    """Every client sends the same fully trained tensors (head, DoRA magnitudes), each floating-point and finite."""
    names = set(extras[0]) if extras else set()
    for client, named in zip(clients, extras, strict=True):
        if set(named) != names:
            raise ValueError(f"client {client} sent fully trained tensors {sorted(named)}, expected {sorted(names)}")
        for name, t in sorted(named.items()):
            check_tensor(t, f"client {client}: tensor {name}")


def check_equal_ranks(adapters: Sequence[Adapter], clients: Sequence[int | str], method: str) -> None:
    """For methods without a heterogeneous-rank policy."""
    ranks = {c: {lr.rank for lr in a.values()} for c, a in zip(clients, adapters, strict=True)}
    first = ranks[clients[0]]
    for c, r in ranks.items():
        if r != first:
            raise ValueError(
                f"client {c}: rank {sorted(r)} differs from client {clients[0]}'s {sorted(first)}; "
                f"{method} needs equal ranks (`fedlora methods` lists the methods with a heterogeneous-rank policy)"
            )


def normalize_weights(weights: Sequence[float] | Tensor | None, n: int, what: str = "weights") -> Tensor:
    """Aggregation weights summing to 1: uniform when None; otherwise finite, non-negative, length n, sum > 0."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != n:
        raise ValueError(f"{what}: got {w.numel()} values for {n} clients")
    if not torch.isfinite(w).all():
        raise ValueError(f"{what}: values must be finite, got {w.tolist()}")
    if (w < 0).any():
        i = int((w < 0).nonzero()[0])
        raise ValueError(f"{what}: client {i} has negative weight {float(w[i])}; expected >= 0")
    if float(w.sum()) <= 0:
        raise ValueError(f"{what}: weights sum to {float(w.sum())}; expected a positive sum")
    return w / w.sum()
