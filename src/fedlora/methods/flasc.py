"""FLASC (Kuo, Raje, Rajesh, Smith, "Federated LoRA with Sparse Communication", arXiv 2406.05233; code
imkevinkuo/flasc, ``train_sparse_lora_dp.py``).

The server keeps a dense global LoRA P. Each round it takes one global top-k magnitude mask over all LoRA
entries (every module's A and B, flattened together) at density ρ_down and sends P ⊙ mask as values plus
indices. Clients fine-tune the entire dense LoRA from there, then upload their delta sparsified by a global
top-k magnitude mask at density ρ_up (values plus indices). The server averages the deltas with the aggregation
weights and takes a server-optimiser step with the average as pseudo-gradient g = −Δ̄ (AdamW lr 1e-3 by default,
or SGD; ``method.server_*``).

fedlora's reading where the paper and code leave room:

- **k** = ⌊ρ·N⌋ entries over the N LoRA entries of the model, as the code's ``int(x.numel()*density)``; ties in
  magnitude are broken by ``torch.topk``. At ρ = 1 a tensor travels dense (no indices), as in the code, which
  skips masking there. Sparse tensors carry flat row-major int32 indices (4 bytes each; see ``fedlora.payload``):
  ⌊ρN⌋·(4 + 4) bytes each way, so sparsity pays only below ρ = 0.5.
- **Scope of the top-k** (``method.topk_scope``). ``"global"`` (default, the official code): one ranking over
  every LoRA entry of the model. Because B starts at 0 and grows by about the server lr per round while A starts
  at Kaiming scale (~1/√k), the global ranking keeps only A entries until B's entries reach A's: the global
  model sent and evaluated has B = 0 (ΔW = 0, divergence 1) for the first tens of rounds (the code runs 200).
  ``"per_tensor"`` (fedlora's option): each tensor keeps its own ⌊ρ·n_t⌋ largest entries, so B travels from the
  first round; bytes are Σ_t ⌊ρ·n_t⌋·(4 + 4).
- **Magnitudes and server steps are in canonical coordinates** (B̃ = s·B): the official code ranks and steps
  PEFT's B, the same when s = α/r = 1 (its default r = α = 16).
- **The classifier head** (fully trained) travels dense both ways, is not part of the top-k, and takes the same
  server-optimiser step with its averaged delta (the official code steps every trainable tensor).
- **Client freezing** (``freeze_to_mask``, the code's ``--client-freeze``, default off): only the downloaded
  entries train; the rest stay exactly at zero (``TrainPlan.grad_masks``).
- **The global model** evaluated and saved is P ⊙ mask_down, what clients receive (the code's default
  ``--eval-masked true``).
- **Weights.** The official code divides the summed deltas by the number of sampled clients; fedlora uses the
  normalised aggregation weights w.
- **Default densities** ¼ both ways (fedlora's choice): the official code's defaults are 1.0 (dense), i.e. FedAvg of
  the LoRA with a server AdamW, not the sparse method.
- **Not implemented:** density decay schedules, per-tier densities (``train_sparse_lora_het.py``), the DP variant.
- **Reported errors.** Against M = Σ w_u B̃'_u A'_u, each client's adapter rebuilt as the server sees it
  (download + sparse delta). The diagnostic ``b_share_down`` is the fraction of the next download's non-zero
  entries that are B's: 0 means the global model sent and evaluated has ΔW = 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from fedlora.methods import register, server_opt
from fedlora.methods.base import (
    Aggregated,
    Capabilities,
    ClientInfo,
    GlobalModel,
    ModelInfo,
    fresh_adapter,
    measure,
)
from fedlora.payload import pack_adapter, pack_extras, pack_sparse, unpack_adapter, unpack_extras, unpack_sparse
from fedlora.types import Adapter, AggregationReport, Contribution, LowRank, Payload, TrainPlan


@dataclass(frozen=True)
class FLASCParams:
    """Hyperparameters (``method.*``) of FLASC."""

    density_down: float = 0.25
    density_up: float = 0.25
    server_optimizer: Literal["adamw", "sgd"] = "adamw"
    server_lr: float = 1e-3
    server_weight_decay: float = 0.01
    freeze_to_mask: bool = False
    topk_scope: Literal["global", "per_tensor"] = "global"

    def __post_init__(self) -> None:
        for key in ("density_down", "density_up"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise ValueError(f"method.{key} = {value!r}: expected a number in (0, 1]")
        server_opt.check_params("server", self.server_optimizer, self.server_lr, self.server_weight_decay)

    def optimizer(self) -> server_opt.ServerOptimizer:
        return server_opt.ServerOptimizer(self.server_optimizer, self.server_lr, self.server_weight_decay)


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="no",
    writes_base=False,
    personalised=False,
    per_client_download=False,
    secure_aggregation=False,
    not_a_sum="uploads are top-k entries at client-chosen indices",
    uplink="ρ_up·r(d+k) + as many int32 idx",
    downlink="ρ_down·r(d+k) + as many int32 idx",
    paper="Kuo et al., arXiv 2406.05233",
)


@dataclass(frozen=True)
class FLASCState:
    """The dense global LoRA P and head, and the server optimiser's state."""

    adapter: Mapping[str, LowRank]
    extras: Mapping[str, Tensor]
    optimizer: server_opt.OptState
    diagnostics: Mapping[str, Any] = field(default_factory=dict)


