"""FLoRA-NA's coefficient problem and its solvers (docs/methods.md, FLoRA-NA).

For one module with clients (B_u, A_u) of equal rank r, weights t_u (the target) and coefficients p, q ∈ R^U:

    f(p, q) = ‖(Σ_u p_u B_u)(Σ_v q_v A_v) − M‖_F²,   M = Σ_u t_u B_u A_u
            = ⟨S_B(p), S_A(q)⟩ − 2 pᵀ N q + ‖M‖²,      S_B = B̂ᵀB̂, S_A = ÂÂᵀ (r×r), N_uv = ⟨B_u A_v, M⟩.

Two *oracles* evaluate the pieces without a d×k matrix while n = U·r ≲ 1.5·min(d, k):
``GramOracle`` from the r×r Gram blocks G^B_ut = B_uᵀB_t, G^A_ut = A_u A_tᵀ (float64), and beyond that
``FactorOracle`` from the factors and one formed M (there M is no larger than the factors themselves).
``SumOracle`` adds modules up for one (p, q) shared by all modules.

The solvers work in the scale-free coordinates of ``Scaling`` (every client's B_u and A_u of unit norm, ‖M‖ ≤ 1),
so that multiplying every B_u by β, or every A_u, changes nothing but rounding. Solvers:

* ``newton`` (default): 2 ALS sweeps, then saddle-free Newton (|λ|-modified Hessian, eigenvalues below
  ``NULL_EIG``·max|λ| dropped, which removes the gauge direction) with an exact line search on the quartic f(α).
* ``als``: alternating least squares only (each half-step an exact U×U solve; can need thousands of sweeps).
* ``adam``: Adam on (p, q) over dense d×k products, float32: the benchmark's baseline, not for users.

Every solver starts at FedIT (p = q = w); ``solve`` can add restarts (the ALS fixed point and seeded random
points). All of them return by one rule, ``better``: the point of lowest f among those evaluated, FedIT included,
so no solver returns a point worse than FedIT. ``rescale`` is the one gauge formula.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

F64 = torch.float64
NULL_EIG = 1e-13
"""Relative eigenvalue cut-off: |λ| ≤ NULL_EIG·max|λ| counts as null (Newton step, pseudo-inverses)."""

Array = np.ndarray


def to_array(t: Tensor) -> Array:
    return t.detach().to(F64).numpy()


@dataclass(frozen=True)
class Scaling:
    """The change of variables every solver works in: unit-norm clients and a target of norm ≤ 1.

        p_u = √κ·p'_u / b_u,  q_u = √κ·q'_u / a_u,  b_u = ‖B_u‖_F,  a_u = ‖A_u‖_F,  κ = Σ_u |t_u| b_u a_u

    (a zero factor gets norm 1, κ = 0 becomes 1). The inner problem has clients B'_u = B_u / b_u, A'_u = A_u / a_u
    and target M' = M / κ = Σ_u t'_u B'_u A'_u with t'_u = t_u b_u a_u / κ; its B̂'Â' = B̂Â / κ, so f' = f / κ² and
    the minimisers correspond exactly. Scaling every B_u by β scales b and κ by β and leaves the inner problem
    as it was, so the solution does not depend on the B/A scale. b, a: (U,); with several modules (one (p, q)
    for all) the norms are over all of them.
    """

    b: Array
    a: Array
    kappa: float

    def inner(self, p: Array, q: Array) -> tuple[Array, Array]:
        root = math.sqrt(self.kappa)
        return p * self.b / root, q * self.a / root

    def outer(self, p: Array, q: Array) -> tuple[Array, Array]:
        root = math.sqrt(self.kappa)
        return p * root / self.b, q * root / self.a

    def target(self, t: Tensor) -> Tensor:
        """t' (U,), float64."""
        return t.to(F64) * torch.from_numpy(self.b * self.a / self.kappa)


