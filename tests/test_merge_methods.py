"""LoRA-FAIR, FRLoRA, FedLoRU, pFedLoRU and mFedLoRU against dense float64 references built here.

Expected values come from the clients' raw factors (ΔW = s·B·A, α ≠ r, non-square modules, unequal weights), the
test's own SVDs and closed forms; never from the code under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import RawClient, assert_counted, ideal, make_clients, read_records, tiny_config
from fedlora import config, engines, methods, peft_io
from fedlora.experiment import build
from fedlora.methods.base import ClientInfo, ModelInfo, ModuleSpec
from fedlora.payload import pack_adapter, unpack_adapter, unpack_base_edits
from fedlora.types import Contribution, Payload

SHAPES = {"q": (12, 7), "v": (5, 9)}
W = torch.tensor([0.3, 0.7], dtype=torch.float64)


def specs_of(shapes):
    return {m: ModuleSpec(*s) for m, s in shapes.items()}


def contributions(clients: list[RawClient], weights: torch.Tensor, ids=None) -> list[Contribution]:
    ids = list(range(len(clients))) if ids is None else ids
    return [
        Contribution(i, float(w), Payload(pack_adapter(c.canonical()), {"rank": c.rank}))
        for i, w, c in zip(ids, weights, clients, strict=True)
    ]


def fedit_dense(clients: list[RawClient], weights: torch.Tensor, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w s_u B_u, Σ w A_u) for equal ranks, float64."""
    B = sum(float(w) * c.scale * c.factors[module][0].double() for w, c in zip(weights, clients, strict=True))
    A = sum(float(w) * c.factors[module][1].double() for w, c in zip(weights, clients, strict=True))
    return B, A


def applied(method, state, client: ClientInfo, rnd: int, module: str, shape) -> torch.Tensor:
    """What a client's model applies after its download: Σ base edits + B̃A of the plan's adapter."""
    plan, _ = method.prepare(method.init_client(client), method.broadcast(state, client, rnd), client, rnd)
    total = torch.zeros(shape, dtype=torch.float64)
    for edit in plan.base_edits:
        total += edit.delta(module).double()
    if plan.adapter is not None:
        total += plan.adapter[module].dense().double()
    return total


# --------------------------------------------------------------------------------------------------------------
# Hyperparameters


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("fedloru", {"tau": 0}, r"method\.tau = 0: expected an integer >= 1"),
        ("mfedloru", {"tau": -3}, r"method\.tau = -3"),
        ("pfedloru", {"tau": 0}, r"method\.tau = 0"),
        ("pfedloru", {"personal_rank": 0}, r"method\.personal_rank = 0: expected an integer >= 1"),
        ("fedloru", {"reset": "both"}, r"method\.reset = 'both'"),
        ("mfedloru", {"nesting": "tree"}, r"method\.nesting = 'tree'"),
        ("lora_fair", {"lam": -0.1}, r"method\.lam = -0\.1: expected a finite number >= 0"),
        ("lora_fair", {"steps": -1}, r"method\.steps = -1: expected an integer >= 0"),
        ("lora_fair", {"lr": 0.0}, r"method\.lr = 0\.0: expected a finite number > 0"),
        ("frlora", {"tau": 2}, r"unknown key 'method\.tau'"),
    ],
)
def test_bad_hyperparameters_name_key_value_and_range(name, params, match):
    with pytest.raises(ValueError, match=match):
        methods.build(name, params)


def test_registered_with_defaults_and_capabilities():
    assert {"lora_fair", "frlora", "fedloru", "pfedloru", "mfedloru"} <= set(methods.available())
    assert methods.build("lora_fair").params.lam == 0.01
    assert methods.build("fedloru").params.tau == 5  # two merges within the shipped configs' 10 rounds
    assert methods.capabilities("frlora").needs_base_weights
    assert methods.capabilities("pfedloru").personalised
    assert methods.capabilities("mfedloru").heterogeneous_ranks == "native"
    assert all(methods.capabilities(n).writes_base for n in ("frlora", "fedloru", "pfedloru", "mfedloru"))


