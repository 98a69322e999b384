"""FedLoRU, pFedLoRU and mFedLoRU (Park & Klabjan, "Communication-Efficient Federated Low-Rank Update Algorithm
and its Connection to Implicit Regularization", arXiv 2409.12371; code ``haemPark/fedloru_official``).

Low-rank client updates are accumulated into the model so that the global model grows in rank over time.

FedLoRU, server step per module, every round (the official ``main.py``: a sample-weighted average of every
tensor, A and B separately):

    B̄ = Σ_u w_u B̃_u,   Ā = Σ_u w_u A_u,

and at every merge round (rnd % τ == 0, the code's ``accumulate_and_reinit`` rounds):

    W0 ← W0 + B̄Ā          (a base edit; B̃ carries the LoRA scale, so this is s·B̄Ā in PEFT terms)
    adapter ← fresh init   (A Kaiming-uniform, B = 0: ReLoRA-style)

so what the model applies is unchanged by the reset and nothing is counted twice. Between merges clients
warm-start from (B̄, Ā). ``method.tau`` defaults to 5: the paper's code merges every 50 of 400 rounds, which
would never merge within the 10 rounds of fedlora's shipped configs; 5 gives two merges there (rounds 5 and 10).

``method.reset`` (fedlora's choice, two readings are plausible):
- ``"server"`` (default, the official code's structure): the server re-initialises the global adapter from a seed
  derived from (server seed, round) and broadcasts it, so every client starts the next period from the same A;
  the download is r(d+k) as in any other round.
- ``"client"``: no factors are sent after a merge; every client restarts from its own fresh PEFT init (as FLoRA).

pFedLoRU (statistical heterogeneity; fedlora's reading, methods.md §9 leaves the scheduling unverified): every
client trains one adapter of rank r = r_g + r_p. Its first r_g rank components are the *global* pair, which is
uploaded, averaged and merged every τ rounds as in FedLoRU (server-side reset only); its last
r_p = ``method.personal_rank`` components are the client's *personal* pair: they never leave the client (they
live in the client state, never in an upload payload), are initialised once per client (B = 0, A Kaiming,
seeded by the client id) and keep training across rounds and across global merges (the personal pair is not
merged: the in-process engine shares one base model between clients, so per-client base weights cannot be kept).
Local accuracy is the personalised model's; the exported global model carries only the global pair. All clients
need the same rank.

mFedLoRU (model heterogeneity; fedlora's reading of the "hierarchical low-rank updates", construction unverified
in methods.md §9): clients of rank r_u ≤ r_max train the first r_u rank components of the global rank-r_max
adapter, so lower-capacity updates are nested in the higher-rank ones (levels = ranks). ``method.nesting``:
- ``"component"`` (default): component i is averaged over the clients that train it, with their weights
  renormalised, B̄_i = Σ_{u: r_u > i} w_u B̃_{u,i} / Σ_{u: r_u > i} w_u (same for A), so a high-rank component is
  not shrunk by the clients that cannot hold it;
- ``"zero_pad"``: clients are zero-padded to r_max and averaged with all weights (FedIT's policy).
Merges every τ rounds as FedLoRU; downloads are truncated to each client's rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Literal

import numpy as np
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
    GlobalModel,
    ModelInfo,
    ModuleSpec,
    fresh_adapter,
)
from fedlora.methods.fedit import fedit_factors
from fedlora.payload import pack_adapter, pack_extras, unpack_adapter, unpack_base_edits, unpack_extras
from fedlora.types import Adapter, AggregationReport, Contribution, LowRank, Payload, TrainPlan

_RESET_STREAM, _PERSONAL_STREAM = 0x10E0, 0x10E1


def derive_seed(*keys: int) -> int:
    """A 31-bit seed from integer keys (independent streams for server resets and personal inits)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] >> 1)


def _check_tau(tau: int) -> None:
    if not isinstance(tau, int) or isinstance(tau, bool) or tau < 1:
        raise ValueError(f"method.tau = {tau!r}: expected an integer >= 1 (merge into the base every tau rounds)")