def client_scaling(modules: Sequence[tuple[Sequence[Tensor], Sequence[Tensor]]], t: Tensor) -> Scaling:
    """``Scaling`` from the clients' factors [(Bs, As) per module]: b_u² = Σ_m ‖B_u^m‖², a_u² = Σ_m ‖A_u^m‖²."""

    def norms(index: int) -> Array:
        per_client = zip(*(factors[index] for factors in modules), strict=True)
        return np.sqrt([sum(float(torch.linalg.vector_norm(x, dtype=F64)) ** 2 for x in xs) for xs in per_client])

    b, a = norms(0), norms(1)
    kappa = float(np.abs(to_array(t)) @ (b * a))
    return Scaling(np.where(b > 0, b, 1.0), np.where(a > 0, a, 1.0), kappa if kappa > 0 else 1.0)


def _unscaled(U: int) -> Scaling:
    return Scaling(np.ones(U), np.ones(U), 1.0)


class Oracle:
    """The pieces of f for one module, from which every solver works; numpy float64 (the small problem is
    dominated by call overhead, which numpy keeps to microseconds). Subclasses define the primitives."""

    U: int
    N: Array  # (U, U)
    m2: float  # ‖M‖²

    def SB(self, x: Array, y: Array) -> Array:  # B̂(x)ᵀB̂(y), (r, r)
        raise NotImplementedError

    def SA(self, x: Array, y: Array) -> Array:  # Â(x)Â(y)ᵀ, (r, r)
        raise NotImplementedError

    def Hp(self, q: Array) -> Array:  # H_p[u,t] = ⟨B_uÂ, B_tÂ⟩, (U, U)
        raise NotImplementedError

    def Hq(self, p: Array) -> Array:  # H_q[v,s] = ⟨B̂A_v, B̂A_s⟩, (U, U)
        raise NotImplementedError

    def E(self, p: Array) -> Array:  # E_u = B̂ᵀB_u, (U, r, r)
        raise NotImplementedError

    def F(self, q: Array) -> Array:  # F_v = ÂA_vᵀ, (U, r, r)
        raise NotImplementedError

    # ---- derived ----------------------------------------------------------------------------------------------
    def f(self, p: Array, q: Array) -> float:
        return float(np.vdot(self.SB(p, p), self.SA(q, q)) - 2 * p @ self.N @ q) + self.m2

    def grad_hess(self, p: Array, q: Array) -> tuple[Array, Array]:
        """∇f and ∇²f over x = (p, q), (2U,) and (2U, 2U) (aggregation-math.md B3)."""
        E, F = self.E(p), self.F(q)
        SA, SB = self.SA(q, q), self.SB(p, p)
        gp = 2 * (np.einsum("uij,ij->u", E, SA) - self.N @ q)
        gq = 2 * (np.einsum("vji,ij->v", F, SB) - self.N.T @ p)
        Ef, Ff = E.reshape(self.U, -1), F.reshape(self.U, -1)
        Hpq = 2 * (Ef @ Ff.T + E.transpose(0, 2, 1).reshape(self.U, -1) @ Ff.T - self.N)
        H = np.block([[2 * self.Hp(q), Hpq], [Hpq.T, 2 * self.Hq(p)]])
        return np.concatenate([gp, gq]), H

    def quartic(self, p: Array, q: Array, dp: Array, dq: Array) -> Array:
        """Coefficients c_0..c_4 of f(p + α dp, q + α dq) = Σ c_j α^j."""
        b = [self.SB(p, p), self.SB(p, dp) + self.SB(dp, p), self.SB(dp, dp)]
        a = [self.SA(q, q), self.SA(q, dq) + self.SA(dq, q), self.SA(dq, dq)]
        c = np.zeros(5)
        for i in range(3):
            for j in range(3):
                c[i + j] += float(np.vdot(b[i], a[j]))
        c[0] += self.m2 - 2 * float(p @ self.N @ q)
        c[1] -= 2 * float(dp @ self.N @ q + p @ self.N @ dq)
        c[2] -= 2 * float(dp @ self.N @ dq)
        return c

    def traces(self, p: Array, q: Array) -> tuple[float, float]:
        """(‖B̂‖_F², ‖Â‖_F²)."""
        return float(np.trace(self.SB(p, p))), float(np.trace(self.SA(q, q)))