def _named(adapter: Adapter) -> dict[str, Tensor]:
    return pack_adapter(dict(sorted(adapter.items())))


def _adapter(named: Mapping[str, Tensor]) -> dict[str, LowRank]:
    return unpack_adapter(named)


def topk_masks(tensors: Mapping[str, Tensor], density: float, scope: str = "global") -> dict[str, Tensor]:
    """Top-k magnitude masks, bool per tensor: ``"global"``, one ranking over all tensors flattened together,
    k = ⌊density·N⌋; ``"per_tensor"``, each tensor's own k_t = ⌊density·n_t⌋."""
    if scope == "per_tensor":
        return {n: topk_masks({n: t}, density)[n] for n, t in tensors.items()}
    names = sorted(tensors)
    flat = torch.cat([tensors[n].detach().reshape(-1).abs().double() for n in names])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    k = int(flat.numel() * density)
    if k > 0:
        keep[torch.topk(flat, k).indices] = True
    out, start = {}, 0
    for n in names:
        size = tensors[n].numel()
        out[n] = keep[start : start + size].reshape(tensors[n].shape)
        start += size
    return out


def encode(tensors: Mapping[str, Tensor], density: float, scope: str = "global") -> dict[str, Tensor]:
    """Dense names at density 1; otherwise ``<name>.values`` / ``<name>.indices`` of the top-k."""
    if density >= 1:
        return dict(tensors)
    out: dict[str, Tensor] = {}
    for n, mask in topk_masks(tensors, density, scope).items():
        idx = mask.reshape(-1).nonzero().squeeze(1)
        out |= pack_sparse(n, tensors[n].reshape(-1)[idx], idx)
    return out


def decode(payload: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], who: str) -> dict[str, Tensor]:
    """Dense LoRA tensors (zero where not sent) from dense or sparse names; every LoRA tensor must be there."""
    out = {n: t for n, t in payload.items() if n in shapes}
    for n, (values, idx) in unpack_sparse(payload, who).items():
        if n not in shapes:
            raise ValueError(f"{who}: sparse tensor {n!r} is not a LoRA factor of the model")
        numel = math.prod(shapes[n])
        if values.ndim != 1 or values.shape != idx.shape:
            raise ValueError(f"{who}, {n}: values {tuple(values.shape)} and indices {tuple(idx.shape)} must be 1-D")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise ValueError(f"{who}, {n}: indices must lie in [0, {numel}), got [{int(idx.min())}, {int(idx.max())}]")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[idx] = values
        out[n] = dense.reshape(shapes[n])
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise ValueError(f"{who}: LoRA tensors {missing[:4]} are missing")
    for n, t in out.items():
        if tuple(t.shape) != tuple(shapes[n]):
            raise ValueError(f"{who}, {n}: shape {tuple(t.shape)}, expected {tuple(shapes[n])}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{who}, {n}: NaN/Inf values")
    return out


def _shape_meta(named: Mapping[str, Tensor]) -> dict[str, str]:
    return {f"shape.{n}": "x".join(map(str, t.shape)) for n, t in named.items()}


