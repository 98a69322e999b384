"""Every aggregation against the dense definition ΔW = s·B·A and the ideal update M = Σ w_u s_u B_u A_u.

Expected values come from dense float64 references computed here, or from inputs built to have closed forms;
never from the code under test. Always α ≠ r, non-square modules, unequal weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RawClient, ideal, make_clients
from fedlora import methods
from fedlora.methods.base import ClientInfo, ModelInfo, ModuleSpec
from fedlora.payload import pack_adapter
from fedlora.types import Contribution, LowRank, Payload

SHAPES = {"q": (12, 7), "v": (5, 9)}
FOUNDATION = ["fedit", "flora_na", "flora", "fedex_lora", "flexlora", "hetlora"]  # server-only rules (FactorMethod)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_round(name: str, clients: list[RawClient], weights: torch.Tensor, params: dict | None = None):
    """One aggregation through the Method API; returns the method, new state, report."""
    method = methods.build(name, params)
    specs = {m: ModuleSpec(*shape) for m, shape in _shapes(clients).items()}
    state = method.init_server(ModelInfo(specs, max(c.rank for c in clients)), seed=0)
    contributions = [
        Contribution(i, float(w), Payload(pack_adapter(c.canonical())))
        for i, (w, c) in enumerate(zip(weights, clients, strict=True))
    ]
    new_state, report = method.aggregate(state, contributions, rnd=1)
    return method, new_state, report


def _shapes(clients: list[RawClient]) -> dict[str, tuple[int, int]]:
    return {m: (B.shape[0], A.shape[1]) for m, (B, A) in clients[0].factors.items()}


def effective_update(method, state, client: int, rank: int, module: str) -> torch.Tensor:
    """What a client's model applies after the download: base edits + s·B·A with B = B̂/s (so B̂Â)."""
    info = ClientInfo(client, rank)
    plan, _ = method.prepare(method.init_client(info), method.broadcast(state, info, 2), info, 2)
    total = torch.zeros(_dims(state, plan, module), dtype=torch.float64)
    for edit in plan.base_edits:
        total += edit.delta(module).double()
    if plan.adapter is not None:
        assert plan.adapter[module].rank == rank
        total += plan.adapter[module].dense().double()
    return total


def _dims(state, plan, module):
    if plan.adapter is not None:
        return plan.adapter[module].shape
    return plan.base_edits[0].delta(module).shape


weights_st = st.lists(st.floats(0.05, 5.0), min_size=1, max_size=5).map(lambda w: torch.tensor(w) / sum(w))


@st.composite
def scenario(draw, hetero: bool):
    w = draw(weights_st)
    U = len(w)
    ranks = [draw(st.integers(1, 4)) for _ in range(U)] if hetero else [draw(st.integers(1, 4))] * U
    alpha = draw(st.sampled_from([3.0, 16.0, 0.5]))
    rslora = draw(st.booleans())
    shapes = {"q": (draw(st.integers(2, 11)), draw(st.integers(2, 11))), "v": (6, 13)}
    seed = draw(st.integers(0, 10_000))
    return make_clients(shapes, ranks, alpha, rslora, seed), w


@pytest.mark.parametrize("name", ["flora", "fedex_lora"])
@SETTINGS
@given(data=st.data())
def test_exact_methods_reproduce_the_ideal_update(name, data):
    clients, w = data.draw(scenario(hetero=name == "flora"))
    method, state, report = run_round(name, clients, w)
    for m in SHAPES:
        M = ideal(clients, w, m)
        for u, c in enumerate(clients):
            got = effective_update(method, state, u, c.rank, m)
            assert torch.allclose(got, M, rtol=1e-5, atol=1e-6 * float(M.abs().max())), (m, u)
    assert report.divergence < 1e-6


