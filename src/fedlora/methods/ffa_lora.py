"""FFA-LoRA (Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
arXiv 2403.12313).

A is frozen at one shared random initialisation A0 and never trained; only B trains and travels. The server
averages B,

    B̄ = Σ_u w_u B̃_u,   ΔW = B̄ A0 = Σ_u w_u B̃_u A0     (exact: A0 is common to every client).

fedlora's reading where the paper is silent:
- A0 is PEFT's initialisation (A ~ U(−1/√k, 1/√k)), seeded by the run seed, and travels once: in the download
  of each client's first round (methods.md §6, "broadcast it once ... costs r·k once"), which counts it. The
  client keeps it in its client state; a client whose state was lost cannot train (clear error).
- B starts at 0 (PEFT init) and the global B̄ is sent every round (r·d, the zero B̄ of round 1 included).
- The classifier head is trained and averaged with the aggregation weights, as in FedIT.
- No DP-SGD: the paper's privacy setting (noise, clipping per example) is out of scope.

``factor_uploads`` (checking uploads that carry one factor) is shared with RoLoRA and FedSA-LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fedlora.linalg import weighted_mean
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
from fedlora.payload import pack_extras, unpack_extras, unpack_factors
from fedlora.types import Adapter, AggregationReport, Contribution, Factor, LowRank, Payload, TrainPlan


@dataclass(frozen=True)
class FFALoRAParams:
    """FFA-LoRA has no hyperparameters in fedlora (the paper's DP-SGD noise and clipping are not implemented)."""


CAPABILITIES = Capabilities(
    exact=True,
    heterogeneous_ranks="no",
    writes_base=False,
    personalised=False,
    per_client_download=True,
    secure_aggregation=True,
    uplink="r·d (B only)",
    downlink="r·d, plus r·k once (the frozen A, in a client's first round)",
    paper="Sun et al., ICLR 2024, arXiv 2403.12313",
)


@dataclass(frozen=True)
class FFAState:
    """Server state: the frozen shared A0 and the global B̄ per module (canonical), the averaged head, and the
    clients that already hold A0."""

    A: Mapping[str, Tensor]
    B: Mapping[str, Tensor]
    extras: Mapping[str, Tensor] | None
    has_A: frozenset[int] = frozenset()


@dataclass(frozen=True)
class FFAClient:
    """Client state: its copy of the frozen shared A0 (None before its first round)."""

    A: Mapping[str, Tensor] | None = None


def pack_factor(tensors: Mapping[str, Tensor], factor: Factor) -> dict[str, Tensor]:
    """Named tensors ``lora.<module>.<factor>`` of one factor."""
    return {f"lora.{m}.{factor}": t for m, t in sorted(tensors.items())}


def factor_uploads(
    method: str, contributions: Sequence[Contribution], factor: Factor, expected: Mapping[str, tuple[int, ...]]
) -> list[dict[str, Tensor]]:
    """Per contribution, module -> uploaded tensor of ``factor``, checked: only that factor travels, the module
    set and shapes are ``expected``, values are finite. Errors name the client, the module and the key."""
    if not contributions:
        raise ValueError(f"{method}: no client updates to aggregate: the client list is empty")
    other = "A" if factor == "B" else "B"
    out = []
    for c in contributions:
        stray = sorted(unpack_factors(c.payload.tensors, other))
        if stray:
            raise ValueError(
                f"{method}: the upload of client {c.client} carries lora.<module>.{other} for {stray[:3]}, "
                f"but only {factor} travels this round"
            )
        got = unpack_factors(c.payload.tensors, factor)
        if set(got) != set(expected):
            missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
            raise ValueError(
                f"{method}: client {c.client} uploaded factor {factor} for the wrong modules: missing "
                f"{missing[:3] or 'none'}, unexpected {extra[:3] or 'none'}"
            )
        for m, t in got.items():
            if tuple(t.shape) != tuple(expected[m]):
                raise ValueError(
                    f"{method}: client {c.client}, key lora.{m}.{factor} has shape {tuple(t.shape)}, expected "
                    f"{tuple(expected[m])}"
                )
            if not torch.isfinite(t).all():
                raise ValueError(f"{method}: client {c.client}, key lora.{m}.{factor} has NaN/Inf values")
        out.append(got)
    return out


def check_rank(method: str, client: ClientInfo, rank: int) -> None:
    if client.rank != rank:
        raise ValueError(
            f"{method}: client {client.id} has rank {client.rank}, but the shared factors have rank {rank}; "
            f"{method} needs equal ranks (unset model.lora.ranks)"
        )


def local_copy(
    method: str, client: ClientInfo, factor: Factor, download: Mapping[str, Tensor], kept: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """The factor from the download if it carries it, else the client's kept copy; a clear error if neither."""
    if download:
        return dict(download)
    if kept:
        return dict(kept)
    raise ValueError(
        f"{method}: client {client.id} has no local copy of factor {factor} (payload keys lora.<module>.{factor}) "
        f"and the download does not carry it: the server sent it earlier and the client's state was lost "
        f"(a resume needs the client states saved in the checkpoint)"
    )


@dataclass(frozen=True)
class FFALoRA:
    name = "ffa_lora"
    capabilities = CAPABILITIES
    params: FFALoRAParams = field(default_factory=FFALoRAParams)

    # ---- server ---------------------------------------------------------------------------------------------
    def init_server(self, model: ModelInfo, seed: int) -> FFAState:
        init = fresh_adapter(model.specs, model.rank, seed)
        return FFAState({m: lr.A for m, lr in init.items()}, {m: lr.B for m, lr in init.items()}, model.extras or None)

    def broadcast(self, state: FFAState, client: ClientInfo, rnd: int) -> Payload:
        check_rank(self.name, client, _rank(state.A))
        tensors = pack_factor(state.B, "B") | pack_extras(state.extras or {})
        if client.id not in state.has_A:
            tensors |= pack_factor(state.A, "A")
        return Payload(tensors, {"round": rnd})

    def aggregate(
        self, state: FFAState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[FFAState, AggregationReport]:
        Bs = factor_uploads(self.name, contributions, "B", {m: tuple(b.shape) for m, b in state.B.items()})
        weights = torch.tensor([c.weight for c in contributions], dtype=torch.float64)
        adapters: list[Adapter] = [{m: LowRank(b[m], state.A[m]) for m in sorted(b)} for b in Bs]
        mean = {m: weighted_mean([b[m] for b in Bs], weights) for m in state.B}
        out = Aggregated({m: LowRank(mean[m], state.A[m]) for m in sorted(mean)})
        report = measure(adapters, weights, out, weights)
        extras = average_extras([unpack_extras(c.payload.tensors) for c in contributions], weights)
        clients = [c.client for c in contributions]
        new = FFAState(state.A, mean, extras, state.has_A | frozenset(clients))
        rank = _rank(state.A)
        bytes_down = {c: self.broadcast(new, ClientInfo(c, rank), rnd + 1).nbytes for c in clients}
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        return new, replace(report, bytes_up=bytes_up, bytes_down=bytes_down)

    def export(self, state: FFAState) -> GlobalModel:
        return GlobalModel({m: LowRank(state.B[m], state.A[m]) for m in sorted(state.A)}, state.extras or {}, ())

    # ---- client ---------------------------------------------------------------------------------------------
    def init_client(self, client: ClientInfo) -> FFAClient:
        return FFAClient()

    def prepare(
        self, client_state: FFAClient, download: Payload, client: ClientInfo, rnd: int
    ) -> tuple[TrainPlan, FFAClient]:
        A = local_copy(self.name, client, "A", unpack_factors(download.tensors, "A"), client_state.A)
        B = unpack_factors(download.tensors, "B")
        if set(A) != set(B):
            raise ValueError(
                f"{self.name}: client {client.id}: modules of A {sorted(A)[:3]} and B {sorted(B)[:3]} differ"
            )
        plan = TrainPlan(
            rank=client.rank,
            adapter={m: LowRank(B[m], A[m]) for m in sorted(A)},
            extras=unpack_extras(download.tensors),
            trainable=frozenset({"B"}),
        )
        return plan, FFAClient(A)

    def upload(
        self, client_state: FFAClient, trained: Adapter, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, FFAClient]:
        check_frozen(self.name, client, "A", {m: lr.A for m, lr in trained.items()}, client_state.A or {})
        tensors = pack_factor({m: lr.B for m, lr in trained.items()}, "B") | pack_extras(extras)
        return Payload(tensors, {"rank": client.rank}), client_state


def check_frozen(method: str, client: ClientInfo, factor: Factor, trained: Mapping[str, Tensor], kept: Mapping) -> None:
    """The frozen factor must come back from training unchanged (else the aggregate would not be exact)."""
    for m, t in trained.items():
        if m not in kept or not torch.equal(t, kept[m]):
            raise RuntimeError(
                f"{method}: client {client.id}, module {m}: factor {factor} changed during training although it is "
                f"frozen this round (the TrainPlan's trainable set was not applied)"
            )


def _rank(factors: Mapping[str, Tensor]) -> int:
    t = next(iter(factors.values()))
    return int(t.shape[0])


@register("ffa_lora", FFALoRAParams, CAPABILITIES)
def build(params: FFALoRAParams) -> FFALoRA:
    return FFALoRA(params)
