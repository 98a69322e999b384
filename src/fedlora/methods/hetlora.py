"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024, arXiv 2401.06432).

Server step: zero-pad every client to r_max, then average each factor with sparsity (norm) weights,

    ω_u = ‖S_u‖_F / Σ_v ‖S_v‖_F,  S_u = B̃_u A_u,   B = Σ ω_u B̃_u^pad,  A = Σ ω_u A_u^pad,

and send client u the truncation B[:, :r_u], A[:r_u, :]. ‖S_u‖_F² = ⟨B̃_uᵀB̃_u, A_uA_uᵀ⟩ comes from r×r Grams.
``weighting = "data"`` uses the aggregation weights w instead (zero-padded FedIT).

Client step: local training with the rank self-pruning regulariser λ‖B[:, γr:]‖·‖A[γr:, :]‖ on the tail ranks
(a ``Regularizer`` named "hetlora_tail" in the client's TrainPlan; the shared training loop applies it), then
rank self-pruning (``prune = true``, the paper's): with the tail from t = ⌊γ r_u⌋ (the regularised one),

    τ = Σ_m ‖B̃_m[:, t:]‖_F · ‖A_m[t:, :]‖_F,   prune to rank t   if τ(trained) < τ(download) and 1 ≤ t < r_u,

i.e. the client drops its tail components when training decreased their norm; the decision is per client (one
rank for all modules, as PEFT and the TrainPlan hold it). A pruned client uploads its first t components, keeps
rank t in its client state and never grows back; the server records every client's current rank from its upload
and truncates that client's downloads to it. The global pair stays at the broadcast rank r_max (zero-padded),
so clients that have not pruned, and the exported model, keep their rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from fedlora.methods import register
from fedlora.methods.base import Aggregated, Capabilities, ClientInfo, FactorMethod, FactorState, ModelInfo
from fedlora.methods.fedit import fedit_factors
from fedlora.payload import unpack_adapter
from fedlora.types import Adapter, AggregationReport, Contribution, LowRank, Payload, Regularizer, TrainPlan


@dataclass(frozen=True)
class HetLoRAParams:
    """Hyperparameters (``method.*``) of HetLoRA."""

    weighting: Literal["norm", "data"] = "norm"
    reg_lambda: float = 0.0
    reg_gamma: float = 0.99
    prune: bool = True

    def __post_init__(self) -> None:
        if self.weighting not in ("norm", "data"):
            raise ValueError(f"method.weighting = {self.weighting!r}: expected 'norm' or 'data'")
        if not self.reg_lambda >= 0:
            raise ValueError(f"method.reg_lambda = {self.reg_lambda}: expected a value >= 0")
        if not 0 < self.reg_gamma <= 1:
            raise ValueError(f"method.reg_gamma = {self.reg_gamma}: expected a value in (0, 1]")
        if not isinstance(self.prune, bool):
            raise ValueError(f"method.prune = {self.prune!r}: expected true or false")


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="native",
    writes_base=False,
    personalised=False,
    per_client_download=True,
    secure_aggregation=False,
    uplink="r_u(d+k), r_u the client's current (self-pruned) rank",
    downlink="r_u(d+k), truncated to the client's current rank",
    paper="Cho et al., EMNLP 2024, arXiv 2401.06432",
)


def update_norms(adapters: Sequence[Adapter]) -> Tensor:
    """‖S_u‖_F over all modules, S_u = B̃_u A_u, from r×r Grams: sqrt(Σ_m ⟨B̃ᵀB̃, AAᵀ⟩)."""
    return torch.tensor([sum(map(_update_norm2, a.values())) ** 0.5 for a in adapters], dtype=torch.float64)


def _update_norm2(lr: LowRank) -> float:
    B, A = lr.B.double(), lr.A.double()
    return float(((B.T @ B) * (A @ A.T)).sum())


def norm_weights(adapters: Sequence[Adapter], weights: Tensor) -> Tensor:
    """ω_u ∝ ‖S_u‖_F; the data weights when every update is zero."""
    norms = update_norms(adapters)
    return norms / norms.sum() if float(norms.sum()) > 0 else weights


def hetlora(adapters: Sequence[Adapter], weights: Tensor, params: HetLoRAParams) -> Aggregated:
    omega = norm_weights(adapters, weights) if params.weighting == "norm" else weights
    return Aggregated(adapter=fedit_factors(adapters, omega), diagnostics={"weights": omega.tolist()})


# --------------------------------------------------------------------------------------------------------------
# Rank self-pruning


def tail_start(rank: int, gamma: float) -> int:
    """t = ⌊γ r⌋: the first tail component, the same split as the "hetlora_tail" regulariser's."""
    return int(gamma * rank)


def tail_norm(adapter: Adapter, gamma: float) -> float:
    """τ = Σ_m ‖B̃_m[:, t:]‖_F · ‖A_m[t:, :]‖_F, t = ⌊γ r⌋ per module (the regulariser's value without λ)."""
    total = 0.0
    for lr in adapter.values():
        t = tail_start(lr.rank, gamma)
        total += float(torch.linalg.vector_norm(lr.B[:, t:], dtype=torch.float64)) * float(
            torch.linalg.vector_norm(lr.A[t:], dtype=torch.float64)
        )
    return total


def pruned_rank(rank: int, gamma: float, before: float, after: float) -> int:
    """⌊γ r⌋ when the tail norm decreased during the round (after < before) and 1 ≤ ⌊γ r⌋ < r; else r."""
    t = tail_start(rank, gamma)
    return t if after < before and 1 <= t < rank else rank


def adapter_rank(adapter: Adapter, who: str) -> int:
    """The one rank of every module of a HetLoRA client's adapter (a client has one rank, as PEFT holds it)."""
    ranks = sorted({lr.rank for lr in adapter.values()})
    if len(ranks) != 1:
        raise ValueError(f"hetlora: {who} has modules at ranks {ranks}; a HetLoRA client has one rank for all modules")
    return ranks[0]


@dataclass(frozen=True)
class HetLoRAState(FactorState):
    """``FactorState`` plus the broadcast rank r_max (the global pair is held at it) and each client's current
    rank, learnt from its uploads (clients not seen yet have their configured rank)."""

    rank: int = 0
    ranks: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class HetLoRAClient:
    """A client's current rank (None: its configured rank, before any pruning) and, within a round, the tail norm
    τ of its download."""

    rank: int | None = None
    tail: float | None = None


@dataclass(frozen=True)
class HetLoRA(FactorMethod):
    """``FactorMethod`` with rank self-pruning: a client's rank lives in its client state, the server learns it from
    the upload and truncates the client's downloads to it."""

    def init_server(self, model: ModelInfo, seed: int) -> HetLoRAState:
        start = super().init_server(model, seed)
        return HetLoRAState(start.adapter, start.extras, rank=model.rank)

    def broadcast(self, state: HetLoRAState, client: ClientInfo, rnd: int) -> Payload:
        rank = state.ranks.get(client.id, client.rank)
        payload = super().broadcast(state, ClientInfo(client.id, rank), rnd)
        return Payload(payload.tensors, {**payload.meta, "rank": rank})

    def aggregate(
        self, state: HetLoRAState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[HetLoRAState, AggregationReport]:
        plain = FactorMethod(self.name, self.capabilities, self.rule, self.params, self.regularizer)
        new, report = plain.aggregate(state, contributions, rnd)  # validates; bytes_down at the uploaded ranks
        assert new.adapter is not None  # the HetLoRA rule always returns the global pair
        ranks = {c.client: _uploaded_rank(c) for c in contributions}
        diagnostics = {**new.diagnostics, "ranks": [ranks[c.client] for c in contributions]}
        adapter = {m: lr.pad(max(lr.rank, state.rank)) for m, lr in new.adapter.items()}
        out = HetLoRAState(
            adapter, new.extras, new.base_edits, new.synced, diagnostics, state.rank, dict(state.ranks) | ranks
        )
        return out, replace(report, diagnostics=diagnostics)

    def init_client(self, client: ClientInfo) -> HetLoRAClient:
        return HetLoRAClient()

    def prepare(
        self, client_state: HetLoRAClient, download: Payload, client: ClientInfo, rnd: int
    ) -> tuple[TrainPlan, HetLoRAClient]:
        rank = client_state.rank or client.rank
        plan, _ = super().prepare(None, download, ClientInfo(client.id, rank), rnd)
        assert plan.adapter is not None  # the HetLoRA rule always returns the global pair
        sent = adapter_rank(plan.adapter, f"client {client.id}'s download")
        if sent != rank:
            raise ValueError(
                f"hetlora: client {client.id}: the download has rank {sent}, the client's current rank is {rank} "
                f"(the server and the client disagree on its pruned rank: was the client's state lost?)"
            )
        return plan, HetLoRAClient(rank, tail_norm(plan.adapter, self.params.reg_gamma))

    def upload(
        self, client_state: HetLoRAClient, trained: Adapter, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, HetLoRAClient]:
        rank = adapter_rank(trained, f"client {client.id}'s trained adapter")
        if client_state.tail is None or rank != client_state.rank:
            raise ValueError(
                f"hetlora: client {client.id}: trained rank {rank}, but the round was prepared at rank "
                f"{client_state.rank} (upload needs the client state its prepare returned)"
            )
        new = rank
        if self.params.prune:
            new = pruned_rank(rank, self.params.reg_gamma, client_state.tail, tail_norm(trained, self.params.reg_gamma))
        kept = {m: lr.truncate(new) for m, lr in trained.items()}
        payload, _ = super().upload(None, kept, extras, ClientInfo(client.id, new), rnd)
        return payload, HetLoRAClient(new)


def _uploaded_rank(contribution: Contribution) -> int:
    """The rank a client uploaded at (its largest module rank, as the download truncation uses one rank per
    client); its meta ``rank``, when present, must agree."""
    who = f"client {contribution.client}'s upload"
    rank = max(lr.rank for lr in unpack_adapter(contribution.payload.tensors, who).values())
    meta = contribution.payload.meta.get("rank")
    if meta is not None and meta != rank:
        raise ValueError(f"hetlora: {who} says rank {meta} in its meta, but its factors have rank {rank}")
    return rank


@register("hetlora", HetLoRAParams, CAPABILITIES)
def build(params: HetLoRAParams) -> HetLoRA:
    regularizer = (
        Regularizer("hetlora_tail", {"lambda": params.reg_lambda, "gamma": params.reg_gamma})
        if params.reg_lambda > 0
        else None
    )
    return HetLoRA("hetlora", CAPABILITIES, hetlora, params, regularizer=regularizer)
