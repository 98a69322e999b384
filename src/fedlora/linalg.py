"""Pure tensor math for LoRA aggregation, computed from the factors: no d×k matrix where factors suffice.

Notation (docs/aggregation-math.md): client u holds B_u (d×r_u, scale folded in) and A_u (r_u×k); weights w_u.
The ideal update is M = Σ_u w_u B_u A_u = B_w A with the stacks B_w = [w_1 B_1 … w_U B_U] (d×n) and
A = [A_1; …; A_U] (n×k), n = Σ r_u.

* ``truncated_svd``: the best rank-r approximation of M (Eckart–Young, FlexLoRA) from a QR of each stack and an
  SVD of the small n×n core R_B R_Aᵀ, switching to a dense SVD only when n ≳ 0.8·min(d, k) (where the core is
  as large as M and forming M is cheaper).
* ``module_errors``: ‖M − XY‖_F for any factored candidate XY, by identity (A1):
  ‖XY − M‖² = ⟨XᵀX, YYᵀ⟩ − 2 Σ_t w_t ⟨XᵀB_t, Y A_tᵀ⟩ + ‖M‖², with ‖M‖² = Σ σ_i² from the SVD core; relative to
  ``error_scale`` = max(‖M‖, NEGLIGIBLE·Σ_u |w_u|‖B_uA_u‖), which is ‖M‖ unless M is a near-total cancellation.
All of it runs in float64 (the identity subtracts terms of size ‖M‖², so fp32 would resolve only ~1e-3), except a
large M on the dense route (``DENSE_FP32_SIZE``), which is formed in float32 and measured directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from fedlora.types import LowRank, ModuleError

F64 = torch.float64

CORE_RATIO = 0.8
"""QR-core SVD while n ≤ CORE_RATIO·min(d, k); dense SVD of the formed M beyond (aggregation-math.md §c)."""

DENSE_FP32_SIZE = 1 << 16
"""On the dense route, M with at least this many entries (256×256) is formed and decomposed in float32, as a
straightforward dense implementation does (float64 would make fedlora up to 2× slower than that baseline). ‖M‖² is then
accumulated in float64 from the float32 M, and ``module_errors`` measures ‖M − candidate‖ directly on the formed
matrix instead of by the cancelling identity (A1), so divergences keep a ~1e-6 resolution there."""


NEGLIGIBLE = 1e-6
"""An ideal update smaller than NEGLIGIBLE·Σ_u |w_u|‖B_uA_u‖_F is a near-total cancellation of the clients' updates
(at float32 training precision, rounding level); relative errors are then taken against this floor, so that they
neither vanish nor explode (``error_scale``)."""


def weighted_stacks(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor, dtype: torch.dtype = F64
) -> tuple[Tensor, Tensor]:
    """B_w = [w_1 B_1 … w_U B_U] (d×n) and A = [A_1; …; A_U] (n×k), in ``dtype``. Ranks may differ."""
    Bw = torch.cat([float(w) * B.to(dtype) for w, B in zip(weights, Bs, strict=True)], dim=1)
    A = torch.cat([A.to(dtype) for A in As], dim=0)
    return Bw, A


@dataclass(frozen=True)
class SVD:
    """M = U diag(S) Vh, thin: U (d×m), S (m,), Vh (m×k), singular values in descending order (float64; U and Vh
    are float64 too, except on the float32 dense route, where they stay float32)."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    total: float | None = None  # ‖M‖_F² when computed apart from S (float32 dense route)
    formed: Tensor | None = None  # M itself when the dense route formed it (module_errors measures on it)

    def energy(self) -> float:
        """‖M‖_F² = Σ σ_i²."""
        return self.total if self.total is not None else float((self.S**2).sum())

    def tail(self, rank: int) -> float:
        """Eckart–Young: ‖M − M_r‖_F = sqrt(Σ_{i>r} σ_i²)."""
        return float((self.S[rank:] ** 2).sum().sqrt())


def ideal_svd(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor, vectors: bool = True) -> SVD:
    """SVD of M = Σ w_u B_u A_u from its factors (``vectors=False``: singular values only, U and Vh empty).

    QR-core route: B_w = Q_B R_B, Aᵀ = Q_A R_A, M = Q_B (R_B R_Aᵀ) Q_Aᵀ, SVD of the n×n core C = X Σ Yᵀ,
    U = Q_B X, Vh = Yᵀ Q_Aᵀ. Cost O((d+k)n² + n³), no d×k matrix, float64. When n ≳ 0.8·min(d, k) the core is as
    large as M itself: then M is formed and decomposed directly (float64, or float32 from ``DENSE_FP32_SIZE`` entries).
    """
    if dense_route(Bs, As):
        return _dense_svd(Bs, As, weights, vectors)
    return _core_svd(*weighted_stacks(Bs, As, weights), vectors)