@SETTINGS
@given(data=st.data())
def test_fedit_is_the_weighted_mean_of_each_factor_zero_padded(data):
    clients, w = data.draw(scenario(hetero=True))
    method, state, _ = run_round("fedit", clients, w)
    r_max = max(c.rank for c in clients)
    for m in SHAPES:
        d, k = clients[0].factors[m][0].shape[0], clients[0].factors[m][1].shape[1]
        B = torch.zeros(d, r_max, dtype=torch.float64)
        A = torch.zeros(r_max, k, dtype=torch.float64)
        for wu, c in zip(w, clients, strict=True):
            Bu, Au = c.factors[m]
            B[:, : c.rank] += float(wu) * c.scale * Bu
            A[: c.rank] += float(wu) * Au
        assert torch.allclose(state.adapter[m].B.double(), B, atol=1e-12)
        assert torch.allclose(state.adapter[m].A.double(), A, atol=1e-12)
        for u, c in enumerate(clients):  # truncated to each client's rank on download
            got = effective_update(method, state, u, c.rank, m)
            assert torch.allclose(got, B[:, : c.rank] @ A[: c.rank], atol=1e-10)


@SETTINGS
@given(data=st.data())
def test_flexlora_reaches_eckart_young_at_each_client_rank(data):
    clients, w = data.draw(scenario(hetero=True))
    method, state, report = run_round("flexlora", clients, w)
    for m in SHAPES:
        M = ideal(clients, w, m)
        sigma = torch.linalg.svdvals(M)
        for u, c in enumerate(clients):
            got = effective_update(method, state, u, c.rank, m)
            e_ey = float(sigma[c.rank :].norm())
            assert float((M - got).norm()) <= e_ey + 1e-6 * float(M.norm())
        r_max = max(c.rank for c in clients)
        assert report.modules[m].divergence == pytest.approx(float(sigma[r_max:].norm() / M.norm()), abs=1e-6)


@SETTINGS
@given(data=st.data())
def test_flora_na_lies_between_eckart_young_and_fedit(data):
    clients, w = data.draw(scenario(hetero=False))
    _, state, report = run_round("flora_na", clients, w)
    _, fedit_state, _ = run_round("fedit", clients, w)
    for m in SHAPES:
        M = ideal(clients, w, m)
        norm = float(M.norm())
        err = float((M - state.adapter[m].dense().double()).norm()) / norm
        fedit_err = float((M - fedit_state.adapter[m].dense().double()).norm()) / norm
        ey = float(torch.linalg.svdvals(M)[clients[0].rank :].norm()) / norm
        assert ey - 1e-7 <= err <= fedit_err + 1e-7
        assert report.modules[m].divergence == pytest.approx(err, abs=1e-6)
        assert report.modules[m].fedit == pytest.approx(fedit_err, abs=1e-6)
        assert report.modules[m].eckart_young == pytest.approx(ey, abs=1e-6)


def gauge_copies(cs: list[float], seed: int = 1) -> list[RawClient]:
    """Copies of one client with B → c B, A → A / c: every B_u A_u is the same."""
    base = make_clients(SHAPES, [3], alpha=7.0, seed=seed)[0]
    return [
        RawClient({m: (c * B, A / c) for m, (B, A) in base.factors.items()}, base.alpha, base.rank, base.rslora)
        for c in cs
    ]


def test_golden_gauge_copies_flora_na_exact_fedit_closed_form():
    cs = [0.25, 1.0, 4.0]
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    clients = gauge_copies(cs)
    _, _, na = run_round("flora_na", clients, w)
    _, _, fedit = run_round("fedit", clients, w)
    # FedIT gives (Σ w c)(Σ w / c)·BA, so its relative error is exactly (Σ w c)(Σ w / c) − 1.
    expected = float(
        sum(wu * c for wu, c in zip(w, cs, strict=True)) * sum(wu / c for wu, c in zip(w, cs, strict=True))
    )
    assert fedit.divergence == pytest.approx(expected - 1, rel=1e-6)
    assert expected - 1 > 0.5
    assert na.divergence < 1e-6


