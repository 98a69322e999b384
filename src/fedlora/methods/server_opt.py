"""Server optimisers over named tensors, as pure functions with explicit state (FSLoRA, FLASC).

The averaged client delta Δ̄ is applied as a pseudo-gradient g = −Δ̄ (FedOpt, Reddi et al. 2021): with ``sgd`` and
lr = 1 the step is plain FedAvg, P ← P + Δ̄. ``adamw`` reproduces ``torch.optim.AdamW`` step for step (betas
(0.9, 0.999), eps 1e-8, decoupled weight decay, bias correction), which is what the official FSLoRA and FLASC code
call; the state (step count and both moments per tensor) lives in the method's server state, so the runner
checkpoints it and a resumed run continues with the same moments.

Math in float64; parameters come back at their own dtype, moments are kept in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from fedlora.types import Contribution

OptimizerName = Literal["adamw", "sgd"]
BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclass(frozen=True)
class ServerOptimizer:
    """Which optimiser, its learning rate and weight decay (AdamW: decoupled; SGD: L2 added to the gradient)."""

    name: OptimizerName
    lr: float
    weight_decay: float = 0.0


@dataclass(frozen=True)
class OptState:
    """AdamW's step count and first/second moments per tensor name (empty for SGD)."""

    step: int = 0
    exp_avg: Mapping[str, Tensor] = field(default_factory=dict)
    exp_avg_sq: Mapping[str, Tensor] = field(default_factory=dict)


def check_params(prefix: str, name: str, lr: float, weight_decay: float) -> None:
    """Errors naming ``method.<prefix>_*`` keys for a bad optimiser, learning rate or weight decay."""
    if name not in ("adamw", "sgd"):
        raise ValueError(f"method.{prefix}_optimizer = {name!r}: expected 'adamw' or 'sgd'")
    if not lr > 0:
        raise ValueError(f"method.{prefix}_lr = {lr}: expected a value > 0")
    if not weight_decay >= 0:
        raise ValueError(f"method.{prefix}_weight_decay = {weight_decay}: expected a value >= 0")


def step(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: OptState, opt: ServerOptimizer
) -> tuple[dict[str, Tensor], OptState]:
    """One optimiser step on every named tensor; inputs are not modified."""
    if set(params) != set(grads):
        raise ValueError(f"server optimiser: gradients for {sorted(set(params) ^ set(grads))[:4]} do not match")
    if opt.name == "sgd":
        out = {}
        for n, p in params.items():
            g = grads[n].double() + opt.weight_decay * p.double()
            out[n] = (p.double() - opt.lr * g).to(p.dtype)
        return out, OptState(state.step + 1)
    t = state.step + 1
    b1, b2 = BETAS
    new_p, m_out, v_out = {}, {}, {}
    for n, p in params.items():
        g, x = grads[n].double(), p.double()
        m = state.exp_avg.get(n, torch.zeros_like(x))
        v = state.exp_avg_sq.get(n, torch.zeros_like(x))
        x = x * (1 - opt.lr * opt.weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = v.sqrt() / (1 - b2**t) ** 0.5 + EPS
        new_p[n] = (x - (opt.lr / (1 - b1**t)) * m / denom).to(p.dtype)
        m_out[n], v_out[n] = m, v
    return new_p, OptState(t, m_out, v_out)


def check_deltas(contributions: Sequence[Contribution], method: str) -> None:
    """Uploads must be this round's deltas (meta ``delta``), not adapters: ``fedlora aggregate`` over adapter
    directories cannot run a method whose server step needs the round's download."""
    for c in contributions:
        if c.payload.meta.get("delta") is not True:
            raise ValueError(
                f"client {c.client}: {method} aggregates the deltas its clients upload after training from this "
                "round's download (meta 'delta'); this upload is not one (adapter directories cannot be aggregated "
                f"with {method})"
            )


def extras_delta(contribution: Contribution, extras: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``extra.<name>`` -> trained value − the server's value, for one client's fully trained tensors (the head)."""
    sent = {n[len("extra.") :]: t for n, t in contribution.payload.tensors.items() if n.startswith("extra.")}
    if set(sent) != set(extras):
        raise ValueError(
            f"client {contribution.client}: sent fully trained tensors {sorted(sent)}, expected {sorted(extras)}"
        )
    return {f"extra.{n}": sent[n].double() - extras[n].double() for n in extras}


def pseudo_gradient_step(
    params: Mapping[str, Tensor],
    deltas: Sequence[Mapping[str, Tensor]],
    weights: Tensor,
    state: OptState,
    opt: ServerOptimizer,
) -> tuple[dict[str, Tensor], OptState]:
    """g = −Σ_u w_u Δ_u for every named tensor, then one optimiser step."""
    grads = {n: -sum(float(w) * d[n].double() for w, d in zip(weights, deltas, strict=True)) for n in params}
    return step(params, grads, state, opt)
