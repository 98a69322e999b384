"""FLoRA-NA against a brute-force optimum computed here, its invariance to the B/A scale, and the adam baseline.

The brute force is independent of ``fedlora.coefficients``: dense float64 products, the optimal p for many random
directions q (a least-squares solve), then damped Newton with the exact dense Hessian of the 2U scalars from the
best of them, keeping the lowest objective.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import RawClient, make_clients
from fedlora.coefficients import solve_adam
from fedlora.methods.fedit import pad_to_max_rank
from fedlora.methods.flora_na import FLoRANAParams, flora_na
from fedlora.types import LowRank

Array = np.ndarray


def dense_objective_terms(Bs: Array, As: Array, t: Array) -> tuple[Array, Array]:
    """P[u, v] = vec(B_u A_v) (U, U, d·k) and vec(M), M = Σ t_u B_u A_u."""
    U = len(Bs)
    P = np.einsum("udr,vrk->uvdk", Bs, As).reshape(U, U, -1)
    return P, np.einsum("u,uuD->D", t, P)


def brute_force(Bs: Array, As: Array, t: Array, samples: int = 4096, starts: int = 64, steps: int = 80) -> float:
    """min over p, q ∈ R^U of ‖Σ_uv p_u q_v B_u A_v − M‖²: many starts, dense float64."""
    P, m = dense_objective_terms(Bs, As, t)
    U = len(Bs)

    def f(p: Array, q: Array) -> tuple[Array, Array]:
        R = np.einsum("su,sv,uvD->sD", p, q, P) - m
        return (R**2).sum(-1), R

    Q = np.random.default_rng(0).standard_normal((samples, U))
    Jp = np.einsum("sv,uvD->suD", Q, P)  # columns vec(B_u Â(q))
    G = np.einsum("suD,stD->sut", Jp, Jp)
    p = np.einsum("sut,st->su", np.linalg.pinv(G, rcond=1e-13, hermitian=True), np.einsum("suD,D->su", Jp, m))
    keep = np.argsort(f(p, Q)[0])[:starts]
    x = np.concatenate([p[keep], Q[keep]], 1)
    for _ in range(steps):
        x = _newton_step(x, P, f, U)
    return float(f(x[:, :U], x[:, U:])[0].min())


def _newton_step(x: Array, P: Array, f, U: int) -> Array:
    """One saddle-free Newton step with backtracking for every start, then the gauge (‖B̂‖ = ‖Â‖ up to scale)."""
    p, q = x[:, :U], x[:, U:]
    fv, R = f(p, q)
    J = np.concatenate([np.einsum("sv,uvD->suD", q, P), np.einsum("su,uvD->svD", p, P)], 1)
    H = 2 * np.einsum("siD,sjD->sij", J, J)
    C = 2 * np.einsum("sD,uvD->suv", R, P)
    H[:, :U, U:] += C
    H[:, U:, :U] += C.transpose(0, 2, 1)
    lam, V = np.linalg.eigh(H)
    inv = np.where(np.abs(lam) > 1e-12 * np.abs(lam).max(-1, keepdims=True), 1 / np.maximum(np.abs(lam), 1e-300), 0)
    g = 2 * np.einsum("siD,sD->si", J, R)
    step = -np.einsum("sij,sj->si", V, inv * np.einsum("sji,sj->si", V, g))
    alpha = np.ones(len(x))
    for _ in range(40):
        fn = f(*np.split(x + alpha[:, None] * step, 2, axis=1))[0]
        if (fn <= fv).all():
            break
        alpha = np.where(fn <= fv, alpha, alpha / 2)
    x = np.where((fn <= fv)[:, None], x + alpha[:, None] * step, x)
    c = np.sqrt(np.abs(x[:, U:]).sum(1) / np.maximum(np.abs(x[:, :U]).sum(1), 1e-300))[:, None]
    return np.concatenate([x[:, :U] * c, x[:, U:] / c], 1)


def stacks(clients: list[RawClient]) -> tuple[Array, Array]:
    """Zero-padded canonical factors of the only module "m", (U, d, r) and (U, r, k), float64."""
    padded = pad_to_max_rank([c.canonical() for c in clients])
    return np.stack([a["m"].B.double().numpy() for a in padded]), np.stack([a["m"].A.double().numpy() for a in padded])


def objective(update: LowRank, Bs: Array, As: Array, t: Array) -> float:
    M = np.einsum("u,udr,urk->dk", t, Bs, As)
    return float(((update.B.double().numpy() @ update.A.double().numpy() - M) ** 2).sum())


def aggregate(clients: list[RawClient], w: torch.Tensor, **params) -> LowRank:
    return flora_na([c.canonical() for c in clients], w, FLoRANAParams(**params)).adapter["m"]


# (U, ranks, d, k): U·r ≫ min(d, k) and U·r < min(d, k); local minima occur in both
INSTANCES = [
    (5, [4] * 5, 6, 5),
    (6, [2] * 6, 5, 8),
    (2, [3, 3], 5, 7),
    (4, [2, 1, 2, 2], 6, 6),
    (3, [1, 1, 1], 8, 8),
    (2, [2, 1], 8, 7),
]
CASES = [(shape, seed) for shape in INSTANCES for seed in range(4)]  # 24 instances


def instance(shape: tuple, seed: int) -> tuple[list[RawClient], torch.Tensor]:
    U, ranks, d, k = shape
    clients = make_clients({"m": (d, k)}, ranks, alpha=5.0, seed=100 + seed)  # α ≠ r
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(U, generator=gen, dtype=torch.float64) + 0.2
    return clients, w / w.sum()


@pytest.mark.parametrize(("shape", "seed"), CASES)
def test_flora_na_equals_the_brute_force_optimum(shape, seed):
    clients, w = instance(shape, seed)
    Bs, As = stacks(clients)
    best = brute_force(Bs, As, w.numpy())
    got = objective(aggregate(clients, w), Bs, As, w.numpy())
    assert got == pytest.approx(best, rel=1e-6, abs=1e-12)


def test_without_restarts_the_same_instances_have_local_minima():
    """The instances above do exercise local minima: one descent from FedIT misses the optimum on some."""
    misses = 0
    for shape, seed in CASES:
        clients, w = instance(shape, seed)
        Bs, As = stacks(clients)
        single = objective(aggregate(clients, w, restarts=0), Bs, As, w.numpy())
        misses += single > brute_force(Bs, As, w.numpy()) * (1 + 1e-6) + 1e-12
    assert misses >= 1  # 2 of the 24 measured


@pytest.mark.parametrize("params", [{}, {"route": "factor"}, {"route": "gram"}, {"solver": "als"}])
def test_flora_na_is_invariant_to_the_scale_of_b(params):
    """Every B̃ times β, β from 1e-12 to 1e12: the objective is β² times the same (to float64 rounding), B̂ is β times
    the same and Â the same (to the conditioning of the optimum: measured ≤ 3e-9)."""
    clients = make_clients({"m": (40, 30)}, [3, 3, 3, 3], alpha=5.0, seed=7)
    gains = [0.25, 1.0, 3.0, 0.5]  # different client gauges: FLoRA-NA ≠ FedIT
    gauged = [
        RawClient({"m": (c.factors["m"][0] * g, c.factors["m"][1] / g)}, 5.0, 3, False)
        for c, g in zip(clients, gains, strict=True)
    ]
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    Bs, As = stacks(gauged)
    ref = aggregate(gauged, w, **params)
    f_ref = objective(ref, Bs, As, w.numpy())
    for beta in (1e-12, 1e-8, 1e8, 1e12):
        scaled = [RawClient({"m": (c.factors["m"][0] * beta, c.factors["m"][1])}, 5.0, 3, False) for c in gauged]
        got = aggregate(scaled, w, **params)
        assert objective(got, Bs * beta, As, w.numpy()) / beta**2 == pytest.approx(f_ref, rel=1e-13)
        torch.testing.assert_close(got.B / beta, ref.B, rtol=1e-7, atol=1e-7 * float(ref.B.abs().max()))
        torch.testing.assert_close(got.A, ref.A, rtol=1e-7, atol=1e-7 * float(ref.A.abs().max()))


def test_flora_na_scale_invariance_reaches_the_optimum():
    """At β = 1e-7 the unnormalised solver stopped after its ALS sweeps; now the optimum is the same as at β = 1."""
    clients, w = instance((5, [4] * 5, 6, 5), 0)
    Bs, As = stacks(clients)
    best = brute_force(Bs, As, w.numpy())
    for beta in (1e-8, 1.0, 1e8):
        scaled = [RawClient({"m": (c.factors["m"][0] * beta, c.factors["m"][1])}, 5.0, 4, False) for c in clients]
        got = objective(aggregate(scaled, w), Bs * beta, As, w.numpy())
        assert got == pytest.approx(best * beta**2, rel=1e-6)


@pytest.mark.parametrize("lr", [None, 0.5, 5.0])
def test_adam_returns_its_best_point_with_its_true_objective(lr):
    """Large steps make Adam overshoot; the returned point is the best evaluated one, its f is the true f there,
    and it is never worse than FedIT's."""
    gen = torch.Generator().manual_seed(3)
    U, d, k, r = 4, 12, 9, 2
    Bs = [torch.randn(d, r, generator=gen) * 30 for _ in range(U)]
    As = [torch.randn(r, k, generator=gen) * 30 for _ in range(U)]
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    sol, history = solve_adam(Bs, As, w, w, steps=60, lr=lr)
    B, A, t = np.stack([x.double().numpy() for x in Bs]), np.stack([x.double().numpy() for x in As]), w.numpy()
    M = np.einsum("u,udr,urk->dk", t, B, A)
    true_f = float(((np.tensordot(sol.p, B, 1) @ np.tensordot(sol.q, A, 1) - M) ** 2).sum())
    fedit = float(((np.tensordot(t, B, 1) @ np.tensordot(t, A, 1) - M) ** 2).sum())
    assert sol.f == pytest.approx(true_f, rel=1e-4)
    assert true_f <= fedit * (1 + 1e-5)
    assert sol.f <= min(history) * (1 + 1e-6)


def test_adam_solver_through_the_method_is_never_worse_than_fedit():
    clients = make_clients({"m": (12, 9)}, [2, 2, 2], alpha=5.0, seed=5)
    big = [RawClient({"m": (c.factors["m"][0] * 40, c.factors["m"][1] * 40)}, 5.0, 2, False) for c in clients]
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    Bs, As = stacks(big)
    M = np.einsum("u,udr,urk->dk", w.numpy(), Bs, As)
    fedit = float(((np.tensordot(w.numpy(), Bs, 1) @ np.tensordot(w.numpy(), As, 1) - M) ** 2).sum())
    assert objective(aggregate(big, w, solver="adam", adam_steps=50), Bs, As, w.numpy()) <= fedit * (1 + 1e-12)
