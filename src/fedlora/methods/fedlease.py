"""FedLEASE (Wang, Bian, Zhang, Xu, "Adaptive LoRA Experts Allocation and Selection for Federated Fine-Tuning",
NeurIPS 2025, arXiv 2509.15087; code ``lei-wang-link/FedLEASE``, by the authors).

1. Warm-up (rounds 1..W): every client trains its own LoRA adapter, continuing from its own; nothing is averaged.
2. After round W the server clusters the clients by the distance of their B's,
       D_uv = mean over adapted modules of (1 − cos(B̃_u, B̃_v)),
   agglomeratively (average linkage) for every M in 2..max_clusters, and keeps the M with the best silhouette score.
   Cluster g's expert starts as the example-weighted average of its clients' warm-up adapters.
3. Then each client trains only its own cluster's expert and a router per adapted layer, R ∈ R^{(2M−1)×k}: per
   token the top M of the 2M − 1 slots (softmax, renormalised) weight the experts, slot e < M pointing at expert e
   and every slot ≥ M at the client's own expert, so a client uses 1 to M experts as it learns to
   (``fedlora.mixture``). The server averages each expert, router and head within its cluster.

fedlora's reading of the code:
- The code runs the warm-up as local training only (``aggregation_warmup`` hands every client its own parameters
  back) and clusters on the last warm-up round's B of every client (its ``calculate_B_similarity_matrix``: 1 − cos
  per layer, averaged over the layers of query and of value, then over the two). It scores 2..max_clusters by
  silhouette alone (its Davies–Bouldin scores are computed but not combined); so does fedlora. Fewer than three
  clients form one cluster (a silhouette needs 2 ≤ M ≤ clients − 1).
- Averages are example-weighted FedIT averages (mean B̃, mean A); the code takes unweighted means.
- At the switch the code computes the cluster averages, then loads each client's own warm-up adapter into its
  expert slot instead (and the averages' parameter names are corrupted for clusters other than 0 by
  ``name.replace('0', g)``, which also rewrites layer numbers); the other experts start at B = 0. fedlora starts
  every expert from its cluster's average and sends every client all M experts from the first clustered round.
- The router starts at one seeded Kaiming-uniform draw shared by all clusters (the code draws one per client); it
  routes on the layer input before LoRA dropout, as the code does.
- The head: the code freezes it (``local_training`` trains only ``lora_A``/``lora_B``/``lora_route``), leaving each
  client's randomly initialised classifier as it was; fedlora trains it with the adapter, keeps it per client in the
  warm-up and averages it within the cluster afterwards (as the router).
- A client first seen after the clustering joins the cluster with the most examples (recorded as ``late``).
- The uploads carry the client's example count (meta ``examples``). Warm-up uploads (A, B̃, head every warm-up
  round, as the code's server receives them) are kept for the clustering.
- The global model, for evaluation only: during the warm-up the example-weighted FedIT average of the clients'
  latest adapters and heads; afterwards all M experts with the example-weighted mean of the clusters' routers
  restricted to their first M slots (slot e → expert e, top M of M: a soft mixture of every expert) and the mean
  head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from fedlora import mixture
from fedlora.linalg import weighted_mean
from fedlora.methods import register
from fedlora.methods.base import Aggregated, Capabilities, ClientInfo, GlobalModel, ModelInfo, fresh_adapter, measure
from fedlora.methods.fedit import fedit_factors
from fedlora.methods.ffa_lora import check_rank
from fedlora.methods.fl_tac import Cluster, average, cluster_errors, pack_prefixed, unpack_prefixed
from fedlora.payload import pack_adapter, pack_extras, unpack_adapter, unpack_extras
from fedlora.types import Adapter, AggregationReport, Contribution, LowRank, Payload, TrainPlan
from fedlora.validation import check_updates

ROUTER_PREFIX = "router."
"""Payload names of a router: ``router.<module>`` (S, k)."""


@dataclass(frozen=True)
class FedLEASEParams:
    """warmup_rounds: W, rounds of local training before the clustering (the code's default 5);
    max_clusters: the largest number of experts M tried (the code's default 4)."""

    warmup_rounds: int = 5
    max_clusters: int = 4

    def __post_init__(self) -> None:
        if self.warmup_rounds < 1:
            raise ValueError(f"method.warmup_rounds = {self.warmup_rounds}: expected a positive int")
        if self.max_clusters < 2:
            raise ValueError(f"method.max_clusters = {self.max_clusters}: expected an int >= 2")


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="no",
    writes_base=False,
    personalised=True,
    per_client_download=True,
    secure_aggregation=False,
    not_a_sum="the server clusters clients by the distances between their B matrices before averaging per cluster",
    uplink="r(d + k) and the head; after the warm-up also (2M − 1)·k (the router)",
    downlink="once r(d + k) and the head; after the warm-up M·r(d + k), (2M − 1)·k and the head",
    paper="Wang et al., NeurIPS 2025, arXiv 2509.15087",
    variants=("lora",),
)


@dataclass(frozen=True)
class FedLEASEState:
    """Server state. Warm-up: the shared init, every client's latest adapter, head and examples (``warm``).
    After the clustering: each client's cluster (``groups``), per cluster its expert, router (per module), head and
    examples of its last update, and the clustering's diagnostics."""

    init: Cluster
    seed: int
    warm: Mapping[int, tuple[Cluster, float]] = field(default_factory=dict)
    groups: Mapping[int, int] = field(default_factory=dict)
    experts: Mapping[int, Mapping[str, LowRank]] = field(default_factory=dict)
    routers: Mapping[int, Mapping[str, Tensor]] = field(default_factory=dict)
    heads: Mapping[int, Mapping[str, Tensor]] = field(default_factory=dict)
    sizes: Mapping[int, float] = field(default_factory=dict)
    clustering: Mapping[str, object] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return next(iter(self.init[0].values())).rank


@dataclass(frozen=True)
class FedLEASEClient:
    """Client state in the warm-up: its own adapter and head (None before its first round)."""

    own: Cluster | None = None


def b_distances(adapters: Sequence[Mapping[str, LowRank]]) -> np.ndarray:
    """(U, U): the mean over modules of 1 − cos(B̃_u, B̃_v) (flattened B̃; 0 on the diagonal)."""
    modules = sorted(adapters[0])
    flat = {m: torch.stack([a[m].B.double().flatten() for a in adapters]) for m in modules}
    dist = np.zeros((len(adapters), len(adapters)))
    for m in modules:
        unit = flat[m] / flat[m].norm(dim=1, keepdim=True).clamp(min=1e-12)
        dist += (1.0 - (unit @ unit.T)).numpy()
    dist /= len(modules)
    np.fill_diagonal(dist, 0.0)
    return np.clip((dist + dist.T) / 2, 0.0, None)


def choose_clusters(distances: np.ndarray, max_clusters: int) -> tuple[list[int], dict[int, float]]:
    """Cluster labels (renumbered by first appearance) and the silhouette score of every M tried: average-linkage
    agglomerative clustering on the precomputed distances for M in 2..min(max_clusters, U − 1), the best silhouette
    kept (the smallest M on ties); one cluster for fewer than three clients."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    n = len(distances)
    scores, candidates = {}, {}
    for M in range(2, min(max_clusters, n - 1) + 1):
        labels = AgglomerativeClustering(n_clusters=M, metric="precomputed", linkage="average").fit_predict(distances)
        scores[M] = float(silhouette_score(distances, labels, metric="precomputed"))
        candidates[M] = labels.tolist()
    if not scores:
        return [0] * n, scores
    best = max(scores, key=lambda M: (scores[M], -M))
    order = list(dict.fromkeys(candidates[best]))
    return [order.index(label) for label in candidates[best]], scores


def slots(M: int, own: int) -> tuple[Tensor, list[int]]:
    """A client's slot map over its 2M − 1 router slots and the order of the other experts: slot e < M points at
    expert e (−1 when e is the client's own, the live adapter), every slot ≥ M at the own expert."""
    others = [e for e in range(M) if e != own]
    first = [-1 if e == own else others.index(e) for e in range(M)]
    return torch.tensor(first + [-1] * (M - 1), dtype=torch.int64), others


def router_init(specs: Mapping[str, tuple[int, int]], slots: int, seed: int) -> dict[str, Tensor]:
    """Kaiming-uniform (a = √5) routers (slots, k), as ``nn.Linear(k, slots)`` draws them: U(−1/√k, 1/√k)."""
    gen = torch.Generator().manual_seed(seed)
    return {m: (torch.rand(slots, k, generator=gen) * 2 - 1) / math.sqrt(k) for m, (_, k) in sorted(specs.items())}


@dataclass(frozen=True)
class FedLEASE:
    name = "fedlease"
    capabilities = CAPABILITIES
    params: FedLEASEParams = field(default_factory=FedLEASEParams)

    # ---- server ---------------------------------------------------------------------------------------------
    def init_server(self, model: ModelInfo, seed: int) -> FedLEASEState:
        return FedLEASEState((fresh_adapter(model.specs, model.rank, seed), dict(model.extras)), seed)

    def broadcast(self, state: FedLEASEState, client: ClientInfo, rnd: int) -> Payload:
        check_rank(self.name, client, state.rank)
        if rnd <= self.params.warmup_rounds:
            if client.id in state.warm:  # the client continues from its own adapter
                return Payload({}, {"round": rnd, "phase": "warmup"})
            return Payload(pack_adapter(state.init[0]) | pack_extras(state.init[1]), {"round": rnd, "phase": "warmup"})
        g = self._group(state, client.id)
        tensors: dict[str, Tensor] = {}
        for e, expert in sorted(state.experts.items()):
            tensors |= pack_prefixed(f"expert.{e}", expert, {})
        tensors |= {f"{ROUTER_PREFIX}{m}": r for m, r in sorted(state.routers[g].items())}
        tensors |= pack_extras(state.heads[g])
        return Payload(tensors, {"round": rnd, "phase": "experts", "expert": g, "experts": len(state.experts)})

    def _group(self, state: FedLEASEState, client: int) -> int:
        return state.groups.get(client, max(state.sizes, key=lambda g: (state.sizes[g], -g)))

    def aggregate(
        self, state: FedLEASEState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[FedLEASEState, AggregationReport]:
        if not contributions:
            raise ValueError(f"{self.name}: no client updates to aggregate: the client list is empty")
        clients = [c.client for c in contributions]
        adapters = [unpack_adapter(c.payload.tensors, f"{self.name}: client {c.client}") for c in contributions]
        check_updates(adapters, clients)
        examples = torch.tensor([_examples(self.name, c) for c in contributions], dtype=torch.float64)
        heads = [unpack_extras(c.payload.tensors) for c in contributions]
        if rnd <= self.params.warmup_rounds:
            new, report = self._warmup(state, clients, adapters, heads, examples, rnd)
        else:
            new, report = self._experts(state, contributions, adapters, heads, examples)
        bytes_down = {c: self.broadcast(new, ClientInfo(c, state.rank), rnd + 1).nbytes for c in clients}
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        return new, replace(report, bytes_up=bytes_up, bytes_down=bytes_down)

    def _warmup(
        self,
        state: FedLEASEState,
        clients: Sequence[int],
        adapters: Sequence[Adapter],
        heads: Sequence[Mapping[str, Tensor]],
        examples: Tensor,
        rnd: int,
    ) -> tuple[FedLEASEState, AggregationReport]:
        """Keep every client's latest adapter; after round W, cluster. The errors are those of the evaluation
        model, the FedIT average of the round's adapters."""
        uploads = zip(clients, adapters, heads, examples.tolist(), strict=True)
        state = replace(state, warm=dict(state.warm) | {c: ((dict(a), dict(h)), n) for c, a, h, n in uploads})
        w = examples / examples.sum()
        report = measure(adapters, w, Aggregated(fedit_factors(adapters, w)), w)
        if rnd < self.params.warmup_rounds:
            return state, report
        state = self._cluster(state)
        return state, replace(report, diagnostics=dict(state.clustering))

    def _cluster(self, state: FedLEASEState) -> FedLEASEState:
        """The switch after the warm-up: clusters, their experts and heads, the routers' shared init."""
        members = sorted(state.warm)
        distances = b_distances([state.warm[c][0][0] for c in members])
        labels, scores = choose_clusters(distances, self.params.max_clusters)
        M = max(labels) + 1
        groups = dict(zip(members, labels, strict=True))
        experts, heads, sizes = {}, {}, {}
        for g in range(M):
            ids = [c for c in members if groups[c] == g]
            weights = torch.tensor([state.warm[c][1] for c in ids], dtype=torch.float64)
            experts[g], heads[g] = average([state.warm[c][0] for c in ids], weights)
            sizes[g] = float(weights.sum())
        specs = {m: lr.shape for m, lr in state.init[0].items()}
        routers = dict.fromkeys(range(M), router_init(specs, 2 * M - 1, state.seed))
        clustering = {"experts": M, "silhouette": scores, "clusters": {str(c): g for c, g in groups.items()}}
        return replace(
            state, groups=groups, experts=experts, routers=routers, heads=heads, sizes=sizes, clustering=clustering
        )

    def _experts(
        self,
        state: FedLEASEState,
        contributions: Sequence[Contribution],
        adapters: Sequence[Adapter],
        heads: Sequence[Mapping[str, Tensor]],
        examples: Tensor,
    ) -> tuple[FedLEASEState, AggregationReport]:
        """Average each cluster's expert, router and head over its clients of the round (example-weighted)."""
        groups = dict(state.groups)
        late = [c.client for c in contributions if c.client not in groups]
        groups |= {c: self._group(state, c) for c in late}
        labels = [groups[c.client] for c in contributions]
        routers = [_routers(self.name, c, state.routers[groups[c.client]]) for c in contributions]
        experts, new_routers, new_heads = dict(state.experts), dict(state.routers), dict(state.heads)
        sizes = dict(state.sizes)
        for g in sorted(set(labels)):
            idx = [i for i, label in enumerate(labels) if label == g]
            w = examples[idx] / examples[idx].sum()
            experts[g], new_heads[g] = average([(adapters[i], heads[i]) for i in idx], examples[idx])
            new_routers[g] = {m: weighted_mean([routers[i][m] for i in idx], w) for m in routers[idx[0]]}
            sizes[g] = float(examples[idx].sum())
        errors = cluster_errors(adapters, examples, labels, {g: experts[g] for g in set(labels)})
        diagnostics = {"clusters": {str(c): g for c, g in sorted(groups.items())}, "late": late}
        new = replace(state, groups=groups, experts=experts, routers=new_routers, heads=new_heads, sizes=sizes)
        return new, AggregationReport(errors, diagnostics=diagnostics)

    def export(self, state: FedLEASEState) -> GlobalModel:
        """The evaluation's global model (module docstring)."""
        if not state.experts:
            if not state.warm:
                return GlobalModel(*state.init, ())
            latest = sorted(state.warm)
            weights = torch.tensor([state.warm[c][1] for c in latest], dtype=torch.float64)
            return GlobalModel(*average([state.warm[c][0] for c in latest], weights), ())
        M = len(state.experts)
        w = torch.tensor([state.sizes[g] for g in range(M)], dtype=torch.float64)
        w = w / w.sum()
        head = {n: weighted_mean([state.heads[g][n] for g in range(M)], w) for n in state.heads[0]}
        live = dict(state.experts[0])
        if M == 1:
            return GlobalModel(live, head, ())
        routers = {m: weighted_mean([state.routers[g][m][:M] for g in range(M)], w) for m in live}
        table = torch.tensor([-1, *range(M - 1)], dtype=torch.int64)
        extras = dict(head)
        for m in live:
            A = torch.stack([state.experts[e][m].A for e in range(1, M)])
            B = torch.stack([state.experts[e][m].B for e in range(1, M)])
            extras |= mixture.pack(m, mixture.LayerMixture(A, B, routers[m], table))
        return GlobalModel(live, extras, ())

    # ---- client ---------------------------------------------------------------------------------------------
    def init_client(self, client: ClientInfo) -> FedLEASEClient:
        return FedLEASEClient()

    def prepare(
        self, client_state: FedLEASEClient, download: Payload, client: ClientInfo, rnd: int
    ) -> tuple[TrainPlan, FedLEASEClient]:
        if download.meta.get("phase") == "warmup":
            if download.tensors:
                own = (unpack_adapter(download.tensors, "download"), unpack_extras(download.tensors))
            elif client_state.own is not None:
                own = client_state.own
            else:
                raise ValueError(
                    f"{self.name}: client {client.id} has no adapter of its own for warm-up round {rnd} and the "
                    "download carries none: its client state was lost"
                )
            return TrainPlan(rank=client.rank, adapter=own[0], extras=own[1]), client_state
        g, M = int(download.meta["expert"]), int(download.meta["experts"])
        experts = {
            e: unpack_prefixed(download.tensors, f"expert.{e}", f"{self.name}: client {client.id}")[0] for e in range(M)
        }
        table, others = slots(M, g)
        extras = dict(unpack_extras(download.tensors))
        for m, lr in experts[g].items():
            A = torch.stack([experts[e][m].A for e in others]) if others else lr.A.new_zeros(0, *lr.A.shape)
            B = torch.stack([experts[e][m].B for e in others]) if others else lr.B.new_zeros(0, *lr.B.shape)
            router = download.tensors[f"{ROUTER_PREFIX}{m}"]
            extras |= mixture.pack(m, mixture.LayerMixture(A, B, router, table))
        plan = TrainPlan(rank=client.rank, adapter=experts[g], extras=extras, trainable=frozenset({"A", "B", "R"}))
        return plan, client_state

    def upload(
        self, client_state: FedLEASEClient, trained: dict, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, FedLEASEClient]:
        routers = {m: extras[f"{m}{mixture.ROUTER}"] for m in trained if f"{m}{mixture.ROUTER}" in extras}
        head = {n: t for n, t in extras.items() if not mixture.is_mixture_key(n)}
        tensors = pack_adapter(trained) | pack_extras(head) | {f"{ROUTER_PREFIX}{m}": r for m, r in routers.items()}
        kept = FedLEASEClient((dict(trained), head)) if not routers else client_state
        return Payload(tensors, {"rank": client.rank, "examples": client.examples}), kept


def _examples(method: str, c: Contribution) -> float:
    n = c.payload.meta.get("examples")
    if n is None or not float(n) > 0:
        raise ValueError(f"{method}: client {c.client}'s upload has meta examples = {n!r}, expected a positive count")
    return float(n)


def _routers(method: str, c: Contribution, expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    got = {n[len(ROUTER_PREFIX) :]: t for n, t in c.payload.tensors.items() if n.startswith(ROUTER_PREFIX)}
    if set(got) != set(expected):
        raise ValueError(
            f"{method}: client {c.client} uploaded routers for {sorted(got)[:3]}, expected {sorted(expected)[:3]}"
        )
    for m, t in got.items():
        if t.shape != expected[m].shape or not torch.isfinite(t).all():
            raise ValueError(
                f"{method}: client {c.client}, key {ROUTER_PREFIX}{m}: shape {tuple(t.shape)} (expected "
                f"{tuple(expected[m].shape)}), finite values required"
            )
    return got


@register("fedlease", FedLEASEParams, CAPABILITIES)
def build(params: FedLEASEParams) -> FedLEASE:
    return FedLEASE(params)
