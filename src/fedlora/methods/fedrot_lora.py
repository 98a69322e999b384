"""FedRot-LoRA (Zhang, Kim, Cha, Vikalo, "FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA",
ICML 2026, PMLR vol. 306, arXiv 2602.23638; code ``haoran-zh/FedRot-LoRA``).

A client's factors are defined only up to an orthogonal r×r matrix, (B̃_u R)(Rᵀ A_u) = B̃_u A_u, so averaging
factors mixes updates written in different latent bases. Before averaging, each client's pair is rotated towards
the global pair (B̃_ref, A_ref) it started the round from, by orthogonal Procrustes on one factor:

    align A:  C_u = A_u A_refᵀ        align B:  C_u = B̃_uᵀ B̃_ref        (r × r)
    C_u = U S Vᵀ,  R_u = U Vᵀ = argmax_{RᵀR = I} tr(Rᵀ C_u)
    B̂ = Σ_u w_u B̃_u R_u,   Â = Σ_u w_u R_uᵀ A_u

Each rotation leaves the client's update unchanged; traffic is FedIT's. Cost O(U r²(d + k)), no d×k matrix.

Schedule (the official code's): round 1 never rotates (every client starts from the same init and the B reference
is zero). Then ``align = "alternate"`` (default) aligns A in even rounds and B in odd rounds; ``"A"`` / ``"B"``
always align that factor (the code's ablations). ``strength`` λ < 1 is the code's soft variant: with R⁺ the
closest proper rotation (det +1), R_λ = polar((1 − λ) I + λ R⁺); λ = 1 (default) is plain Procrustes, which may
return a reflection (the code's default path; a reflection preserves the update as well).

Guard (fedlora's, ``guard = true`` by default): Procrustes matches one factor to the reference; it does not minimise
the aggregation error, and the rotated average can be worse than FedIT's (docs/methods.md has a two-client
example). Per module the server keeps the aligned pair only when ‖B̂Â − M‖_F ≤ ‖B̄Ā − M‖_F, B̄Ā FedIT's pair and
M = Σ_u w_u B̃_u A_u, both errors from the factors by identity (A1); otherwise it sends FedIT's pair. The error is
then never above FedIT's. ``guard = false`` is the code (always the aligned pair).

Where: the code rotates on each client, against the global pair it downloaded, so its uplink is a plain weighted
sum. fedlora rotates on the server against the same pair (the same aggregate): the guard, and the FedIT error
reported beside every method, need each client's unrotated factors.

Heterogeneous ranks (fedlora's extension; the paper has equal ranks): client u is aligned in its own rank against
the reference truncated to r_u (its download), then zero-padded and averaged as FedIT, truncated on download.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from fedlora.linalg import F64, weighted_stacks
from fedlora.methods import register
from fedlora.methods.base import Aggregated, Capabilities, FactorMethod, FactorState
from fedlora.methods.fedit import fedit_factors
from fedlora.types import Adapter, AggregationReport, Contribution, Factor, LowRank


@dataclass(frozen=True)
class FedRotLoRAParams:
    """align: which factor the rotation matches to the reference ("alternate": A in even rounds, B in odd rounds
    from round 3; "A"; "B"); strength: λ in (0, 1], 1 is plain Procrustes; guard: never return a pair whose
    aggregation error exceeds FedIT's."""

    align: Literal["alternate", "A", "B"] = "alternate"
    strength: float = 1.0
    guard: bool = True

    def __post_init__(self) -> None:
        if self.align not in ("alternate", "A", "B"):
            raise ValueError(f"method.align = {self.align!r}: expected one of 'alternate', 'A', 'B'")
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, int | float) or not (math.isfinite(s) and 0 < s <= 1):
            raise ValueError(f"method.strength = {s!r}: expected a number in (0, 1] (1: plain Procrustes rotation)")
        if not isinstance(self.guard, bool):
            raise ValueError(f"method.guard = {self.guard!r}: expected true or false")


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="zero-pad",
    writes_base=False,
    personalised=False,
    per_client_download=False,
    secure_aggregation=False,
    uplink="r(d+k)",
    downlink="r(d+k)",
    paper="Zhang et al., ICML 2026 (PMLR 306), arXiv 2602.23638",
)


def aligned_factor(align: str, rnd: int) -> Factor | None:
    """The factor round ``rnd`` aligns (rounds count from 1), None in round 1."""
    if rnd < 1:
        raise ValueError(f"fedrot_lora: round {rnd}: rounds count from 1")
    if rnd == 1:
        return None
    if align == "alternate":
        return "A" if rnd % 2 == 0 else "B"
    return "A" if align == "A" else "B"


def rotation(cross: Tensor, strength: float = 1.0) -> Tensor:
    """The orthogonal R (r × r) maximising tr(Rᵀ C) for the cross product C = U S Vᵀ: R = U Vᵀ.

    strength λ < 1: R⁺ = U diag(1, …, 1, det(U Vᵀ)) Vᵀ (a proper rotation; singular values descend, so the last
    pair is flipped), then the orthogonal polar factor of (1 − λ) I + λ R⁺.
    """
    U, _, Vh = torch.linalg.svd(cross)
    R = U @ Vh
    if strength == 1.0:
        return R
    if float(torch.linalg.det(R)) < 0:
        R = U @ torch.cat([Vh[:-1], -Vh[-1:]], 0)
    soft = (1.0 - strength) * torch.eye(R.shape[0], dtype=R.dtype) + strength * R
    Us, _, Vhs = torch.linalg.svd(soft)
    return Us @ Vhs