def _check_reset(reset: str) -> None:
    if reset not in ("server", "client"):
        raise ValueError(f"method.reset = {reset!r}: expected 'server' or 'client'")


@dataclass(frozen=True)
class FedLoRUParams:
    """tau: merge B̄Ā into the base and reset the adapter every tau rounds (>= 1); reset: who re-initialises."""

    tau: int = 5
    reset: Literal["server", "client"] = "server"

    def __post_init__(self) -> None:
        _check_tau(self.tau)
        _check_reset(self.reset)


@dataclass(frozen=True)
class PFedLoRUParams:
    """tau as FedLoRU (the server always re-initialises the global pair: a client-side reset would leave a
    client that first joins after a merge without the module shapes); personal_rank: the r_p rank components of
    every client's adapter kept local (>= 1, and smaller than the client rank model.lora.r, checked when the
    server starts)."""

    tau: int = 5
    personal_rank: int = 4

    def __post_init__(self) -> None:
        _check_tau(self.tau)
        if not isinstance(self.personal_rank, int) or isinstance(self.personal_rank, bool) or self.personal_rank < 1:
            raise ValueError(
                f"method.personal_rank = {self.personal_rank!r}: expected an integer >= 1 and < model.lora.r "
                "(the rank components each client keeps local)"
            )


@dataclass(frozen=True)
class MFedLoRUParams:
    """As FedLoRU, plus nesting: how nested components of heterogeneous ranks are averaged."""

    tau: int = 5
    reset: Literal["server", "client"] = "server"
    nesting: Literal["component", "zero_pad"] = "component"

    def __post_init__(self) -> None:
        _check_tau(self.tau)
        _check_reset(self.reset)
        if self.nesting not in ("component", "zero_pad"):
            raise ValueError(f"method.nesting = {self.nesting!r}: expected 'component' or 'zero_pad'")


_PAPER = "Park & Klabjan, arXiv 2409.12371"

FEDLORU_CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="zero-pad",
    writes_base=True,
    personalised=False,
    per_client_download=False,
    secure_aggregation=True,
    uplink="r(d+k)",
    downlink="r(d+k) (none after a merge with reset='client'); every τ rounds + min(r(d+k), d·k) base edit",
    paper=_PAPER,
)

PFEDLORU_CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="no",
    writes_base=True,
    personalised=True,
    per_client_download=False,
    secure_aggregation=True,
    uplink="r_g(d+k), r_g = r − personal_rank (the personal pair stays local)",
    downlink="r_g(d+k); every τ rounds + min(r_g(d+k), d·k) base edit",
    paper=_PAPER + " (pFedLoRU; fedlora's reading)",
)

MFEDLORU_CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="native",
    writes_base=True,
    personalised=False,
    per_client_download=True,
    secure_aggregation=True,
    uplink="r_u(d+k)",
    downlink="r_u(d+k) (the nested global factors truncated); every τ rounds + min(r_max(d+k), d·k) base edit",
    paper=_PAPER + " (mFedLoRU; fedlora's reading)",
)


# --------------------------------------------------------------------------------------------------------------
# Pure math


def nested_mean(adapters: Sequence[Adapter], weights: Tensor) -> dict[str, LowRank]:
    """Per module and rank component i, the mean over the clients holding component i (rank > i), weights
    renormalised among them. Equal ranks: FedIT's (Σ w B̃, Σ w A)."""
    out = {}
    for m in adapters[0]:
        r_max = max(a[m].rank for a in adapters)
        ranks = torch.tensor([a[m].rank for a in adapters])
        held = (torch.arange(r_max)[None, :] < ranks[:, None]).to(F64)  # (U, r_max)
        w = weights.to(F64)[:, None] * held
        w = w / w.sum(0, keepdim=True)
        B = sum(a[m].pad(r_max).B.to(F64) * w[u][None, :] for u, a in enumerate(adapters))
        A = sum(a[m].pad(r_max).A.to(F64) * w[u][:, None] for u, a in enumerate(adapters))
        dtype = adapters[0][m].B.dtype
        out[m] = LowRank(B.to(dtype), A.to(dtype))  # type: ignore[union-attr]
    return out


