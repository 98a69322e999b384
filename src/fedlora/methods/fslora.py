"""FSLoRA (Fang, Han, Yuan, Hosseinalipour, Brinton, "Federated Sketching LoRA: A Flexible Framework for
Heterogeneous Collaborative Fine-Tuning of LLMs", arXiv 2501.19389; code wenzhifang/Federated-Sketching-LoRA-
Implementation).

The server keeps one global rank-r adapter (B̃, A). In round t client u gets a sketch of m_u of the r rank
components, S_u = (r/m_u)·diag(mask_u) with mask_u a uniformly drawn m_u-subset, so E[S_u] = I. The client
trains B S_u A: only the selected columns of B and rows of A move. It uploads the delta of its selected
components only, the server averages the (zero-filled) deltas with the aggregation weights and applies the average
as a pseudo-gradient with a server optimiser (AdamW lr 3e-4 by default, or SGD; ``method.server_*``).

fedlora's reading where the paper and code leave room:

- **Who draws the sketch.** The server, seeded by (seed, round, client), one independent subset per module shared
  by its A and B (B S A needs the same S on both sides). So the download holds only the selected components,
  m_u(d+k) values, as the paper counts. The upload repeats the component indices (m_u int32 per factor) so it is
  self-describing; they are counted.
- **How the client trains B S_u A.** Exactly: the download is the rank-m_u adapter B̃_c = (r/m_u)·B̃[:, sel],
  A_c = A[sel, :], whose product is B̃ S_u A, and the client trains it at rank m_u (less compute for weak clients,
  the paper's point). With plain LoRA scaling s = α/r the client's PEFT scale α/m_u supplies the r/m_u factor,
  so PEFT's B at rank m_u *is* the global B's selected columns and every gradient, clipping norm and AdamW step is
  the paper's (the official code instead trains B·S and rescales B's gradient by S², which equals the paper's
  step under SGD but not under AdamW, which ignores gradient scale). With rsLoRA (α/√r) the forward pass is still
  exact but B's AdamW steps are √(r/m_u) times the global parametrisation's. The uploaded B delta is mapped back
  to global coordinates, (B̃_c' − B̃_c)·m_u/r. The official code's name-equality test (``'lora_B' == n``) never
  matches PEFT names, so it runs FedAvg of the dense LoRA; this implementation is the sketched method.
- **Sketch size.** m_u = max(1, round(sketch_ratio_u · r)), and the scale is r/m_u for the m_u actually drawn,
  so E[S_u] = I holds exactly. ``method.sketch_ratio`` is one number for all clients or a list, one per client.
- **Weights.** The official code divides the summed deltas by the number of sampled clients; fedlora uses the
  normalised aggregation weights w (uniform when chosen so).
- **Server optimiser coordinates.** The canonical factors (B̃ = s·B): with s ≠ 1, AdamW's per-entry step on PEFT's
  B is lr/s. The classifier head (fully trained, dense both ways) takes the same pseudo-gradient step, as every
  trainable tensor does in the official code.
- **Reported errors.** Against M = Σ w_u B̃'_u S_u A'_u, the clients' trained sketched updates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from fedlora.methods import register, server_opt
from fedlora.methods.base import (
    Aggregated,
    Capabilities,
    ClientInfo,
    GlobalModel,
    ModelInfo,
    ModuleSpec,
    fresh_adapter,
    measure,
)
from fedlora.payload import pack_adapter, pack_extras, pack_sparse, unpack_extras, unpack_sparse
from fedlora.types import Adapter, AggregationReport, Contribution, LowRank, Payload, TrainPlan


@dataclass(frozen=True)
class FSLoRAParams:
    """Hyperparameters (``method.*``) of FSLoRA."""

    sketch_ratio: float | tuple[float, ...] = 0.5
    server_optimizer: Literal["adamw", "sgd"] = "adamw"
    server_lr: float = 3e-4
    server_weight_decay: float = 0.01

    def __post_init__(self) -> None:
        ratio = self.sketch_ratio
        values = list(ratio) if isinstance(ratio, list | tuple) else [ratio]
        ok = bool(values) and all(isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1 for v in values)
        if not ok:
            raise ValueError(
                f"method.sketch_ratio = {ratio!r}: expected a number in (0, 1] or a non-empty list of such numbers, "
                "one per client"
            )
        if isinstance(ratio, list | tuple):
            object.__setattr__(self, "sketch_ratio", tuple(float(v) for v in ratio))
        server_opt.check_params("server", self.server_optimizer, self.server_lr, self.server_weight_decay)

    def ratio(self, client: int) -> float:
        if isinstance(self.sketch_ratio, tuple):
            if not 0 <= client < len(self.sketch_ratio):
                raise ValueError(
                    f"client {client}: method.sketch_ratio lists {len(self.sketch_ratio)} values, one per client, "
                    f"so it has none for client {client} (give data.num_clients values)"
                )
            return self.sketch_ratio[client]
        return float(self.sketch_ratio)

    def optimizer(self) -> server_opt.ServerOptimizer:
        return server_opt.ServerOptimizer(self.server_optimizer, self.server_lr, self.server_weight_decay)


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="no",
    writes_base=False,
    personalised=False,
    per_client_download=True,
    secure_aggregation=False,
    not_a_sum="uploads are sparse rank components at client-specific indices, averaged per component",
    uplink="m_u(d+k) + 2m_u int32 idx",
    downlink="m_u(d+k) + 2m_u int32 idx",
    paper="Fang et al., arXiv 2501.19389",
)


@dataclass(frozen=True)
class FSLoRAState:
    """The global rank-r adapter and head, the server optimiser's state, the seed the sketches derive from."""

    adapter: Mapping[str, LowRank]
    extras: Mapping[str, Tensor]
    optimizer: server_opt.OptState
    seed: int
    specs: Mapping[str, ModuleSpec]
    diagnostics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SketchRound:
    """A client's memory within one round: the global rank, its components and their downloaded values."""

    rank: int
    indices: Mapping[str, Tensor]
    start: Mapping[str, LowRank]


