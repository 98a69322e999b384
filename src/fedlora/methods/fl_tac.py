"""FL-TAC (Ping, Mao, Liu, Zhang, Ding, "FL-TAC: Enhanced Fine-Tuning in Federated Learning via Low-Rank,
Task-Specific Adapter Clustering", ICLR 2024 Workshop on LLM Agents, arXiv 2404.15384; code ``siqi2000/FL-TAC``).

Every client trains one LoRA adapter (with the classification head) per local task. The server is not told which
adapter serves which task: it flattens every received adapter into a vector, runs K-means with K = the number of
tasks, and averages within each cluster with the examples as weights,

    (B̄_k, Ā_k, head_k) = Σ_{v ∈ cluster k} n_v (B̃_v, A_v, head_v) / Σ_{v ∈ k} n_v,

and each adapter continues from the average of the cluster it fell into.

fedlora's reading (and the official code's, where it says more than the paper):
- Each plan trains ``train.local_steps`` steps on its task's examples with a fresh AdamW, one task after another
  (the code's ``local_finetune`` per task), so a client with two tasks trains twice as many steps as under FedIT.
- The vector K-means sees is the canonical factors A, B̃ (B̃ = s·B; the code flattens PEFT's raw B, a factor s
  smaller) and the head, sorted by name; scikit-learn's ``KMeans(K, n_init=10, random_state=seed)`` as in the code;
  with no more adapters than clusters, each adapter is its own cluster (the code's rule). Cluster ids are renumbered
  by first appearance in client order.
- The upload names its adapters by local slot (``slot.<j>.lora...``, meta ``slot.<j>.examples``), never by task;
  the download sends each cluster average a client needs once (``cluster.<k>...``) and maps its slots to them (meta
  ``slot.<j>``). A client's first download is the shared seeded init and head, for every slot. A known adapter whose
  client skipped a round continues from the new cluster nearest (in the same vectors) to its old cluster's average.
- The global model, for evaluation only: task t uses the cluster that holds most of task t's examples (the code
  evaluates task t with the adapter of the first client holding it, which is the same when clusters are pure); the
  task adapters form one model that routes each example to its task's adapter (``fedlora.mixture``), with the head
  rows of task t taken from task t's cluster. The task of each adapter comes from the client states (on Flower from
  the nodes' evaluation reports), which also give the cluster purity recorded in the metrics
  (``diagnostics.cluster_purity``; ``cluster_matched_accuracy`` is the code's Hungarian-matched clustering accuracy).
- The divergence is measured within clusters: each cluster's FedIT average against its own ideal Σ w B̃ A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fedlora import linalg, mixture
from fedlora.methods import register
from fedlora.methods.base import Capabilities, ClientInfo, GlobalModel, ModelInfo, average_extras, fresh_adapter
from fedlora.methods.fedit import fedit_factors
from fedlora.methods.ffa_lora import check_rank
from fedlora.payload import pack_adapter, pack_extras, unpack_adapter, unpack_extras
from fedlora.types import Adapter, AggregationReport, Contribution, LowRank, ModuleError, Payload, TrainPlan
from fedlora.validation import check_updates


@dataclass(frozen=True)
class FLTACParams:
    """clusters: K of K-means (0: the number of tasks of the federation, as in the paper); n_init: K-means
    restarts (the code's 10)."""

    clusters: int = 0
    n_init: int = 10

    def __post_init__(self) -> None:
        if self.clusters < 0:
            raise ValueError(f"method.clusters = {self.clusters}: expected 0 (the number of tasks) or a positive int")
        if self.n_init < 1:
            raise ValueError(f"method.n_init = {self.n_init}: expected a positive int")


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="no",
    writes_base=False,
    personalised=True,
    per_client_download=True,
    secure_aggregation=False,
    not_a_sum="the server clusters each client's task adapters with K-means before averaging",
    uplink="r(d + k) and the head per local task",
    downlink="r(d + k) and the head per distinct cluster of the client's adapters",
    paper="Ping et al., ICLR 2024 LLM Agents workshop, arXiv 2404.15384",
    variants=("lora",),
)

