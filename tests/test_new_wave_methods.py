"""FedRot-LoRA, FedSVD and HetLoRA's rank self-pruning against dense float64 references built here.

Expected values come from the clients' raw factors (ΔW = s·B·A with α ≠ r, non-square modules, unequal weights), from
the test's own linear algebra (polar factors by eigendecomposition, dense SVDs), from PEFT's own merge on BERT
(nn.Linear) and GPT-2 (Conv1D) layers, or from closed forms; never from the code under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_clients, read_records, tiny_config
from fedlora import engines, methods, peft_io
from fedlora.methods.base import ClientInfo, FactorState, ModelInfo, ModuleSpec
from fedlora.methods.fedrot_lora import aligned_factor, rotate_towards, rotation
from fedlora.methods.hetlora import pruned_rank, tail_norm
from fedlora.payload import pack_adapter
from fedlora.training import penalty
from fedlora.types import Contribution, LowRank, Payload, Regularizer
from test_client_side_methods import A_BYTES, B_BYTES, HEAD_BYTES, SHAPES, W3, dense, keys_of, play, start
from test_client_side_methods import ideal as ideal_trained
from test_peft_io import merged_deltas, peft_bert, peft_gpt2

F64 = torch.float64
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def orthogonal(r: int, gen: torch.Generator, proper: bool = False) -> torch.Tensor:
    """A random r×r orthogonal matrix (a reflection half of the time unless ``proper``)."""
    Q, _ = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
    if proper and float(torch.linalg.det(Q)) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q


def polar(C: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor C (CᵀC)^(-1/2) by eigendecomposition: the Procrustes maximiser of tr(Rᵀ C),
    computed independently of the SVD the method uses (C must be non-singular)."""
    vals, vecs = torch.linalg.eigh(C.T @ C)
    return C @ (vecs * vals.rsqrt()) @ vecs.T


def contributions(adapters, weights, metas=None) -> list[Contribution]:
    metas = metas or [{}] * len(adapters)
    return [
        Contribution(i, float(w), Payload(pack_adapter(a), meta))
        for i, (w, a, meta) in enumerate(zip(weights, adapters, metas, strict=True))
    ]


def rel_err(M: torch.Tensor, X: torch.Tensor) -> float:
    return float((M - X).norm() / M.norm())


def dense_ideal(adapters, weights, module) -> torch.Tensor:
    return sum(float(w) * a[module].dense().double() for w, a in zip(weights, adapters, strict=True))


def fedit_dense(adapters, weights, module) -> torch.Tensor:
    """(Σ w B̃_u^pad)(Σ w A_u^pad) in float64, zero-padded to the largest rank."""
    r = max(a[module].rank for a in adapters)
    B = sum(float(w) * a[module].pad(r).B.double() for w, a in zip(weights, adapters, strict=True))
    A = sum(float(w) * a[module].pad(r).A.double() for w, a in zip(weights, adapters, strict=True))
    return B @ A


# ==============================================================================================================
# FedRot-LoRA


def fedrot_round(adapters, weights, reference, rnd, params=None):
    """One FedRot-LoRA aggregation in round ``rnd`` whose clients started from ``reference``."""
    method = methods.build("fedrot_lora", params)
    state = FactorState(adapter=reference, extras=None)
    return method, *method.aggregate(state, contributions(adapters, weights), rnd)


def dense_fedrot(adapters, weights, reference, factor, module) -> torch.Tensor:
    """The aligned average formed densely: per client R_u = polar(C_u) against the reference truncated to its rank,
    (B̃_u R_u, R_uᵀ A_u) zero-padded, averaged, multiplied."""
    r = max(a[module].rank for a in adapters)
    B = torch.zeros(adapters[0][module].shape[0], r, dtype=F64)
    A = torch.zeros(r, adapters[0][module].shape[1], dtype=F64)
    for w, a in zip(weights, adapters, strict=True):
        Bu, Au, ru = a[module].B.double(), a[module].A.double(), a[module].rank
        ref = reference[module]
        C = Au @ ref.A[:ru].double().T if factor == "A" else Bu.T @ ref.B[:, :ru].double()
        R = polar(C)
        B[:, :ru] += float(w) * Bu @ R
        A[:ru] += float(w) * R.T @ Au
    return B @ A


def canonical(clients):
    return [c.canonical() for c in clients]


def planted(shapes, r, U, alpha, seed):
    """A shared update (s·B, A) and U clients holding it in planted bases (s·B Q_u, Q_uᵀ A)."""
    gen = torch.Generator().manual_seed(seed)
    (base,) = make_clients(shapes, [r], alpha, seed=seed)
    shared = base.canonical()
    Qs = [orthogonal(r, gen) for _ in range(U)]
    clients = [{m: LowRank(lr.B @ Q, Q.T @ lr.A) for m, lr in shared.items()} for Q in Qs]
    return shared, clients, Qs


