"""FedSVD (Lee, Park, Lee, Wagner, Seong, Bocklet, Lee, Hwang, "FedSVD: Adaptive Orthogonalization for Private
Federated Learning with LoRA", NeurIPS 2025, arXiv 2505.12805; code ``seanie12/fed-svd``).

Clients train B only, A frozen at the value the server broadcast (``TrainPlan.trainable = {B}``), and upload B.
The server averages B and re-factorises the product with the A it broadcast, per module:

    B̄ = Σ_u w_u B̃_u,   B̄ A = U Σ Vᵀ (thin, rank ≤ r),   B̂ = U_r Σ_r (d × r),   Â = V_rᵀ (r × k)

so Â has orthonormal rows (the right singular vectors of the aggregate) and B̂Â = B̄A = Σ_u w_u B̃_u A: the
aggregate is exact, because A is common to every client (as in FFA-LoRA), yet A moves every round. No d×k matrix
is formed: ``fedlora.linalg.truncated_svd`` of the one pair (B̄, A) takes a QR of B̄ and of Aᵀ and an SVD of the
r×r core, O((d + k)r²); the official code takes a dense SVD of B·A per module per round.

fedlora's reading (docs/methods.md, FedSVD):
- Round 1 starts from PEFT's init (A Kaiming-uniform, B = 0), seeded by the run seed, as the code's LoRA init.
- Both factors are sent every round (r(d + k)): A changes at every re-factorisation.
- ``svd_period`` / ``svd_warmup``: the code's ``--recalculate-svd-period`` (default 1) and ``--svd-warmup-steps``
  (default 0): re-factorise after round t when t > svd_warmup and t % svd_period == 0; otherwise the global pair is
  (B̄, A), still exact.
- The classifier head is trained and averaged with the aggregation weights, as for every method (the code freezes
  RoBERTa's head at its random init). No DP-SGD (the paper's private setting is out of scope, as in FFA-LoRA).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fedlora.linalg import F64, truncated_svd, weighted_mean
from fedlora.methods import register
from fedlora.methods.base import (
    Aggregated,
    Capabilities,
    ClientInfo,
    GlobalModel,
    ModelInfo,
    average_extras,
    fresh_adapter,
    measure,
)
from fedlora.methods.ffa_lora import check_frozen, check_rank, factor_uploads, pack_factor
from fedlora.payload import pack_adapter, pack_extras, unpack_adapter, unpack_extras
from fedlora.types import Adapter, AggregationReport, Contribution, LowRank, Payload, TrainPlan


@dataclass(frozen=True)
class FedSVDParams:
    """svd_period: re-factorise after the rounds that are multiples of it (>= 1; 1: every round, the code's default);
    svd_warmup: not before round svd_warmup + 1 (>= 0; the code's default 0)."""

    svd_period: int = 1
    svd_warmup: int = 0

    def __post_init__(self) -> None:
        for key, low in (("svd_period", 1), ("svd_warmup", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"method.{key} = {value!r}: expected an integer >= {low}")


CAPABILITIES = Capabilities(
    exact=True,
    heterogeneous_ranks="no",
    writes_base=False,
    personalised=False,
    per_client_download=False,
    secure_aggregation=True,
    uplink="r·d (B only)",
    downlink="r(d+k) (A changes at every re-factorisation)",
    paper="Lee et al., NeurIPS 2025, arXiv 2505.12805",
)


@dataclass(frozen=True)
class FedSVDState:
    """Server state: the global pair per module (canonical; Â orthonormal after a re-factorisation), the head."""

    adapter: Mapping[str, LowRank]
    extras: Mapping[str, Tensor] | None


@dataclass(frozen=True)
class FedSVDClient:
    """Client state within a round: the frozen A it downloaded (checked unchanged on upload), None otherwise."""

    A: Mapping[str, Tensor] | None = None


def refactorise(lr: LowRank) -> LowRank:
    """(U_r Σ_r, V_rᵀ) of the thin SVD of B A, r = rank of the pair: same product, A with orthonormal rows.

    B (d × r), A (r × k) → B̂ (d × r), Â (r × k), B̂Â = BA. From the factors: QR of B and of Aᵀ, SVD of the r×r core.
    """
    return truncated_svd([lr.B], [lr.A], torch.ones(1, dtype=F64), lr.rank)[0]


def refactorises(rnd: int, params: FedSVDParams) -> bool:
    """Whether round ``rnd``'s aggregate is re-factorised (the code's period and warm-up)."""
    return rnd > params.svd_warmup and rnd % params.svd_period == 0


def fedsvd_step(
    Bs: Sequence[Mapping[str, Tensor]], weights: Tensor, A: Mapping[str, Tensor], svd: bool
) -> dict[str, LowRank]:
    """The server step, per module: the pair (Σ_u w_u B̃_u, A), re-factorised when ``svd``."""
    out = {}
    for m in sorted(A):
        mean = LowRank(weighted_mean([b[m] for b in Bs], weights), A[m])
        out[m] = refactorise(mean) if svd else mean
    return out


@dataclass(frozen=True)
class FedSVD:
    name = "fedsvd"
    capabilities = CAPABILITIES
    params: FedSVDParams = field(default_factory=FedSVDParams)

    # ---- server ---------------------------------------------------------------------------------------------
    def init_server(self, model: ModelInfo, seed: int) -> FedSVDState:
        return FedSVDState(fresh_adapter(model.specs, model.rank, seed), dict(model.extras) or None)

    def broadcast(self, state: FedSVDState, client: ClientInfo, rnd: int) -> Payload:
        check_rank(self.name, client, _rank(state))
        return Payload(pack_adapter(state.adapter) | pack_extras(state.extras or {}), {"round": rnd})

    def aggregate(
        self, state: FedSVDState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[FedSVDState, AggregationReport]:
        expected = {m: tuple(lr.B.shape) for m, lr in state.adapter.items()}
        Bs = factor_uploads(self.name, contributions, "B", expected)
        weights = torch.tensor([c.weight for c in contributions], dtype=torch.float64)
        A = {m: lr.A for m, lr in state.adapter.items()}
        adapters: list[Adapter] = [{m: LowRank(b[m], A[m]) for m in sorted(b)} for b in Bs]
        svd = refactorises(rnd, self.params)
        adapter = fedsvd_step(Bs, weights, A, svd)
        report = measure(adapters, weights, Aggregated(adapter, diagnostics={"refactorised": svd}), weights)
        extras = average_extras([unpack_extras(c.payload.tensors) for c in contributions], weights)
        new = FedSVDState(adapter, extras)
        clients = [c.client for c in contributions]
        bytes_down = {c: self.broadcast(new, ClientInfo(c, _rank(new)), rnd + 1).nbytes for c in clients}
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        return new, replace(report, bytes_up=bytes_up, bytes_down=bytes_down)

    def export(self, state: FedSVDState) -> GlobalModel:
        return GlobalModel(dict(state.adapter), state.extras or {}, ())

    # ---- client ---------------------------------------------------------------------------------------------
    def init_client(self, client: ClientInfo) -> FedSVDClient:
        return FedSVDClient()

    def prepare(
        self, client_state: FedSVDClient, download: Payload, client: ClientInfo, rnd: int
    ) -> tuple[TrainPlan, FedSVDClient]:
        adapter = unpack_adapter(download.tensors, f"{self.name}: client {client.id}'s download")
        if not adapter:
            raise ValueError(f"{self.name}: round {rnd} download for client {client.id} carries no lora.<module>.A/B")
        plan = TrainPlan(
            rank=client.rank, adapter=adapter, extras=unpack_extras(download.tensors), trainable=frozenset({"B"})
        )
        return plan, FedSVDClient({m: lr.A for m, lr in adapter.items()})

    def upload(
        self, client_state: FedSVDClient, trained: Adapter, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, FedSVDClient]:
        check_frozen(self.name, client, "A", {m: lr.A for m, lr in trained.items()}, client_state.A or {})
        tensors = pack_factor({m: lr.B for m, lr in trained.items()}, "B") | pack_extras(extras)
        return Payload(tensors, {"rank": client.rank}), FedSVDClient()


def _rank(state: FedSVDState) -> int:
    return next(iter(state.adapter.values())).rank


@register("fedsvd", FedSVDParams, CAPABILITIES)
def build(params: FedSVDParams) -> FedSVD:
    return FedSVD(params)