class GramOracle(Oracle):
    """Pieces from the r×r Gram blocks, float64. Cost (d+k)n² once (two SYRKs in torch), then one GEMV over a
    U²r² array per call, independent of d and k. With ``scale``, the pieces of the inner problem of ``Scaling``.

    The blocks are stored as T^B[u,t,i,j] = (B_uᵀB_t)_ij and T^A[u,t,i,j] = (A_uA_tᵀ)_ij, (U, U, r, r)."""

    def __init__(self, Bs: Sequence[Tensor], As: Sequence[Tensor], t: Tensor, scale: Scaling | None = None) -> None:
        U, r = len(Bs), Bs[0].shape[1]
        scale = scale or _unscaled(U)
        Bt = torch.cat([B.to(F64).T for B in Bs], 0)  # (n, d): rows B_uᵀ
        A = torch.cat([A.to(F64) for A in As], 0)  # (n, k)
        self.U, self.r = U, r
        self.TB = _blocks(Bt @ Bt.T, U, r) / np.outer(scale.b, scale.b)[:, :, None, None]
        self.TA = _blocks(A @ A.T, U, r) / np.outer(scale.a, scale.a)[:, :, None, None]
        tw = to_array(scale.target(t))
        self.N = (self.TB * tw[None, :, None, None]).reshape(U, -1) @ self.TA.reshape(
            U, -1
        ).T  # Σ_t t_t⟨G^B_ut, G^A_vt⟩
        self.m2 = float(tw @ self.N.diagonal())  # Σ_u t_u N_uu = ‖M‖²

    def _pair(self, T: Array, x: Array, y: Array) -> Array:  # Σ_ut x_u y_t T[u,t]
        return (y @ (x @ T.reshape(self.U, -1)).reshape(self.U, -1)).reshape(self.r, self.r)

    def SB(self, x: Array, y: Array) -> Array:
        return self._pair(self.TB, x, y)

    def SA(self, x: Array, y: Array) -> Array:
        return self._pair(self.TA, x, y)

    def Hp(self, q: Array) -> Array:
        return (self.TB.reshape(self.U * self.U, -1) @ self.SA(q, q).ravel()).reshape(self.U, self.U)

    def Hq(self, p: Array) -> Array:
        return (self.TA.reshape(self.U * self.U, -1) @ self.SB(p, p).ravel()).reshape(self.U, self.U)

    def E(self, p: Array) -> Array:  # E_u = Σ_t p_t (B_tᵀB_u)
        return (p @ self.TB.reshape(self.U, -1)).reshape(self.U, self.r, self.r)

    def F(self, q: Array) -> Array:  # F_v = Σ_s q_s (A_sA_vᵀ)
        return (q @ self.TA.reshape(self.U, -1)).reshape(self.U, self.r, self.r)


def _blocks(G: Tensor, U: int, r: int) -> Array:
    """An (n, n) Gram as its (U, U, r, r) blocks, contiguous."""
    return np.ascontiguousarray(to_array(G).reshape(U, r, U, r).transpose(0, 2, 1, 3))