@pytest.mark.parametrize("rnd", [2, 3])  # round 2 aligns A, round 3 aligns B
def test_fedrot_recovers_planted_rotations_exactly(rnd):
    shared, clients, Qs = planted(SHAPES, r=3, U=3, alpha=5.0, seed=1)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    factor = aligned_factor("alternate", rnd)
    for m, lr in shared.items():  # the rotation found is the planted one, inverted
        for Q, client in zip(Qs, clients, strict=True):
            cross = client[m].A @ lr.A.T if factor == "A" else client[m].B.T @ lr.B
            assert torch.allclose(rotation(cross), Q.T, atol=1e-10)
    _, state, report = fedrot_round(clients, w, shared, rnd)
    for m, lr in shared.items():
        assert torch.allclose(state.adapter[m].B, lr.B, atol=1e-10) and torch.allclose(state.adapter[m].A, lr.A)
        assert report.modules[m].divergence < 1e-10
        assert report.modules[m].fedit > 0.1  # the same update in planted bases: FedIT's average is far off
    assert state.diagnostics == {"align": factor, "aligned": {m: True for m in SHAPES}}


def test_fedrot_alignment_is_invariant_to_the_clients_basis():
    """Aligning (B̃Q, QᵀA) gives the same pair as aligning (B̃, A), for any orthogonal Q (the reference fixes it)."""
    gen = torch.Generator().manual_seed(4)
    clients = canonical(make_clients(SHAPES, [3, 3], alpha=7.0, seed=4))
    reference = canonical(make_clients(SHAPES, [3], alpha=7.0, seed=5))[0]
    w = torch.tensor([0.35, 0.65], dtype=F64)
    Qs = [orthogonal(3, gen) for _ in clients]
    rotated = [{m: LowRank(lr.B @ Q, Q.T @ lr.A) for m, lr in a.items()} for Q, a in zip(Qs, clients, strict=True)]
    for rnd in (2, 3):
        _, s1, _ = fedrot_round(clients, w, reference, rnd, {"guard": False})
        _, s2, _ = fedrot_round(rotated, w, reference, rnd, {"guard": False})
        for m in SHAPES:
            assert torch.allclose(s1.adapter[m].B, s2.adapter[m].B, atol=1e-9)
            assert torch.allclose(s1.adapter[m].A, s2.adapter[m].A, atol=1e-9)


@st.composite
def fedrot_scenario(draw):
    U = draw(st.integers(1, 4))
    w = torch.tensor([draw(st.floats(0.05, 5.0)) for _ in range(U)], dtype=F64)
    ranks = [draw(st.integers(1, 4)) for _ in range(U)]
    shapes = {"q": (draw(st.integers(4, 11)), draw(st.integers(4, 11))), "v": (6, 13)}
    alpha, rslora, seed = draw(st.sampled_from([3.0, 16.0, 0.5])), draw(st.booleans()), draw(st.integers(0, 10_000))
    clients = canonical(make_clients(shapes, ranks, alpha, rslora, seed))
    reference = canonical(make_clients(shapes, [max(ranks)], alpha, rslora, seed + 1))[0]
    return clients, w / w.sum(), reference, draw(st.sampled_from([2, 3]))


@SETTINGS
@given(data=st.data())
def test_fedrot_aligned_average_matches_the_dense_reference(data):
    clients, w, reference, rnd = data.draw(fedrot_scenario())
    _, state, report = fedrot_round(clients, w, reference, rnd, {"guard": False})
    factor = aligned_factor("alternate", rnd)
    for m in clients[0]:
        want = dense_fedrot(clients, w, reference, factor, m)
        got = state.adapter[m].dense().double()
        assert torch.allclose(got, want, atol=1e-8 * max(1.0, float(want.abs().max())))
        M = dense_ideal(clients, w, m)
        assert report.modules[m].divergence == pytest.approx(rel_err(M, want), abs=1e-7)
        assert report.modules[m].fedit == pytest.approx(rel_err(M, fedit_dense(clients, w, m)), abs=1e-7)


@SETTINGS
@given(data=st.data())
def test_fedrot_with_the_guard_is_never_worse_than_fedit(data):
    clients, w, reference, rnd = data.draw(fedrot_scenario())
    _, state, report = fedrot_round(clients, w, reference, rnd)
    for m in clients[0]:
        M = dense_ideal(clients, w, m)
        got, fedit = rel_err(M, state.adapter[m].dense().double()), rel_err(M, fedit_dense(clients, w, m))
        assert got <= fedit + 1e-9
        assert report.modules[m].divergence <= report.modules[m].fedit + 1e-9
        if not state.diagnostics["aligned"][m]:  # fell back: exactly FedIT's pair
            assert got == pytest.approx(fedit, abs=1e-12)


