"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024, arXiv 2401.06432).

Server step: zero-pad every client to r_max, then average each factor with sparsity (norm) weights,

    ω_u = ‖S_u‖_F / Σ_v ‖S_v‖_F,  S_u = B̃_u A_u,   B = Σ ω_u B̃_u^pad,  A = Σ ω_u A_u^pad,

and send client u the truncation B[:, :r_u], A[:r_u, :]. ‖S_u‖_F² = ⟨B̃_uᵀB̃_u, A_uA_uᵀ⟩ comes from r×r Grams.
``weighting = "data"`` uses the aggregation weights w instead (zero-padded FedIT).

Client step: local training with the rank self-pruning regulariser λ‖B[:, γr:]‖·‖A[γr:, :]‖ on the tail ranks
(a ``Regularizer`` named "hetlora_tail" in the client's TrainPlan; the shared training loop applies it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedlora.methods import register
from fedlora.methods.base import Aggregated, Capabilities, FactorMethod
from fedlora.methods.fedit import fedit_factors
from fedlora.types import Adapter, LowRank, Regularizer


@dataclass(frozen=True)
class HetLoRAParams:
    """Hyperparameters (``method.*``) of HetLoRA."""

    weighting: Literal["norm", "data"] = "norm"
    reg_lambda: float = 0.0
    reg_gamma: float = 0.99

    def __post_init__(self) -> None:
        if self.weighting not in ("norm", "data"):
            raise ValueError(f"method.weighting = {self.weighting!r}: expected 'norm' or 'data'")
        if not self.reg_lambda >= 0:
            raise ValueError(f"method.reg_lambda = {self.reg_lambda}: expected a value >= 0")
        if not 0 < self.reg_gamma <= 1:
            raise ValueError(f"method.reg_gamma = {self.reg_gamma}: expected a value in (0, 1]")


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="native",
    writes_base=False,
    personalised=False,
    per_client_download=True,
    secure_aggregation=False,
    not_a_sum="it weights each client by the norm of its own B̃_u A_u",
    uplink="r_u(d+k)",
    downlink="r_u(d+k), client-specific truncation",
    paper="Cho et al., EMNLP 2024, arXiv 2401.06432",
)


def update_norms(adapters: Sequence[Adapter]) -> Tensor:
    """‖S_u‖_F over all modules, S_u = B̃_u A_u, from r×r Grams: sqrt(Σ_m ⟨B̃ᵀB̃, AAᵀ⟩)."""
    return torch.tensor([sum(map(_update_norm2, a.values())) ** 0.5 for a in adapters], dtype=torch.float64)


def _update_norm2(lr: LowRank) -> float:
    B, A = lr.B.double(), lr.A.double()
    return float(((B.T @ B) * (A @ A.T)).sum())


def norm_weights(adapters: Sequence[Adapter], weights: Tensor) -> Tensor:
    """ω_u ∝ ‖S_u‖_F; the data weights when every update is zero."""
    norms = update_norms(adapters)
    return norms / norms.sum() if float(norms.sum()) > 0 else weights


def hetlora(adapters: Sequence[Adapter], weights: Tensor, params: HetLoRAParams) -> Aggregated:
    omega = norm_weights(adapters, weights) if params.weighting == "norm" else weights
    return Aggregated(adapter=fedit_factors(adapters, omega), diagnostics={"weights": omega.tolist()})


@register("hetlora", HetLoRAParams, CAPABILITIES)
def build(params: HetLoRAParams) -> FactorMethod:
    regularizer = (
        Regularizer("hetlora_tail", {"lambda": params.reg_lambda, "gamma": params.reg_gamma})
        if params.reg_lambda > 0
        else None
    )
    return FactorMethod("hetlora", CAPABILITIES, hetlora, params, regularizer=regularizer)
