"""The ``Method`` abstraction: what a client trains, what it uploads, what the server keeps, what comes down.

A method is a frozen object of pure functions over explicit state (optax style): nothing here holds mutable
attributes, imports PEFT or Flower, or touches the filesystem. The runner (in-process or Flower) calls, per
round and per sampled client:

    payload_down          = method.broadcast(server_state, client, rnd)
    plan, client_state    = method.prepare(client_state, payload_down, client, rnd)
    ... the edge builds the adapter from ``plan``, the shared loop trains it ...
    payload_up, client_st = method.upload(client_state, trained, extras, client, rnd)

then once per round

    server_state, report  = method.aggregate(server_state, contributions, rnd)

``prepare`` may return several plans (a tuple, e.g. one per local task: FL-TAC); they are trained one after
another on the same model and ``upload`` then receives the trained adapters and extras as tuples in plan order.

and ``method.export(server_state)`` gives the global model for evaluation and saving.

Most methods only change the server step (FedIT, FLoRA-NA, FLoRA, FedEx-LoRA, FlexLoRA, HetLoRA, LoRA-FAIR):
``FactorMethod`` builds a full ``Method`` from one pure rule ``(client adapters, weights) -> Aggregated``.
Methods that change the client side (FFA-LoRA, FedSA-LoRA, RoLoRA, FSLoRA, FLASC, ...) implement the protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from fedlora import linalg
from fedlora.payload import (
    pack_adapter,
    pack_base_edits,
    pack_extras,
    unpack_adapter,
    unpack_base_edits,
    unpack_extras,
)
from fedlora.types import (
    Adapter,
    AggregationReport,
    BaseEdit,
    Contribution,
    LowRank,
    Payload,
    Regularizer,
    TrainPlan,
)
from fedlora.validation import check_equal_ranks, check_extras, check_updates


@dataclass(frozen=True)
class ModuleSpec:
    """Shape of one adapted module in (out, in) orientation: ΔW is (d, k)."""

    d: int
    k: int


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know of the model when the server starts.

    specs: every adapted module's (d, k); rank: the broadcast rank (r_max when client ranks differ);
    extras: the initial values of the fully trained tensors (the classifier head), so that every client starts
    round 1 from the same head.
    base_weights: the frozen base weight W0 of every adapted module in canonical (out, in) = (d, k) orientation
        (GPT-2 Conv1D transposed), float32 copies; filled by the runner only for methods whose capabilities say
        ``needs_base_weights`` (FRLoRA's SVD of W0), None otherwise.
    scales: every adapted module's LoRA scale s at the broadcast rank (α/r or α/√r); None when not provided.
        Canonical factors fold s into B, so only methods whose initialisation is defined in PEFT's gauge
        (FRLoRA's PiSSA split) need it.
    task_labels: in a multi-task federation (``data.tasks``), per task the rows [start, stop) of the classification
        head its labels own; empty for one task (every row is its own).
    """

    specs: Mapping[str, ModuleSpec]
    rank: int
    extras: Mapping[str, Tensor] = field(default_factory=dict)
    base_weights: Mapping[str, Tensor] | None = None
    scales: Mapping[str, float] | None = None
    task_labels: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ClientInfo:
    """Who a client is: its id (0-based partition index), its adapter rank, its number of training examples
    (``examples``, 0 when unknown) and in a multi-task federation its number of training examples of each task
    (``tasks[t]``; empty for one task). Known on the client; what a method sends of it is its choice (FL-TAC keeps
    the task identities from the server)."""

    id: int
    rank: int
    tasks: tuple[int, ...] = ()
    examples: int = 0


