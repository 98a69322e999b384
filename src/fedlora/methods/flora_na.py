"""FLoRA-NA (Nguyen et al., "Communication-Efficient and Accurate Approach for Aggregation in Federated Low-Rank
Adaptation", arXiv 2509.26399).

Server step, per adapted module (or with one (p, q) shared by all modules):

    (p, q) = argmin ‖(Σ_u p_u B̃_u)(Σ_v q_v A_v) − M‖_F,   M = Σ_u t_u B̃_u A_u,
    broadcast B̂ = Σ_u p_u B̃_u,  Â = Σ_v q_v A_v,

at FedIT's communication cost; the residual M − B̂Â is discarded (folding it into W0 would be FedEx-LoRA).

fedlora's reading where the paper is silent (methods.md §1.2–1.3, conventions.md §3):
* target t = w (weighted mean, default) or U·w (``target = "sum"``, what the abstract writes);
* solver: Gram blocks in float64, 2 ALS sweeps from FedIT, then saddle-free Newton with an exact quartic line
  search (``solver = "newton"``); ``"als"`` and ``"adam"`` (dense baseline) for comparison. All start from FedIT
  (p = q = w) and never return a worse point;
* gauge: (p, q) → (c p, q / c) leaves B̂Â unchanged; c makes ‖B̂‖/‖Â‖ equal FedIT's ratio (default) or 1;
* heterogeneous ranks: zero-pad to r_max and truncate on download (an extension the paper does not claim);
* route: Gram blocks while U·r ≤ 1.5·min(d, k), the factor-space oracle beyond (same optimum);
* adapter variants (``model.lora.variant``): on DoRA the directional part s·B·A is aggregated here and the
  magnitude vectors are averaged like the head (they are extras); on HiRA (ΔW = W0 ⊙ BA, s = 1) the inner B·A
  is aggregated, so the applied update is W0 ⊙ B̂Â.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedlora.coefficients import (
    FactorOracle,
    GramOracle,
    Oracle,
    Point,
    Scaling,
    Solution,
    SumOracle,
    better,
    client_scaling,
    rescale,
    solve,
    solve_adam,
    to_array,
)
from fedlora.methods import register
from fedlora.methods.base import Aggregated, Capabilities, FactorMethod, target_weights
from fedlora.methods.fedit import pad_to_max_rank
from fedlora.types import Adapter, LowRank

ROUTE_RATIO = 1.5
RESTART_MAX_N = 64
"""Restarts run only while n = U·r ≤ RESTART_MAX_N, where 18 starts cost ~0.1 s a module; at n = 128–768 they
measured 4–30 s (docs/benchmarks.md). Local minima occur at any n (even U = 2 with sign-flipped optima)."""


@dataclass(frozen=True)
class FLoRANAParams:
    """Hyperparameters (``method.*``) of FLoRA-NA."""

    solver: Literal["newton", "als", "adam"] = "newton"
    target: Literal["weighted_mean", "sum"] = "weighted_mean"
    shared_coefficients: bool = False
    gauge: Literal["fedit_ratio", "balanced"] = "fedit_ratio"
    route: Literal["auto", "gram", "factor"] = "auto"
    max_iter: int = 100
    tol: float = 1e-12
    ridge: float = 0.0
    adam_steps: int = 500
    restarts: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {
            "solver": ("newton", "als", "adam"),
            "target": ("weighted_mean", "sum"),
            "gauge": ("fedit_ratio", "balanced"),
            "route": ("auto", "gram", "factor"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"method.{key} = {getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        for key in ("max_iter", "adam_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"method.{key} = {getattr(self, key)!r}: expected an integer >= 1")
        if self.solver == "adam" and (self.shared_coefficients or self.route != "auto"):
            raise ValueError(
                "method.solver = 'adam' is the dense baseline: method.shared_coefficients and method.route do not "
                f"apply to it (got {self.shared_coefficients}, {self.route!r})"
            )
        if not isinstance(self.restarts, int) or self.restarts < 0 or not isinstance(self.seed, int):
            raise ValueError(
                f"method.restarts = {self.restarts!r}, method.seed = {self.seed!r}: expected integers, restarts >= 0"
            )
        if not self.tol >= 0 or not self.ridge >= 0:
            raise ValueError(f"method.tol = {self.tol}, method.ridge = {self.ridge}: expected values >= 0")


CAPABILITIES = Capabilities(
    exact=False,
    heterogeneous_ranks="zero-pad",
    writes_base=False,
    personalised=False,
    per_client_download=False,
    secure_aggregation=False,
    not_a_sum="it solves its coefficients from each client's factors (Gram blocks of B̃_u and A_u)",
    uplink="r(d+k)",
    downlink="r(d+k)",
    paper="Nguyen et al., arXiv 2509.26399",
    variants=("lora", "dora", "hira"),
)


def oracle(
    Bs: Sequence[Tensor], As: Sequence[Tensor], t: Tensor, route: str = "auto", scale: Scaling | None = None
) -> Oracle:
    """The Gram oracle while n = U·r ≤ 1.5·min(d, k), the factor-space oracle beyond (or as forced)."""
    n, d, k = len(Bs) * Bs[0].shape[1], Bs[0].shape[0], As[0].shape[1]
    if route == "gram" or (route == "auto" and n <= ROUTE_RATIO * min(d, k)):
        return GramOracle(Bs, As, t, scale)
    return FactorOracle(Bs, As, t, scale)


def restarts_for(U: int, Bs: Sequence[Tensor], params: FLoRANAParams) -> int:
    """Random restarts for one module: ``params.restarts`` while n = U·r ≤ RESTART_MAX_N (cheap), 0 beyond."""
    return params.restarts if U * Bs[0].shape[1] <= RESTART_MAX_N else 0


def _solve(o: Oracle, start: tuple, params: FLoRANAParams, restarts: int) -> Solution:
    return solve(o, start, params.solver, params.max_iter, params.tol, params.ridge, restarts, params.seed)


def _combine(Bs: Sequence[Tensor], As: Sequence[Tensor], p: Tensor, q: Tensor) -> LowRank:
    B = torch.einsum("u,udr->dr", p, torch.stack([b.to(torch.float64) for b in Bs]))
    A = torch.einsum("u,urk->rk", q, torch.stack([a.to(torch.float64) for a in As]))
    return LowRank(B.to(Bs[0].dtype), A.to(As[0].dtype))


Factors = tuple[list[Tensor], list[Tensor]]


def _adam(o: Oracle, scale: Scaling, factors: Factors, t: Tensor, w: Tensor, params: FLoRANAParams) -> Solution:
    """The dense baseline, returned by the same best-point rule as the other solvers (in float64: never worse
    than FedIT)."""
    sol = solve_adam(*factors, t, w, params.adam_steps)[0]
    start = scale.inner(to_array(w), to_array(w))
    fedit = Point(o.f(*start), *start)
    found = scale.inner(sol.p, sol.q)
    best = better(fedit, Point(o.f(*found), *found))
    return Solution(best.p, best.q, best.f, fedit.f, sol.iterations)


def _gauged(o: Oracle, scale: Scaling, sol: Solution, w: Tensor, rule: str) -> tuple[Tensor, Tensor]:
    """Outer (p, q) with ‖B̂‖_F / ‖Â‖_F = FedIT's ‖Σ w B̃‖_F / ‖Σ w A‖_F ("fedit_ratio") or 1 ("balanced"), and
    ⟨B̂, Σ w B̃⟩ ≥ 0 (the sign of the gauge)."""
    fedit = scale.inner(to_array(w), to_array(w))
    tb, ta = o.traces(*fedit)
    ratio = math.sqrt(tb / ta) if rule == "fedit_ratio" and tb > 0 and ta > 0 else 1.0
    gauged = rescale(o, sol.p, sol.q, ratio, toward=fedit[0])
    return tuple(torch.from_numpy(x) for x in scale.outer(*gauged))  # type: ignore[return-value]


def flora_na(adapters: Sequence[Adapter], weights: Tensor, params: FLoRANAParams) -> Aggregated:
    padded = pad_to_max_rank(adapters)
    t = target_weights(weights, params)
    w = weights.to(torch.float64)
    factors = {m: ([a[m].B for a in padded], [a[m].A for a in padded]) for m in padded[0]}
    shared = client_scaling(list(factors.values()), t) if params.shared_coefficients else None
    scales = {m: shared or client_scaling([f], t) for m, f in factors.items()}
    oracles = {m: oracle(*f, t, params.route, scales[m]) for m, f in factors.items()}
    restarts = {m: restarts_for(len(padded), Bs, params) for m, (Bs, _) in factors.items()}
    if params.solver == "adam":
        solutions = {m: _adam(oracles[m], scales[m], f, t, w, params) for m, f in factors.items()}
    elif shared is not None:
        start = shared.inner(to_array(w), to_array(w))
        one = _solve(SumOracle(list(oracles.values())), start, params, max(restarts.values()))
        solutions = dict.fromkeys(oracles, one)
    else:
        starts = {m: scales[m].inner(to_array(w), to_array(w)) for m in oracles}
        solutions = {m: _solve(o, starts[m], params, restarts[m]) for m, o in oracles.items()}
    adapter, diagnostics = {}, {}
    for m, (Bs, As) in factors.items():
        sol = solutions[m]
        p, q = _gauged(oracles[m], scales[m], sol, w, params.gauge)
        adapter[m] = _combine(Bs, As, p, q)
        diagnostics[m] = {"p": p.tolist(), "q": q.tolist(), "iterations": sol.iterations, "starts": sol.starts}
    return Aggregated(adapter=adapter, diagnostics=diagnostics)


@register("flora_na", FLoRANAParams, CAPABILITIES)
def build(params: FLoRANAParams) -> FactorMethod:
    return FactorMethod("flora_na", CAPABILITIES, flora_na, params)
