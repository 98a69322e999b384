"""LoRA-FAIR (Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025, arXiv 2411.14961).

Server step per module (methods.md §8): FedIT's factors B̄ = Σ w_u B̃_u, Ā = Σ w_u A_u, then a residual
correction of B,

    ΔB = argmin_ΔB  S(M, (B̄ + ΔB)Ā) + λ‖ΔB‖_F,    S(M, Y) = 1 − ⟨M, Y⟩ / (‖M‖_F ‖Y‖_F),

with M = Σ w_u B̃_u A_u the ideal update, and clients warm-start from (B̄ + ΔB, Ā) ("Avg-Initial"). W0 is
unchanged; traffic is FedIT's. Everything comes from factors, no d×k matrix: with X = B̄ + ΔB,

    ⟨M, XĀ⟩ = ⟨X, P⟩,  P = Σ_u w_u B̃_u (A_u Āᵀ)  (d × r);   ‖XĀ‖² = ⟨XᵀX, G⟩,  G = ĀĀᵀ;
    ‖M‖² = ⟨B_wᵀB_w, A_sA_sᵀ⟩ from the weighted stacks.

Solver (fedlora's reading; the paper says "SGD on the server" without a published iteration count or rate, and
its objective has no data to sample, so the "stochastic" gradient is the full gradient): ``method.steps``
proximal-gradient iterations from ΔB = 0. Each takes a gradient step on S and the exact proximal step of
λ‖·‖_F (block soft-thresholding of ΔB), starting at step size ``method.lr``; a step that does not lower the
objective is halved (up to 40 times, then the solver stops) and an accepted step doubles the next trial size, so
the solver adapts to the scale of B̃ (the LoRA scale is folded into it) and never increases the objective: the
result is never worse than FedIT's B̄ for the objective it minimises. The regulariser is the Frobenius norm, not
its square, as the paper writes λ‖ΔB‖: when λ exceeds ‖∇S‖ at ΔB = 0 the correction is exactly zero (FedIT).
Defaults: λ = 0.01 (the paper's), steps = 100, lr = 0.01 (fedlora's choices). Equal client ranks only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from fedlora import linalg
from fedlora.linalg import F64
from fedlora.methods import register
from fedlora.methods.base import Aggregated, Capabilities, FactorMethod
from fedlora.methods.fedit import fedit_factors
from fedlora.types import Adapter, LowRank

MAX_HALVINGS = 40


@dataclass(frozen=True)
class LoRAFAIRParams:
    """lam: λ of the ‖ΔB‖_F penalty (>= 0); steps: solver iterations (>= 0, 0 is FedIT); lr: initial step (> 0)."""

    lam: float = 0.01
    steps: int = 100
    lr: float = 0.01

    def __post_init__(self) -> None:
        if not (isinstance(self.lam, int | float) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"method.lam = {self.lam!r}: expected a finite number >= 0 (the ‖ΔB‖ penalty weight)")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"method.steps = {self.steps!r}: expected an integer >= 0 (server solver iterations)")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"method.lr = {self.lr!r}: expected a finite number > 0 (the solver's initial step)")


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="no",
    writes_base=False,
    personalised=False,
    per_client_download=False,
    secure_aggregation=False,
    not_a_sum="its correction of B̄ needs each client's product B̃_u A_u",
    uplink="r(d+k)",
    downlink="r(d+k)",
    paper="Bian et al., ICCV 2025, arXiv 2411.14961",
)


@dataclass(frozen=True)
class Problem:
    """The correction problem of one module, in float64: P = Σ w B̃_u A_u Āᵀ, G = ĀĀᵀ, ‖M‖, B̄, λ."""

    P: Tensor
    G: Tensor
    norm_m: float
    B_bar: Tensor
    lam: float

    def cosine(self, X: Tensor) -> float:
        n2 = float(((X.T @ X) * self.G).sum())
        if n2 <= 0 or self.norm_m == 0:
            return 0.0
        return float((X * self.P).sum()) / (self.norm_m * math.sqrt(n2))

    def objective(self, X: Tensor) -> float:
        """S(M, XĀ) + λ‖X − B̄‖_F."""
        return 1.0 - self.cosine(X) + self.lam * float((X - self.B_bar).norm())

    def grad(self, X: Tensor) -> Tensor:
        """∇_X of S(M, XĀ) = −[P/n − ⟨X, P⟩ XG/n³] / ‖M‖ with n = ‖XĀ‖."""
        n = math.sqrt(float(((X.T @ X) * self.G).sum()))
        inner = float((X * self.P).sum())
        return -(self.P / n - inner * (X @ self.G) / n**3) / self.norm_m


def problem(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor, B_bar: Tensor, A_bar: Tensor, lam: float
) -> Problem:
    """The factored data of one module's correction problem (no d×k matrix)."""
    Ab = A_bar.to(F64)
    P = sum(float(w) * B.to(F64) @ (A.to(F64) @ Ab.T) for w, B, A in zip(weights, Bs, As, strict=True))
    Bw, A_stack = linalg.weighted_stacks(Bs, As, weights)
    energy = float(((Bw.T @ Bw) * (A_stack @ A_stack.T)).sum())
    return Problem(P, Ab @ Ab.T, math.sqrt(max(energy, 0.0)), B_bar.to(F64), float(lam))  # type: ignore[arg-type]


def solve(prob: Problem, steps: int, lr: float) -> tuple[Tensor, dict[str, float]]:
    """Proximal gradient with halving/doubling steps from X = B̄; returns X = B̄ + ΔB and diagnostics."""
    X = prob.B_bar.clone()
    start = f = prob.objective(X)
    degenerate = prob.norm_m == 0 or float(((X.T @ X) * prob.G).sum()) <= 0
    eta, done = lr, 0
    for _ in range(0 if degenerate else steps):
        g = prob.grad(X)
        for _ in range(MAX_HALVINGS):
            V = X - eta * g - prob.B_bar
            norm = float(V.norm())
            shrink = max(0.0, 1.0 - eta * prob.lam / norm) if norm > 0 else 0.0
            candidate = prob.B_bar + shrink * V
            f_new = prob.objective(candidate)
            if f_new < f and math.isfinite(f_new):
                X, f = candidate, f_new
                eta *= 2.0
                break
            eta /= 2.0
        else:
            break
        done += 1
    return X, {"objective_fedit": start, "objective": f, "cosine": prob.cosine(X), "iterations": done}


def lora_fair(adapters: Sequence[Adapter], weights: Tensor, params: LoRAFAIRParams) -> Aggregated:
    mean = fedit_factors(adapters, weights)
    out, diagnostics = {}, {}
    for m, lr in mean.items():
        prob = problem([a[m].B for a in adapters], [a[m].A for a in adapters], weights, lr.B, lr.A, params.lam)
        X, diagnostics[m] = solve(prob, params.steps, params.lr)
        out[m] = LowRank(X.to(lr.B.dtype), lr.A)
    return Aggregated(adapter=out, diagnostics=diagnostics)


@register("lora_fair", LoRAFAIRParams, CAPABILITIES)
def build(params: LoRAFAIRParams) -> FactorMethod:
    return FactorMethod("lora_fair", CAPABILITIES, lora_fair, params)
