"""CE-LoRA (Li, Liu, Huang, Zhang, Yuan, Hong, "Communication-Efficient and Personalized Federated Foundation Model
Fine-Tuning via Tri-Matrix Adaptation", arXiv 2503.23869).

Each client's update is tri-factor, ΔW_u = B̃_u C_u A_u, with a small dense core C_u ∈ R^{r×r}. Only C travels:
A_u, B̃_u and the head stay on the client. The server gives each client its own core, averaged with personalised
weights from the clients' similarity in parameter space and in data space:

    s_uv  = β · cos(C_u − I, C_v − I) + (1 − β) · BC(u, v)
    π_uv  = w_v exp(s_uv / T) / Σ_x w_x exp(s_ux / T)          (w: the round's example weights)
    C̄_u  = Σ_v π_uv C_v                                        (per module, over the round's clients)

cos is over all modules' C − I together (0 when either is 0); BC(u, v) = exp(−D_B) is the Bhattacharyya
coefficient of two diagonal Gaussians, the clients' feature statistics (mean and variance over their training
examples of the mean-pooled last hidden state of the model as it starts, measured once, in a client's first round).

fedlora's reading. The paper's weighting formula is unverified and its official code does not publish the server
(``trainers/BaseServer`` is imported but absent from every commit of ``1503552056/CE-LoRA``), so s, π, T and β above
are fedlora's choice: T → ∞ gives FedAvg of the cores, T → 0 each client's own core. The code fits per-class
three-component diagonal GMMs on the backbone's [CLS] features at client start-up for the data similarity;
fedlora uses one diagonal Gaussian per client on the mean-pooled features (architecture-independent) and sends it
once through the method's uplink, where it is counted.
- Training phases. With the code's default (``train_c_only``: A, B frozen) and its init B = 0, both the adapter's
  output and ∂/∂C are identically zero, so C can never move. The code as committed instead trains A, B and C
  together (and every LayerNorm and the classifier) in every round, with no phase structure; fedlora trains A, B̃,
  C and the head every round (not the LayerNorms), keeps A, B̃ and the head local, and sends C only. B = 0 at the
  start makes ∂/∂C zero only at the first step: B moves first, then C.
- Initialisation: the shared seeded PEFT init (A Kaiming-uniform, B = 0), not the code's A ~ N(0, 10⁻³); C = I.
  A, B = 0 and the initial head are sent once, in a client's first download, and counted.
- A client that has not answered this round keeps its last personalised core; one never seen receives the last
  round's FedAvg core Σ_v w_v C_v (I before the first round).
- The global model, for evaluation only: (Σ_u w_u B̃_u C_u, Σ_u w_u A_u) and the mean head over the last round's
  clients (``evaluation_model``; on Flower from the nodes' ``evaluation_report``). Its divergence from the ideal
  Σ_u w_u B̃_u C_u A_u is reported, as FedSA-LoRA's is.
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
from fedlora.types import (
    CORE_SUFFIX,
    FEATURE_MEAN,
    FEATURE_VAR,
    UNFOLDED_B_SUFFIX,
    AggregationReport,
    Contribution,
    LowRank,
    ModuleError,
    Payload,
    TrainPlan,
)

STATS = ("stats.mean", "stats.var")
"""Upload names of a client's feature statistics (sent once)."""


@dataclass(frozen=True)
class CELoRAParams:
    """temperature: T of the personalised weights (> 0; large: FedAvg, small: each client's own core).
    param_weight: β, the share of parameter-space similarity in s (the rest is data-space), in [0, 1]."""

    temperature: float = 0.5
    param_weight: float = 0.5

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"method.temperature = {self.temperature}: expected a positive number")
        if not 0.0 <= self.param_weight <= 1.0:
            raise ValueError(f"method.param_weight = {self.param_weight}: expected a value in [0, 1]")


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="no",
    writes_base=False,
    personalised=True,
    per_client_download=True,
    secure_aggregation=False,
    not_a_sum="its personalised cores weigh each client's core by parameter and data similarity to every other client",
    uplink="r² (the core C only; A, B and the head stay local), plus 2h once (feature statistics)",
    downlink="r² (the client's personalised core), plus r(d + k) and the head once (the initial A, B = 0)",
    paper="Li et al., arXiv 2503.23869",
    variants=("lora",),
)


