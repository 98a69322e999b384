"""RoLoRA (Chen, Guo, Ju, Dalal, Zhu, Khisti, "Robust Federated Finetuning of LLMs via Alternating Optimization
of LoRA", NeurIPS 2025, arXiv 2502.01755; earlier arXiv 2409.02346).

Alternating optimisation: rounds count from 1. On odd rounds A is frozen and shared, B trains and travels; on
even rounds B is frozen and shared, A trains and travels. Both aggregates are exact because the frozen factor is
common to every client:

    odd t:   B̄ = Σ_u w_u B̃_u,   ΔW = B̄ A = Σ_u w_u B̃_u A
    even t:  Ā = Σ_u w_u A_u,    ΔW = B̃ Ā = Σ_u w_u B̃ A_u

Round 1 starts from PEFT's init (A random, B = 0) and trains B, so A is never trained against B = 0 (whose
gradient with respect to A is zero).

fedlora's reading where the paper is silent:
- Download of round t: the factor frozen in round t (the one aggregated in round t − 1, or A0 in round 1). The
  factor the client trains starts from the global value the client already holds (it was the frozen, shared
  factor of round t − 1); a client that did not answer round t − 1 (first round, skipped or failed rounds) also
  receives it. So a client that takes part in consecutive rounds downloads r·d or r·k, and r(d+k) otherwise.
- The classifier head is trained every round and averaged with the aggregation weights, as in FedIT.
- One factor per round (the method's alternation at round granularity, methods.md §17); the paper's variants
  with several alternations per round are not implemented.
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
from fedlora.methods.ffa_lora import check_frozen, check_rank, factor_uploads, local_copy, pack_factor
from fedlora.payload import pack_extras, unpack_extras, unpack_factors
from fedlora.types import Adapter, AggregationReport, Contribution, Factor, LowRank, Payload, TrainPlan


@dataclass(frozen=True)
class RoLoRAParams:
    """RoLoRA has no hyperparameters in fedlora (the alternation order is fixed: B on odd rounds)."""


CAPABILITIES = Capabilities(
    exact=True,
    heterogeneous_ranks="no",
    writes_base=False,
    personalised=False,
    per_client_download=True,
    secure_aggregation=True,
    uplink="r·d on odd rounds (B), r·k on even rounds (A)",
    downlink="r·k on odd rounds (A), r·d on even rounds (B); r(d+k) after a missed round",
    paper="Chen et al., NeurIPS 2025, arXiv 2502.01755",
)


def trained_factor(rnd: int) -> Factor:
    """B on odd rounds (rounds count from 1), A on even rounds."""
    if rnd < 1:
        raise ValueError(f"rolora: round {rnd}: rounds count from 1")
    return "B" if rnd % 2 == 1 else "A"


def frozen_factor(rnd: int) -> Factor:
    return "A" if trained_factor(rnd) == "B" else "B"


@dataclass(frozen=True)
class RoLoRAState:
    """Server state: the global factors (canonical), the averaged head, and per client the last round it
    answered (it then holds the factor that round froze)."""

    adapter: Mapping[str, LowRank]
    extras: Mapping[str, Tensor] | None
    last_round: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RoLoRAClient:
    """Client state: the factor frozen in round ``round`` (the global value it downloaded)."""

    round: int = 0
    factor: Factor | None = None
    values: Mapping[str, Tensor] | None = None


def _side(adapter: Mapping[str, LowRank], factor: Factor) -> dict[str, Tensor]:
    return {m: (lr.A if factor == "A" else lr.B) for m, lr in adapter.items()}


def _join(factor: Factor, values: Mapping[str, Tensor], other: Mapping[str, Tensor]) -> dict[str, LowRank]:
    """LowRank per module from ``values`` of ``factor`` and ``other`` of the other factor."""
    return {
        m: (LowRank(other[m], values[m]) if factor == "A" else LowRank(values[m], other[m])) for m in sorted(values)
    }


@dataclass(frozen=True)
class RoLoRA:
    name = "rolora"
    capabilities = CAPABILITIES
    params: RoLoRAParams = field(default_factory=RoLoRAParams)

    # ---- server ---------------------------------------------------------------------------------------------
    def init_server(self, model: ModelInfo, seed: int) -> RoLoRAState:
        return RoLoRAState(fresh_adapter(model.specs, model.rank, seed), model.extras or None)

    def broadcast(self, state: RoLoRAState, client: ClientInfo, rnd: int) -> Payload:
        check_rank(self.name, client, next(iter(state.adapter.values())).rank)
        frozen = frozen_factor(rnd)
        tensors = pack_factor(_side(state.adapter, frozen), frozen) | pack_extras(state.extras or {})
        if state.last_round.get(client.id) != rnd - 1:  # it does not hold the factor it will train
            train = trained_factor(rnd)
            tensors |= pack_factor(_side(state.adapter, train), train)
        return Payload(tensors, {"round": rnd})

    def aggregate(
        self, state: RoLoRAState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[RoLoRAState, AggregationReport]:
        train, frozen = trained_factor(rnd), frozen_factor(rnd)
        current = _side(state.adapter, train)
        ups = factor_uploads(self.name, contributions, train, {m: tuple(t.shape) for m, t in current.items()})
        fixed = _side(state.adapter, frozen)
        weights = torch.tensor([c.weight for c in contributions], dtype=torch.float64)
        adapters: list[Adapter] = [_join(train, u, fixed) for u in ups]
        mean = {m: weighted_mean([u[m] for u in ups], weights) for m in current}
        new_adapter = _join(train, mean, fixed)
        report = measure(adapters, weights, Aggregated(new_adapter), weights)
        extras = average_extras([unpack_extras(c.payload.tensors) for c in contributions], weights)
        clients = [c.client for c in contributions]
        new = RoLoRAState(new_adapter, extras, dict(state.last_round) | {c: rnd for c in clients})
        rank = next(iter(new_adapter.values())).rank
        bytes_down = {c: self.broadcast(new, ClientInfo(c, rank), rnd + 1).nbytes for c in clients}
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        return new, replace(report, bytes_up=bytes_up, bytes_down=bytes_down)

    def export(self, state: RoLoRAState) -> GlobalModel:
        return GlobalModel(dict(state.adapter), state.extras or {}, ())

    # ---- client ---------------------------------------------------------------------------------------------
    def init_client(self, client: ClientInfo) -> RoLoRAClient:
        return RoLoRAClient()

    def prepare(
        self, client_state: RoLoRAClient, download: Payload, client: ClientInfo, rnd: int
    ) -> tuple[TrainPlan, RoLoRAClient]:
        train, frozen = trained_factor(rnd), frozen_factor(rnd)
        fixed = unpack_factors(download.tensors, frozen)
        if not fixed:
            raise ValueError(f"{self.name}: round {rnd} download for client {client.id} lacks lora.<module>.{frozen}")
        held = client_state.values if (client_state.round, client_state.factor) == (rnd - 1, train) else None
        start = local_copy(self.name, client, train, unpack_factors(download.tensors, train), held)
        if set(start) != set(fixed):
            raise ValueError(
                f"{self.name}: client {client.id}: modules of A and B differ ({sorted(set(start) ^ set(fixed))[:3]})"
            )
        plan = TrainPlan(
            rank=client.rank,
            adapter=_join(train, start, fixed),
            extras=unpack_extras(download.tensors),
            trainable=frozenset({train}),
        )
        return plan, RoLoRAClient(rnd, frozen, fixed)

    def upload(
        self, client_state: RoLoRAClient, trained: Adapter, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, RoLoRAClient]:
        train, frozen = trained_factor(rnd), frozen_factor(rnd)
        check_frozen(self.name, client, frozen, _side(trained, frozen), client_state.values or {})
        tensors = pack_factor(_side(trained, train), train) | pack_extras(extras)
        return Payload(tensors, {"rank": client.rank}), client_state


@register("rolora", RoLoRAParams, CAPABILITIES)
def build(params: RoLoRAParams) -> RoLoRA:
    return RoLoRA(params)