def test_golden_flexlora_on_known_singular_values():
    """M = Σ_i σ_i u_i v_iᵀ split over two clients; EY at rank 2 is sqrt(σ_3² + σ_4²) = 5 (σ = 10, 6, 4, 3)."""
    gen = torch.Generator().manual_seed(3)
    Uo, _ = torch.linalg.qr(torch.randn(9, 4, generator=gen, dtype=torch.float64))
    Vo, _ = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    sigma = torch.tensor([10.0, 6.0, 4.0, 3.0], dtype=torch.float64)
    # client 0 holds components 0 and 2, client 1 components 1 and 3, each with weight 1/2 (so factor 2 inside)
    c0 = RawClient({"q": (2 * Uo[:, [0, 2]] * sigma[[0, 2]], Vo[:, [0, 2]].T)}, alpha=2.0, rank=2, rslora=False)
    c1 = RawClient({"q": (2 * Uo[:, [1, 3]] * sigma[[1, 3]], Vo[:, [1, 3]].T)}, alpha=2.0, rank=2, rslora=False)
    # alpha = r = 2 would hide scale bugs: use alpha 3 with B rescaled so s·B is unchanged
    c0 = RawClient({"q": (c0.factors["q"][0] * 2 / 3, c0.factors["q"][1])}, alpha=3.0, rank=2, rslora=False)
    c1 = RawClient({"q": (c1.factors["q"][0] * 2 / 3, c1.factors["q"][1])}, alpha=3.0, rank=2, rslora=False)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    _method, state, report = run_round("flexlora", [c0, c1], w)
    M = (Uo * sigma) @ Vo.T
    got = state.adapter["q"].dense().double()
    assert float((M - got).norm()) == pytest.approx(5.0, rel=1e-9)
    assert report.modules["q"].eckart_young == pytest.approx(5.0 / float(sigma.norm()), rel=1e-9)
    # the rank-2 result is the top two components: σ = 10 and 6
    assert torch.allclose(torch.linalg.svdvals(got)[:2], sigma[:2], rtol=1e-9)


def test_golden_flora_stack_two_clients_by_hand():
    c = make_clients({"q": (4, 3)}, [1, 2], alpha=5.0, seed=7)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    _method, state, _ = run_round("flora", c, w)
    (edit,) = state.base_edits
    by_hand = 0.25 * (5.0 / 1) * c[0].factors["q"][0] @ c[0].factors["q"][1]
    by_hand = by_hand + 0.75 * (5.0 / 2) * c[1].factors["q"][0] @ c[1].factors["q"][1]
    assert torch.allclose(edit.delta("q").double(), by_hand, atol=1e-12)
    assert state.adapter is None  # clients restart from a fresh init


def test_golden_fedex_residual_two_clients_by_hand():
    c = make_clients({"q": (5, 3)}, [2, 2], alpha=3.0, seed=8)
    w = torch.tensor([0.4, 0.6], dtype=torch.float64)
    _, state, _ = run_round("fedex_lora", c, w)
    s = 3.0 / 2
    (B0, A0), (B1, A1) = c[0].factors["q"], c[1].factors["q"]
    Bbar, Abar = s * (0.4 * B0 + 0.6 * B1), 0.4 * A0 + 0.6 * A1
    residual = 0.4 * s * B0 @ A0 + 0.6 * s * B1 @ A1 - Bbar @ Abar
    assert torch.allclose(state.base_edits[0].delta("q").double(), residual, atol=1e-12)
    assert torch.allclose(state.adapter["q"].B.double(), Bbar, atol=1e-12)


@pytest.mark.parametrize("name", FOUNDATION)
def test_identical_clients_give_back_that_clients_update(name):
    one = make_clients(SHAPES, [3], alpha=11.0, seed=5)[0]
    clients = [one] * 3
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    method, state, _report = run_round(name, clients, w)
    for m in SHAPES:
        got = effective_update(method, state, 0, 3, m)
        assert torch.allclose(got, one.delta(m), rtol=1e-6, atol=1e-9), (name, m)


@pytest.mark.parametrize("name", FOUNDATION)
def test_permuting_clients_with_their_weights_changes_nothing(name):
    clients = make_clients(SHAPES, [2, 2, 2, 2], alpha=4.0, seed=9)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    perm = [2, 0, 3, 1]
    m1, s1, r1 = run_round(name, clients, w)
    m2, s2, r2 = run_round(name, [clients[i] for i in perm], w[perm])
    for m in SHAPES:
        a = effective_update(m1, s1, 0, 2, m)
        b = effective_update(m2, s2, 0, 2, m)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), (name, m)
    assert r1.divergence == pytest.approx(r2.divergence, abs=1e-7)