def test_pfedloru_personal_rank_must_leave_a_global_component():
    method = methods.build("pfedloru", {"personal_rank": 4})
    with pytest.raises(ValueError, match=r"method\.personal_rank = 4 .* model\.lora\.r = 4"):
        method.init_server(ModelInfo(specs_of(SHAPES), 4), seed=0)


# --------------------------------------------------------------------------------------------------------------
# FedLoRU


def test_fedloru_golden_two_rounds_merge_then_fresh_init():
    """τ = 2: round 1 averages factors; round 2 merges s·B̄Ā into the base and broadcasts a fresh init."""
    method = methods.build("fedloru", {"tau": 2})
    state0 = method.init_server(ModelInfo(specs_of(SHAPES), 3), seed=0)
    r1 = make_clients(SHAPES, [3, 3], alpha=5.0, seed=1)
    r2 = make_clients(SHAPES, [3, 3], alpha=5.0, seed=2)
    state1, _ = method.aggregate(state0, contributions(r1, W), rnd=1)
    assert state1.base_edits == ()
    for m in SHAPES:
        B, A = fedit_dense(r1, W, m)
        assert torch.allclose(state1.adapter[m].B.double(), B, atol=1e-12)
        assert torch.allclose(state1.adapter[m].A.double(), A, atol=1e-12)
    before = copy.deepcopy(contributions(r2, W))
    state2, report = method.aggregate(state1, contributions(r2, W), rnd=2)
    assert [e.version for e in state2.base_edits] == [2]
    down = method.broadcast(state2, ClientInfo(0, 3), 3)
    for m, (d, k) in SHAPES.items():
        B, A = fedit_dense(r2, W, m)
        assert torch.allclose(state2.base_edits[0].delta(m).double(), B @ A, atol=1e-12)  # s·B̄Ā, dense
        fresh = unpack_adapter(down.tensors)[m]
        assert torch.count_nonzero(fresh.B) == 0 and fresh.A.abs().max() <= 1 / math.sqrt(k)
        assert not torch.allclose(fresh.A, state0.adapter[m].A)  # a new init, not the round-1 one
        # nothing counted twice: after merge + reset the model applies exactly B̄Ā, as without the reset
        got = applied(method, state2, ClientInfo(0, 3), 3, m, (d, k))
        assert torch.allclose(got, B @ A, atol=1e-10)
    assert report.divergence == pytest.approx(report.fedit, abs=1e-9)
    # bytes: fresh adapter r(d+k) in float32 + factored edit r(d+k) (r(d+k) < d·k) in the clients' float64
    expected = sum(3 * (d + k) * (4 + 8) for d, k in SHAPES.values())
    assert report.bytes_down == {0: expected, 1: expected}
    assert report.bytes_up == {0: sum(3 * (d + k) * 8 for d, k in SHAPES.values())} | {
        1: sum(3 * (d + k) * 8 for d, k in SHAPES.values())
    }
    assert all(
        torch.equal(a.payload.tensors[n], b.payload.tensors[n])
        for a, b in zip(before, contributions(r2, W), strict=True)
        for n in a.payload.tensors
    )


def test_fedloru_client_reset_sends_no_factors_and_missed_edits_catch_up():
    method = methods.build("fedloru", {"tau": 1, "reset": "client"})
    state = method.init_server(ModelInfo(specs_of(SHAPES), 2), seed=0)
    c1 = make_clients(SHAPES, [2, 2], alpha=3.0, seed=4)
    c2 = make_clients(SHAPES, [2, 2], alpha=3.0, seed=5)
    state, _ = method.aggregate(state, contributions(c1, W), rnd=1)
    state, _ = method.aggregate(state, contributions(c2, W, ids=[0, 1]), rnd=2)
    assert state.adapter is None
    down = method.broadcast(state, ClientInfo(7, 2), 3)  # never seen: both merges
    assert down.meta["fresh_init"] and not any(n.startswith("lora.") for n in down.tensors)
    assert [e.version for e in unpack_base_edits(down.tensors)] == [1, 2]
    for m, (d, k) in SHAPES.items():
        total = sum(fedit_dense(c, W, m)[0] @ fedit_dense(c, W, m)[1] for c in (c1, c2))
        assert torch.allclose(applied(method, state, ClientInfo(7, 2), 3, m, (d, k)), total, atol=1e-10)