@dataclass(frozen=True)
class Capabilities:
    """What a method declares; checked when a config is validated and printed by ``fedlora methods``.

    heterogeneous_ranks: "native", "zero-pad" (documented padding policy) or "no".
    uplink / downlink: size per adapted (d, k) matrix per client per round, in scalars.
    needs_base_weights: ``init_server`` reads ``ModelInfo.base_weights`` (and ``scales``), so the runner must
        copy the frozen base weights (FRLoRA).
    variants: the ``model.lora.variant`` values the method runs on. HiRA (ΔW = W0 ⊙ B̃A) is opt-in: a method
        declares it only when its math holds for the B̃A inside the Hadamard product; one that writes base
        weights cannot (the edit would change every Hadamard term), which config validation also refuses.
    secure_aggregation: the server step is a plain weighted sum of the uploads (Σ_u w_u upload_u, w the
        normalised data weights), so it works under secure aggregation and central DP (``fedlora.privacy``);
        ``not_a_sum`` says why not where it is not.
    """

    exact: bool
    heterogeneous_ranks: str
    writes_base: bool
    personalised: bool
    per_client_download: bool
    secure_aggregation: bool
    uplink: str
    downlink: str
    paper: str
    needs_base_weights: bool = False
    variants: tuple[str, ...] = ("lora", "dora")
    not_a_sum: str = ""

    def __post_init__(self) -> None:
        if self.secure_aggregation == bool(self.not_a_sum):
            raise ValueError("Capabilities: not_a_sum gives the reason exactly when secure_aggregation is False")


@dataclass(frozen=True)
class GlobalModel:
    """The global model a method exports: base edits (in order) + adapter + fully trained tensors (which may
    describe a mixture of experts around the adapter, ``fedlora.mixture``). ``diagnostics``: numbers a method's
    evaluation-only model measured while it was built (FL-TAC's cluster purity), added to the round's diagnostics.
    ``cores``: the global r×r cores of a tri-factor method whose clients upload cores (Fed-SB's R̄), already folded
    into ``adapter``; only the reference uploads are compared with (screening's update norms, central DP's
    clipping) reads them."""

    adapter: Adapter | None
    extras: Mapping[str, Tensor]
    base_edits: tuple[BaseEdit, ...]
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    cores: Mapping[str, Tensor] = field(default_factory=dict)