def _specs(adapter: Adapter) -> dict[str, ModuleSpec]:
    return {m: ModuleSpec(*lr.shape) for m, lr in adapter.items()}


def _pad_all(adapter: Adapter, rank: int) -> dict[str, LowRank]:
    return {m: lr.pad(rank) for m, lr in adapter.items()}


def merge_rule(
    adapters: Sequence[Adapter],
    weights: Tensor,
    params: Any,
    *,
    rnd: int,
    seed: int,
    rank: int,
    global_rank: int,
    nested: bool,
) -> Aggregated:
    """One round: factor averaging; at merge rounds (rnd % τ == 0) the base edit B̄Ā and a fresh adapter.

    rank: the broadcast rank the global adapter is held at; global_rank: the rank of the shared components
    (< rank for pFedLoRU, whose last components are the zero slots of the personal pair).
    """
    mean = nested_mean(adapters, weights) if nested else fedit_factors(adapters, weights)
    if rnd % params.tau:
        return Aggregated(adapter=_pad_all(mean, rank), diagnostics={"merged": False})
    if getattr(params, "reset", "server") == "client":
        fresh = None
    else:
        fresh = _pad_all(fresh_adapter(_specs(mean), global_rank, derive_seed(seed, _RESET_STREAM, rnd)), rank)
    return Aggregated(adapter=fresh, base_delta=mean, diagnostics={"merged": True})


# --------------------------------------------------------------------------------------------------------------
# Methods


@dataclass(frozen=True)
class LowRankUpdateState(FactorState):
    """``FactorState`` plus the server seed (for seeded resets) and the broadcast rank."""

    seed: int = 0
    rank: int = 0