class FactorOracle(Oracle):
    """Pieces from the factors and one formed M, for n = U·r ≳ 1.5·min(d, k), where the n×n Grams are larger
    than M. H_p = Y Yᵀ with Y_u = B_u L, L Lᵀ = S_A (and symmetrically for H_q): O(U(d+k)r² + U²(d+k)r)."""

    def __init__(self, Bs: Sequence[Tensor], As: Sequence[Tensor], t: Tensor, scale: Scaling | None = None) -> None:
        self.U = len(Bs)
        scale = scale or _unscaled(self.U)
        B = torch.stack([B.to(F64) / float(b) for B, b in zip(Bs, scale.b, strict=True)], 0)  # (U, d, r)
        A = torch.stack([A.to(F64) / float(a) for A, a in zip(As, scale.a, strict=True)], 0)  # (U, r, k)
        M = torch.einsum("u,udr,urk->dk", scale.target(t), B, A)  # (d, k)
        MA = torch.einsum("dk,vrk->vdr", M, A)  # M A_vᵀ
        self.N = to_array(torch.einsum("udr,vdr->uv", B, MA))  # ⟨B_u, M A_vᵀ⟩
        self.m2 = float((M * M).sum())
        self.B, self.A = B.numpy(), A.numpy()

    def _Bhat(self, x: Array) -> Array:  # Σ_u x_u B_u, (d, r)
        return (x @ self.B.reshape(self.U, -1)).reshape(self.B.shape[1:])

    def _Ahat(self, x: Array) -> Array:  # Σ_u x_u A_u, (r, k)
        return (x @ self.A.reshape(self.U, -1)).reshape(self.A.shape[1:])

    def SB(self, x: Array, y: Array) -> Array:
        return self._Bhat(x).T @ self._Bhat(y)

    def SA(self, x: Array, y: Array) -> Array:
        return self._Ahat(x) @ self._Ahat(y).T

    def Hp(self, q: Array) -> Array:
        Y = (self.B @ _psd_root(self.SA(q, q))).reshape(self.U, -1)  # Y_u = B_u L
        return Y @ Y.T

    def Hq(self, p: Array) -> Array:
        Z = (_psd_root(self.SB(p, p)).T @ self.A).reshape(self.U, -1)  # Z_v = Lᵀ A_v
        return Z @ Z.T

    def E(self, p: Array) -> Array:  # E_u = B̂ᵀB_u
        return self._Bhat(p).T @ self.B

    def F(self, q: Array) -> Array:  # F_v = ÂA_vᵀ
        return self._Ahat(q) @ self.A.transpose(0, 2, 1)


def _psd_root(S: Array) -> Array:
    """L with L Lᵀ = S for a symmetric PSD S."""
    lam, V = np.linalg.eigh(S)
    return V * np.sqrt(np.clip(lam, 0, None))


class SumOracle(Oracle):
    """Σ_m f_m(p, q): one (p, q) shared by all modules (``method.shared_coefficients = true``)."""

    def __init__(self, parts: Sequence[Oracle]) -> None:
        self.parts = list(parts)
        self.U = parts[0].U
        self.N = sum((o.N for o in parts), np.zeros((self.U, self.U)))
        self.m2 = sum(o.m2 for o in parts)

    def f(self, p: Array, q: Array) -> float:
        return sum(o.f(p, q) for o in self.parts)

    def grad_hess(self, p: Array, q: Array) -> tuple[Array, Array]:
        gs, Hs = zip(*(o.grad_hess(p, q) for o in self.parts), strict=True)
        return sum(gs), sum(Hs)  # type: ignore[return-value]

    def quartic(self, p: Array, q: Array, dp: Array, dq: Array) -> Array:
        return sum(o.quartic(p, q, dp, dq) for o in self.parts)  # type: ignore[return-value]

    def traces(self, p: Array, q: Array) -> tuple[float, float]:
        tb, ta = zip(*(o.traces(p, q) for o in self.parts), strict=True)
        return sum(tb), sum(ta)

    def Hp(self, q: Array) -> Array:
        return sum(o.Hp(q) for o in self.parts)  # type: ignore[return-value]

    def Hq(self, p: Array) -> Array:
        return sum(o.Hq(p) for o in self.parts)  # type: ignore[return-value]


class Point(NamedTuple):
    """A candidate (p, q) with its objective f(p, q)."""

    f: float
    p: Array
    q: Array


def better(best: Point, candidate: Point) -> Point:
    """The one best-point rule of every solver: the candidate only when strictly lower (ties keep the earlier,
    so FedIT, evaluated first, wins a tie)."""
    return candidate if candidate.f < best.f else best


