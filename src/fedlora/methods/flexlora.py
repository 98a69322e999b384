"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024, arXiv 2402.11505).

Server step, per module: the truncated SVD of the ideal update,

    M = Σ_u w_u B̃_u A_u = U Σ Vᵀ,   client u receives B = U_{r_u} Σ_{r_u},  A = V_{r_u}ᵀ,

the best rank-r_u approximation of M (Eckart–Young); the edge divides B by the client's scale s_u, as in the
paper's B = U_r Σ_r / (α/r). fedlora never forms a d×k matrix for it while Σ r_u ≲ 0.8·min(d, k): a QR of each
stacked factor and an SVD of the small core (``fedlora.linalg.ideal_svd``). ``split = "sqrt"`` gives
B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from fedlora.linalg import truncated_svd
from fedlora.methods import register
from fedlora.methods.base import Aggregated, Capabilities, FactorMethod
from fedlora.types import Adapter


@dataclass(frozen=True)
class FlexLoRAParams:
    """Hyperparameters (``method.*``) of FlexLoRA."""

    split: Literal["sigma_left", "sqrt"] = "sigma_left"

    def __post_init__(self) -> None:
        if self.split not in ("sigma_left", "sqrt"):
            raise ValueError(f"method.split = {self.split!r}: expected 'sigma_left' or 'sqrt'")


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="native",
    writes_base=False,
    personalised=False,
    per_client_download=True,
    secure_aggregation=False,
    not_a_sum="its SVD of Σ w_u B̃_u A_u needs each client's product",
    uplink="r_u(d+k)",
    downlink="r_u(d+k), client-specific truncation",
    paper="Bai et al., NeurIPS 2024, arXiv 2402.11505",
)


def flexlora(adapters: Sequence[Adapter], weights: Tensor, params: FlexLoRAParams) -> Aggregated:
    r_max = {m: max(a[m].rank for a in adapters) for m in adapters[0]}
    adapter = {
        m: truncated_svd([a[m].B for a in adapters], [a[m].A for a in adapters], weights, r_max[m], params.split)[0]
        for m in adapters[0]
    }
    return Aggregated(adapter=adapter)


@register("flexlora", FlexLoRAParams, CAPABILITIES)
def build(params: FlexLoRAParams) -> FactorMethod:
    return FactorMethod("flexlora", CAPABILITIES, flexlora, params)