@pytest.mark.parametrize("name", FOUNDATION)
def test_inputs_are_never_mutated(name):
    clients = make_clients(SHAPES, [2, 3] if name in ("flora", "flexlora", "hetlora") else [2, 2], 5.0, seed=2)
    before = copy.deepcopy(clients)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    method = methods.build(name)
    canon = [c.canonical() for c in clients]
    canon_before = copy.deepcopy(canon)
    contributions = [
        Contribution(i, float(wu), Payload(pack_adapter(a))) for i, (wu, a) in enumerate(zip(w, canon, strict=False))
    ]
    method.aggregate(method.init_server(ModelInfo({}, 3), 0), contributions, 1)
    for a, b in zip(canon, canon_before, strict=True):
        for m in a:
            assert torch.equal(a[m].A, b[m].A) and torch.equal(a[m].B, b[m].B)
    for a, b in zip(clients, before, strict=True):
        for m in a.factors:
            assert all(torch.equal(x, y) for x, y in zip(a.factors[m], b.factors[m], strict=True))


@pytest.mark.parametrize("route", ["gram", "factor"])
@pytest.mark.parametrize("shared", [False, True])
def test_flora_na_routes_and_solvers_agree(route, shared):
    clients = make_clients(SHAPES, [3] * 4, alpha=6.0, seed=4)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    ref = run_round("flora_na", clients, w, {"route": "gram", "shared_coefficients": shared})[2]
    got = run_round("flora_na", clients, w, {"route": route, "shared_coefficients": shared})[2]
    als = run_round("flora_na", clients, w, {"route": route, "solver": "als", "shared_coefficients": shared})[2]
    assert got.divergence == pytest.approx(ref.divergence, abs=1e-8)
    # ALS stops at a stationary point that can be worse than Newton's, never worse than FedIT.
    assert ref.divergence - 1e-9 <= als.divergence <= als.fedit + 1e-9
    assert ref.divergence <= ref.fedit + 1e-9


def test_flora_na_shared_coefficients_is_no_better_than_per_module():
    clients = make_clients(SHAPES, [2] * 3, alpha=6.0, seed=12)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    per = run_round("flora_na", clients, w)[2]
    shared = run_round("flora_na", clients, w, {"shared_coefficients": True})[2]
    assert per.divergence <= shared.divergence + 1e-9 <= per.fedit + 2e-9


def test_flora_na_sum_target_scales_identical_clients_by_u():
    one = make_clients(SHAPES, [2], alpha=3.0, seed=13)[0]
    w = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    _method, state, report = run_round("flora_na", [one] * 3, w, {"target": "sum"})
    for m in SHAPES:
        assert torch.allclose(state.adapter[m].dense().double(), 3 * one.delta(m), rtol=1e-6)
    assert report.divergence < 1e-6


def test_flora_na_gauge_rules():
    clients = gauge_copies([0.5, 2.0, 1.0], seed=3)
    w = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    _, fedit, _ = run_round("fedit", clients, w)
    _, ratio, _ = run_round("flora_na", clients, w, {"gauge": "fedit_ratio"})
    _, bal, _ = run_round("flora_na", clients, w, {"gauge": "balanced"})
    for m in SHAPES:
        f = fedit.adapter[m]
        assert float(ratio.adapter[m].B.norm() / ratio.adapter[m].A.norm()) == pytest.approx(
            float(f.B.norm() / f.A.norm()), rel=1e-6
        )
        assert float(bal.adapter[m].B.norm() / bal.adapter[m].A.norm()) == pytest.approx(1.0, rel=1e-6)
        assert torch.allclose(ratio.adapter[m].dense(), bal.adapter[m].dense(), rtol=1e-6, atol=1e-9)


def test_hetlora_norm_weights_from_grams():
    clients = make_clients(SHAPES, [1, 3], alpha=2.0, seed=6)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    _, state, _ = run_round("hetlora", clients, w)
    norms = torch.tensor(
        [sum(float(c.delta(m).norm() ** 2) for m in SHAPES) ** 0.5 for c in clients], dtype=torch.float64
    )
    assert state.diagnostics["weights"] == pytest.approx((norms / norms.sum()).tolist(), rel=1e-9)