def rotate_towards(pair: LowRank, reference: LowRank, factor: Factor, strength: float = 1.0) -> LowRank:
    """(B̃ R, Rᵀ A) with R from Procrustes of ``factor`` against the reference of the same rank; in float64.

    pair: B̃ (d × r), A (r × k); reference: (d × r), (r × k). The product B̃A is unchanged.
    """
    B, A = pair.B.to(F64), pair.A.to(F64)
    cross = A @ reference.A.to(F64).T if factor == "A" else B.T @ reference.B.to(F64)
    R = rotation(cross, strength)
    return LowRank(B @ R, R.T @ A)


def excess_error2(Bw: Tensor, A: Tensor, pair: LowRank) -> float:
    """‖XY − M‖_F² − ‖M‖_F² for pair = (X, Y), by identity (A1) from the weighted stacks B_w, A of M = B_w A:
    ⟨XᵀX, YYᵀ⟩ − 2⟨B_wᵀX, A Yᵀ⟩. Two candidates compare by it without ‖M‖² (no d×k matrix, no n×n Gram)."""
    X, Y = pair.B.to(F64), pair.A.to(F64)
    return float(((X.T @ X) * (Y @ Y.T)).sum()) - 2.0 * float(((Bw.T @ X) * (A @ Y.T)).sum())


def _at_rank(pair: LowRank, rank: int) -> LowRank:
    return pair.truncate(rank) if pair.rank >= rank else pair.pad(rank)


def _reference(reference: Adapter | None, adapters: Sequence[Adapter]) -> Adapter:
    if reference is None:
        raise ValueError("fedrot_lora: no global pair to align to (the previous round restarted from a fresh init)")
    for m, lr in adapters[0].items():
        if m not in reference or reference[m].shape != lr.shape:
            got = reference[m].shape if m in reference else "absent"
            raise ValueError(
                f"fedrot_lora: module {m!r}: client updates are (d, k) = {lr.shape}, the global pair the clients "
                f"started from is {got}"
            )
    return reference


def fedrot_lora(
    adapters: Sequence[Adapter], weights: Tensor, params: FedRotLoRAParams, *, reference: Adapter | None, rnd: int
) -> Aggregated:
    """Rotate every client pair towards ``reference`` (the global pair of this round's download), average, and
    keep per module the aligned or, under the guard, FedIT's pair, whichever is closer to M."""
    ref = _reference(reference, adapters)
    factor = aligned_factor(params.align, rnd)
    fedit = fedit_factors(adapters, weights)
    rank = {m: max(ref[m].rank, lr.rank) for m, lr in fedit.items()}
    if factor is None:
        return Aggregated({m: lr.pad(rank[m]) for m, lr in fedit.items()}, diagnostics={"align": "none"})
    rotated = [
        {m: rotate_towards(lr, _at_rank(ref[m], lr.rank), factor, params.strength) for m, lr in a.items()}
        for a in adapters
    ]
    aligned = fedit_factors(rotated, weights)
    out, kept = {}, {}
    for m, pair in aligned.items():
        pair = LowRank(pair.B.to(fedit[m].B.dtype), pair.A.to(fedit[m].A.dtype))
        kept[m] = not params.guard or no_worse([a[m] for a in adapters], weights, pair, fedit[m])
        out[m] = (pair if kept[m] else fedit[m]).pad(rank[m])
    return Aggregated(out, diagnostics={"align": factor, "aligned": kept})


def no_worse(clients: Sequence[LowRank], weights: Tensor, pair: LowRank, other: LowRank) -> bool:
    """‖pair − M‖_F ≤ ‖other − M‖_F for M = Σ_u w_u B̃_u A_u, from the weighted stacks (no d×k matrix)."""
    Bw, A = weighted_stacks([c.B for c in clients], [c.A for c in clients], weights)
    return excess_error2(Bw, A, pair) <= excess_error2(Bw, A, other)


@dataclass(frozen=True)
class FedRotLoRA(FactorMethod):
    """``FactorMethod`` whose rule also receives the global pair the clients started from (the alignment
    reference) and the round (the schedule); broadcast, prepare, upload and export are FactorMethod's."""

    def aggregate(
        self, state: FactorState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[FactorState, AggregationReport]:
        rule = partial(self.rule, reference=state.adapter, rnd=rnd)
        return FactorMethod(self.name, self.capabilities, rule, self.params).aggregate(state, contributions, rnd)


@register("fedrot_lora", FedRotLoRAParams, CAPABILITIES)
def build(params: FedRotLoRAParams) -> FedRotLoRA:
    return FedRotLoRA("fedrot_lora", CAPABILITIES, fedrot_lora, params)
