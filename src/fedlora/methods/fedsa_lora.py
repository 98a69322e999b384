"""FedSA-LoRA (Guo, Zeng, Wang, Fan, Wang, Qu, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning", ICLR 2025, arXiv 2410.01463).

Only A is shared: clients train A and B (and the classifier head), upload A, and the server averages it,

    Ā = Σ_u w_u A_u          (w_u = n_u / Σ n, the official code's sample-size weights)

while each client keeps its own B_u and head across rounds (the official configuration's
``personalization.local_param: ['lora_B', 'classifier']``) and continues from (B_u, Ā).

fedlora's reading where the paper is silent:
- Round 1: every client starts from one seeded PEFT init (A0 random, B = 0) and the model's initial head. B = 0
  and the head are sent once, in a client's first download, and counted; afterwards only Ā travels down.
- Local accuracy uses each client's own B and head (the runner's local evaluation after training).
- The global model, for evaluation only: Ā with the weighted mean of the last round's clients' B̃_u and heads,
  B̄ = Σ_u w_u B̃_u (``evaluation_model``; the server never sends it). Its divergence from the ideal update
  Σ_u w_u B̃_u A_u (with each client's trained A_u) is reported as the method's divergence; it equals FedIT's,
  since B̄Ā is FedIT's aggregate of those factors. The in-process runner has the client states; on Flower each
  node reports its B̃ and head after training (``evaluation_report``, evaluation-only traffic counted apart as
  ``flower_bytes_report``). ``export`` alone (no client states) gives Ā with B = 0.
- ``exact`` is declared False: there is no global update to be exact about, only the evaluation model above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora import linalg
from fedlora.linalg import weighted_mean
from fedlora.methods import register
from fedlora.methods.base import Capabilities, ClientInfo, GlobalModel, ModelInfo, average_extras, fresh_adapter
from fedlora.methods.ffa_lora import check_rank, factor_uploads, local_copy, pack_factor
from fedlora.payload import pack_extras, unpack_extras, unpack_factors
from fedlora.types import Adapter, AggregationReport, Contribution, LowRank, ModuleError, Payload, TrainPlan


@dataclass(frozen=True)
class FedSALoRAParams:
    """FedSA-LoRA has no hyperparameters in fedlora (B and the head are always local, as in the paper)."""


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="no",
    writes_base=False,
    personalised=True,
    per_client_download=True,
    secure_aggregation=True,
    uplink="r·k (A only; B and the head stay local)",
    downlink="r·k, plus r·d and the head once (the initial B = 0 and head, in a client's first round)",
    paper="Guo et al., ICLR 2025, arXiv 2410.01463",
)


@dataclass(frozen=True)
class FedSAState:
    """Server state: Ā per module, each module's d (for the initial B = 0), the initial head, the clients that
    hold their own B, and the last round's clients with their weights and uploaded A_u (for the errors of the
    evaluation model)."""

    A: Mapping[str, Tensor]
    d: Mapping[str, int]
    init_extras: Mapping[str, Tensor]
    seen: frozenset[int] = frozenset()
    last_weights: Mapping[int, float] = field(default_factory=dict)
    last_A: Mapping[int, Mapping[str, Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class FedSAClient:
    """Client state: its own B̃ per module (canonical) and its own head; None before its first round."""

    B: Mapping[str, Tensor] | None = None
    extras: Mapping[str, Tensor] | None = None


@dataclass(frozen=True)
class FedSALoRA:
    name = "fedsa_lora"
    capabilities = CAPABILITIES
    params: FedSALoRAParams = field(default_factory=FedSALoRAParams)

    # ---- server ---------------------------------------------------------------------------------------------
    def init_server(self, model: ModelInfo, seed: int) -> FedSAState:
        init = fresh_adapter(model.specs, model.rank, seed)
        return FedSAState({m: lr.A for m, lr in init.items()}, {m: s.d for m, s in model.specs.items()}, model.extras)

    def broadcast(self, state: FedSAState, client: ClientInfo, rnd: int) -> Payload:
        rank = _rank(state)
        check_rank(self.name, client, rank)
        tensors = pack_factor(state.A, "A")
        if client.id not in state.seen:  # the initial B = 0 and head, once
            tensors |= pack_factor({m: torch.zeros(d, rank) for m, d in state.d.items()}, "B")
            tensors |= pack_extras(state.init_extras)
        return Payload(tensors, {"round": rnd})

    def aggregate(
        self, state: FedSAState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[FedSAState, AggregationReport]:
        for c in contributions:
            local = sorted(unpack_extras(c.payload.tensors))
            if local:
                raise ValueError(f"{self.name}: client {c.client} uploaded extra.{local[0]}, which stays local")
        As = factor_uploads(self.name, contributions, "A", {m: tuple(a.shape) for m, a in state.A.items()})
        weights = torch.tensor([c.weight for c in contributions], dtype=torch.float64)
        mean = {m: weighted_mean([a[m] for a in As], weights) for m in state.A}
        clients = [c.client for c in contributions]
        new = FedSAState(
            mean,
            state.d,
            state.init_extras,
            state.seen | frozenset(clients),
            {c: float(w) for c, w in zip(clients, weights, strict=True)},
            dict(zip(clients, As, strict=True)),
        )
        bytes_down = {c: self.broadcast(new, ClientInfo(c, _rank(state)), rnd + 1).nbytes for c in clients}
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        # No module errors here: the server has no B. The runner takes them from ``evaluation_model``.
        return new, AggregationReport({}, bytes_up, bytes_down)

    def export(self, state: FedSAState) -> GlobalModel:
        """What the server alone holds: Ā with B = 0 (ΔW = 0) and the initial head. See ``evaluation_model``."""
        zero = {m: LowRank(torch.zeros(state.d[m], _rank(state)), a) for m, a in sorted(state.A.items())}
        return GlobalModel(zero, state.init_extras, ())

    def evaluation_model(
        self, state: FedSAState, client_states: Mapping[int, FedSAClient]
    ) -> tuple[GlobalModel, dict[str, ModuleError]]:
        """For evaluation only, never sent: Ā with B̄ = Σ_u w_u B̃_u and the weighted mean head over the last
        round's clients, and per module its errors against the ideal Σ_u w_u B̃_u A_u (A_u as uploaded)."""
        if not state.last_weights:
            return self.export(state), {}
        clients = sorted(state.last_weights)
        states = []
        for c in clients:
            cs = client_states.get(c)
            if cs is None or cs.B is None:
                raise ValueError(
                    f"{self.name}: the evaluation model needs client {c}'s own B (its client state), which is "
                    f"missing: client states must be kept (and checkpointed) with the server state"
                )
            states.append(cs)
        w = torch.tensor([state.last_weights[c] for c in clients], dtype=torch.float64)
        adapter, errors = {}, {}
        for m, A in sorted(state.A.items()):
            Bs = [cs.B[m] for cs in states]  # type: ignore[index]
            adapter[m] = LowRank(weighted_mean(Bs, w), A)
            As = [state.last_A[c][m] for c in clients]
            errors[m] = linalg.module_errors(Bs, As, w, [adapter[m]], _rank(state), fedit_weights=w)
        extras = average_extras([cs.extras or {} for cs in states], w) or {}
        return GlobalModel(adapter, extras, ()), errors

    def from_evaluation_report(self, report: Payload) -> FedSAClient:
        """A Flower node's ``evaluation_report`` back as the client state ``evaluation_model`` reads."""
        return FedSAClient(unpack_factors(report.tensors, "B"), unpack_extras(report.tensors))

    # ---- client ---------------------------------------------------------------------------------------------
    def evaluation_report(self, client_state: FedSAClient) -> Payload:
        """On Flower, where client states stay on the nodes: what a node reports after training so the server can
        build ``evaluation_model`` (its B̃ and head). For evaluation only: never aggregated, never sent to any
        client, and counted apart from the method's communication (``flower_bytes_report``)."""
        return Payload(pack_factor(dict(client_state.B or {}), "B") | pack_extras(client_state.extras or {}))

    def init_client(self, client: ClientInfo) -> FedSAClient:
        return FedSAClient()

    def prepare(
        self, client_state: FedSAClient, download: Payload, client: ClientInfo, rnd: int
    ) -> tuple[TrainPlan, FedSAClient]:
        A = unpack_factors(download.tensors, "A")
        if not A:
            raise ValueError(f"{self.name}: round {rnd} download for client {client.id} lacks lora.<module>.A")
        B = local_copy(self.name, client, "B", unpack_factors(download.tensors, "B"), client_state.B)
        if set(A) != set(B):
            raise ValueError(f"{self.name}: client {client.id}: its B modules differ from Ā's {sorted(A)[:3]}")
        head = unpack_extras(download.tensors) or dict(client_state.extras or {})
        plan = TrainPlan(rank=client.rank, adapter={m: LowRank(B[m], A[m]) for m in sorted(A)}, extras=head)
        return plan, client_state

    def upload(
        self, client_state: FedSAClient, trained: Adapter, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, FedSAClient]:
        kept = FedSAClient({m: lr.B for m, lr in trained.items()}, dict(extras))
        return Payload(pack_factor({m: lr.A for m, lr in trained.items()}, "A"), {"rank": client.rank}), kept


def _rank(state: FedSAState) -> int:
    return int(next(iter(state.A.values())).shape[0])


@register("fedsa_lora", FedSALoRAParams, CAPABILITIES)
def build(params: FedSALoRAParams) -> FedSALoRA:
    return FedSALoRA(params)