Cluster = tuple[dict[str, LowRank], dict[str, Tensor]]
"""A cluster's average: adapter and head."""


@dataclass(frozen=True)
class FLTACState:
    """Server state: the shared init (adapter, head), K and the K-means seed, the head rows per task, the last
    round's cluster averages, every known adapter's cluster (``assignment[(client, slot)]``) and the last round's
    examples per adapter (``examples[(client, slot)]``)."""

    init: Cluster
    clusters_wanted: int
    seed: int
    task_labels: tuple[tuple[int, int], ...]
    clusters: Mapping[int, Cluster] = field(default_factory=dict)
    assignment: Mapping[tuple[int, int], int] = field(default_factory=dict)
    examples: Mapping[tuple[int, int], float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return next(iter(self.init[0].values())).rank


@dataclass(frozen=True)
class FLTACClient:
    """Client state: the task of each of its adapters (slot j trains task ``tasks[j]``); never uploaded."""

    tasks: tuple[int, ...] = ()


def slot_tasks(client: ClientInfo) -> tuple[int, ...]:
    """The tasks a client holds training examples of (task 0 alone outside a multi-task federation)."""
    return tuple(t for t, n in enumerate(client.tasks) if n > 0) if client.tasks else (0,)


def pack_prefixed(prefix: str, adapter: Adapter, extras: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{name}": t for name, t in (pack_adapter(adapter) | pack_extras(extras)).items()}


def unpack_prefixed(tensors: Mapping[str, Tensor], prefix: str, who: str) -> Cluster:
    part = {name[len(prefix) + 1 :]: t for name, t in tensors.items() if name.startswith(f"{prefix}.")}
    if not part:
        raise ValueError(f"{who}: no tensors named {prefix}.*")
    return unpack_adapter(part, who), unpack_extras(part)


def flatten(adapter: Adapter, extras: Mapping[str, Tensor]) -> np.ndarray:
    """One adapter as K-means sees it: A and B̃ of every module, then the head, sorted by name, float64."""
    parts = [t for _, t in sorted((pack_adapter(adapter) | pack_extras(extras)).items())]
    return torch.cat([t.detach().double().flatten() for t in parts]).numpy()


def kmeans(vectors: np.ndarray, k: int, n_init: int, seed: int) -> list[int]:
    """K-means labels (scikit-learn, seeded), renumbered by first appearance; with at most k vectors each is its
    own cluster."""
    if len(vectors) <= k:
        raw = list(range(len(vectors)))
    else:
        from sklearn.cluster import KMeans

        raw = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(vectors).tolist()
    order = list(dict.fromkeys(raw))
    return [order.index(label) for label in raw]


def average(members: Sequence[Cluster], weights: Tensor) -> Cluster:
    """The example-weighted FedIT average of adapters and heads."""
    w = weights / weights.sum()
    return fedit_factors([a for a, _ in members], w), average_extras([e for _, e in members], w) or {}


def cluster_errors(
    adapters: Sequence[Adapter], weights: Tensor, labels: Sequence[int], averaged: Mapping[int, Adapter]
) -> dict[str, ModuleError]:
    """Per module, the errors of each cluster's average against the cluster's own ideal Σ_v w_v B̃_v A_v (weights
    renormalised within the cluster), combined over clusters as the overall errors are over modules: absolute
    errors and scales in quadrature, relative errors err = √(Σ_k (err_k·scale_k)²) / √(Σ_k scale_k²)."""
    out = {}
    for m in adapters[0]:
        parts = []
        for k, avg in averaged.items():
            idx = [i for i, label in enumerate(labels) if label == k]
            w = weights[idx] / weights[idx].sum()
            Bs, As = [adapters[i][m].B for i in idx], [adapters[i][m].A for i in idx]
            parts.append(linalg.module_errors(Bs, As, w, [avg[m]], avg[m].rank, fedit_weights=w))
        scale2 = sum(e.scale**2 for e in parts)

        def combined(attr: str, parts: list[ModuleError] = parts, scale2: float = scale2) -> float:
            return (sum((getattr(e, attr) * e.scale) ** 2 for e in parts) / scale2) ** 0.5 if scale2 > 0 else 0.0

        def quadrature(attr: str, parts: list[ModuleError] = parts) -> float:
            return sum(getattr(e, attr) ** 2 for e in parts) ** 0.5

        out[m] = ModuleError(
            combined("divergence"),
            combined("eckart_young"),
            combined("fedit"),
            quadrature("ideal_norm"),
            quadrature("error"),
            scale2**0.5,
        )
    return out


def purity(labels: Sequence[int], tasks: Sequence[int]) -> tuple[float, float]:
    """(purity, matched accuracy) of a clustering against the true tasks: purity = Σ_k max_t |k ∩ t| / N; matched
    accuracy = the share agreeing under the best one-to-one matching of clusters and tasks (Hungarian; the
    official code's ``clustering_accuracy``)."""
    from scipy.optimize import linear_sum_assignment

    K, T = max(labels) + 1, max(tasks) + 1
    counts = np.zeros((max(K, T), max(K, T)), dtype=np.int64)
    for k, t in zip(labels, tasks, strict=True):
        counts[k, t] += 1
    rows, cols = linear_sum_assignment(-counts)
    return float(counts.max(axis=1).sum() / len(labels)), float(counts[rows, cols].sum() / len(labels))


@dataclass(frozen=True)
class FLTAC:
    name = "fl_tac"
    capabilities = CAPABILITIES
    params: FLTACParams = field(default_factory=FLTACParams)

    # ---- server ---------------------------------------------------------------------------------------------
    def init_server(self, model: ModelInfo, seed: int) -> FLTACState:
        k = self.params.clusters or max(1, len(model.task_labels))
        return FLTACState(
            (fresh_adapter(model.specs, model.rank, seed), dict(model.extras)), k, seed, model.task_labels
        )

    def broadcast(self, state: FLTACState, client: ClientInfo, rnd: int) -> Payload:
        check_rank(self.name, client, state.rank)
        slots = sorted(j for (c, j) in state.assignment if c == client.id)
        if not slots:  # the shared init, for every slot
            adapter, head = state.init
            return Payload(pack_adapter(adapter) | pack_extras(head), {"round": rnd, "fresh_init": True})
        mapping = {j: state.assignment[(client.id, j)] for j in slots}
        tensors: dict[str, Tensor] = {}
        for k in sorted(set(mapping.values())):
            tensors |= pack_prefixed(f"cluster.{k}", *state.clusters[k])
        return Payload(tensors, {"round": rnd} | {f"slot.{j}": k for j, k in mapping.items()})

    def aggregate(
        self, state: FLTACState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[FLTACState, AggregationReport]:
        keys, members, counts = self._uploads(contributions)
        adapters = [a for a, _ in members]
        check_updates(adapters, [f"{c} (slot {j})" for c, j in keys])
        labels = kmeans(np.stack([flatten(*m) for m in members]), state.clusters_wanted, self.params.n_init, state.seed)
        weights = torch.tensor(counts, dtype=torch.float64)
        clusters = {}
        for k in sorted(set(labels)):
            idx = [i for i, label in enumerate(labels) if label == k]
            clusters[k] = average([members[i] for i in idx], weights[idx])
        assignment = _carried_over(state, clusters, set(keys)) | dict(zip(keys, labels, strict=True))
        new = FLTACState(
            state.init,
            state.clusters_wanted,
            state.seed,
            state.task_labels,
            clusters,
            assignment,
            dict(zip(keys, counts, strict=True)),
        )
        errors = cluster_errors(adapters, weights, labels, {k: a for k, (a, _) in clusters.items()})
        diagnostics = {
            "clusters": len(clusters),
            "assignment": [[c, j, k] for (c, j), k in zip(keys, labels, strict=True)],
        }
        clients = sorted({c.client for c in contributions})
        bytes_down = {c: self.broadcast(new, ClientInfo(c, state.rank), rnd + 1).nbytes for c in clients}
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        return new, AggregationReport(errors, bytes_up, bytes_down, diagnostics)

    def _uploads(
        self, contributions: Sequence[Contribution]
    ) -> tuple[list[tuple[int, int]], list[Cluster], list[float]]:
        """Every uploaded adapter: (client, slot), (adapter, head), its training examples (meta
        ``slot.<j>.examples``)."""
        if not contributions:
            raise ValueError(f"{self.name}: no client updates to aggregate: the client list is empty")
        keys, members, counts = [], [], []
        for c in contributions:
            slots = sorted({int(name.split(".")[1]) for name in c.payload.tensors if name.startswith("slot.")})
            if not slots:
                raise ValueError(f"{self.name}: the upload of client {c.client} carries no adapter (slot.<j>.lora...)")
            for j in slots:
                who = f"{self.name}: client {c.client}, slot {j}"
                members.append(unpack_prefixed(c.payload.tensors, f"slot.{j}", who))
                count = c.payload.meta.get(f"slot.{j}.examples")
                if count is None or not float(count) > 0:
                    raise ValueError(f"{who}: meta slot.{j}.examples = {count!r}, expected a positive example count")
                keys.append((c.client, j))
                counts.append(float(count))
        return keys, members, counts

    def export(self, state: FLTACState) -> GlobalModel:
        """The cluster with the most examples in the last round (the shared init before the first round)."""
        return GlobalModel(*(state.clusters[_largest(state)] if state.clusters else state.init), ())

    def evaluation_model(self, state: FLTACState, client_states: Mapping[int, FLTACClient]) -> tuple[GlobalModel, dict]:
        """For evaluation only: per task the cluster holding most of its examples, as one task-routed model with
        the task's head rows from that cluster; the cluster purity of the last round in ``diagnostics``."""
        if not state.clusters:
            return self.export(state), {}
        keys = sorted(state.examples)
        tasks = [_task_of(self.name, client_states, c, j) for c, j in keys]
        labels = [state.assignment[key] for key in keys]
        n_tasks = max(1, len(state.task_labels))
        chosen = []
        for t in range(n_tasks):
            mass = {k: 0.0 for k in state.clusters}
            for key, kt, k in zip(keys, tasks, labels, strict=True):
                mass[k] += state.examples[key] if kt == t else 0.0
            chosen.append(max(mass, key=lambda k: (mass[k], -k)) if any(mass.values()) else _largest(state))
        p, matched = purity(labels, tasks)
        diagnostics = {"cluster_purity": p, "cluster_matched_accuracy": matched, "task_clusters": chosen}
        adapter, extras = task_routed(state, chosen)
        return GlobalModel(adapter, extras, (), diagnostics), {}

    def from_evaluation_report(self, report: Payload) -> FLTACClient:
        return FLTACClient(tuple(int(t) for t in report.tensors["tasks"].tolist()))

    # ---- client ---------------------------------------------------------------------------------------------
    def evaluation_report(self, client_state: FLTACClient) -> Payload:
        """On Flower: the task of each of the node's adapters, for the evaluation model and the cluster purity
        (evaluation-only, counted apart; the method's own traffic never names a task)."""
        return Payload({"tasks": torch.tensor(client_state.tasks, dtype=torch.int64)})

    def init_client(self, client: ClientInfo) -> FLTACClient:
        return FLTACClient(slot_tasks(client))

    def prepare(
        self, client_state: FLTACClient, download: Payload, client: ClientInfo, rnd: int
    ) -> tuple[tuple[TrainPlan, ...], FLTACClient]:
        tasks = slot_tasks(client)
        multi = bool(client.tasks)
        plans = []
        for j, t in enumerate(tasks):
            if download.meta.get("fresh_init"):
                adapter, head = unpack_adapter(download.tensors, "download"), unpack_extras(download.tensors)
            else:
                k = download.meta.get(f"slot.{j}")
                if k is None:
                    raise ValueError(
                        f"{self.name}: round {rnd} download for client {client.id} maps no cluster to slot {j}"
                    )
                adapter, head = unpack_prefixed(
                    download.tensors, f"cluster.{k}", f"{self.name}: client {client.id} download"
                )
            plans.append(TrainPlan(rank=client.rank, adapter=adapter, extras=head, task=t if multi else None))
        return tuple(plans), FLTACClient(tasks)

    def upload(
        self, client_state: FLTACClient, trained: tuple, extras: tuple, client: ClientInfo, rnd: int
    ) -> tuple[Payload, FLTACClient]:
        tensors: dict[str, Tensor] = {}
        meta: dict[str, int | float | str | bool] = {"rank": client.rank}
        for j, (t, adapter, head) in enumerate(zip(client_state.tasks, trained, extras, strict=True)):
            tensors |= pack_prefixed(f"slot.{j}", adapter, head)
            meta[f"slot.{j}.examples"] = client.tasks[t] if client.tasks else client.examples
        return Payload(tensors, meta), client_state


def _task_of(method: str, client_states: Mapping[int, FLTACClient], c: int, j: int) -> int:
    cs = client_states.get(c)
    if cs is None or j >= len(cs.tasks):
        raise ValueError(
            f"{method}: the evaluation model needs the task of client {c}'s adapter {j} (its client state), which "
            "is missing: client states must be kept (and checkpointed) with the server state"
        )
    return cs.tasks[j]


def _largest(state: FLTACState) -> int:
    """The cluster with the most examples in the last round (the lowest id on ties)."""
    sizes = {k: 0.0 for k in state.clusters}
    for key, n in state.examples.items():
        sizes[state.assignment[key]] += n
    return max(sizes, key=lambda k: (sizes[k], -k))


def _carried_over(
    state: FLTACState, clusters: Mapping[int, Cluster], answered: set[tuple[int, int]]
) -> dict[tuple[int, int], int]:
    """Known adapters that did not answer: each to the new cluster nearest its old cluster's average."""
    if not state.clusters:
        return {}
    new = {k: flatten(*c) for k, c in clusters.items()}
    nearest = {
        old: min(new, key=lambda k: float(np.linalg.norm(new[k] - flatten(*cluster))))
        for old, cluster in state.clusters.items()
    }
    return {key: nearest[k] for key, k in state.assignment.items() if key not in answered}


def task_routed(state: FLTACState, chosen: Sequence[int]) -> tuple[dict[str, LowRank], dict[str, Tensor]]:
    """The adapter of task 0's cluster, and extras: the other chosen clusters as experts with a task table, and
    the head with task t's rows from task t's cluster (other head tensors averaged over the tasks' clusters)."""
    distinct = list(dict.fromkeys(chosen))
    live, others = distinct[0], distinct[1:]
    adapter, _ = state.clusters[live]
    extras = _assembled_head(state, chosen)
    if not others:
        return adapter, extras
    table = torch.tensor([-1 if k == live else others.index(k) for k in chosen], dtype=torch.int64)
    for m in adapter:
        A = torch.stack([state.clusters[k][0][m].A for k in others])
        B = torch.stack([state.clusters[k][0][m].B for k in others])
        extras |= mixture.pack(m, mixture.LayerMixture(A, B, task_expert=table))
    return adapter, extras


def _assembled_head(state: FLTACState, chosen: Sequence[int]) -> dict[str, Tensor]:
    """Head tensors with one row per label (first dimension = the labels of every task): task t's rows from task
    t's cluster; any other head tensor (a dense layer before the output rows): the mean over the tasks' clusters."""
    heads = [state.clusters[k][1] for k in chosen]
    spans = state.task_labels
    rows = spans[-1][1] if spans else None
    out = {}
    for name, first in heads[0].items():
        if spans and first.ndim >= 1 and first.shape[0] == rows:
            out[name] = torch.cat([h[name][a:b] for h, (a, b) in zip(heads, spans, strict=True)])
        else:
            out[name] = torch.stack([h[name] for h in heads]).mean(0)
    return out


@register("fl_tac", FLTACParams, CAPABILITIES)
def build(params: FLTACParams) -> FLTAC:
    return FLTAC(params)