def test_divergence_from_factors_equals_dense():
    from fedlora.linalg import module_errors

    clients = make_clients({"q": (30, 17)}, [2, 3, 4], alpha=5.0, seed=11)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    canon = [c.canonical()["q"] for c in clients]
    gen = torch.Generator().manual_seed(0)
    cand = LowRank(torch.randn(30, 4, generator=gen, dtype=torch.float64), torch.randn(4, 17, generator=gen).double())
    err = module_errors([c.B for c in canon], [c.A for c in canon], w, [cand], rank=3)
    M = ideal(clients, w, "q")
    assert err.divergence == pytest.approx(float((M - cand.dense()).norm() / M.norm()), rel=1e-9)
    assert err.eckart_young == pytest.approx(float(torch.linalg.svdvals(M)[3:].norm() / M.norm()), rel=1e-9)
    assert err.ideal_norm == pytest.approx(float(M.norm()), rel=1e-12)


def test_dense_route_of_the_svd_matches_the_core_route(monkeypatch):
    from fedlora import linalg

    clients = make_clients({"q": (10, 8)}, [3, 3], alpha=5.0, seed=1)
    w = torch.tensor([0.6, 0.4], dtype=torch.float64)
    Bs, As = [c.canonical()["q"].B for c in clients], [c.canonical()["q"].A for c in clients]
    core = linalg.ideal_svd(Bs, As, w)
    monkeypatch.setattr(linalg, "CORE_RATIO", 0.0)
    dense = linalg.ideal_svd(Bs, As, w)
    assert torch.allclose(core.S, dense.S[: core.S.numel()], rtol=1e-10)
    only_values = linalg.ideal_svd(Bs, As, w, vectors=False)
    assert torch.allclose(only_values.S, dense.S, rtol=1e-6) and only_values.U.numel() == 0
    assert only_values.energy() == pytest.approx(core.energy(), rel=1e-12)
    monkeypatch.setattr(linalg, "DENSE_FP32_SIZE", 0)  # the float32 branch used for large M
    low = linalg.ideal_svd(Bs, As, w)
    assert low.formed is not None and low.formed.dtype == torch.float32
    assert torch.allclose(low.S[: core.S.numel()], core.S, rtol=1e-5)
    assert low.energy() == pytest.approx(core.energy(), rel=1e-6)
    trunc, _ = linalg.truncated_svd(Bs, As, w, 3)
    M = sum(float(wi) * b.double() @ a.double() for wi, b, a in zip(w, Bs, As, strict=True))
    assert float((M - trunc.dense().double()).norm()) <= float(core.S[3:].norm()) + 1e-5 * float(M.norm())


def test_float32_dense_route_measures_errors_directly(monkeypatch):
    """On the float32 dense route an exact candidate still measures ~0 (no cancellation against ‖M‖²), and the
    divergence and FedIT error agree with float64 dense computations."""
    from fedlora import linalg

    clients = make_clients({"q": (12, 9)}, [4, 4, 3], alpha=5.0, seed=2)
    w = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    Bs, As = [c.canonical()["q"].B for c in clients], [c.canonical()["q"].A for c in clients]
    M = sum(float(wi) * b.double() @ a.double() for wi, b, a in zip(w, Bs, As, strict=True))
    stack = LowRank(torch.cat([float(wi) * b for wi, b in zip(w, Bs, strict=True)], 1), torch.cat(As, 0))
    half = LowRank(0.5 * Bs[0], As[0])
    monkeypatch.setattr(linalg, "CORE_RATIO", 0.0)
    monkeypatch.setattr(linalg, "DENSE_FP32_SIZE", 0)
    exact = linalg.module_errors(Bs, As, w, [stack], rank=4)
    partial = linalg.module_errors(Bs, As, w, [half], rank=4)
    assert exact.divergence < 1e-6
    norm = float(M.norm())
    assert partial.divergence == pytest.approx(float((M - half.dense().double()).norm()) / norm, rel=1e-5)
    pad = torch.nn.functional.pad  # FedIT zero-pads the rank-3 client to r = 4
    Bbar = sum(float(wi) * pad(b.double(), (0, 4 - b.shape[1])) for wi, b in zip(w, Bs, strict=True))
    Abar = sum(float(wi) * pad(a.double(), (0, 0, 0, 4 - a.shape[0])) for wi, a in zip(w, As, strict=True))
    assert partial.fedit == pytest.approx(float((M - Bbar @ Abar).norm()) / norm, rel=1e-5)