def dense_route(Bs: Sequence[Tensor], As: Sequence[Tensor]) -> bool:
    """n = Σ r_u > CORE_RATIO·min(d, k): forming M is cheaper than the QR core."""
    return sum(B.shape[1] for B in Bs) > CORE_RATIO * min(Bs[0].shape[0], As[0].shape[1])


def _core_svd(Bw: Tensor, A: Tensor, vectors: bool) -> SVD:
    QB, RB = torch.linalg.qr(Bw)  # (d, n), (n, n)
    QA, RA = torch.linalg.qr(A.T)  # (k, n), (n, n)
    if not vectors:
        return SVD(Bw.new_zeros(0), torch.linalg.svdvals(RB @ RA.T), Bw.new_zeros(0))
    X, S, Yh = torch.linalg.svd(RB @ RA.T)  # core (n, n)
    return SVD(QB @ X, S, Yh @ QA.T)


def _dense_svd(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor, vectors: bool) -> SVD:
    """Form M (float64, or float32 from ``DENSE_FP32_SIZE`` entries) and decompose it; M is kept in ``formed``."""
    dtype = torch.float32 if Bs[0].shape[0] * As[0].shape[1] >= DENSE_FP32_SIZE else F64
    M = torch.mm(*weighted_stacks(Bs, As, weights, dtype))
    total = float(torch.linalg.vector_norm(M, dtype=F64) ** 2)
    empty = M.new_zeros(0, dtype=F64)
    if not vectors:
        return SVD(empty, torch.linalg.svdvals(M).to(F64), empty, total, M)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return SVD(U, S.to(F64), Vh, total, M)  # U, Vh stay in M's dtype: callers keep only a few columns


def truncated_svd(
    Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor, rank: int, split: str = "sigma_left"
) -> tuple[LowRank, SVD]:
    """Best rank-``rank`` approximation of M as factors (FlexLoRA).

    split "sigma_left": B = U_r Σ_r, A = V_rᵀ (FlexLoRA's paper); "sqrt": B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ.
    Components beyond rank(M) are zero. Returned in the dtype of the first client's factors.
    """
    svd = ideal_svd(Bs, As, weights)
    m = svd.S.numel()
    r = min(rank, m)
    U, S, Vh = svd.U[:, :r], svd.S[:r], svd.Vh[:r]
    if split == "sigma_left":
        B, A = U * S, Vh
    elif split == "sqrt":
        root = S.sqrt()
        B, A = U * root, root[:, None] * Vh
    else:
        raise ValueError(f"split = {split!r}: expected 'sigma_left' or 'sqrt'")
    out = LowRank(B.to(Bs[0].dtype), A.to(As[0].dtype)).pad(rank)
    return out, svd