def test_fedrot_alignment_alone_can_be_worse_than_fedit_and_the_guard_falls_back():
    """Two clients holding nearly the same rank-1 update in the same basis, so FedIT is exact; the reference's A is
    almost orthogonal to both, and Procrustes (r = 1: a sign) flips one of them: the aligned average cancels."""
    a1, a2 = torch.tensor([[0.1, 1.0, 0.0]], dtype=F64), torch.tensor([[-0.1, 1.0, 0.0]], dtype=F64)
    b = torch.tensor([[2.0], [-1.0], [0.5], [1.0]], dtype=F64)
    clients = [{"q": LowRank(b, a1)}, {"q": LowRank(b, a2)}]
    reference = {"q": LowRank(torch.ones(4, 1, dtype=F64), torch.tensor([[1.0, 0.0, 0.0]], dtype=F64))}
    w = torch.tensor([0.5, 0.5], dtype=F64)
    _, plain, plain_report = fedrot_round(clients, w, reference, 2, {"guard": False})
    # FedIT: B̄Ā = b·(0, 1, 0) = M exactly; aligned: client 2 becomes (−b, −a2), so Ā = (0.1, 0, 0) and B̄ = 0
    assert plain_report.modules["q"].fedit < 1e-12
    assert float(plain.adapter["q"].B.abs().max()) == 0.0
    assert plain_report.modules["q"].divergence == pytest.approx(1.0, abs=1e-12)
    _, guarded, report = fedrot_round(clients, w, reference, 2)
    assert guarded.diagnostics["aligned"] == {"q": False}
    assert report.modules["q"].divergence < 1e-12
    assert torch.allclose(guarded.adapter["q"].dense(), b @ torch.tensor([[0.0, 1.0, 0.0]], dtype=F64))


def test_fedrot_round_one_is_fedit_and_the_schedule_alternates():
    clients = canonical(make_clients(SHAPES, [2, 2, 2], alpha=3.0, seed=6))
    w = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    method = methods.build("fedrot_lora")
    state = method.init_server(ModelInfo({m: ModuleSpec(*s) for m, s in SHAPES.items()}, 2), seed=0)
    state, report = method.aggregate(state, contributions(clients, w), 1)
    for m in SHAPES:
        assert torch.allclose(state.adapter[m].dense().double(), fedit_dense(clients, w, m), atol=1e-12)
    assert report.divergence == pytest.approx(report.fedit, abs=1e-12) and report.fedit > 0.01
    assert state.diagnostics == {"align": "none"}
    assert [aligned_factor("alternate", t) for t in (1, 2, 3, 4, 5)] == [None, "A", "B", "A", "B"]
    assert [aligned_factor("B", t) for t in (1, 2, 3)] == [None, "B", "B"]
    with pytest.raises(ValueError, match="rounds count from 1"):
        aligned_factor("A", 0)


def test_fedrot_soft_rotation_interpolates_the_angle():
    """C = R(θ): the soft rotation is R(φ), φ = atan2(λ sin θ, 1 − λ + λ cos θ); a reflection is first replaced by
    the closest proper rotation (det +1), so with λ < 1 the result is always a rotation."""

    def rot(t):
        return torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=F64)

    theta, lam = 2.0, 0.4
    phi = math.atan2(lam * math.sin(theta), 1 - lam + lam * math.cos(theta))
    assert torch.allclose(rotation(rot(theta), lam), rot(phi), atol=1e-12)
    assert torch.allclose(rotation(rot(theta)), rot(theta), atol=1e-12)
    reflection = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=F64) @ torch.diag(torch.tensor([3.0, 1.0], dtype=F64))
    assert float(torch.linalg.det(rotation(reflection))) == pytest.approx(-1.0)  # λ = 1: reflections allowed
    soft = rotation(reflection, 0.7)
    assert float(torch.linalg.det(soft)) == pytest.approx(1.0) and torch.allclose(soft, torch.eye(2, dtype=F64))


def test_fedrot_soft_strength_spans_fedit_to_procrustes_and_keeps_every_update():
    clients = canonical(make_clients(SHAPES, [3, 3], alpha=4.0, seed=8))
    reference = canonical(make_clients(SHAPES, [3], alpha=4.0, seed=9))[0]
    w = torch.tensor([0.6, 0.4], dtype=F64)
    _, fedit, _ = fedrot_round(clients, w, reference, 1)
    _, hard, _ = fedrot_round(clients, w, reference, 2, {"guard": False})
    _, tiny, _ = fedrot_round(clients, w, reference, 2, {"guard": False, "strength": 1e-9})
    _, half, _ = fedrot_round(clients, w, reference, 2, {"guard": False, "strength": 0.5})
    for m in SHAPES:
        assert torch.allclose(tiny.adapter[m].A, fedit.adapter[m].A, atol=1e-7)  # λ → 0: no rotation
        assert not torch.allclose(half.adapter[m].A, hard.adapter[m].A, atol=1e-3)
        assert not torch.allclose(half.adapter[m].A, fedit.adapter[m].A, atol=1e-3)
        for a in clients:  # every rotated client pair still carries the client's own update
            rotated = rotate_towards(a[m], reference[m], "A", 0.5)
            assert torch.allclose(rotated.dense(), a[m].dense(), atol=1e-12)


def test_fedrot_bytes_are_fedits_and_downloads_truncate_to_each_rank():
    d, k = 12, 7
    clients = make_clients({"q": (d, k)}, [2, 3, 3], alpha=3.0, seed=0, dtype=torch.float32)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    method = methods.build("fedrot_lora")
    state = method.init_server(ModelInfo({"q": ModuleSpec(d, k)}, 3), 0)
    for rnd in (1, 2, 3):
        state, report = method.aggregate(state, contributions(canonical(clients), w), rnd)
        assert report.bytes_up == {u: 4 * c.rank * (d + k) for u, c in enumerate(clients)}
        assert report.bytes_down == {u: 4 * c.rank * (d + k) for u, c in enumerate(clients)}
        assert state.adapter["q"].rank == 3
        plan, _ = method.prepare(None, method.broadcast(state, ClientInfo(0, 2), rnd + 1), ClientInfo(0, 2), rnd + 1)
        assert torch.equal(plan.adapter["q"].B, state.adapter["q"].B[:, :2])