@pytest.mark.parametrize("name", FOUNDATION)
def test_bytes_are_measured_from_payloads(name):
    d, k, r = 12, 7, 2
    clients = make_clients({"q": (d, k)}, [r, r, r], alpha=3.0, seed=0, dtype=torch.float32)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    _, _, report = run_round(name, clients, w)
    assert report.bytes_up == {u: 4 * r * (d + k) for u in range(3)}
    cap = methods.capabilities(name)
    if name == "flora":  # stacked edit: 3r(d+k) = 114 scalars > d·k = 84: travels dense
        expected = 4 * d * k
    elif name == "fedex_lora":  # adapter r(d+k) + residual: (U+1)r(d+k) = 152 > 84: dense
        expected = 4 * (r * (d + k) + d * k)
    else:
        expected = 4 * r * (d + k)
    assert report.bytes_down == {u: expected for u in range(3)}, cap.downlink


def test_base_edit_travels_factored_when_smaller():
    d, k, r = 64, 48, 2
    clients = make_clients({"q": (d, k)}, [r, r], alpha=3.0, seed=0, dtype=torch.float32)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    _, state, report = run_round("fedex_lora", clients, w)
    assert set(state.base_edits[0].factored) == {"q"}
    assert report.bytes_down[0] == 4 * (r * (d + k) + 3 * r * (d + k))


def test_gram_and_factor_oracles_compute_the_same_pieces():
    """Every piece of f (N, ‖M‖², S_B, S_A, H_p, H_q, E, F) from both routes against a dense reference."""
    from fedlora.coefficients import FactorOracle, GramOracle

    gen = torch.Generator().manual_seed(21)
    U, d, k, r = 4, 9, 7, 3
    Bs = [torch.randn(d, r, generator=gen, dtype=torch.float64) for _ in range(U)]
    As = [torch.randn(r, k, generator=gen, dtype=torch.float64) for _ in range(U)]
    t = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    p, q = torch.randn(U, generator=gen, dtype=torch.float64), torch.randn(U, generator=gen, dtype=torch.float64)
    M = sum(t[u] * Bs[u] @ As[u] for u in range(U))
    Bh, Ah = sum(p[u] * Bs[u] for u in range(U)), sum(q[u] * As[u] for u in range(U))
    dense = {
        "N": torch.tensor([[float((Bs[u] @ As[v] * M).sum()) for v in range(U)] for u in range(U)]).double(),
        "Hp": torch.tensor([[float((Bs[u] @ Ah * (Bs[s] @ Ah)).sum()) for s in range(U)] for u in range(U)]).double(),
        "Hq": torch.tensor([[float((Bh @ As[v] * (Bh @ As[s])).sum()) for s in range(U)] for v in range(U)]).double(),
        "E": torch.stack([Bh.T @ Bs[u] for u in range(U)]),
        "F": torch.stack([Ah @ As[v].T for v in range(U)]),
    }
    f_dense = float(((Bh @ Ah - M) ** 2).sum())
    pn, qn = p.numpy(), q.numpy()
    for oracle in (GramOracle(Bs, As, t), FactorOracle(Bs, As, t)):
        name = type(oracle).__name__
        got = {
            "N": oracle.N,
            "Hp": oracle.Hp(qn),
            "Hq": oracle.Hq(pn),
            "E": oracle.E(pn),
            "F": oracle.F(qn),
        }
        for key, value in got.items():
            assert torch.allclose(torch.from_numpy(value), dense[key], atol=1e-9), (name, key)
        assert oracle.m2 == pytest.approx(float((M**2).sum()), rel=1e-12), name
        assert oracle.f(pn, qn) == pytest.approx(f_dense, rel=1e-10), name


