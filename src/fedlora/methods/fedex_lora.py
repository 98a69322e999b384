"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Large Language Models", ACL 2025, arXiv 2410.09432).

Server step, per module: FedIT's factors plus the exact residual folded into the frozen base weights,

    B̄ = Σ w_u B̃_u,  Ā = Σ w_u A_u,  R = M − B̄Ā,   W0 ← W0 + R,   broadcast (B̄, Ā),

so W0 + R + B̄Ā = W0 + M exactly. The residual travels factored,
R = [w_1 B̃_1 … w_U B̃_U, −B̄] [A_1; …; A_U; Ā] (rank ≤ (U+1)r), whenever (U+1)r(d+k) < d·k, and dense
otherwise (the official code always sends it dense). The official code averages uniformly; fedlora uses the
aggregation weights w (uniform when chosen so). The residual is never transposed here: layouts are handled
once, at the PEFT edge (the official code transposes it for nn.Linear too, which is wrong; methods.md §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.methods import register
from fedlora.methods.base import Aggregated, Capabilities, FactorMethod
from fedlora.methods.fedit import fedit_factors
from fedlora.types import Adapter, LowRank


@dataclass(frozen=True)
class FedExLoRAParams:
    """FedEx-LoRA has no hyperparameters."""


CAPABILITIES = Capabilities(
    exact=True,
    heterogeneous_ranks="no",
    writes_base=True,
    personalised=False,
    per_client_download=False,
    secure_aggregation=False,
    not_a_sum="its residual Σ w_u B̃_u A_u − B̄Ā needs each client's product",
    uplink="r(d+k)",
    downlink="r(d+k) + min((U+1)r(d+k), d·k) residual",
    paper="Singhal et al., ACL 2025, arXiv 2410.09432",
)


def residual(adapters: Sequence[Adapter], weights: Tensor, mean: dict[str, LowRank]) -> dict[str, LowRank]:
    """R = M − B̄Ā per module, exactly, as [w_1 B̃_1 … w_U B̃_U, −B̄][A_1; …; A_U; Ā]."""
    return {
        m: LowRank(
            torch.cat([float(w) * a[m].B for w, a in zip(weights, adapters, strict=True)] + [-mean[m].B], dim=1),
            torch.cat([a[m].A for a in adapters] + [mean[m].A], dim=0),
        )
        for m in adapters[0]
    }


def fedex_lora(adapters: Sequence[Adapter], weights: Tensor, params: FedExLoRAParams) -> Aggregated:
    mean = fedit_factors(adapters, weights)
    return Aggregated(adapter=mean, base_delta=residual(adapters, weights, mean))


@register("fedex_lora", FedExLoRAParams, CAPABILITIES)
def build(params: FedExLoRAParams) -> FactorMethod:
    return FactorMethod("fedex_lora", CAPABILITIES, fedex_lora, params)
