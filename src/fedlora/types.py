"""Values exchanged between the math, the methods and the edges (PEFT, Flower, the runner).

Everything here is a frozen dataclass over tensors. Inside fedlora every adapter update is held in the
*canonical form* of conventions.md §2: per adapted module, ΔW = B̃ A in (out, in) orientation, with the LoRA
scale folded into B̃ = s·B (s = α/r, or α/√r with rsLoRA; s = 1 for HiRA). GPT-2 Conv1D layouts are
transposed at the PEFT edge (``fedlora.peft_io``) and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

Factor = Literal["A", "B", "C", "R"]
"""A, B: the LoRA factors; C: the r×r core of a tri-factor adapter ΔW = s·B·C·A (``TrainPlan.cores``); R: the
router of a mixture of experts (``fedlora.mixture``, described by the plan's extras)."""


CORE_SUFFIX = ".lora_core"
"""Extras name of a trained tri-factor core: ``<module>.lora_core`` (r, r), as DoRA magnitudes are
``<module>.lora_magnitude_vector``."""

UNFOLDED_B_SUFFIX = ".lora_B_without_core"
"""Extras name of a trained B̃ (canonical, d × r) before its core is folded in, returned when a tri-factor plan
trains B as well as C: ``<module>.lora_B_without_core``."""

FEATURE_MEAN, FEATURE_VAR = "data.feature_mean", "data.feature_var"
"""Extras names of a plan's feature statistics (``TrainPlan.feature_statistics``)."""


@dataclass(frozen=True)
class LowRank:
    """One module's update ΔW = B @ A in canonical form.

    B: (d, r) with the LoRA scale folded in; A: (r, k). d = out_features, k = in_features.
    """

    B: Tensor
    A: Tensor

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2:
            raise ValueError(f"LowRank needs 2-D factors, got B{tuple(self.B.shape)} and A{tuple(self.A.shape)}")
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LowRank rank mismatch: B is {tuple(self.B.shape)} (d, r) but A is {tuple(self.A.shape)} (r, k)"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (d, k) of the dense update."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self) -> Tensor:
        """ΔW = B A, (d, k). For tests and edges only: the math never needs it."""
        return self.B @ self.A

    def truncate(self, rank: int) -> LowRank:
        """Keep the first ``rank`` components (B's columns, A's rows)."""
        return LowRank(self.B[:, :rank], self.A[:rank, :])

    def pad(self, rank: int) -> LowRank:
        """Zero-pad to ``rank`` (B gets zero columns, A zero rows); ΔW is unchanged."""
        extra = rank - self.rank
        if extra < 0:
            raise ValueError(f"cannot pad a rank-{self.rank} update down to rank {rank}")
        if extra == 0:
            return self
        B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], extra)], dim=1)
        A = torch.cat([self.A, self.A.new_zeros(extra, self.A.shape[1])], dim=0)
        return LowRank(B, A)

    def scaled(self, c: float) -> LowRank:
        """c·ΔW, with the factor applied to B."""
        return LowRank(self.B * c, self.A)


Adapter = Mapping[str, LowRank]
"""Module path (as ``fedlora.peft_io`` names it) -> canonical update."""


@dataclass(frozen=True)
class BaseEdit:
    """A delta added to frozen base weights: W0[m] += left[m] @ right[m] in (out, in) orientation.

    ``version`` is the round that produced it; a client replays every edit newer than the last it applied, so
    clients that skip rounds catch up (methods.md §19.7). A module's delta travels factored (``factored``) when
    that is smaller than dense, and as a dense (d, k) tensor (``dense``) otherwise.
    """

    version: int
    factored: Mapping[str, LowRank] = field(default_factory=dict)
    dense: Mapping[str, Tensor] = field(default_factory=dict)

    def modules(self) -> set[str]:
        return set(self.factored) | set(self.dense)

    def delta(self, module: str) -> Tensor:
        """The dense (d, k) delta of one module (edges and tests only): its factored part plus its dense part (an
        edit read back from a file may hold both, e.g. base edits inherited by ``fedlora aggregate`` and its own)."""
        parts = [self.factored[module].dense()] if module in self.factored else []
        parts += [self.dense[module]] if module in self.dense else []
        if not parts:
            raise KeyError(f"base edit version {self.version} has no module {module!r}")
        return parts[0] if len(parts) == 1 else parts[0] + parts[1].to(parts[0].dtype)