def sketch_size(ratio: float, rank: int) -> int:
    """m_u = max(1, round(ratio · r))."""
    return max(1, min(rank, round(ratio * rank)))


def draw_sketch(seed: int, rnd: int, client: int, modules: Sequence[str], rank: int, m: int) -> dict[str, Tensor]:
    """Per module, the m selected component indices (sorted, int64), uniform without replacement, seeded by
    (seed, round, client) so every call for the same client and round gives the same sketch."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7, rnd, client]))
    return {mod: torch.from_numpy(np.sort(rng.choice(rank, size=m, replace=False))).long() for mod in sorted(modules)}


def sketched(adapter: Adapter, indices: Mapping[str, Tensor], rank: int) -> dict[str, LowRank]:
    """The rank-m adapter whose product is B̃ S A: ((r/m)·B̃[:, sel], A[sel, :])."""
    return {
        mod: LowRank(lr.B[:, indices[mod]] * (rank / len(indices[mod])), lr.A[indices[mod], :])
        for mod, lr in adapter.items()
    }


def _components(download: Mapping[str, Tensor], who: str) -> tuple[dict[str, LowRank], dict[str, Tensor]]:
    """Selected components (B values (d, m), A values (m, k)) and their indices, per module, from a payload."""
    sparse = unpack_sparse(download, who)
    modules = sorted({n[len("lora.") : -2] for n in sparse if n.startswith("lora.")})
    comps, indices = {}, {}
    for mod in modules:
        if f"lora.{mod}.A" not in sparse or f"lora.{mod}.B" not in sparse:
            raise ValueError(f"{who}, module {mod}: needs both lora A and B components")
        (Bv, Bi), (Av, Ai) = sparse[f"lora.{mod}.B"], sparse[f"lora.{mod}.A"]
        if not torch.equal(Bi, Ai):
            raise ValueError(f"{who}, module {mod}: B columns {Bi.tolist()} and A rows {Ai.tolist()} differ")
        if Bv.ndim != 2 or Av.ndim != 2 or Bv.shape[1] != len(Bi) or Av.shape[0] != len(Ai):
            raise ValueError(
                f"{who}, module {mod}: component shapes B{tuple(Bv.shape)}, A{tuple(Av.shape)} do not match "
                f"{len(Bi)} indices"
            )
        comps[mod], indices[mod] = LowRank(Bv, Av), Ai
    return comps, indices


def _dense(comps: LowRank, idx: Tensor, spec: ModuleSpec, rank: int) -> LowRank:
    """Zero-filled global-size factors holding the components at their indices."""
    B = torch.zeros(spec.d, rank, dtype=torch.float64)
    A = torch.zeros(rank, spec.k, dtype=torch.float64)
    B[:, idx] = comps.B.double()
    A[idx, :] = comps.A.double()
    return LowRank(B, A)


@dataclass(frozen=True)
class FSLoRA:
    """The FSLoRA ``Method``: sketched client training, sparse components both ways, server optimiser."""

    params: FSLoRAParams
    name = "fslora"
    capabilities = CAPABILITIES

    # ---- server ---------------------------------------------------------------------------------------------
    def init_server(self, model: ModelInfo, seed: int) -> FSLoRAState:
        adapter = fresh_adapter(model.specs, model.rank, seed)
        return FSLoRAState(adapter, dict(model.extras), server_opt.OptState(), seed, dict(model.specs))

    def _sketch(self, state: FSLoRAState, client: int, rnd: int) -> dict[str, Tensor]:
        rank = next(iter(state.adapter.values())).rank
        m = sketch_size(self.params.ratio(client), rank)
        return draw_sketch(state.seed, rnd, client, list(state.adapter), rank, m)

    def broadcast(self, state: FSLoRAState, client: ClientInfo, rnd: int) -> Payload:
        rank = next(iter(state.adapter.values())).rank
        indices = self._sketch(state, client.id, rnd)
        tensors: dict[str, Tensor] = {}
        for mod, lr in sorted(state.adapter.items()):
            idx = indices[mod]
            tensors |= pack_sparse(f"lora.{mod}.B", lr.B[:, idx], idx)
            tensors |= pack_sparse(f"lora.{mod}.A", lr.A[idx, :], idx)
        return Payload(tensors | pack_extras(state.extras), {"round": rnd, "rank": rank})

    def _client_update(
        self, state: FSLoRAState, c: Contribution, rnd: int, rank: int
    ) -> tuple[dict[str, Tensor], dict[str, LowRank]]:
        """One upload, checked against the client's sketch: its zero-filled delta per ``lora.<m>.A/B`` (global
        size), and its trained update B̃'_c A'_c in global coordinates (for the reported errors)."""
        who = f"client {c.client}"
        comps, indices = _components(c.payload.tensors, who)
        expected = self._sketch(state, c.client, rnd)
        if set(comps) != set(state.adapter):
            raise ValueError(f"{who}: modules {sorted(set(comps) ^ set(state.adapter))[:4]} differ from the model")
        start = sketched(state.adapter, expected, rank)
        delta, effective = {}, {}
        for mod, comp in comps.items():
            spec, idx = state.specs[mod], expected[mod]
            if not torch.equal(indices[mod], idx):
                raise ValueError(
                    f"{who}, module {mod}: uploaded components {indices[mod].tolist()}, but its sketch this round "
                    f"is {idx.tolist()}"
                )
            if comp.B.shape[0] != spec.d or comp.A.shape[1] != spec.k:
                raise ValueError(f"{who}, module {mod}: update shape {comp.shape}, expected ({spec.d}, {spec.k})")
            if not (torch.isfinite(comp.B).all() and torch.isfinite(comp.A).all()):
                raise ValueError(f"{who}, module {mod}: the update has NaN/Inf values")
            dense = _dense(comp, idx, spec, rank)
            delta[f"lora.{mod}.B"], delta[f"lora.{mod}.A"] = dense.B, dense.A
            trained = LowRank(start[mod].B + comp.B * (rank / len(idx)), start[mod].A + comp.A)
            effective[mod] = _dense(trained, idx, spec, rank)
        return delta, effective

    def aggregate(
        self, state: FSLoRAState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[FSLoRAState, AggregationReport]:
        if not contributions:
            raise ValueError("no client updates to aggregate: the client list is empty")
        server_opt.check_deltas(contributions, "FSLoRA")
        rank = next(iter(state.adapter.values())).rank
        weights = torch.tensor([c.weight for c in contributions], dtype=torch.float64)
        updates = [self._client_update(state, c, rnd, rank) for c in contributions]
        deltas = [
            d | server_opt.extras_delta(c, state.extras) for (d, _), c in zip(updates, contributions, strict=True)
        ]
        params = pack_adapter(state.adapter) | pack_extras(state.extras)
        new, opt_state = server_opt.pseudo_gradient_step(
            params, deltas, weights, state.optimizer, self.params.optimizer()
        )
        adapter = {mod: LowRank(new[f"lora.{mod}.B"], new[f"lora.{mod}.A"]) for mod in state.adapter}
        extras = {name: new[f"extra.{name}"] for name in state.extras}
        sizes = {c.client: len(next(iter(self._sketch(state, c.client, rnd).values()))) for c in contributions}
        effective = [e for _, e in updates]
        new_state = FSLoRAState(adapter, extras, opt_state, state.seed, state.specs, {"sketch_sizes": sizes})
        report = measure(effective, weights, Aggregated(adapter), weights)
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        bytes_down = {
            c.client: self.broadcast(new_state, ClientInfo(c.client, rank), rnd + 1).nbytes for c in contributions
        }
        report = AggregationReport(report.modules, bytes_up, bytes_down, {"sketch_sizes": sizes}, report.client_balance)
        return new_state, report

    def export(self, state: FSLoRAState) -> GlobalModel:
        return GlobalModel(dict(state.adapter), dict(state.extras), ())

    # ---- client ---------------------------------------------------------------------------------------------
    def init_client(self, client: ClientInfo) -> None:
        return None

    def prepare(self, client_state: Any, download: Payload, client: ClientInfo, rnd: int) -> tuple[TrainPlan, Any]:
        rank = int(download.meta["rank"])
        comps, indices = _components(download.tensors, f"client {client.id} download")
        m = {len(i) for i in indices.values()}
        if len(m) != 1:
            raise ValueError(f"client {client.id} download: sketch sizes {sorted(m)} differ between modules")
        scale = rank / m.pop()
        adapter = {mod: LowRank(lr.B * scale, lr.A) for mod, lr in comps.items()}
        plan = TrainPlan(
            rank=len(next(iter(indices.values()))), adapter=adapter, extras=unpack_extras(download.tensors)
        )
        return plan, SketchRound(rank, indices, adapter)

    def upload(
        self, client_state: SketchRound, trained: Adapter, extras: Mapping[str, Tensor], client: ClientInfo, rnd: int
    ) -> tuple[Payload, None]:
        tensors: dict[str, Tensor] = {}
        for mod, start in sorted(client_state.start.items()):
            if mod not in trained or trained[mod].rank != start.rank:
                got = trained[mod].rank if mod in trained else "missing"
                raise ValueError(f"client {client.id}, module {mod}: trained rank {got}, expected {start.rank}")
            idx = client_state.indices[mod]
            unscale = len(idx) / client_state.rank  # back to global coordinates: B̃ = B̃_c · m/r
            tensors |= pack_sparse(f"lora.{mod}.B", (trained[mod].B - start.B) * unscale, idx)
            tensors |= pack_sparse(f"lora.{mod}.A", trained[mod].A - start.A, idx)
        return Payload(tensors | pack_extras(extras), {"rank": client_state.rank, "delta": True}), None


@register("fslora", FSLoRAParams, CAPABILITIES)
def build(params: FSLoRAParams) -> FSLoRA:
    return FSLoRA(params)