@dataclass(frozen=True)
class Solution:
    """The best point over every start, the objective at FedIT, the work done (iterations over all starts) and
    the number of starts. p, q and f are in the coordinates of the oracle that was solved."""

    p: Array
    q: Array
    f: float
    f_fedit: float
    iterations: int
    starts: int = 1


def _lstsq(H: Array, h: Array, ridge: float) -> Array:
    """argmin ‖H x − h‖ with optional ridge; the pseudo-inverse handles singular H (coinciding clients)."""
    if ridge > 0:
        H = H + ridge * np.eye(H.shape[0]) * max(float(np.abs(H.diagonal()).max()), 1e-300)
    return np.linalg.pinv(H, rcond=NULL_EIG, hermitian=True) @ h


def als_sweep(o: Oracle, p: Array, q: Array, ridge: float = 0.0) -> tuple[Array, Array]:
    """One sweep: p ← H_p(q)⁺ N q, then q ← H_q(p)⁺ Nᵀ p. Each half-step is an exact minimisation."""
    p = _lstsq(o.Hp(q), o.N @ q, ridge)
    q = _lstsq(o.Hq(p), o.N.T @ p, ridge)
    return p, q


def _line_search(o: Oracle, p: Array, q: Array, dp: Array, dq: Array) -> float:
    """The exact minimiser of the quartic f(α) among α = 0, 1 and the real roots of the cubic f′."""
    c = o.quartic(p, q, dp, dq)
    deriv = [4 * c[4], 3 * c[3], 2 * c[2], c[1]]
    roots = [float(z.real) for z in np.roots(deriv) if abs(z.imag) < 1e-9 * (1 + abs(z.real))] if any(deriv) else []
    cands = [0.0, 1.0, *roots]
    values = [np.polyval(c[::-1], a) for a in cands]
    return cands[int(np.argmin(values))]


def _newton_step(o: Oracle, p: Array, q: Array) -> tuple[Array, Array]:
    """Saddle-free Newton direction: −V |Λ|⁻¹ Vᵀ g, with |λ| ≤ NULL_EIG·max|λ| treated as null."""
    g, H = o.grad_hess(p, q)
    lam, V = np.linalg.eigh(H)
    keep = np.abs(lam) > NULL_EIG * np.abs(lam).max()
    step = -(V[:, keep] @ ((V[:, keep].T @ g) / np.abs(lam[keep])))
    return step[: o.U], step[o.U :]


def rescale(o: Oracle, p: Array, q: Array, ratio: float = 1.0, toward: Array | None = None) -> tuple[Array, Array]:
    """The gauge formula: (c·p, q/c), which leaves B̂Â and f unchanged, with ‖B̂‖_F / ‖Â‖_F = ratio, i.e.
    |c| = (ratio·‖Â‖_F / ‖B̂‖_F)^½; c < 0 when ``toward`` is given and ⟨B̂(p), B̂(toward)⟩ < 0, so that B̂ points
    the way of B̂(toward) (FedIT's B̄ for the returned point). Unchanged when B̂ or Â is zero."""
    tb, ta = o.traces(p, q)
    if tb <= 0 or ta <= 0:
        return p, q
    c = math.sqrt(ratio * math.sqrt(ta / tb))
    if toward is not None and np.trace(o.SB(p, toward)) < 0:
        c = -c
    return p * c, q / c