def _shapes_from_meta(meta: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {
        k[len("shape.") :]: tuple(int(x) for x in str(v).split("x")) for k, v in meta.items() if k.startswith("shape.")
    }


@dataclass(frozen=True)
class FLASC:
    """The FLASC ``Method``: sparse download, dense local LoRA, sparse upload, server optimiser."""

    params: FLASCParams
    name = "flasc"
    capabilities = CAPABILITIES

    # ---- server ---------------------------------------------------------------------------------------------
    def init_server(self, model: ModelInfo, seed: int) -> FLASCState:
        return FLASCState(fresh_adapter(model.specs, model.rank, seed), dict(model.extras), server_opt.OptState())

    def _download(self, state: FLASCState) -> dict[str, Tensor]:
        """P ⊙ mask_down, dense."""
        named = _named(state.adapter)
        if self.params.density_down >= 1:
            return named
        masks = topk_masks(named, self.params.density_down, self.params.topk_scope)
        return {n: t * masks[n] for n, t in named.items()}

    def broadcast(self, state: FLASCState, client: ClientInfo, rnd: int) -> Payload:
        named = _named(state.adapter)
        meta = {"round": rnd, "rank": next(iter(state.adapter.values())).rank} | _shape_meta(named)
        sent = encode(named, self.params.density_down, self.params.topk_scope)
        return Payload(sent | pack_extras(state.extras), meta)

    def aggregate(
        self, state: FLASCState, contributions: Sequence[Contribution], rnd: int
    ) -> tuple[FLASCState, AggregationReport]:
        if not contributions:
            raise ValueError("no client updates to aggregate: the client list is empty")
        server_opt.check_deltas(contributions, "FLASC")
        weights = torch.tensor([c.weight for c in contributions], dtype=torch.float64)
        params = _named(state.adapter)
        shapes = {n: tuple(t.shape) for n, t in params.items()}
        deltas = [decode(c.payload.tensors, shapes, f"client {c.client}") for c in contributions]
        named = [d | server_opt.extras_delta(c, state.extras) for d, c in zip(deltas, contributions, strict=True)]
        params |= pack_extras(state.extras)
        new, opt_state = server_opt.pseudo_gradient_step(
            params, named, weights, state.optimizer, self.params.optimizer()
        )
        extras = {name: new.pop(f"extra.{name}") for name in state.extras}
        new_state = FLASCState(_adapter(new), extras, opt_state)
        sent = self._download(state)
        effective = [_adapter({n: sent[n].double() + d[n].double() for n in sent}) for d in deltas]
        report = measure(effective, weights, Aggregated(self.export(new_state).adapter), weights)
        rank = next(iter(state.adapter.values())).rank
        bytes_up = {c.client: c.payload.nbytes for c in contributions}
        bytes_down = {
            c.client: self.broadcast(new_state, ClientInfo(c.client, rank), rnd + 1).nbytes for c in contributions
        }
        diagnostics = {"b_share_down": b_share(self._download(new_state))}
        return new_state, AggregationReport(report.modules, bytes_up, bytes_down, diagnostics, report.client_balance)

    def export(self, state: FLASCState) -> GlobalModel:
        return GlobalModel(_adapter(self._download(state)), dict(state.extras), ())

    # ---- client ---------------------------------------------------------------------------------------------
    def init_client(self, client: ClientInfo) -> None:
        return None

    def prepare(self, client_state: Any, download: Payload, client: ClientInfo, rnd: int) -> tuple[TrainPlan, Any]:
        who = f"client {client.id} download"
        named = decode(download.tensors, _shapes_from_meta(download.meta), who)
        adapter = _adapter(named)
        masks = None
        if self.params.freeze_to_mask:  # dense tensors (ρ_down = 1) train entirely
            support = {n: _support(download.tensors, n, t.shape) for n, t in named.items()}
            masks = {mod: (support[f"lora.{mod}.A"], support[f"lora.{mod}.B"]) for mod in adapter}
        plan = TrainPlan(
            rank=int(download.meta["rank"]), adapter=adapter, extras=unpack_extras(download.tensors), grad_masks=masks
        )
        return plan, named

    def upload(
        self,
        client_state: Mapping[str, Tensor],
        trained: Adapter,
        extras: Mapping[str, Tensor],
        client: ClientInfo,
        rnd: int,
    ) -> tuple[Payload, None]:
        named = _named(trained)
        if set(named) != set(client_state):
            raise ValueError(f"client {client.id}: trained LoRA tensors differ from the download's")
        delta = {n: named[n] - client_state[n].to(named[n].dtype) for n in sorted(named)}
        sent = encode(delta, self.params.density_up, self.params.topk_scope)
        return Payload(sent | pack_extras(extras), {"delta": True}), None


def b_share(sent: Mapping[str, Tensor]) -> float:
    """The fraction of the non-zero LoRA entries sent that belong to B factors (0: the global ΔW is 0)."""
    nonzero = {n: int(t.count_nonzero()) for n, t in sent.items()}
    total = sum(nonzero.values())
    return sum(v for n, v in nonzero.items() if n.endswith(".B")) / total if total else 0.0


def _support(tensors: Mapping[str, Tensor], name: str, shape: torch.Size) -> Tensor:
    """Bool mask of the entries a tensor carries (all of them when it travels dense)."""
    if f"{name}.indices" not in tensors:
        return torch.ones(shape, dtype=torch.bool)
    mask = torch.zeros(math.prod(shape), dtype=torch.bool)
    mask[tensors[f"{name}.indices"].to(torch.int64)] = True
    return mask.reshape(shape)


@register("flasc", FLASCParams, CAPABILITIES)
def build(params: FLASCParams) -> FLASC:
    return FLASC(params)