@dataclass(frozen=True)
class Payload:
    """What travels in one direction for one client: named tensors plus small scalars.

    Communication is measured from payloads, never assumed: ``nbytes`` counts every tensor at its dtype,
    including sparse indices and base edits.
    """

    tensors: Mapping[str, Tensor] = field(default_factory=dict)
    meta: Mapping[str, int | float | str | bool] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class Regularizer:
    """A named training-time penalty added to the client's loss (e.g. HetLoRA's tail-rank norm)."""

    name: str
    params: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainPlan:
    """A client's instructions for one round, as data: the shared training loop reads it, methods never
    subclass a trainer.

    rank: the adapter rank to train this round.
    adapter: initial canonical factors per module, or None for a fresh PEFT initialisation (A Kaiming, B = 0).
    extras: initial values of fully trained tensors (the classifier head); those absent keep the local value.
    base_edits: deltas to add to the frozen base weights before training, in version order.
    trainable: which LoRA factors receive gradients.
    regularizer: an optional named penalty.
    grad_masks: optional elementwise masks per module, (A mask (r, k), B mask (d, r)) in PEFT's factor shapes
        (1/True: the entry trains, 0/False: it stays bit-identical to its initial value). The shared loop zeroes
        the masked gradients before clipping and restores the masked entries after every optimizer step, so
        neither AdamW's weight decay nor its moments move them (FLASC's ``freeze_to_mask``).
    cores: optional r×r core C per module for a tri-factor adapter ΔW = B̃·C·A (B̃ canonical, scale folded in;
        C unscaled); ``"C"`` in ``trainable`` trains it. Training returns each trained core as the extra
        ``<module>.lora_core`` and the adapter with C folded into B̃ (B̃·C), so that evaluation and saving see a
        plain LoRA update; when B trains too, its own B̃ comes back as the extra ``<module>.lora_B_without_core``.
    task: in a multi-task federation, train on this task's examples only (None: on all of the client's).
    feature_statistics: before training, measure the client's training examples under the model as loaded: the
        mean and variance over examples of the mean-pooled last hidden state, returned as the extras
        ``data.feature_mean`` and ``data.feature_var`` (h,) (CE-LoRA's data-space similarity).

    Extras may also describe a mixture of LoRA experts around the adapter (``fedlora.mixture``); ``"R"`` in
    ``trainable`` trains its router, returned as ``<module>.lora_router``.
    """

    rank: int
    adapter: Adapter | None
    extras: Mapping[str, Tensor] = field(default_factory=dict)
    base_edits: tuple[BaseEdit, ...] = ()
    trainable: frozenset[Factor] = frozenset({"A", "B"})
    regularizer: Regularizer | None = None
    grad_masks: Mapping[str, tuple[Tensor, Tensor]] | None = None
    cores: Mapping[str, Tensor] | None = None
    task: int | None = None
    feature_statistics: bool = False


@dataclass(frozen=True)
class Contribution:
    """One client's reply as the server sees it: who, its normalised aggregation weight, its upload."""

    client: int
    weight: float
    payload: Payload


@dataclass(frozen=True)
class ModuleError:
    """Aggregation error of one module against the ideal update M = Σ w_u B̃_u A_u.

    Relative errors are divided by ``scale`` = max(‖M‖_F, 1e-6·Σ_u w_u‖B̃_uA_u‖_F) (``linalg.error_scale``): that
    is ‖M‖_F unless M is a near-total cancellation of the clients' updates, where dividing by ‖M‖ would explode
    (and a zero M would hide a nonzero error).

    divergence: ‖M − ΔW_applied‖_F / scale (0 for exact methods); error: ‖M − ΔW_applied‖_F itself.
    eckart_young: ‖M − M_r‖_F / scale with M_r the best update of the broadcast rank r.
    fedit: the divergence FedIT's ΣwB·ΣwA would have (the reference every method is compared with).
    ideal_norm: ‖M‖_F.
    """

    divergence: float
    eckart_young: float
    fedit: float
    ideal_norm: float
    error: float
    scale: float


@dataclass(frozen=True)
class AggregationReport:
    """What every aggregation measures: per-module and overall errors, bytes per client each way.

    bytes_up: what each contributing client uploaded; bytes_down: what it downloads at the start of the next
    round (global factors at its rank, head, base edits it has not seen). diagnostics: the rule's own numbers
    (FLoRA-NA's p, q per module, HetLoRA's weights). client_balance: per client ‖B̃‖_F / ‖A‖_F.
    """

    modules: Mapping[str, ModuleError]
    bytes_up: Mapping[int, int] = field(default_factory=dict)
    bytes_down: Mapping[int, int] = field(default_factory=dict)
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    client_balance: Sequence[float] = ()

    def _overall(self, attr: str) -> float:
        """sqrt(Σ_m (err_m·scale_m)²) / sqrt(Σ_m scale_m²): the relative error of all modules taken together."""
        num = sum((getattr(e, attr) * e.scale) ** 2 for e in self.modules.values() if e.scale > 0)
        den = sum(e.scale**2 for e in self.modules.values())
        if den > 0:
            return float((num / den) ** 0.5)
        return 0.0 if all(getattr(e, attr) == 0 for e in self.modules.values()) else math.inf

    @property
    def divergence(self) -> float:
        """Overall relative divergence: sqrt(Σ_m ‖M_m − ΔW_m‖²) / sqrt(Σ_m scale_m²)."""
        return self._overall("divergence")

    @property
    def error(self) -> float:
        """Overall absolute divergence sqrt(Σ_m ‖M_m − ΔW_m‖²)."""
        return float(sum(e.error**2 for e in self.modules.values()) ** 0.5)

    @property
    def eckart_young(self) -> float:
        return self._overall("eckart_young")

    @property
    def fedit(self) -> float:
        return self._overall("fedit")


@dataclass
class RunState:
    """Where a run stands, and what a checkpoint holds: the next round, the method's server state, the client
    states the server keeps (in process: every client's; on Flower: None, or what nodes report), the metrics
    records so far, and with ``output.keep = "best"`` the best round's global model. Mutable: the engines advance
    it round by round."""

    next_round: int
    server: Any
    clients: dict[int, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    best: Any = None  # output.keep = "best": the best round so far and its global model (fedlora.keep.Best)