def test_fedit_reference_uses_the_data_weights_under_the_sum_target():
    clients = make_clients(SHAPES, [2, 2, 2], alpha=3.0, seed=14)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    _, _, report = run_round("flora_na", clients, w, {"target": "sum"})
    _, fedit_state, _ = run_round("fedit", clients, w)
    for m in SHAPES:
        M = 3 * ideal(clients, w, m)
        expected = float((M - fedit_state.adapter[m].dense().double()).norm() / M.norm())
        assert report.modules[m].fedit == pytest.approx(expected, rel=1e-6)


def test_flora_na_diagnostics_and_client_balance_are_reported():
    clients = gauge_copies([0.5, 2.0], seed=5)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    _, _, report = run_round("flora_na", clients, w)
    assert set(report.diagnostics) == set(SHAPES)
    assert len(report.diagnostics["q"]["p"]) == 2
    assert report.client_balance[1] / report.client_balance[0] == pytest.approx(16.0, rel=1e-9)


def cancelling_clients(residual: float) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Two clients whose updates cancel: B_2 = −B_1 + residual·E, so M = ½·residual·E A (exactly 0 for 0)."""
    gen = torch.Generator().manual_seed(8)
    B = torch.randn(9, 2, generator=gen, dtype=torch.float64)
    A = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    E = torch.randn(9, 2, generator=gen, dtype=torch.float64)
    return [B, -B + residual * E], [A, A], torch.tensor([0.5, 0.5], dtype=torch.float64)


@pytest.mark.parametrize("residual", [0.0, 1e-16, 1e-3])
def test_divergence_is_honest_when_the_ideal_update_cancels(residual):
    """‖M‖ = 0 must not hide a nonzero error, and a rounding-level ‖M‖ must not blow the divergence up: errors are
    relative to max(‖M‖, 1e-6·Σ w_u‖B_uA_u‖), which is ‖M‖ whenever M is not a near-total cancellation."""
    from fedlora.linalg import module_errors

    Bs, As, w = cancelling_clients(residual)
    gen = torch.Generator().manual_seed(9)
    cand = LowRank(torch.randn(9, 2, generator=gen, dtype=torch.float64), torch.randn(2, 6, generator=gen).double())
    err = module_errors(Bs, As, w, [cand], rank=2)
    M = sum(float(wi) * b @ a for wi, b, a in zip(w, Bs, As, strict=True))
    mass = sum(float(wi) * float((b @ a).norm()) for wi, b, a in zip(w, Bs, As, strict=True))
    dense_err = float((M - cand.dense()).norm())
    scale = max(float(M.norm()), 1e-6 * mass)
    assert err.error == pytest.approx(dense_err, rel=1e-9)
    assert err.scale == pytest.approx(scale, rel=1e-6)
    assert err.divergence == pytest.approx(dense_err / scale, rel=1e-6)
    assert 0 < err.divergence < 1e7
    if residual == 1e-3:  # an ordinary M: the divergence is ‖M − ΔW‖ / ‖M‖
        assert err.divergence == pytest.approx(dense_err / float(M.norm()), rel=1e-9)


def test_report_combines_modules_by_their_scales():
    from fedlora.types import AggregationReport, ModuleError

    a = ModuleError(divergence=0.5, eckart_young=0.1, fedit=0.6, ideal_norm=2.0, error=1.0, scale=2.0)
    b = ModuleError(divergence=3.0, eckart_young=0.0, fedit=4.0, ideal_norm=0.0, error=3e-6, scale=1e-6)
    report = AggregationReport({"a": a, "b": b})
    assert report.error == pytest.approx((1.0 + 9e-12) ** 0.5)
    assert report.divergence == pytest.approx(((1.0 + 9e-12) / (4.0 + 1e-12)) ** 0.5)
    assert report.fedit == pytest.approx((((0.6 * 2) ** 2 + (4e-6) ** 2) / (4.0 + 1e-12)) ** 0.5)
    empty = ModuleError(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert AggregationReport({"a": empty}).divergence == 0.0