def weighted_mean(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Σ w_u T_u (accumulated in float64, returned in the inputs' dtype)."""
    acc = sum(float(w) * t.to(F64) for w, t in zip(weights, tensors, strict=True))
    return acc.to(tensors[0].dtype)  # type: ignore[union-attr]


def candidate_error2(Bw: Tensor, A: Tensor, energy: float, X: Tensor, Y: Tensor) -> float:
    """‖XY − M‖_F² by (A1), from the weighted stacks; X (d×s), Y (s×k). Cost 2(d+k)ns, no d×k matrix.

    ⟨XᵀX, YYᵀ⟩ − 2⟨Bwᵀ X, A Yᵀ⟩ + ‖M‖²: the middle term is Σ_t w_t ⟨XᵀB_t, Y A_tᵀ⟩ with the weights in Bw.
    """
    X, Y = X.to(F64), Y.to(F64)
    cross = float(((Bw.T @ X) * (A @ Y.T)).sum())
    quad = float(((X.T @ X) * (Y @ Y.T)).sum())
    return max(quad - 2.0 * cross + energy, 0.0)


def _formed_error2(M: Tensor | None, parts: Sequence[LowRank]) -> float:
    """‖Σ X_i Y_i − M‖_F² on the formed M of the dense route, in M's dtype: direct, so no cancellation against
    ‖M‖²; one copy of M, each part subtracted in place."""
    assert M is not None
    R = M.clone()
    for p in parts:
        R.addmm_(p.B.to(M.dtype), p.A.to(M.dtype), alpha=-1.0)
    return float(torch.linalg.vector_norm(R, dtype=F64) ** 2)


def _factored_error2(Bw: Tensor, A: Tensor, energy: float, parts: Sequence[LowRank]) -> float:
    cand = concat(parts)
    return candidate_error2(Bw, A, energy, cand.B, cand.A)


def concat(parts: Sequence[LowRank]) -> LowRank:
    """Σ_i X_i Y_i as one factored update [X_1 … X_m][Y_1; …; Y_m]."""
    return LowRank(torch.cat([p.B.to(F64) for p in parts], 1), torch.cat([p.A.to(F64) for p in parts], 0))


def client_mass(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Tensor) -> float:
    """Σ_u |w_u| ‖B_u A_u‖_F, from r×r Grams: ‖B_uA_u‖² = ⟨B_uᵀB_u, A_uA_uᵀ⟩. Cost Σ_u (d+k)r_u², float64."""
    total = 0.0
    for w, B, A in zip(weights.tolist(), Bs, As, strict=True):
        B, A = B.to(F64), A.to(F64)
        total += abs(w) * max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0) ** 0.5
    return total


def error_scale(ideal_norm: float, mass: float) -> float:
    """What errors are relative to: max(‖M‖, NEGLIGIBLE·Σ_u |w_u|‖B_uA_u‖). Equal to ‖M‖ except where M is a
    near-total cancellation (then the floor), and 0 only when every client update is 0."""
    return max(ideal_norm, NEGLIGIBLE * mass)


def relative(error: float, scale: float) -> float:
    """error / scale; a zero scale gives 0 for a zero error and inf otherwise (never a silent 0)."""
    if scale > 0:
        return error / scale
    return 0.0 if error == 0 else math.inf


def module_errors(
    Bs: Sequence[Tensor],
    As: Sequence[Tensor],
    weights: Tensor,
    applied: Sequence[LowRank],
    rank: int,
    fedit_weights: Tensor | None = None,
) -> ModuleError:
    """Errors of one module against M = Σ w_u B_u A_u, all from factors: absolute, and relative to
    ``error_scale`` (= ‖M‖ unless M is a near-total cancellation of the client updates).

    applied: the terms the model actually receives this round (adapter, base edit, ...), summed.
    rank: the broadcast rank, at which the Eckart–Young bound is reported.
    fedit_weights: the weights FedIT would average the factors with (default ``weights``; differs from the
        target weights when the target is the sum).
    """
    if dense_route(Bs, As):  # M is formed anyway: measure on it directly
        svd = _dense_svd(Bs, As, weights, vectors=False)
        error2 = partial(_formed_error2, svd.formed)
    else:
        Bw, A = weighted_stacks(Bs, As, weights)
        svd = _core_svd(Bw, A, vectors=False)
        error2 = partial(_factored_error2, Bw, A, svd.energy())
    energy = svd.energy()
    err = (error2(applied) if applied else energy) ** 0.5
    r_max = max(b.shape[1] for b in Bs)
    fw = weights if fedit_weights is None else fedit_weights
    fedit_B = weighted_mean([_pad_cols(b, r_max) for b in Bs], fw)
    fedit_A = weighted_mean([_pad_rows(a, r_max) for a in As], fw)
    fedit = error2([LowRank(fedit_B, fedit_A)]) ** 0.5
    norm = energy**0.5
    scale = error_scale(norm, client_mass(Bs, As, weights))
    return ModuleError(
        divergence=relative(err, scale),
        eckart_young=relative(svd.tail(rank), scale),
        fedit=relative(fedit, scale),
        ideal_norm=norm,
        error=err,
        scale=scale,
    )


def _pad_cols(B: Tensor, r: int) -> Tensor:
    return torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], 1) if B.shape[1] < r else B


def _pad_rows(A: Tensor, r: int) -> Tensor:
    return torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])], 0) if A.shape[0] < r else A


def factored_norm(parts: Sequence[LowRank]) -> float:
    """‖Σ_i X_i Y_i‖_F from the factors, ⟨XᵀX, YYᵀ⟩ on the concatenation (float64): no d×k matrix is formed."""
    c = concat(parts)
    return math.sqrt(max(float(((c.B.T @ c.B) * (c.A @ c.A.T)).sum()), 0.0))