def test_fedloru_permutation_and_identical_clients():
    method = methods.build("fedloru", {"tau": 1})
    state = method.init_server(ModelInfo(specs_of(SHAPES), 2), seed=0)
    cs = make_clients(SHAPES, [2, 2, 2], alpha=7.0, seed=3)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    a, _ = method.aggregate(state, contributions(cs, w), rnd=1)
    b, _ = method.aggregate(state, contributions(cs[::-1], w.flip(0), ids=[2, 1, 0]), rnd=1)
    for m in SHAPES:
        assert torch.allclose(a.base_edits[0].delta(m), b.base_edits[0].delta(m), atol=1e-12)
    same, _ = method.aggregate(state, contributions([cs[0], cs[0]], W), rnd=1)
    for m in SHAPES:
        assert torch.allclose(same.base_edits[0].delta(m).double(), cs[0].delta(m), atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# mFedLoRU


def test_mfedloru_nested_component_mean_by_hand_and_truncated_downloads():
    method = methods.build("mfedloru", {"tau": 2})
    state = method.init_server(ModelInfo(specs_of(SHAPES), 4), seed=0)
    cs = make_clients(SHAPES, [2, 4], alpha=6.0, seed=8)
    state, _ = method.aggregate(state, contributions(cs, W), rnd=1)
    for m in SHAPES:
        (B0, A0), (B1, A1) = cs[0].factors[m], cs[1].factors[m]
        s0, s1 = cs[0].scale, cs[1].scale
        B = torch.cat([0.3 * s0 * B0 + 0.7 * s1 * B1[:, :2], s1 * B1[:, 2:]], 1)  # components 3, 4: client 1 only
        A = torch.cat([0.3 * A0 + 0.7 * A1[:2], A1[2:]], 0)
        assert torch.allclose(state.adapter[m].B.double(), B, atol=1e-12)
        assert torch.allclose(state.adapter[m].A.double(), A, atol=1e-12)
        low = unpack_adapter(method.broadcast(state, ClientInfo(0, 2), 2).tensors)[m]
        assert torch.allclose(low.dense().double(), B[:, :2] @ A[:2], atol=1e-12)
    padded = methods.build("mfedloru", {"tau": 2, "nesting": "zero_pad"})
    st, _ = padded.aggregate(padded.init_server(ModelInfo(specs_of(SHAPES), 4), 0), contributions(cs, W), rnd=1)
    for m in SHAPES:
        assert torch.allclose(st.adapter[m].A.double()[2:], 0.7 * cs[1].factors[m][1][2:], atol=1e-12)
    merged, _ = method.aggregate(state, contributions(cs, W), rnd=2)
    for m in SHAPES:
        assert torch.allclose(merged.base_edits[0].delta(m).double(), B_A(cs, m), atol=1e-10)


def B_A(cs, m):
    """The nested mean's B̄Ā for ranks [2, 4] with W, dense."""
    (B0, A0), (B1, A1) = cs[0].factors[m], cs[1].factors[m]
    s0, s1 = cs[0].scale, cs[1].scale
    B = torch.cat([0.3 * s0 * B0 + 0.7 * s1 * B1[:, :2], s1 * B1[:, 2:]], 1)
    A = torch.cat([0.3 * A0 + 0.7 * A1[:2], A1[2:]], 0)
    return B @ A


# --------------------------------------------------------------------------------------------------------------
# pFedLoRU


def test_pfedloru_personal_pair_stays_local_and_is_kept():
    r, r_p = 5, 2
    method = methods.build("pfedloru", {"tau": 2, "personal_rank": r_p})
    state = method.init_server(ModelInfo(specs_of(SHAPES), r), seed=0)
    info = ClientInfo(1, r)
    down = method.broadcast(state, info, 1)
    assert all(t.shape[0 if n.endswith(".A") else 1] == r - r_p for n, t in down.tensors.items())
    plan, cstate = method.prepare(method.init_client(info), down, info, 1)
    assert plan.rank == r
    for m in SHAPES:
        assert torch.equal(plan.adapter[m].truncate(r - r_p).A, unpack_adapter(down.tensors)[m].A)
        assert torch.count_nonzero(plan.adapter[m].B[:, r - r_p :]) == 0  # fresh personal pair
    trained = make_clients(SHAPES, [r], alpha=9.0, seed=11)[0].canonical()
    up, cstate = method.upload(cstate, trained, {}, info, 1)
    assert up.meta["rank"] == r - r_p
    for m in SHAPES:
        assert torch.equal(up.tensors[f"lora.{m}.B"], trained[m].B[:, : r - r_p])
        assert torch.equal(cstate.personal[m].B, trained[m].B[:, r - r_p :])
        personal = trained[m].B[:, r - r_p :]
        assert not any(  # no uploaded tensor contains a personal column
            t.shape[0] == personal.shape[0] and any(torch.equal(t[:, j], personal[:, 0]) for j in range(t.shape[1]))
            for n, t in up.tensors.items()
            if n.endswith(".B")
        )
    # the next round starts from the new global pair and the kept personal pair
    other = make_clients(SHAPES, [r - r_p], alpha=4.0, seed=12)[0]
    state, report = method.aggregate(state, [Contribution(1, 0.5, up), contributions([other], [0.5], [0])[0]], 1)
    plan2, _ = method.prepare(cstate, method.broadcast(state, info, 2), info, 2)
    for m in SHAPES:
        gB = 0.5 * trained[m].B[:, : r - r_p].double() + 0.5 * other.scale * other.factors[m][0]
        assert torch.allclose(plan2.adapter[m].B[:, : r - r_p].double(), gB, atol=1e-6)
        assert torch.equal(plan2.adapter[m].B[:, r - r_p :], cstate.personal[m].B)
        assert state.adapter[m].rank == r and torch.count_nonzero(state.adapter[m].A[r - r_p :]) == 0
    assert report.bytes_up[1] == sum((r - r_p) * (d + k) * 8 for d, k in SHAPES.values())  # float64 factors


def test_pfedloru_personal_init_follows_the_run_seed():
    r, r_p = 5, 2
    method = methods.build("pfedloru", {"tau": 2, "personal_rank": r_p})
    info = ClientInfo(1, r)

    def personal_A(seed: int, client: ClientInfo = info) -> dict[str, torch.Tensor]:
        state = method.init_server(ModelInfo(specs_of(SHAPES), r), seed=seed)
        plan, _ = method.prepare(method.init_client(client), method.broadcast(state, client, 1), client, 1)
        return {m: plan.adapter[m].A[r - r_p :] for m in SHAPES}

    same, again, other = personal_A(3), personal_A(3), personal_A(4)
    other_client = personal_A(3, ClientInfo(2, r))
    assert all(torch.equal(same[m], again[m]) for m in SHAPES)
    assert all(not torch.equal(same[m], other[m]) for m in SHAPES)
    assert all(not torch.equal(same[m], other_client[m]) for m in SHAPES)


# --------------------------------------------------------------------------------------------------------------
# FRLoRA


def frlora_setup(rank=3, scale=2.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W0 = {m: torch.randn(d, k, generator=gen) for m, (d, k) in SHAPES.items()}
    info = ModelInfo(specs_of(SHAPES), rank, base_weights=W0, scales={m: scale for m in SHAPES})
    method = methods.build("frlora")
    return method, method.init_server(info, seed=0), W0


def test_frlora_initial_edit_leaves_the_output_unchanged_and_anchors_are_pissa():
    rank, scale = 3, 2.5
    method, state, W0 = frlora_setup(rank, scale)
    (initial,) = state.base_edits
    assert initial.version == 1
    for m, (d, k) in SHAPES.items():
        U, S, Vh = torch.linalg.svd(W0[m].double(), full_matrices=False)
        principal = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        anchors = state.adapter[m]
        assert torch.allclose(anchors.dense().double(), principal, atol=1e-5)
        assert torch.allclose(initial.delta(m).double(), -principal, atol=1e-5)
        after = W0[m].double() + initial.delta(m).double() + anchors.dense().double()
        assert torch.allclose(after, W0[m].double(), atol=1e-5)  # W0 − sB0A0 + sB0A0 = W0
        # PiSSA's gauge in PEFT terms: B0 = B̃0/s and A0 have the same per-component norms √(S_r/s)
        expected = (S[:rank] / scale).sqrt()
        assert torch.allclose((anchors.B.double() / scale).norm(dim=0), expected, atol=1e-5)
        assert torch.allclose(anchors.A.double().norm(dim=1), expected, atol=1e-5)
        assert torch.allclose(applied(method, state, ClientInfo(0, rank), 1, m, (d, k)), principal * 0, atol=1e-4)


def test_frlora_round_adds_mean_product_minus_anchors_and_resets():
    rank = 3
    method, state, _ = frlora_setup(rank)
    cs = make_clients(SHAPES, [rank, rank], alpha=5.0, seed=21, dtype=torch.float32)  # as PEFT clients send
    new, report = method.aggregate(state, contributions(cs, W), rnd=1)
    assert [e.version for e in new.base_edits] == [1, 2]
    for m, (d, k) in SHAPES.items():
        B, A = fedit_dense(cs, W, m)
        anchor = state.adapter[m].dense().double()
        assert torch.allclose(new.base_edits[1].delta(m).double(), B @ A - anchor, atol=1e-5)
        assert torch.equal(new.adapter[m].B, state.adapter[m].B) and torch.equal(new.adapter[m].A, state.adapter[m].A)
        # a never-seen client replays both edits: W0 − P + (B̄Ā − P) + P = W0 + B̄Ā − P with P = B̃0A0, i.e. the
        # model applies W0' + B̄Ā, as the clients did after training from (B0, A0) on W0' = W0 − P
        got = applied(method, new, ClientInfo(9, rank), 2, m, (d, k))
        assert torch.allclose(got, B @ A - anchor, atol=1e-4)
    synced_down = method.broadcast(new, ClientInfo(0, rank), 2)
    assert [e.version for e in unpack_base_edits(synced_down.tensors)] == [2]
    anchors_bytes = sum(rank * (d + k) * 4 for d, k in SHAPES.values())
    edit_bytes = sum(min(2 * rank * (d + k), d * k) * 4 for d, k in SHAPES.values())
    assert report.bytes_down == {0: anchors_bytes + edit_bytes, 1: anchors_bytes + edit_bytes}
    assert report.divergence == pytest.approx(report.fedit, abs=1e-6)


def test_frlora_needs_base_weights():
    with pytest.raises(ValueError, match="base weights"):
        methods.build("frlora").init_server(ModelInfo(specs_of(SHAPES), 2), seed=0)


# --------------------------------------------------------------------------------------------------------------
# LoRA-FAIR


def fair_objective(M: torch.Tensor, X: torch.Tensor, A_bar: torch.Tensor, B_bar: torch.Tensor, lam: float) -> float:
    """1 − cos(M, XĀ) + λ‖X − B̄‖_F, dense float64."""
    Y = X.double() @ A_bar.double()
    cos = float((M * Y).sum() / (M.norm() * Y.norm()))
    return 1 - cos + lam * float((X.double() - B_bar).norm())


def hand_built():
    """2×2, r = 1: B_1 = e1, A_1 = e1ᵀ; B_2 = e2, A_2 = (1, 1); s = 2 with B halved so s·B is as written."""
    c0 = RawClient(
        {"q": (torch.tensor([[0.5], [0.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0]]).double())}, 2.0, 1, False
    )
    c1 = RawClient(
        {"q": (torch.tensor([[0.0], [0.5]], dtype=torch.float64), torch.tensor([[1.0, 1.0]]).double())}, 2.0, 1, False
    )
    return [c0, c1], torch.tensor([0.5, 0.5], dtype=torch.float64)


def run_fair(clients, w, params=None):
    method = methods.build("lora_fair", params)
    shapes = {m: (B.shape[0], A.shape[1]) for m, (B, A) in clients[0].factors.items()}
    state = method.init_server(ModelInfo(specs_of(shapes), clients[0].rank), seed=0)
    return method.aggregate(state, contributions(clients, w), rnd=1)


def test_lora_fair_golden_hand_built_case_reduces_objective_and_divergence():
    clients, w = hand_built()
    state, report = run_fair(clients, w)
    M = ideal(clients, w, "q")  # [[.5, 0], [.5, .5]]
    assert torch.allclose(M, torch.tensor([[0.5, 0.0], [0.5, 0.5]], dtype=torch.float64))
    B_bar, A_bar = torch.tensor([[0.5], [0.5]]).double(), torch.tensor([[1.0, 0.5]]).double()
    X = state.adapter["q"].B.double()
    assert torch.allclose(state.adapter["q"].A.double(), A_bar)
    assert fair_objective(M, X, A_bar, B_bar, 0.01) < fair_objective(M, B_bar, A_bar, B_bar, 0.01) - 1e-3
    assert float((M - X @ A_bar).norm()) < float((M - B_bar @ A_bar).norm())
    # the cosine-optimal direction is MĀᵀ = (.5, .75) (r = 1); λ pulls the scale to B̄'s projection on it
    direction = torch.tensor([0.5, 0.75], dtype=torch.float64)
    assert float(torch.nn.functional.cosine_similarity(X[:, 0], direction, dim=0)) > 0.9999
    assert report.divergence < report.fedit


@pytest.mark.parametrize("seed", range(5))
def test_lora_fair_never_increases_its_objective_on_random_clients(seed):
    clients = make_clients(SHAPES, [3, 3, 3], alpha=5.0, seed=seed)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    for lam in (0.0, 0.01, 1.0):
        state, _ = run_fair(clients, w, {"lam": lam, "steps": 30})
        for m in SHAPES:
            B_bar, A_bar = fedit_dense(clients, w, m)
            M = ideal(clients, w, m)
            X = state.adapter[m].B
            assert fair_objective(M, X, A_bar, B_bar, lam) <= fair_objective(M, B_bar, A_bar, B_bar, lam) + 1e-9


def test_lora_fair_lambda_zero_reaches_max_cosine_large_lambda_is_fedit():
    clients = make_clients({"q": (12, 7)}, [2, 2], alpha=5.0, seed=5)
    M = ideal(clients, W, "q")
    B_bar, A_bar = fedit_dense(clients, W, "q")
    # best cosine over X: projection of M onto the row space of Ā, dense
    proj = M @ A_bar.T @ torch.linalg.inv(A_bar @ A_bar.T) @ A_bar
    best = float(proj.norm() / M.norm())
    free, _ = run_fair(clients, W, {"lam": 0.0, "steps": 500})
    Y = free.adapter["q"].B.double() @ A_bar
    assert float((M * Y).sum() / (M.norm() * Y.norm())) == pytest.approx(best, abs=1e-5)
    reg, _ = run_fair(clients, W, {"lam": 0.01, "steps": 500})
    d_free = float((free.adapter["q"].B.double() - B_bar).norm())
    d_reg = float((reg.adapter["q"].B.double() - B_bar).norm())
    assert 0 < d_reg < d_free
    big, _ = run_fair(clients, W, {"lam": 1e6})
    assert torch.allclose(big.adapter["q"].B.double(), B_bar, atol=1e-12)  # prox threshold: ΔB = 0 exactly
    none, _ = run_fair(clients, W, {"steps": 0})
    assert torch.allclose(none.adapter["q"].B.double(), B_bar, atol=1e-12)


def test_lora_fair_bytes_are_fedit_and_inputs_untouched():
    clients = make_clients(SHAPES, [2, 2], alpha=5.0, seed=6)
    contribs = contributions(clients, W)
    before = copy.deepcopy(contribs)
    method = methods.build("lora_fair")
    state = method.init_server(ModelInfo(specs_of(SHAPES), 2), seed=0)
    _, report = method.aggregate(state, contribs, rnd=1)
    expected = sum(2 * (d + k) * 8 for d, k in SHAPES.values())  # FedIT's r(d+k), float64 like the inputs
    assert report.bytes_down == {0: expected, 1: expected}
    assert report.bytes_up == {0: expected, 1: expected}
    for a, b in zip(before, contribs, strict=True):
        assert all(torch.equal(a.payload.tensors[n], b.payload.tensors[n]) for n in a.payload.tensors)


def test_lora_fair_refuses_heterogeneous_ranks():
    clients = make_clients(SHAPES, [2, 3], alpha=5.0, seed=6)
    with pytest.raises(ValueError, match="rank"):
        run_fair(clients, W)


# --------------------------------------------------------------------------------------------------------------
# Invariances shared by the five methods (one merge round for the FedLoRU family: tau = 1)

INVARIANT_PARAMS = {
    "lora_fair": {},
    "frlora": {},
    "fedloru": {"tau": 1},
    "pfedloru": {"tau": 1, "personal_rank": 1},  # uploads carry the r − 1 global components
    "mfedloru": {"tau": 1},
}


def start(name: str, rank: int):
    """The method and its initial server state (FRLoRA gets base weights; pFedLoRU a rank leaving r_p = 1)."""
    method = methods.build(name, INVARIANT_PARAMS[name])
    if name == "frlora":
        return method, frlora_setup(rank)[1]
    return method, method.init_server(ModelInfo(specs_of(SHAPES), rank + (name == "pfedloru")), seed=0)


def applied_after(name, method, state, m) -> torch.Tensor:
    rank = max(lr.rank for lr in state.adapter.values()) if state.adapter else 2
    return applied(method, state, ClientInfo(99, rank), 2, m, SHAPES[m])  # never seen: receives every edit


@pytest.mark.parametrize("name", list(INVARIANT_PARAMS))
def test_identical_clients_give_back_that_clients_update(name):
    one = make_clients(SHAPES, [2], alpha=11.0, seed=5)[0]
    method, state0 = start(name, 2)
    state, _ = method.aggregate(state0, contributions([one] * 3, torch.tensor([0.2, 0.5, 0.3]).double()), 1)
    for m in SHAPES:
        # FRLoRA's clients started from its anchors P = B̃0A0 (already in the model): the update is B̃A − P
        start_point = state0.adapter[m].dense().double() if name == "frlora" else 0.0
        assert torch.allclose(applied_after(name, method, state, m), one.delta(m) - start_point, atol=1e-5), m


@pytest.mark.parametrize("name", list(INVARIANT_PARAMS))
def test_permuting_clients_with_their_weights_changes_nothing(name):
    cs = make_clients(SHAPES, [2, 2, 2], alpha=4.0, seed=9, dtype=torch.float32)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    perm = [2, 0, 1]
    method, state0 = start(name, 2)
    a, ra = method.aggregate(state0, contributions(cs, w), 1)
    b, rb = method.aggregate(state0, contributions([cs[i] for i in perm], w[perm], ids=perm), 1)
    for m in SHAPES:
        assert torch.allclose(applied_after(name, method, a, m), applied_after(name, method, b, m), atol=1e-5)
    assert ra.divergence == pytest.approx(rb.divergence, abs=1e-6)


@pytest.mark.parametrize("name", list(INVARIANT_PARAMS))
def test_inputs_and_server_state_are_never_mutated(name):
    cs = make_clients(SHAPES, [2, 2], alpha=5.0, seed=2)
    method, state0 = start(name, 2)
    contribs = contributions(cs, W)
    snapshot = copy.deepcopy((contribs, state0))
    method.aggregate(state0, contribs, 1)
    for a, b in zip(contribs, snapshot[0], strict=True):
        assert all(torch.equal(a.payload.tensors[n], b.payload.tensors[n]) for n in a.payload.tensors)
    for m in SHAPES:
        assert torch.equal(state0.adapter[m].A, snapshot[1].adapter[m].A)
        assert torch.equal(state0.adapter[m].B, snapshot[1].adapter[m].B)
    assert [e.version for e in state0.base_edits] == [e.version for e in snapshot[1].base_edits]
    for e, f in zip(state0.base_edits, snapshot[1].base_edits, strict=True):
        assert all(torch.equal(e.delta(m), f.delta(m)) for m in e.modules())


# --------------------------------------------------------------------------------------------------------------
# Integration: 2 clients × 2 rounds on the packaged MiniLM


UPLOAD_RANKS = {"lora_fair": [8, 8], "frlora": [8, 8], "fedloru": [8, 8], "pfedloru": [6, 6], "mfedloru": [4, 8]}
"""The rank each of the two clients uploads (pFedLoRU: r − personal_rank global components)."""
FIRST_EDIT = {"frlora": 2 * 4 * 12 * 8 * (384 + 384)}
"""FRLoRA's first download also holds the initial base edit (W0's rank-r PiSSA part), factored: 12 modules."""


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("lora_fair", ["method.steps=20"]),
        ("frlora", []),
        ("fedloru", ["method.tau=1"]),
        ("pfedloru", ["method.tau=2", "method.personal_rank=2"]),
        ("mfedloru", ["method.tau=2", "model.lora.ranks=[4, 8]"]),
    ],
)
def test_two_clients_two_rounds_on_minilm(rt_csv, tmp_path, method, extra):
    cfg = tiny_config(rt_csv, tmp_path / "run", f"federation.method={method}", *extra)
    run_dir, summary = engines.run(cfg, tmp_path / "run")
    records = read_records(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert_counted(r["global_accuracy"])
        assert math.isfinite(r["divergence"])
    upload = sum(4 * (12 * rank * (384 + 384) + 2 * 384 + 2) for rank in UPLOAD_RANKS[method])  # factors + head
    assert records[0]["bytes_up"] == records[1]["bytes_up"] == upload
    assert records[0]["bytes_down"] == upload + FIRST_EDIT.get(method, 0)  # round 1: the initial adapter and head
    if methods.capabilities(method).writes_base:
        assert (run_dir / "adapter" / "base_edits.safetensors").exists()
    assert summary["rounds"] == 2


def test_frlora_experiment_fills_base_weights_in_out_in_layout():
    """peft_io.base_weights (the W0 copy FRLoRA needs): (out, in) for nn.Linear, transposed for GPT-2 Conv1D."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    weights = peft_io.base_weights(model)
    (name,) = weights
    stored = model.base_model.model.get_submodule(name).get_base_layer().weight  # Conv1D: (in, out) = (8, 24)
    assert tuple(stored.shape) == (8, 24) and tuple(weights[name].shape) == (24, 8)
    assert torch.equal(weights[name], stored.detach().T)


@pytest.mark.integration
def test_frlora_initial_edit_and_anchors_leave_minilm_logits_unchanged(rt_csv, tmp_path):
    """On the real model (α = 16 ≠ r = 8): W0 − s·B0A0 with the adapter at (B0, A0) gives the original logits."""
    cfg = config.load_config(
        None,
        [
            f"data.dataset={rt_csv}",
            "data.num_clients=2",
            "data.max_length=32",
            "federation.method=frlora",
            "model.lora.alpha=16",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    exp = build(cfg)
    assert exp.info.base_weights is not None and exp.info.scales is not None
    batch = {k: v[:16] for k, v in exp.test.items() if k != "labels"}
    exp.model.eval()
    with torch.no_grad():
        before = exp.model(**batch).logits
    state = exp.method.init_server(exp.info, cfg.seed)
    info = exp.client_info(0)
    plan, _ = exp.method.prepare(None, exp.method.broadcast(state, info, 1), info, 1)
    peft_io.load_plan(exp.model, plan, seed=0)
    exp.model.eval()
    with torch.no_grad():
        after = exp.model(**batch).logits
    assert torch.allclose(after, before, atol=1e-4)
    # the adapter really holds the principal part (B ≠ 0), so the equality is not the trivial B = 0 one
    assert all(float(B.detach().abs().max()) > 0 for _A, B in peft_io.lora_parameters(exp.model).values())
