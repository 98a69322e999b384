"""FRLoRA (Yan, Feng, Zuo, Zhu, Goh, Liu, "Federated Residual Low-Rank Adaption of Large Language Models",
ICLR 2025, OpenReview e0rQRMUhs7; code ``IAMJackYan/FRLoRA``).

Initialisation (PiSSA-style, the code's ``fed_global.py``), per adapted module, from the SVD of the frozen base
weight in (out, in) layout, W0 = U S Vᵀ (computed once by ``init_server``, in float64: an O(d·k·min(d, k)) SVD per
module is inherent to the method):

    B0 = U_r diag(√(S_r/s)),  A0 = diag(√(S_r/s)) V_rᵀ   (PEFT's factors; canonical B̃0 = s·B0 = U_r diag(√(s·S_r)))
    W0 ← W0 − s·B0A0 = W0 − U_r S_r V_rᵀ                  (the initial base edit: the model's output is unchanged)

Each round (``label_skew_ours.py``): every client starts from the same (B0, A0); the server averages
B̄ = Σ w_u B̃_u, Ā = Σ w_u A_u and adds

    ΔW = B̄Ā − B̃0A0 = [B̄, −B̃0][Ā; A0]     (canonical: s is folded into B̄ and B̃0)

to every model's base weight; the adapter is reset to (B0, A0). The model therefore applies W0 + B̄Ā after the
round. The residual travels factored (rank 2r) when 2r(d+k) < d·k and dense otherwise; the anchors (B0, A0) are
sent every round (the paper's clients could keep them; fedlora counts what it sends). The code forces uniform
weights; fedlora uses the aggregation weights (uniform when chosen so).

Base-edit versions are shifted by one: version 1 is the initial PiSSA edit, round t's residual is version t + 1
(versions must be >= 1 and increasing). The PiSSA split needs the LoRA scale s of each module
(``ModelInfo.scales``); without it the canonical factors are split evenly (B̃0 = U_r √S_r, A0 = √S_r V_rᵀ).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedlora.linalg import F64
from fedlora.methods import register
from fedlora.methods.base import (
    Aggregated,
    Capabilities,
    ClientInfo,
    FactorMethod,
    FactorState,
    ModelInfo,
    average_extras,
    measure,
    travel_form,
)
from fedlora.methods.fedit import fedit_factors
from fedlora.payload import unpack_adapter, unpack_extras
from fedlora.types import Adapter, AggregationReport, Contribution, LowRank
from fedlora.validation import check_equal_ranks, check_updates


@dataclass(frozen=True)
class FRLoRAParams:
    """FRLoRA has no hyperparameters (its rank and α are the LoRA config's)."""


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="no",
    writes_base=True,
    personalised=False,
    per_client_download=False,
    secure_aggregation=True,
    uplink="r(d+k)",
    downlink="r(d+k) anchors + min(2r(d+k), d·k) residual base edit; once min(r(d+k), d·k) initial edit",
    paper="Yan et al., ICLR 2025, OpenReview e0rQRMUhs7",
    needs_base_weights=True,
)


def pissa_anchors(weight: Tensor, rank: int, scale: float = 1.0) -> LowRank:
    """Canonical (B̃0, A0) of the principal rank-``rank`` part of ``weight`` (d, k): B̃0A0 = U_r S_r V_rᵀ, split
    as PiSSA does in PEFT's gauge (PEFT's B0 = B̃0/s = U_r √(S_r/s), A0 = √(S_r/s) V_rᵀ)."""
    d, k = weight.shape
    if not 1 <= rank <= min(d, k):
        raise ValueError(f"FRLoRA: rank {rank} must be in [1, min(d, k) = {min(d, k)}] for a ({d}, {k}) weight")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"FRLoRA: LoRA scale {scale!r} must be a positive number")
    U, S, Vh = torch.linalg.svd(weight.to(F64), full_matrices=False)
    S = S[:rank]
    B = U[:, :rank] * (S * scale).sqrt()
    A = (S / scale).sqrt()[:, None] * Vh[:rank]
    return LowRank(B.to(torch.float32), A.to(torch.float32))