def test_fedrot_bad_input_names_the_value_and_what_was_expected():
    for params, match in [
        ({"align": "C"}, r"method\.align = 'C' .*expected one of 'alternate', 'A', 'B'"),
        ({"strength": 0.0}, r"method\.strength = 0\.0: expected a number in \(0, 1\]"),
        ({"strength": 1.5}, r"method\.strength = 1\.5"),
        ({"strength": float("nan")}, r"method\.strength = nan"),
        ({"guard": "yes"}, r"method\.guard = 'yes' .* expected true or false"),
    ]:
        with pytest.raises(ValueError, match=match):
            methods.build("fedrot_lora", params)
    with pytest.raises(ValueError, match=r"method\.align = 'C': expected one of"):  # the dataclass checks itself
        methods.params_class("fedrot_lora")(align="C")
    clients = canonical(make_clients({"q": (4, 3)}, [2, 2], alpha=3.0, seed=1))
    reference = canonical(make_clients({"q": (3, 4)}, [2], alpha=3.0, seed=1))[0]
    with pytest.raises(ValueError, match=r"module 'q': client updates are \(d, k\) = \(4, 3\), .* is \(3, 4\)"):
        fedrot_round(clients, torch.tensor([0.5, 0.5], dtype=F64), reference, 2)


def test_fedrot_permutation_invariant_and_inputs_not_mutated():
    clients = canonical(make_clients(SHAPES, [2, 3, 2, 3], alpha=6.0, seed=10))
    reference = canonical(make_clients(SHAPES, [3], alpha=6.0, seed=11))[0]
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    before, ref_before = copy.deepcopy(clients), copy.deepcopy(reference)
    perm = [2, 0, 3, 1]
    _, s1, _ = fedrot_round(clients, w, reference, 3)
    _, s2, _ = fedrot_round([clients[i] for i in perm], w[perm], reference, 3)
    for m in SHAPES:
        assert torch.allclose(s1.adapter[m].dense(), s2.adapter[m].dense(), atol=1e-10)
    for a, b in zip([*clients, reference], [*before, ref_before], strict=True):
        assert all(torch.equal(a[m].A, b[m].A) and torch.equal(a[m].B, b[m].B) for m in a)


# ==============================================================================================================
# FedSVD


def test_fedsvd_exact_orthonormal_and_bytes_from_payloads():
    method, server = start("fedsvd")
    states = {}
    for rnd in (1, 2, 3):
        A_prev = {m: lr.A.clone() for m, lr in server.adapter.items()}
        server, report, log = play(method, server, states, rnd, W3)
        for c, entry in log.items():
            assert entry["plan"].trainable == frozenset({"B"})
            assert all(torch.equal(entry["plan"].adapter[m].A, A_prev[m]) for m in SHAPES)
            assert keys_of(entry["up"]) == {"B"} and entry["up"].nbytes == B_BYTES + HEAD_BYTES == report.bytes_up[c]
            assert keys_of(entry["down"]) == {"A", "B"} and entry["down"].nbytes == A_BYTES + B_BYTES + HEAD_BYTES
            assert report.bytes_down[c] == A_BYTES + B_BYTES + HEAD_BYTES
        for m in SHAPES:
            got = server.adapter[m]
            # exact: B̂Â = Σ_u w_u B̃_u A_prev, the clients' trained updates (A frozen at A_prev)
            assert torch.allclose(dense(got), ideal_trained(log, W3, m), rtol=1e-5, atol=1e-6)
            assert torch.allclose(got.A.double() @ got.A.double().T, torch.eye(3, dtype=F64), atol=1e-6)
            # Â spans the row space of the aggregate: its rows are right singular vectors (B̂ᵀB̂ diagonal, σ²)
            sigma = torch.linalg.svdvals(ideal_trained(log, W3, m))[:3]
            assert torch.allclose(got.B.double().norm(dim=0), sigma, rtol=1e-5)
        assert report.divergence < 1e-6 and server.extras is not None


def test_fedsvd_golden_two_clients_by_hand():
    """B̄ = (3, 4)ᵀ, A = (1, 2, 2): B̄A = 15 · (0.6, 0.8)ᵀ(1, 2, 2)/3, so B̂ = ±(9, 12)ᵀ and Â = ±(1, 2, 2)/3."""
    method = methods.build("fedsvd")
    server = method.init_server(ModelInfo({"q": ModuleSpec(2, 3)}, 1, {}), 0)
    server = type(server)({"q": LowRank(torch.zeros(2, 1), torch.tensor([[1.0, 2.0, 2.0]]))}, None)
    ups = {0: torch.tensor([[0.0], [4.0]]), 1: torch.tensor([[4.0], [4.0]])}
    contribs = [Contribution(c, w, Payload({"lora.q.B": ups[c]})) for c, w in ((0, 0.25), (1, 0.75))]
    new, report = method.aggregate(server, contribs, 1)
    B, A = new.adapter["q"].B, new.adapter["q"].A
    sign = float(A[0, 0].sign())
    assert torch.allclose(A * sign, torch.tensor([[1.0, 2.0, 2.0]]) / 3, atol=1e-6)
    assert torch.allclose(B * sign, torch.tensor([[9.0], [12.0]]), atol=1e-5)
    assert report.divergence < 1e-7 and new.adapter["q"].rank == 1