@dataclass(frozen=True)
class FedLoRU:
    """FedLoRU and mFedLoRU: a ``FactorMethod`` whose rule knows the round (merge schedule) and the seed."""

    name: str
    capabilities: Capabilities
    params: Any
    nested: bool = False

    def _global_rank(self, rank: int) -> int:
        return rank

    def _factor_method(self, rule: Any = None) -> FactorMethod:
        return FactorMethod(self.name, self.capabilities, rule, self.params)

    def init_server(self, model: ModelInfo, seed: int) -> LowRankUpdateState:
        r_g = self._global_rank(model.rank)
        adapter = _pad_all(fresh_adapter(model.specs, r_g, seed), model.rank)
        return LowRankUpdateState(adapter, dict(model.extras) or None, seed=seed, rank=model.rank)

    def broadcast(self, state: LowRankUpdateState, client: ClientInfo, rnd: int) -> Payload:
        return self._factor_method().broadcast(state, client, rnd)

    def aggregate(
        self, state: LowRankUpdateState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[LowRankUpdateState, AggregationReport]:
        rule = partial(
            merge_rule,
            rnd=rnd,
            seed=state.seed,
            rank=state.rank,
            global_rank=self._global_rank(state.rank),
            nested=self.nested,
        )
        new, report = self._factor_method(rule).aggregate(state, contributions, rnd)
        kept = {f.name: getattr(new, f.name) for f in fields(FactorState)}
        return LowRankUpdateState(**kept, seed=state.seed, rank=state.rank), report

    def export(self, state: LowRankUpdateState) -> GlobalModel:
        return GlobalModel(state.adapter, state.extras or {}, state.base_edits)

    def init_client(self, client: ClientInfo) -> Any:
        return None

    def prepare(self, client_state: Any, download: Payload, client: ClientInfo, rnd: int) -> tuple[TrainPlan, Any]:
        return self._factor_method().prepare(client_state, download, client, rnd)

    def upload(
        self, client_state: Any, trained: Adapter, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, Any]:
        return self._factor_method().upload(client_state, trained, extras, client, rnd)


@dataclass(frozen=True)
class PersonalState:
    """A pFedLoRU client's personal pair (canonical, rank r_p per module); None before its first round."""

    personal: Mapping[str, LowRank] | None = None


@dataclass(frozen=True)
class PFedLoRU(FedLoRU):
    """pFedLoRU: the client adapter is [global r_g | personal r_p]; only the global components travel."""

    def _global_rank(self, rank: int) -> int:
        r_p = self.params.personal_rank
        if rank - r_p < 1:
            raise ValueError(
                f"{self.name}: method.personal_rank = {r_p} leaves no global rank component at client rank {rank}: "
                f"expected personal_rank < model.lora.r = {rank}"
            )
        return rank - r_p

    def broadcast(self, state: LowRankUpdateState, client: ClientInfo, rnd: int) -> Payload:
        """The global pair at the global rank, and the run seed (meta ``seed``) for the personal pair's init."""
        payload = self._factor_method().broadcast(state, ClientInfo(client.id, self._global_rank(client.rank)), rnd)
        return Payload(payload.tensors, {**payload.meta, "seed": state.seed})

    def init_client(self, client: ClientInfo) -> PersonalState:
        return PersonalState()

    def prepare(
        self, client_state: PersonalState, download: Payload, client: ClientInfo, rnd: int
    ) -> tuple[TrainPlan, PersonalState]:
        r_g, r_p = self._global_rank(client.rank), self.params.personal_rank
        shared = unpack_adapter(download.tensors, f"client {client.id} download")
        if not shared:
            raise ValueError(f"client {client.id}: pFedLoRU download carries no global pair (lora.<module>.A/B)")
        for m, lr in shared.items():
            if lr.rank != r_g:
                raise ValueError(f"client {client.id}: module {m!r} global pair has rank {lr.rank}, expected {r_g}")
        personal = client_state.personal
        if personal is None:
            seed = int(download.meta.get("seed", 0))  # the run seed: another seed gives other personal inits
            personal = fresh_adapter(_specs(shared), r_p, derive_seed(seed, client.id, _PERSONAL_STREAM))
        adapter = {
            m: LowRank(torch.cat([lr.B, personal[m].B.to(lr.B.dtype)], 1), torch.cat([lr.A, personal[m].A], 0))
            for m, lr in shared.items()
        }
        plan = TrainPlan(
            rank=client.rank,
            adapter=adapter,
            extras=unpack_extras(download.tensors),
            base_edits=unpack_base_edits(download.tensors),
        )
        return plan, PersonalState(personal)

    def upload(
        self, client_state: PersonalState, trained: Adapter, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, PersonalState]:
        r_g = self._global_rank(client.rank)
        shared = {m: lr.truncate(r_g) for m, lr in trained.items()}
        personal = {m: LowRank(lr.B[:, r_g:].clone(), lr.A[r_g:].clone()) for m, lr in trained.items()}
        return Payload(pack_adapter(shared) | pack_extras(extras), {"rank": r_g}), PersonalState(personal)


@register("fedloru", FedLoRUParams, FEDLORU_CAPABILITIES)
def build_fedloru(params: FedLoRUParams) -> FedLoRU:
    return FedLoRU("fedloru", FEDLORU_CAPABILITIES, params)


@register("pfedloru", PFedLoRUParams, PFEDLORU_CAPABILITIES)
def build_pfedloru(params: PFedLoRUParams) -> PFedLoRU:
    return PFedLoRU("pfedloru", PFEDLORU_CAPABILITIES, params)


@register("mfedloru", MFedLoRUParams, MFEDLORU_CAPABILITIES)
def build_mfedloru(params: MFedLoRUParams) -> FedLoRU:
    return FedLoRU("mfedloru", MFEDLORU_CAPABILITIES, params, nested=params.nesting == "component")