@dataclass(frozen=True)
class CEState:
    """Server state: the shared initial factors and head (sent once), the clients that hold them, each client's
    feature statistics (mean, var), each client's next personalised core, the last round's FedAvg core, and the
    last round's weights (for the evaluation model)."""

    init: Mapping[str, LowRank]
    init_extras: Mapping[str, Tensor]
    seen: frozenset[int] = frozenset()
    statistics: Mapping[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    personal: Mapping[int, Mapping[str, Tensor]] = field(default_factory=dict)
    mean: Mapping[str, Tensor] | None = None
    last_weights: Mapping[int, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return next(iter(self.init.values())).rank


@dataclass(frozen=True)
class CEClient:
    """Client state: its own A and B̃ (without the core), the core as last trained, its head, and whether its
    feature statistics were sent; None before its first round."""

    A: Mapping[str, Tensor] | None = None
    B: Mapping[str, Tensor] | None = None
    C: Mapping[str, Tensor] | None = None
    extras: Mapping[str, Tensor] | None = None
    measured: bool = False


def bhattacharyya(mean_u: Tensor, var_u: Tensor, mean_v: Tensor, var_v: Tensor) -> float:
    """exp(−D_B) of the diagonal Gaussians N(mean_u, var_u) and N(mean_v, var_v): 1 for equal ones, → 0 apart.
    D_B = ¼ Σ (μ_u − μ_v)² / (σ²_u + σ²_v) + ½ Σ ln(½(σ²_u + σ²_v) / √(σ²_u σ²_v)); variances floored at 1e-12."""
    vu, vv = var_u.double().clamp(min=1e-12), var_v.double().clamp(min=1e-12)
    diff = mean_u.double() - mean_v.double()
    d_b = 0.25 * (diff**2 / (vu + vv)).sum() + 0.5 * torch.log(0.5 * (vu + vv) / torch.sqrt(vu * vv)).sum()
    return float(torch.exp(-d_b))


def personal_weights(
    cores: Sequence[Mapping[str, Tensor]],
    statistics: Sequence[tuple[Tensor, Tensor]],
    weights: Tensor,
    params: CELoRAParams,
) -> tuple[Tensor, Tensor, Tensor]:
    """(π, parameter similarities, data similarities), each (U, U) float64: row u holds client u's weights over
    the round's clients (module docstring)."""
    U = len(cores)
    flat = [
        torch.cat([(c - torch.eye(c.shape[0], dtype=c.dtype)).double().flatten() for _, c in sorted(cs.items())])
        for cs in cores
    ]
    norms = [float(f.norm()) for f in flat]
    param = torch.zeros(U, U, dtype=torch.float64)
    data = torch.zeros(U, U, dtype=torch.float64)
    for u in range(U):
        for v in range(U):
            if norms[u] > 0 and norms[v] > 0:
                param[u, v] = float(flat[u] @ flat[v]) / (norms[u] * norms[v])
            data[u, v] = bhattacharyya(*statistics[u], *statistics[v])
    s = params.param_weight * param + (1 - params.param_weight) * data
    logits = torch.log(weights.double()).unsqueeze(0) + s / params.temperature
    return torch.softmax(logits, dim=1), param, data


@dataclass(frozen=True)
class CELoRA:
    name = "ce_lora"
    capabilities = CAPABILITIES
    params: CELoRAParams = field(default_factory=CELoRAParams)

    # ---- server ---------------------------------------------------------------------------------------------
    def init_server(self, model: ModelInfo, seed: int) -> CEState:
        return CEState(fresh_adapter(model.specs, model.rank, seed), dict(model.extras))

    def broadcast(self, state: CEState, client: ClientInfo, rnd: int) -> Payload:
        check_rank(self.name, client, state.rank)
        eye = {m: torch.eye(state.rank) for m in state.init}
        tensors = pack_factor(state.personal.get(client.id) or state.mean or eye, "C")
        if client.id not in state.seen:  # the shared initial A, B = 0 and head, once
            tensors |= pack_factor({m: lr.A for m, lr in state.init.items()}, "A")
            tensors |= pack_factor({m: lr.B for m, lr in state.init.items()}, "B")
            tensors |= pack_extras(state.init_extras)
        return Payload(tensors, {"round": rnd})

    def aggregate(
        self, state: CEState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[CEState, AggregationReport]:
        r = state.rank
        cores = factor_uploads(self.name, contributions, "C", {m: (r, r) for m in state.init})
        statistics = dict(state.statistics) | {
            c.client: _statistics(self.name, c) for c in contributions if STATS[0] in c.payload.tensors
        }
        clients = [c.client for c in contributions]
        missing = [c for c in clients if c not in statistics]
        if missing:
            raise ValueError(
                f"{self.name}: no feature statistics for client(s) {missing}: a client sends them (stats.mean, "
                "stats.var) with its first upload, and the server keeps them in its state"
            )
        weights = torch.tensor([c.weight for c in contributions], dtype=torch.float64)
        pi, param, data = personal_weights(cores, [statistics[c] for c in clients], weights, self.params)
        personal = dict(state.personal) | {
            c: {m: weighted_mean([cs[m] for cs in cores], pi[i]) for m in state.init} for i, c in enumerate(clients)
        }
        mean = {m: weighted_mean([cs[m] for cs in cores], weights) for m in state.init}
        new = CEState(
            state.init,
            state.init_extras,
            state.seen | frozenset(clients),
            statistics,
            personal,
            mean,
            {c: float(w) for c, w in zip(clients, weights, strict=True)},
        )
        diagnostics = {
            "clients": clients,
            "weights": pi.tolist(),
            "param_similarity": param.tolist(),
            "data_similarity": data.tolist(),
        }
        bytes_down = {c: self.broadcast(new, ClientInfo(c, r), rnd + 1).nbytes for c in clients}
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        # No module errors here: the server holds no A or B. The runner takes them from ``evaluation_model``.
        return new, AggregationReport({}, bytes_up, bytes_down, diagnostics)

    def export(self, state: CEState) -> GlobalModel:
        """What the server alone holds: the initial A with B = 0 (ΔW = 0) and the initial head."""
        return GlobalModel(dict(state.init), state.init_extras, ())

    def evaluation_model(
        self, state: CEState, client_states: Mapping[int, CEClient]
    ) -> tuple[GlobalModel, dict[str, ModuleError]]:
        """For evaluation only, never sent: (Σ w B̃_u C_u, Σ w A_u) and the mean head over the last round's clients,
        and per module its errors against the ideal Σ w B̃_u C_u A_u."""
        if not state.last_weights:
            return self.export(state), {}
        clients = sorted(state.last_weights)
        states = [client_states.get(c) for c in clients]
        lost = [c for c, cs in zip(clients, states, strict=True) if cs is None or cs.A is None]
        if lost:
            raise ValueError(
                f"{self.name}: the evaluation model needs the own factors of client(s) {lost} (their client states), "
                "which are missing: client states must be kept (and checkpointed) with the server state"
            )
        w = torch.tensor([state.last_weights[c] for c in clients], dtype=torch.float64)
        adapter, errors = {}, {}
        for m in sorted(state.init):
            Bs = [cs.B[m] @ cs.C[m] for cs in states]  # type: ignore[union-attr,index]
            As = [cs.A[m] for cs in states]  # type: ignore[union-attr,index]
            adapter[m] = LowRank(weighted_mean(Bs, w), weighted_mean(As, w))
            errors[m] = linalg.module_errors(Bs, As, w, [adapter[m]], state.rank, fedit_weights=w)
        extras = average_extras([cs.extras or {} for cs in states], w) or {}  # type: ignore[union-attr]
        return GlobalModel(adapter, extras, ()), errors

    def from_evaluation_report(self, report: Payload) -> CEClient:
        """A Flower node's ``evaluation_report`` back as the client state ``evaluation_model`` reads."""
        t = report.tensors
        return CEClient(unpack_factors(t, "A"), unpack_factors(t, "B"), unpack_factors(t, "C"), unpack_extras(t), True)

    # ---- client ---------------------------------------------------------------------------------------------
    def evaluation_report(self, client_state: CEClient) -> Payload:
        """On Flower: the node's A, B̃, C and head, for the evaluation-only global model (counted apart)."""
        tensors = {}
        for factor, values in (("A", client_state.A), ("B", client_state.B), ("C", client_state.C)):
            tensors |= pack_factor(dict(values or {}), factor)  # type: ignore[arg-type]
        return Payload(tensors | pack_extras(client_state.extras or {}))

    def init_client(self, client: ClientInfo) -> CEClient:
        return CEClient()

    def prepare(
        self, client_state: CEClient, download: Payload, client: ClientInfo, rnd: int
    ) -> tuple[TrainPlan, CEClient]:
        A, B, cores = tri_factor_download(self.name, download, client, rnd, client_state.A, client_state.B)
        head = unpack_extras(download.tensors) or dict(client_state.extras or {})
        plan = TrainPlan(
            rank=client.rank,
            adapter={m: LowRank(B[m], A[m]) for m in sorted(A)},
            extras=head,
            trainable=frozenset({"A", "B", "C"}),
            cores=cores,
            feature_statistics=not client_state.measured,
        )
        return plan, client_state

    def upload(
        self, client_state: CEClient, trained: dict, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, CEClient]:
        cores = {m: extras[f"{m}{CORE_SUFFIX}"] for m in trained}
        own_B = {m: extras[f"{m}{UNFOLDED_B_SUFFIX}"] for m in trained}
        reserved = {f"{m}{s}" for m in trained for s in (CORE_SUFFIX, UNFOLDED_B_SUFFIX)} | {FEATURE_MEAN, FEATURE_VAR}
        head = {n: t for n, t in extras.items() if n not in reserved}
        tensors = pack_factor(cores, "C")
        if FEATURE_MEAN in extras:
            tensors |= {STATS[0]: extras[FEATURE_MEAN], STATS[1]: extras[FEATURE_VAR]}
        kept = CEClient({m: lr.A for m, lr in trained.items()}, own_B, cores, head, True)
        return Payload(tensors, {"rank": client.rank}), kept


def tri_factor_download(
    method: str,
    download: Payload,
    client: ClientInfo,
    rnd: int,
    kept_A: Mapping[str, Tensor] | None,
    kept_B: Mapping[str, Tensor] | None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """(A, B̃, C) per module for a tri-factor plan: the core from the download, A and B̃ from the download when it
    carries them (a client's first round) or else the client's kept copies; clear errors when any is missing or
    the module sets differ. Shared with Fed-SB."""
    cores = unpack_factors(download.tensors, "C")
    if not cores:
        raise ValueError(f"{method}: round {rnd} download for client {client.id} lacks lora.<module>.C")
    A = local_copy(method, client, "A", unpack_factors(download.tensors, "A"), kept_A)
    B = local_copy(method, client, "B", unpack_factors(download.tensors, "B"), kept_B)
    if not set(A) == set(B) == set(cores):
        raise ValueError(f"{method}: client {client.id}: the modules of A, B and C differ")
    return A, B, cores


def _statistics(method: str, c: Contribution) -> tuple[Tensor, Tensor]:
    mean, var = (c.payload.tensors.get(name) for name in STATS)
    if mean is None or var is None or mean.shape != var.shape or mean.ndim != 1:
        raise ValueError(
            f"{method}: client {c.client} sent malformed feature statistics: expected {STATS} of equal (h,)"
        )
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()) or bool((var < 0).any()):
        raise ValueError(f"{method}: client {c.client}'s feature statistics have NaN/Inf or negative variances")
    return mean, var


@register("ce_lora", CELoRAParams, CAPABILITIES)
def build(params: CELoRAParams) -> CELoRA:
    return CELoRA(params)