def test_fedsvd_period_and_warmup_follow_the_official_flags():
    for params, refactorised in [({"svd_period": 2}, [False, True, False]), ({"svd_warmup": 2}, [False, False, True])]:
        method = methods.build("fedsvd", params)
        server = method.init_server(ModelInfo({m: ModuleSpec(*s) for m, s in SHAPES.items()}, 3, {}), seed=0)
        states = {}
        for rnd, svd in enumerate(refactorised, start=1):
            A_prev = {m: lr.A.clone() for m, lr in server.adapter.items()}
            server, report, log = play(method, server, states, rnd, W3)
            assert report.diagnostics == {"refactorised": svd}
            for m in SHAPES:
                assert torch.equal(server.adapter[m].A, A_prev[m]) != svd
                Bbar = sum(w * log[c]["trained"][m].B.double() for c, w in W3.items())
                if not svd:
                    assert torch.allclose(server.adapter[m].B.double(), Bbar, atol=1e-6)
            assert report.divergence < 1e-6


def test_fedsvd_zero_aggregate_keeps_a_orthonormal():
    method = methods.build("fedsvd")
    server = method.init_server(ModelInfo({"q": ModuleSpec(6, 4)}, 2, {}), 0)
    contribs = [Contribution(c, 0.5, Payload({"lora.q.B": torch.zeros(6, 2)})) for c in (0, 1)]
    new, report = method.aggregate(server, contribs, 1)
    A = new.adapter["q"].A.double()
    assert torch.allclose(A @ A.T, torch.eye(2, dtype=F64), atol=1e-6) and float(new.adapter["q"].B.abs().max()) == 0
    assert report.divergence == 0.0