def descend(
    o: Oracle, p: Array, q: Array, solver: str = "newton", max_iter: int = 100, tol: float = 1e-12, ridge: float = 0.0
) -> tuple[Point, int]:
    """One local descent from (p, q): ``newton`` (2 ALS sweeps, then saddle-free Newton steps on the balanced
    gauge with an exact line search) or ``als``. At most ``max_iter`` iterations; after the third, stops when f
    falls by ≤ tol·‖M‖². Returns the best point visited (the start included) and the iterations taken."""
    if solver not in ("newton", "als"):
        raise ValueError(f"method.solver = {solver!r}: expected 'newton', 'als' or 'adam'")
    best = prev = Point(o.f(p, q), p, q)
    its = 0
    for its in range(1, max_iter + 1):
        if solver == "als" or its <= 2:
            p, q = als_sweep(o, p, q, ridge)
        else:
            p, q = rescale(o, p, q)
            dp, dq = _newton_step(o, p, q)
            alpha = _line_search(o, p, q, dp, dq)
            if alpha == 0.0:
                break
            p, q = p + alpha * dp, q + alpha * dq
        current = Point(o.f(p, q), p, q)
        best = better(best, current)
        if prev.f - current.f <= tol * max(o.m2, 1e-300) and its > 2:
            break
        prev = current
    return best, its


def solve(
    o: Oracle,
    start: tuple[Array, Array],
    solver: str = "newton",
    max_iter: int = 100,
    tol: float = 1e-12,
    ridge: float = 0.0,
    restarts: int = 0,
    seed: int = 0,
) -> Solution:
    """Minimise f from ``start`` (FedIT, in the oracle's coordinates). With ``restarts`` > 0, also descend from
    the ALS fixed point reached from FedIT and from ``restarts`` seeded random points (``random_starts``); the best
    point over every start is returned, so the result is never worse than FedIT nor than any single start."""
    f0 = o.f(*start)
    best, its = descend(o, *start, solver, max_iter, tol, ridge)
    starts = 1
    if restarts > 0:
        points = random_starts(o, restarts, seed, ridge)
        if solver != "als":  # for als, the descent from FedIT above already is the ALS fixed point
            als_point, als_its = descend(o, *start, "als", max_iter, tol, ridge)
            points, its = [(als_point.p, als_point.q), *points], its + als_its
        for p, q in points:
            found, n = descend(o, p, q, solver, max_iter, tol, ridge)
            best, its, starts = better(best, found), its + n, starts + 1
    return Solution(best.p, best.q, best.f, f0, its, starts)


def random_starts(o: Oracle, count: int, seed: int, ridge: float = 0.0) -> list[tuple[Array, Array]]:
    """``count`` seeded starts: q standard normal, p = H_p(q)⁺ N q (the best p for it)."""
    rng = np.random.default_rng(seed)
    return [(_lstsq(o.Hp(q), o.N @ q, ridge), q) for q in rng.standard_normal((count, o.U))]


def solve_adam(
    Bs: Sequence[Tensor], As: Sequence[Tensor], t: Tensor, w: Tensor, steps: int = 500, lr: float | None = None
) -> tuple[Solution, list[float]]:
    """The straightforward baseline: Adam on (p, q) over dense fp32 d×k products, from FedIT (p = q = w).

    Every step evaluates f at the current point before moving; the returned point is the best of all points
    evaluated (the last one included) with its own objective (``better``). Returns it and f at the point of every
    step (for the benchmark's time-to-target)."""
    B = torch.stack([b.float() for b in Bs])  # (U, d, r)
    A = torch.stack([a.float() for a in As])  # (U, r, k)
    M = torch.einsum("u,udr,urk->dk", t.float(), B, A)
    p = w.float().clone().requires_grad_(True)
    q = w.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([p, q], lr=lr if lr is not None else 0.1 / len(Bs))

    def objective() -> Tensor:
        return ((torch.einsum("u,udr->dr", p, B) @ torch.einsum("u,urk->rk", q, A) - M) ** 2).sum()

    def here(loss: Tensor) -> Point:
        return Point(float(loss.detach()), to_array(p), to_array(q))

    history: list[float] = []
    best: Point | None = None
    for _ in range(steps):
        opt.zero_grad()
        loss = objective()
        current = here(loss)
        best = current if best is None else better(best, current)
        history.append(current.f)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = here(objective())
    best = last if best is None else better(best, last)
    return Solution(best.p, best.q, best.f, history[0] if history else last.f, steps), history
