"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024,
arXiv 2305.05644).

Server step: every LoRA factor is averaged on its own,

    B̄ = Σ_u w_u B̃_u,   Ā = Σ_u w_u A_u,   ΔW = B̄ Ā  (≠ Σ_u w_u B̃_u A_u: the cross terms are its error).

Clients warm-start from (B̄, Ā). Heterogeneous ranks (fedlora's policy, not the paper's): zero-pad every
client to r_max (B gets zero columns, A zero rows), average, and truncate to each client's rank on download.
On DoRA the directional factors are averaged and the magnitudes averaged as extras; on HiRA (ΔW = W0 ⊙ BA, s = 1)
the inner factors are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from fedlora.linalg import weighted_mean
from fedlora.methods import register
from fedlora.methods.base import Aggregated, Capabilities, FactorMethod
from fedlora.types import Adapter, LowRank


@dataclass(frozen=True)
class FedITParams:
    """FedIT has no hyperparameters."""


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="zero-pad",
    writes_base=False,
    personalised=False,
    per_client_download=False,
    secure_aggregation=True,
    uplink="r(d+k)",
    downlink="r(d+k)",
    paper="Zhang et al., ICASSP 2024, arXiv 2305.05644",
    variants=("lora", "dora", "hira"),
)


def pad_to_max_rank(adapters: Sequence[Adapter]) -> list[dict[str, LowRank]]:
    """Zero-pad every client's modules to the largest rank among clients (ΔW unchanged)."""
    r_max = {m: max(a[m].rank for a in adapters) for m in adapters[0]}
    return [{m: lr.pad(r_max[m]) for m, lr in a.items()} for a in adapters]


def fedit_factors(adapters: Sequence[Adapter], weights: Tensor) -> dict[str, LowRank]:
    """(Σ w_u B̃_u, Σ w_u A_u) per module, after zero-padding to r_max."""
    padded = pad_to_max_rank(adapters)
    return {
        m: LowRank(weighted_mean([a[m].B for a in padded], weights), weighted_mean([a[m].A for a in padded], weights))
        for m in padded[0]
    }


def fedit(adapters: Sequence[Adapter], weights: Tensor, params: FedITParams) -> Aggregated:
    return Aggregated(adapter=fedit_factors(adapters, weights))


@register("fedit", FedITParams, CAPABILITIES)
def build(params: FedITParams) -> FactorMethod:
    return FactorMethod("fedit", CAPABILITIES, fedit, params)