def residual(mean: Adapter, anchors: Adapter) -> dict[str, LowRank]:
    """ΔW = B̄Ā − B̃0A0 per module as [B̄, −B̃0][Ā; A0]."""
    return {
        m: LowRank(
            torch.cat([lr.B, -anchors[m].B.to(lr.B.dtype)], 1), torch.cat([lr.A, anchors[m].A.to(lr.A.dtype)], 0)
        )
        for m, lr in mean.items()
    }


@dataclass(frozen=True)
class FRLoRA(FactorMethod):
    """``FactorMethod`` whose global adapter is always the anchors (B̃0, A0) and whose aggregation writes the
    residual into the base (broadcast, prepare, upload and export are FactorMethod's)."""

    def init_server(self, model: ModelInfo, seed: int) -> FactorState:
        if model.base_weights is None:
            raise ValueError(
                "frlora needs the frozen base weights (ModelInfo.base_weights) for its SVD initialisation; the "
                "runner provides them, `fedlora aggregate` over adapter directories cannot"
            )
        anchors = {}
        for m, spec in sorted(model.specs.items()):
            if m not in model.base_weights:
                raise ValueError(f"frlora: no base weight for adapted module {m!r}")
            w = model.base_weights[m]
            if tuple(w.shape) != (spec.d, spec.k):
                raise ValueError(
                    f"frlora: base weight of {m!r} is {tuple(w.shape)}, expected (d, k) = {(spec.d, spec.k)}"
                )
            scale = 1.0 if model.scales is None else float(model.scales[m])
            anchors[m] = pissa_anchors(w, model.rank, scale)
        initial = travel_form(1, {m: lr.scaled(-1.0) for m, lr in anchors.items()})
        return FactorState(adapter=anchors, extras=dict(model.extras) or None, base_edits=(initial,))

    def aggregate(
        self, state: FactorState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[FactorState, AggregationReport]:
        clients = [c.client for c in contributions]
        adapters = [unpack_adapter(c.payload.tensors, f"client {c.client}") for c in contributions]
        check_updates(adapters, clients)
        check_equal_ranks(adapters, clients, self.name)
        anchors = state.adapter
        assert anchors is not None
        for m, lr in adapters[0].items():
            if m not in anchors or lr.rank != anchors[m].rank:
                raise ValueError(f"frlora: client update of {m!r} has rank {lr.rank}, the anchors have a different one")
        weights = torch.tensor([c.weight for c in contributions], dtype=torch.float64)
        delta = residual(fedit_factors(adapters, weights), anchors)
        report = measure(adapters, weights, Aggregated(adapter=anchors, base_delta=delta), weights)
        extras = average_extras([unpack_extras(c.payload.tensors) for c in contributions], weights)
        # Round rnd's edit is version rnd + 1; a client that replied had every version <= rnd.
        synced = dict(state.synced) | {c: rnd for c in clients}
        new_state = FactorState(anchors, extras, (*state.base_edits, travel_form(rnd + 1, delta)), synced)
        ranks = {c: max(lr.rank for lr in a.values()) for c, a in zip(clients, adapters, strict=True)}
        bytes_down = {c: self.broadcast(new_state, ClientInfo(c, r), rnd + 1).nbytes for c, r in ranks.items()}
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        return new_state, replace(report, bytes_up=bytes_up, bytes_down=bytes_down)


def _unused_rule(adapters: Sequence[Adapter], weights: Tensor, params: object) -> Aggregated:
    raise NotImplementedError("FRLoRA aggregates in FRLoRA.aggregate")


@register("frlora", FRLoRAParams, CAPABILITIES)
def build(params: FRLoRAParams) -> FRLoRA:
    return FRLoRA("frlora", CAPABILITIES, _unused_rule, params)
