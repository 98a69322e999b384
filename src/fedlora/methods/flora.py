"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024, arXiv 2409.05976).

Server step: stack the clients' factors along the rank axis (any ranks),

    B_stack = [B̃_1 … B̃_U] (d × Σr_u),   A_stack = [w_1 A_1; …; w_U A_U] (Σr_u × k),
    B_stack A_stack = Σ_u w_u B̃_u A_u = M   (exact),

and merge it into every client's base weights (W0 ← W0 + M, a base edit). Each client then restarts from a
fresh PEFT initialisation (B = 0) at its own rank. The per-client scale s_u is folded into B̃_u before
stacking (canonical form), so the merge uses scale 1 (methods.md §3).

The stack travels factored, (Σ r_u)(d + k) scalars per module, while that is smaller than d·k, and dense
otherwise; clients that skip rounds receive every edit they missed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.methods import register
from fedlora.methods.base import Aggregated, Capabilities, FactorMethod
from fedlora.types import Adapter, LowRank


@dataclass(frozen=True)
class FLoRAParams:
    """FLoRA has no hyperparameters."""


CAPABILITIES = Capabilities(
    exact=True,
    heterogeneous_ranks="native",
    writes_base=True,
    personalised=False,
    per_client_download=False,
    secure_aggregation=False,
    not_a_sum="it stacks every client's factors B̃_u, A_u into the base edit",
    uplink="r_u(d+k)",
    downlink="min((Σ_u r_u)(d+k), d·k) base edit; the adapter restarts from a fresh init",
    paper="Wang et al., NeurIPS 2024, arXiv 2409.05976",
)


def stack(adapters: Sequence[Adapter], weights: Tensor) -> dict[str, LowRank]:
    """Per module, the exact factorisation [B̃_1 … B̃_U][w_1 A_1; …; w_U A_U] of M."""
    return {
        m: LowRank(
            torch.cat([a[m].B for a in adapters], dim=1),
            torch.cat([float(w) * a[m].A for w, a in zip(weights, adapters, strict=True)], dim=0),
        )
        for m in adapters[0]
    }


def flora(adapters: Sequence[Adapter], weights: Tensor, params: FLoRAParams) -> Aggregated:
    return Aggregated(adapter=None, base_delta=stack(adapters, weights))


@register("flora", FLoRAParams, CAPABILITIES)
def build(params: FLoRAParams) -> FactorMethod:
    return FactorMethod("flora", CAPABILITIES, flora, params)
