"""Fed-SB (Singhal, Ponkshe, Vartak, Vepakomma, "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
Performance in (Private) Federated LoRA Fine-Tuning", arXiv 2502.15436): LoRA-SB in federation.

Every adapted module applies ΔW = s·B·R·A with B (d×r) and A (r×k) fixed, shared by every client and never
trained; only the r×r matrix R trains and travels. In canonical form (s folded into B̃ = s·B) the round is

    R̄_{t+1} = Σ_u w_u R_u,   ΔW_{t+1} = B̃ R̄_{t+1} A = Σ_u w_u B̃ R_u A

where client u trained R_u from R̄_t with A and B̃ frozen and uploads R_u and its head. B̃ and A are common, so the
aggregate is the weighted mean of the clients' dense updates, and the server step is a plain weighted sum
of the uploads (secure aggregation and central DP apply as they are).

Initialisation. The paper (LoRA-SB's "initialisation using update approximation") takes the truncated SVD of an
approximation of the first full fine-tuning step, ΔW_1 ≈ −η·sign(Σ_batch ∇_W L) = U_r S_r V_rᵀ in the code, and sets
B = U_r, A = V_rᵀ and R0 from S_r (the model starts one approximated step ahead). That needs gradients of the
full weights on training data, which the server does not have (``ModelInfo`` carries shapes, the head and the
frozen base weights). fedlora's reading (``method.init``):

- ``"weight_svd"`` (default): the same orthonormal structure from what the server has, the truncated SVD of the
  frozen base weight W0 = U S Vᵀ: B = U_r, A = V_rᵀ (the principal subspaces of W0, as LoRA-XS, which the official
  code also carries as its non-gradient path), R0 = 0, so the model starts exactly at the base (no update is
  known yet to approximate).
- ``"random"``: B, A with random orthonormal columns / rows (QR of seeded Gaussians), R0 = 0.

B̃ = s·B and A travel once, in a client's first download; R̄ and the head every round.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from fedlora.linalg import F64, weighted_mean
from fedlora.methods import register
from fedlora.methods.base import (
    Aggregated,
    Capabilities,
    ClientInfo,
    GlobalModel,
    ModelInfo,
    ModuleSpec,
    average_extras,
    measure,
)
from fedlora.methods.ce_lora import tri_factor_download
from fedlora.methods.ffa_lora import check_frozen, check_rank, factor_uploads, pack_factor
from fedlora.payload import pack_extras, unpack_extras, unpack_factors
from fedlora.types import (
    CORE_SUFFIX,
    UNFOLDED_B_SUFFIX,
    Adapter,
    AggregationReport,
    Contribution,
    LowRank,
    Payload,
    TrainPlan,
)

INITS = ("weight_svd", "random")


@dataclass(frozen=True)
class FedSBParams:
    """init: how the shared frozen B, A are chosen (module docstring): "weight_svd" (the principal subspaces of the
    frozen base weight) or "random" (random orthonormal); R0 = 0 either way."""

    init: Literal["weight_svd", "random"] = "weight_svd"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"method.init = {self.init!r}: expected one of {', '.join(map(repr, INITS))}")


CAPABILITIES = Capabilities(
    exact=True,
    heterogeneous_ranks="no",
    writes_base=False,
    personalised=False,
    per_client_download=True,
    secure_aggregation=True,
    uplink="r² per module (R only) and the head",
    downlink="r² per module (R̄) and the head, plus r(d + k) once (the frozen B, A, in a client's first round)",
    paper="Singhal et al., arXiv 2502.15436",
    needs_base_weights=True,
    variants=("lora",),
)


# ---- the math, as pure functions ------------------------------------------------------------------------------


def svd_factors(weight: Tensor, rank: int, scale: float = 1.0) -> LowRank:
    """Canonical frozen factors from the truncated SVD of ``weight`` (d, k) = U S Vᵀ: (B̃, A) = (s·U_r, V_rᵀ),
    orthonormal up to s. Computed in float64, returned in float32."""
    d, k = weight.shape
    if not 1 <= rank <= min(d, k):
        raise ValueError(f"fed_sb: rank {rank} must be in [1, min(d, k) = {min(d, k)}] for a ({d}, {k}) weight")
    U, _, Vh = torch.linalg.svd(weight.to(F64), full_matrices=False)
    return LowRank((scale * U[:, :rank]).float(), Vh[:rank].float().contiguous())


def random_factors(spec: ModuleSpec, rank: int, scale: float, gen: torch.Generator) -> LowRank:
    """Canonical frozen factors with orthonormal columns (B = B̃/s, d×r) and rows (A, r×k): QR of Gaussians."""
    if not 1 <= rank <= min(spec.d, spec.k):
        raise ValueError(f"fed_sb: rank {rank} must be in [1, min(d, k) = {min(spec.d, spec.k)}] for {spec}")
    Qb, _ = torch.linalg.qr(torch.randn(spec.d, rank, generator=gen, dtype=F64))
    Qa, _ = torch.linalg.qr(torch.randn(spec.k, rank, generator=gen, dtype=F64))
    return LowRank((scale * Qb).float(), Qa.T.float().contiguous())


def average_cores(cores: Sequence[Tensor], weights: Tensor) -> Tensor:
    """R̄ = Σ_u w_u R_u (float64 accumulation)."""
    return weighted_mean(cores, weights)


def applied_update(frozen: LowRank, core: Tensor) -> LowRank:
    """The adapter that applies B̃ R A: (B̃ R, A), the product taken in float64."""
    return LowRank((frozen.B.to(F64) @ core.to(F64)).float(), frozen.A)


# ---- the method ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SBState:
    """Server state: the shared frozen (B̃, A) per module, the global core R̄, the averaged head (the initial one
    before the first round) and the clients that already hold B̃ and A."""

    frozen: Mapping[str, LowRank]
    R: Mapping[str, Tensor]
    extras: Mapping[str, Tensor] | None
    has_frozen: frozenset[int] = frozenset()

    @property
    def rank(self) -> int:
        return next(iter(self.frozen.values())).rank


@dataclass(frozen=True)
class SBClient:
    """Client state: its copy of the frozen B̃ and A (None before its first round)."""

    A: Mapping[str, Tensor] | None = None
    B: Mapping[str, Tensor] | None = None


def initial_factors(model: ModelInfo, init: str, seed: int) -> dict[str, LowRank]:
    """The shared frozen (B̃, A) of every module under ``init``; B̃ carries each module's LoRA scale."""
    scales = model.scales or {}
    if init == "weight_svd":
        if model.base_weights is None:
            raise ValueError(
                "fed_sb: method.init = 'weight_svd' needs the frozen base weights (ModelInfo.base_weights), which the "
                "runner provides and `fedlora aggregate` over adapter directories cannot"
            )
        out = {}
        for m, spec in sorted(model.specs.items()):
            w = model.base_weights.get(m)
            if w is None or tuple(w.shape) != (spec.d, spec.k):
                got = "missing" if w is None else tuple(w.shape)
                raise ValueError(f"fed_sb: base weight of {m!r} is {got}, expected (d, k) = {(spec.d, spec.k)}")
            out[m] = svd_factors(w, model.rank, float(scales.get(m, 1.0)))
        return out
    gen = torch.Generator().manual_seed(seed)
    return {m: random_factors(s, model.rank, float(scales.get(m, 1.0)), gen) for m, s in sorted(model.specs.items())}