def test_fedsvd_refuses_a_in_uploads_changed_a_unequal_ranks_and_bad_params():
    method, server = start("fedsvd")
    _, _, log = play(method, server, {}, 1, {0: 1.0})
    bad = log[0]["up"].tensors | {"lora.q.A": server.adapter["q"].A}
    with pytest.raises(ValueError, match=r"fedsvd: the upload of client 0 carries lora.<module>.A .*only B travels"):
        method.aggregate(server, [Contribution(0, 1.0, Payload(bad))], 1)
    with pytest.raises(ValueError, match=r"fedsvd: client 3 has rank 2.*needs equal ranks"):
        method.broadcast(server, ClientInfo(3, 2), 1)
    info = ClientInfo(0, 3)
    plan, cs = method.prepare(method.init_client(info), method.broadcast(server, info, 1), info, 1)
    moved = {m: LowRank(lr.B, lr.A + 1.0) for m, lr in plan.adapter.items()}
    with pytest.raises(RuntimeError, match=r"fedsvd: client 0, module q: factor A changed during training"):
        method.upload(cs, moved, {}, info, 1)
    for params, match in [
        ({"svd_period": 0}, r"method\.svd_period = 0: expected an integer >= 1"),
        ({"svd_warmup": -1}, r"method\.svd_warmup = -1: expected an integer >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            methods.build("fedsvd", params)


# ==============================================================================================================
# HetLoRA rank self-pruning

GAMMA = 0.75  # rank 4 → tail from ⌊0.75·4⌋ = 3: prune to 3, then 2, then 1, then no further


def hetlora(prune: bool = True, gamma: float = GAMMA):
    return methods.build("hetlora", {"reg_gamma": gamma, "prune": prune})


def shrink_tail(plan, gen, factor: float = 0.5):
    """Simulated training: new B̃ and A, then the tail components (from ⌊γr⌋) scaled so their norm falls below the
    download's (by ``factor`` of the download's tail, or zero when the download's tail was zero)."""
    out = {}
    for m, lr in plan.adapter.items():
        t = int(GAMMA * lr.rank)
        B = lr.B + 0.1 * torch.randn(lr.B.shape, generator=gen)
        A = lr.A + 0.1 * torch.randn(lr.A.shape, generator=gen)
        scale_b = factor * float(lr.B[:, t:].norm()) / max(float(B[:, t:].norm()), 1e-30)
        scale_a = factor * float(lr.A[t:].norm()) / max(float(A[t:].norm()), 1e-30)
        B[:, t:] *= scale_b
        A[t:] *= scale_a
        out[m] = LowRank(B, A)
    return out, {}


def het_round(method, server, states, rnd, ranks, weights, train):
    gen = torch.Generator().manual_seed(rnd)
    log, contribs = {}, []
    for c, w in weights.items():
        info = ClientInfo(c, ranks[c])
        down = method.broadcast(server, info, rnd)
        plan, cs = method.prepare(states.get(c, method.init_client(info)), down, info, rnd)
        trained, head = train(plan, gen)
        up, states[c] = method.upload(cs, trained, head, info, rnd)
        log[c] = {"down": down, "plan": plan, "trained": trained, "up": up}
        contribs.append(Contribution(c, w, up))
    server, report = method.aggregate(server, contribs, rnd)
    return server, report, log


def het_start(ranks, prune=True):
    method = hetlora(prune)
    specs = {m: ModuleSpec(*s) for m, s in SHAPES.items()}
    server = method.init_server(ModelInfo(specs, max(ranks.values())), seed=0)
    gen = torch.Generator().manual_seed(99)  # a global pair with a non-zero B, as after a first round
    adapter = {m: LowRank(torch.randn(lr.B.shape, generator=gen), lr.A) for m, lr in server.adapter.items()}
    return method, type(server)(adapter, None, rank=server.rank)


def test_pruning_rule_golden():
    assert [pruned_rank(r, 0.75, 2.0, 1.0) for r in (4, 3, 2, 1)] == [3, 2, 1, 1]
    assert pruned_rank(4, 0.75, 1.0, 1.0) == 4  # not decreased: kept
    assert pruned_rank(4, 0.75, 0.0, 0.0) == 4  # a zero tail cannot decrease (round 1: B = 0)
    assert pruned_rank(8, 0.99, 2.0, 1.0) == 7 and pruned_rank(8, 1.0, 2.0, 1.0) == 8  # γ = 1: no tail
    B = torch.tensor([[3.0, 0.0, 4.0], [0.0, 1.0, 0.0]])
    A = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    # t = ⌊0.5·3⌋ = 1: ‖B[:, 1:]‖ = √17, ‖A[1:]‖ = √8
    assert tail_norm({"q": LowRank(B, A)}, 0.5) == pytest.approx(math.sqrt(17 * 8))


def test_pruning_tail_is_the_regularisers_tail_on_a_real_peft_model():
    """training.penalty (λ = 1) on PEFT's B = B̃/s equals tail_norm of the canonical factors divided by s."""
    from conftest import tiny_peft

    pm = tiny_peft()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in peft_io.lora_parameters(pm).items():
            for t in p:
                t.copy_(torch.randn(t.shape, generator=gen))
    adapter, _ = peft_io.read_adapter(pm)
    s = 6.0 / 4
    reg = float(penalty(peft_io.lora_parameters(pm), Regularizer("hetlora_tail", {"lambda": 1.0, "gamma": GAMMA})))
    assert reg == pytest.approx(tail_norm(adapter, GAMMA) / s, rel=1e-6)


def norm_weighted_mean(uploads, r_max):
    """HetLoRA's dense reference: ω_u ∝ sqrt(Σ_m ‖B̃_u,m A_u,m‖²), zero-padded factors averaged with ω."""
    norms = torch.tensor([math.sqrt(sum(float(lr.dense().double().norm()) ** 2 for lr in u.values())) for u in uploads])
    omega = (norms / norms.sum()).tolist()
    out = {}
    for m in uploads[0]:
        B = sum(o * u[m].pad(r_max).B.double() for o, u in zip(omega, uploads, strict=True))
        A = sum(o * u[m].pad(r_max).A.double() for o, u in zip(omega, uploads, strict=True))
        out[m] = (B, A)
    return out


def test_client_prunes_when_its_tail_shrank_and_the_server_truncates_its_downloads():
    ranks = {0: 4, 1: 2}
    weights = {0: 0.6, 1: 0.4}
    method, server = het_start(ranks)
    states = {}
    current = dict(ranks)
    scalars = sum(d + k for d, k in SHAPES.values())  # per rank component, A and B of every module
    for rnd in (2, 3, 4, 5):
        server, report, log = het_round(method, server, states, rnd, ranks, weights, shrink_tail)
        for c, entry in log.items():
            assert entry["plan"].rank == current[c] == entry["down"].tensors["lora.q.B"].shape[1]
            t = int(GAMMA * current[c])
            current[c] = t if t >= 1 else current[c]  # the tail always shrank here
            assert entry["up"].meta["rank"] == current[c] == states[c].rank
            assert entry["up"].tensors["lora.v.A"].shape == (current[c], SHAPES["v"][1])
            assert report.bytes_up[c] == 4 * current[c] * scalars  # float32 factors, no head
            assert report.bytes_down[c] == 4 * current[c] * scalars  # next download, truncated to the new rank
        assert report.diagnostics["ranks"] == [current[0], current[1]] and server.ranks == current
        uploads = [{m: log[c]["trained"][m].truncate(current[c]) for m in SHAPES} for c in weights]
        want = norm_weighted_mean(uploads, 4)
        for m, (B, A) in want.items():  # the global pair stays at r_max: the norm-weighted zero-padded mean
            assert server.adapter[m].rank == 4
            assert torch.allclose(server.adapter[m].dense().double(), B @ A, atol=1e-6)
            for c in weights:  # what the client's model applies next round: the global pair at its rank
                info = ClientInfo(c, ranks[c])
                plan, _ = method.prepare(states[c], method.broadcast(server, info, rnd + 1), info, rnd + 1)
                r = current[c]
                assert torch.allclose(plan.adapter[m].dense().double(), B[:, :r] @ A[:r], atol=1e-6)
    assert current == {0: 1, 1: 1}


def test_no_pruning_when_the_tail_grew_or_pruning_is_off():
    ranks, weights = {0: 4}, {0: 1.0}
    for prune, train in [(True, lambda plan, gen: shrink_tail(plan, gen, factor=2.0)), (False, shrink_tail)]:
        method, server = het_start(ranks, prune)
        states = {}
        server, report, log = het_round(method, server, states, 2, ranks, weights, train)
        assert log[0]["up"].meta["rank"] == 4 == states[0].rank and report.diagnostics["ranks"] == [4]
    method = hetlora()  # round 1: B = 0, so the download's tail norm is 0 and cannot decrease
    server = method.init_server(ModelInfo({m: ModuleSpec(*s) for m, s in SHAPES.items()}, 4), seed=0)
    states = {}
    _, _, log = het_round(method, server, states, 1, ranks, weights, lambda p, g: shrink_tail(p, g, factor=0.0))
    assert log[0]["up"].meta["rank"] == 4


def pruned_once():
    """A rank-4 client whose tail shrank in round 2: it uploaded at rank 3. Returns method, server, client states."""
    ranks, weights = {0: 4}, {0: 1.0}
    method, server = het_start(ranks)
    states = {}
    server, _, _ = het_round(method, server, states, 2, ranks, weights, shrink_tail)
    return method, server, states


def test_pruned_rank_mismatch_is_a_clear_error():
    method, server, _ = pruned_once()
    info = ClientInfo(0, 4)
    with pytest.raises(ValueError, match=r"hetlora: client 0: the download has rank 3, the client's current rank is 4"):
        method.prepare(method.init_client(info), method.broadcast(server, info, 3), info, 3)
    two = pack_adapter({m: lr.truncate(2) for m, lr in server.adapter.items()})
    bad = [Contribution(0, 1.0, Payload(two, {"rank": 3}))]
    with pytest.raises(ValueError, match=r"client 0's upload says rank 3 in its meta, but its factors have rank 2"):
        method.aggregate(server, bad, 3)
    with pytest.raises(ValueError, match=r"method\.prune = 'yes' .* expected true or false"):
        methods.build("hetlora", {"prune": "yes"})


def test_pruned_client_trains_at_its_new_rank_with_the_rescaled_peft_scale():
    """The PEFT edge at the pruned rank r' applies exactly the truncated canonical update (s = α/r' there)."""
    method, server, states = pruned_once()
    info = ClientInfo(0, 4)
    plan, _ = method.prepare(states[0], method.broadcast(server, info, 3), info, 3)
    assert plan.rank == 3
    pm = peft_bert()
    specs = peft_io.module_specs(pm)
    gen = torch.Generator().manual_seed(3)
    pruned = {
        m: LowRank(torch.randn(s.d, 3, generator=gen), torch.randn(3, s.k, generator=gen)) for m, s in specs.items()
    }
    peft_io.load_plan(pm, type(plan)(rank=3, adapter=pruned), seed=0)
    for m, delta in merged_deltas(pm).items():
        assert torch.allclose(delta.double(), pruned[m].dense().double(), atol=1e-5)


# ==============================================================================================================
# Both weight layouts through the PEFT edge (nn.Linear on BERT incl. a non-square layer, Conv1D on GPT-2)


def edge_round(method, pm, server, states, rnd, weights, gen):
    """One round with the real PEFT edge: apply the plan to the model, perturb exactly the trainable tensors (what a
    training step may move), read the canonical adapter back, upload. Returns PEFT's merged delta per client."""
    deltas, contribs = {}, []
    for c, w in weights.items():
        info = ClientInfo(c, 4)
        plan, cs = method.prepare(
            states.get(c, method.init_client(info)), method.broadcast(server, info, rnd), info, rnd
        )
        peft_io.load_plan(pm, plan, seed=0)
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
        deltas[c] = merged_deltas(pm)
        trained, extras = peft_io.read_adapter(pm)
        up, states[c] = method.upload(cs, trained, extras, info, rnd)
        contribs.append(Contribution(c, w, up))
    server, report = method.aggregate(server, contribs, rnd)
    return server, report, deltas


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("name", ["fedrot_lora", "fedsvd", "hetlora"])
def test_layouts_through_the_peft_edge(name, kind):
    pm = peft_bert() if kind == "bert" else peft_gpt2()
    conv = kind == "gpt2"  # Conv1D stores (in, out): PEFT's merged delta is ΔWᵀ
    method = methods.build(name, {"prune": False} if name == "hetlora" else None)  # pruning: tested above
    _, extras = peft_io.read_adapter(pm)
    server = method.init_server(ModelInfo(peft_io.module_specs(pm), 4, extras), seed=0)
    weights, states, gen = {0: 0.3, 1: 0.7}, {}, torch.Generator().manual_seed(0)
    for rnd in (1, 2):
        server, report, deltas = edge_round(method, pm, server, states, rnd, weights, gen)
        exported = method.export(server)
        peft_io.write_adapter(pm, exported.adapter, exported.extras, rank=4, seed=0)
        for m, got in merged_deltas(pm).items():
            M = sum(w * deltas[c][m].double() for c, w in weights.items())
            want = exported.adapter[m].dense().double()
            assert torch.allclose(got.double(), want.T if conv else want, atol=1e-5)
            assert report.modules[m].divergence == pytest.approx(rel_err(M, got.double()), abs=1e-5)
            if name == "fedsvd":  # exact whatever the layout
                assert rel_err(M, got.double()) < 1e-5


# ==============================================================================================================
# Registry and the real packaged MiniLM


def test_registered_with_capabilities_and_defaults():
    assert {"fedrot_lora", "fedsvd"} <= set(methods.available())
    rot, svd = methods.capabilities("fedrot_lora"), methods.capabilities("fedsvd")
    assert (rot.exact, rot.secure_aggregation, rot.heterogeneous_ranks) == (False, False, "zero-pad")
    assert (svd.exact, svd.secure_aggregation, svd.heterogeneous_ranks) == (True, True, "no")
    assert "arXiv 2602.23638" in rot.paper and "arXiv 2505.12805" in svd.paper
    assert methods.capabilities("hetlora").heterogeneous_ranks == "native" and methods.make_params("hetlora").prune
    assert methods.make_params("fedrot_lora") == methods.params_class("fedrot_lora")("alternate", 1.0, True)


MODULES, D, R8 = 12, 384, 8  # MiniLM: 6 layers × (query, value), 384 × 384
HEAD = (2 * D + 2) * 4


def run_tiny(rt_csv, tmp_path, *extra):
    """A 2-client run of ``tiny_config`` on the packaged MiniLM; returns its directory and round records."""
    run_dir, _ = engines.run(tiny_config(rt_csv, tmp_path / "run", *extra), tmp_path / "run")
    return run_dir, read_records(run_dir)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fedsvd_two_clients_two_rounds_on_minilm(rt_csv, tmp_path):
    run_dir, (r1, r2) = run_tiny(rt_csv, tmp_path, "federation.method=fedsvd")
    assert r1["bytes_up"] == r2["bytes_up"] == 2 * (MODULES * R8 * D * 4 + HEAD)  # B only
    assert r1["bytes_down"] == r2["bytes_down"] == 2 * (MODULES * R8 * 2 * D * 4 + HEAD)  # A and B
    assert r1["divergence"] < 1e-5 and r2["divergence"] < 1e-5
    saved = peft_io.read_adapter_dir(run_dir / "adapter").adapter
    for lr in saved.values():
        assert torch.allclose(lr.A @ lr.A.T, torch.eye(R8), atol=1e-5) and float(lr.B.abs().max()) > 0


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fedrot_two_clients_two_rounds_on_minilm(rt_csv, tmp_path):
    _, (r1, r2) = run_tiny(rt_csv, tmp_path, "federation.method=fedrot_lora")
    assert r1["diagnostics"] == {"align": "none"} and r2["diagnostics"]["align"] == "A"
    assert r1["divergence"] == pytest.approx(r1["fedit_divergence"], rel=1e-9)
    assert 0 < r2["divergence"] <= r2["fedit_divergence"] + 1e-12
    assert r1["bytes_up"] == r2["bytes_up"] == 2 * (MODULES * R8 * 2 * D * 4 + HEAD)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_hetlora_pruning_two_clients_three_rounds_on_minilm(rt_csv, tmp_path):
    """A strong tail penalty and a large learning rate make client 0's tail shrink in round 2 (with AdamW's
    sign-like first steps a tail smaller than the learning rate cannot shrink); it then trains at rank 2."""
    extra = ["federation.method=hetlora", "model.lora.ranks=[4, 8]", "method.reg_lambda=1000.0"]
    extra += ["method.reg_gamma=0.5", "train.lr=0.02", "federation.rounds=3"]
    run_dir, (r1, r2, r3) = run_tiny(rt_csv, tmp_path, *extra)
    per_rank = MODULES * 2 * D * 4  # one rank component of every module, A and B, float32
    assert r1["diagnostics"]["ranks"] == [4, 8]  # round 1 starts from B = 0: nothing to prune
    assert r2["diagnostics"]["ranks"] == [2, 8]  # client 0's tail shrank: ⌊0.5·4⌋
    for before, record in ((r1, r2), (r2, r3)):
        assert record["bytes_down"] == sum(r * per_rank + HEAD for r in before["diagnostics"]["ranks"])
        assert record["bytes_up"] == sum(r * per_rank + HEAD for r in record["diagnostics"]["ranks"])
    assert all(
        now in (r, r // 2) for now, r in zip(r3["diagnostics"]["ranks"], r2["diagnostics"]["ranks"], strict=True)
    )
    saved = peft_io.read_adapter_dir(run_dir / "adapter")
    assert {lr.rank for lr in saved.adapter.values()} == {8}  # the global pair keeps the broadcast rank