class Method(Protocol):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def init_server(self, model: ModelInfo, seed: int) -> Any: ...

    def init_client(self, client: ClientInfo) -> Any: ...

    def broadcast(self, state: Any, client: ClientInfo, rnd: int) -> Payload: ...

    def prepare(
        self, client_state: Any, download: Payload, client: ClientInfo, rnd: int
    ) -> tuple[TrainPlan | tuple[TrainPlan, ...], Any]: ...

    def upload(
        self, client_state: Any, trained: Any, extras: Any, client: ClientInfo, rnd: int
    ) -> tuple[Payload, Any]: ...

    def aggregate(
        self, state: Any, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[Any, AggregationReport]: ...

    def export(self, state: Any) -> GlobalModel: ...


# --------------------------------------------------------------------------------------------------------------
# The server-only shortcut


@dataclass(frozen=True)
class Aggregated:
    """The outcome of a server-only rule for one round.

    adapter: the global factors clients continue from (warm start), or None: clients restart from a fresh
        PEFT initialisation (FLoRA).
    base_delta: per module, a delta every client adds to its frozen base weights (FedEx residual, FLoRA stack).
    diagnostics: per module, extra numbers the rule wants logged (e.g. FLoRA-NA's coefficients).
    """

    adapter: Adapter | None
    base_delta: Mapping[str, LowRank] = field(default_factory=dict)
    diagnostics: Mapping[str, Any] = field(default_factory=dict)


Rule = Callable[[Sequence[Adapter], Tensor, Any], Aggregated]
"""(client adapters in canonical form, normalised weights (U,), params) -> Aggregated."""


@dataclass(frozen=True)
class FactorState:
    """Server state of a server-only method.

    adapter: the current global factors (None: the next round starts from a fresh PEFT init).
    extras: the averaged fully trained tensors (classifier head), None before the first round.
    base_edits: every base edit made so far, oldest first.
    synced: per client, the newest base-edit version it has received.
    diagnostics: the last round's rule diagnostics.
    """

    adapter: Adapter | None
    extras: Mapping[str, Tensor] | None
    base_edits: tuple[BaseEdit, ...] = ()
    synced: Mapping[int, int] = field(default_factory=dict)
    diagnostics: Mapping[str, Any] = field(default_factory=dict)


def fresh_adapter(specs: Mapping[str, ModuleSpec], rank: int, seed: int) -> dict[str, LowRank]:
    """PEFT's LoRA initialisation, seeded: A ~ U(−1/√k, 1/√k) (Kaiming-uniform, a = √5), B = 0."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module, spec in sorted(specs.items()):
        bound = 1.0 / math.sqrt(spec.k)
        A = (torch.rand(rank, spec.k, generator=gen) * 2 - 1) * bound
        out[module] = LowRank(torch.zeros(spec.d, rank), A)
    return out


@dataclass(frozen=True)
class FactorMethod:
    """A full ``Method`` built from a server-only rule (FedIT, FLoRA-NA, FLoRA, FedEx-LoRA, FlexLoRA, HetLoRA).

    Clients train A and B. Round 1 starts from a shared seeded PEFT init (A random, B = 0). Afterwards clients
    warm-start from the global factors truncated (or zero-padded) to their own rank, or restart from a fresh
    init when the rule returned ``adapter=None``; they first replay every base edit they have not applied.
    Fully trained tensors (the classifier head) are averaged with the aggregation weights.
    """

    name: str
    capabilities: Capabilities
    rule: Rule
    params: Any
    regularizer: Regularizer | None = None

    # ---- server ---------------------------------------------------------------------------------------------
    def init_server(self, model: ModelInfo, seed: int) -> FactorState:
        return FactorState(adapter=fresh_adapter(model.specs, model.rank, seed), extras=dict(model.extras) or None)

    def broadcast(self, state: FactorState, client: ClientInfo, rnd: int) -> Payload:
        tensors: dict[str, Tensor] = {}
        if state.adapter is not None:
            tensors |= pack_adapter(_fit_rank(state.adapter, client.rank))
        if state.extras is not None:
            tensors |= pack_extras(state.extras)
        seen = state.synced.get(client.id, 0)
        tensors |= pack_base_edits(tuple(e for e in state.base_edits if e.version > seen))
        return Payload(tensors, {"round": rnd, "fresh_init": state.adapter is None})

    def aggregate(
        self, state: FactorState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[FactorState, AggregationReport]:
        clients = [c.client for c in contributions]
        adapters = [unpack_adapter(c.payload.tensors, f"client {c.client}") for c in contributions]
        check_updates(adapters, clients)
        extras_in = [unpack_extras(c.payload.tensors) for c in contributions]
        check_extras(extras_in, clients)
        if self.capabilities.heterogeneous_ranks == "no":
            check_equal_ranks(adapters, clients, self.name)
        weights = torch.tensor([c.weight for c in contributions], dtype=torch.float64)
        out = self.rule(adapters, weights, self.params)
        report = measure(adapters, target_weights(weights, self.params), out, weights)
        edits = state.base_edits
        if out.base_delta:
            edits = (*edits, travel_form(rnd, out.base_delta))
        extras = average_extras(extras_in, weights)
        # A client that replied had applied every edit made before this round.
        synced = dict(state.synced) | {c: rnd - 1 for c in clients}
        new_state = FactorState(out.adapter, extras, edits, synced, out.diagnostics)
        ranks = {c: max(lr.rank for lr in a.values()) for c, a in zip(clients, adapters, strict=True)}
        bytes_down = {c: self.broadcast(new_state, ClientInfo(c, r), rnd + 1).nbytes for c, r in ranks.items()}
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        return new_state, replace(report, bytes_up=bytes_up, bytes_down=bytes_down)

    def export(self, state: FactorState) -> GlobalModel:
        return GlobalModel(state.adapter, state.extras or {}, state.base_edits)

    # ---- client ---------------------------------------------------------------------------------------------
    def init_client(self, client: ClientInfo) -> None:
        return None

    def prepare(self, client_state: None, download: Payload, client: ClientInfo, rnd: int) -> tuple[TrainPlan, None]:
        adapter = None if download.meta.get("fresh_init") else unpack_adapter(download.tensors, "download")
        plan = TrainPlan(
            rank=client.rank,
            adapter=adapter,
            extras=unpack_extras(download.tensors),
            base_edits=unpack_base_edits(download.tensors),
            regularizer=self.regularizer,
        )
        return plan, client_state

    def upload(
        self, client_state: None, trained: Adapter, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, None]:
        return Payload(pack_adapter(trained) | pack_extras(extras), {"rank": client.rank}), client_state


def _fit_rank(adapter: Adapter, rank: int) -> dict[str, LowRank]:
    """Truncate (or zero-pad) every module to ``rank``: the per-client download policy."""
    return {m: (lr.truncate(rank) if lr.rank >= rank else lr.pad(rank)) for m, lr in adapter.items()}


def travel_form(version: int, delta: Mapping[str, LowRank]) -> BaseEdit:
    """A base edit that travels factored where r(d+k) < d·k and dense otherwise (the cheaper of the two)."""
    factored = {m: lr for m, lr in delta.items() if lr.rank * sum(lr.shape) < lr.shape[0] * lr.shape[1]}
    dense = {m: lr.dense() for m, lr in delta.items() if m not in factored}
    return BaseEdit(version, factored, dense)


def target_weights(weights: Tensor, params: Any) -> Tensor:
    """Weights t of the ideal update M = Σ t_u B_u A_u: the normalised weights, or U·w for ``target = "sum"``."""
    return weights * len(weights) if getattr(params, "target", "weighted_mean") == "sum" else weights


def average_extras(extras: Sequence[Mapping[str, Tensor]], weights: Tensor) -> dict[str, Tensor] | None:
    """Weighted mean of fully trained tensors (FedAvg of the classifier head); None when no client sends any."""
    if not extras or not extras[0]:
        return None
    names = set(extras[0])
    for i, e in enumerate(extras):
        if set(e) != names:
            raise ValueError(f"client {i} sent fully trained tensors {sorted(e)}, expected {sorted(names)}")
    return {
        n: sum(float(w) * e[n].to(torch.float64) for w, e in zip(weights, extras, strict=True)).to(extras[0][n].dtype)
        for n in sorted(names)
    }


def measure(adapters: Sequence[Adapter], target: Tensor, out: Aggregated, weights: Tensor) -> AggregationReport:
    """Divergence of what the model gets this round (base delta + adapter) from the ideal update, per module,
    with the Eckart–Young bound at the broadcast rank and FedIT's divergence beside it; all from factors."""
    modules = {}
    for m in adapters[0]:
        Bs = [a[m].B for a in adapters]
        As = [a[m].A for a in adapters]
        applied = [lr for lr in ((out.adapter or {}).get(m), out.base_delta.get(m)) if lr is not None]
        rank = out.adapter[m].rank if out.adapter is not None else max(b.shape[1] for b in Bs)
        modules[m] = linalg.module_errors(Bs, As, target, applied, rank, fedit_weights=weights)
    return AggregationReport(modules, diagnostics=dict(out.diagnostics), client_balance=balance(adapters))


def balance(adapters: Sequence[Adapter]) -> list[float]:
    """Per client, ‖B̃‖_F / ‖A‖_F over all modules: how far clients' LoRA gauges drift apart (FLoRA-NA's case)."""
    out = []
    for a in adapters:
        nb = sum(float(torch.linalg.vector_norm(lr.B, dtype=torch.float64) ** 2) for lr in a.values())
        na = sum(float(torch.linalg.vector_norm(lr.A, dtype=torch.float64) ** 2) for lr in a.values())
        out.append((nb / na) ** 0.5 if na > 0 else float("nan"))
    return out