@dataclass(frozen=True)
class FedSB:
    name = "fed_sb"
    capabilities = CAPABILITIES
    params: FedSBParams = field(default_factory=FedSBParams)

    # ---- server ---------------------------------------------------------------------------------------------
    def init_server(self, model: ModelInfo, seed: int) -> SBState:
        frozen = initial_factors(model, self.params.init, seed)
        zeros = {m: torch.zeros(model.rank, model.rank) for m in frozen}
        return SBState(frozen, zeros, dict(model.extras) or None)

    def broadcast(self, state: SBState, client: ClientInfo, rnd: int) -> Payload:
        check_rank(self.name, client, state.rank)
        tensors = pack_factor(state.R, "C") | pack_extras(state.extras or {})
        if client.id not in state.has_frozen:
            tensors |= pack_factor({m: lr.B for m, lr in state.frozen.items()}, "B")
            tensors |= pack_factor({m: lr.A for m, lr in state.frozen.items()}, "A")
        return Payload(tensors, {"round": rnd})

    def aggregate(
        self, state: SBState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[SBState, AggregationReport]:
        r = state.rank
        cores = factor_uploads(self.name, contributions, "C", {m: (r, r) for m in state.frozen})
        for c in contributions:
            stray = sorted(unpack_factors(c.payload.tensors, "A"))
            if stray:
                raise ValueError(
                    f"{self.name}: the upload of client {c.client} carries lora.<module>.A for {stray[:3]}, "
                    "but only C travels (A and B are frozen and shared)"
                )
        weights = torch.tensor([c.weight for c in contributions], dtype=F64)
        R = {m: average_cores([cs[m] for cs in cores], weights) for m in sorted(state.frozen)}
        adapters: list[Adapter] = [{m: applied_update(state.frozen[m], cs[m]) for m in sorted(cs)} for cs in cores]
        out = Aggregated({m: applied_update(state.frozen[m], R[m]) for m in sorted(R)})
        report = measure(adapters, weights, out, weights)
        extras = average_extras([unpack_extras(c.payload.tensors) for c in contributions], weights)
        clients = [c.client for c in contributions]
        new = SBState(state.frozen, R, extras, state.has_frozen | frozenset(clients))
        bytes_down = {c: self.broadcast(new, ClientInfo(c, r), rnd + 1).nbytes for c in clients}
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        return new, replace(report, bytes_up=bytes_up, bytes_down=bytes_down)

    def export(self, state: SBState) -> GlobalModel:
        """The plain LoRA adapter (B̃ R̄, A) that applies B̃ R̄ A, the averaged head, and R̄ itself (``cores``: what
        uploaded cores are compared with by screening and central DP)."""
        adapter = {m: applied_update(lr, state.R[m]) for m, lr in state.frozen.items()}
        return GlobalModel(adapter, state.extras or {}, (), cores=dict(state.R))

    # ---- client ---------------------------------------------------------------------------------------------
    def init_client(self, client: ClientInfo) -> SBClient:
        return SBClient()

    def prepare(
        self, client_state: SBClient, download: Payload, client: ClientInfo, rnd: int
    ) -> tuple[TrainPlan, SBClient]:
        A, B, cores = tri_factor_download(self.name, download, client, rnd, client_state.A, client_state.B)
        plan = TrainPlan(
            rank=client.rank,
            adapter={m: LowRank(B[m], A[m]) for m in sorted(A)},
            extras=unpack_extras(download.tensors),
            trainable=frozenset({"C"}),
            cores=cores,
        )
        return plan, SBClient(A, B)

    def upload(
        self, client_state: SBClient, trained: Adapter, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, SBClient]:
        missing = sorted(m for m in trained if f"{m}{CORE_SUFFIX}" not in extras)
        if missing:
            raise RuntimeError(
                f"{self.name}: client {client.id}: training returned no core for {missing[:3]} "
                f"(<module>{CORE_SUFFIX}): the TrainPlan's cores were not applied"
            )
        check_frozen(self.name, client, "A", {m: lr.A for m, lr in trained.items()}, client_state.A or {})
        cores = {m: extras[f"{m}{CORE_SUFFIX}"] for m in trained}
        reserved = {f"{m}{s}" for m in trained for s in (CORE_SUFFIX, UNFOLDED_B_SUFFIX)}
        head = {n: t for n, t in extras.items() if n not in reserved}
        return Payload(pack_factor(cores, "C") | pack_extras(head), {"rank": client.rank}), client_state


@register("fed_sb", FedSBParams, CAPABILITIES)
def build(params: FedSBParams) -> FedSB:
    return FedSB(params)
