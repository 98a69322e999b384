"""FSLoRA and FLASC: sketched / sparse communication with a server optimiser, and the training loop's gradient masks.

Expected values are computed here, densely in float64, from the definitions (methods.md §10, §13): the selected
components or top-k entries are re-derived in the test, and the server step uses SGD (FedAvg when lr = 1) or the
closed form of AdamW's first step, p(1 − lr·wd) − lr·g/(|g| + eps). Modules are non-square, weights unequal.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from conftest import assert_counted, read_records, tiny_config, tiny_peft
from fedlora import engines, methods, peft_io, tasks, training
from fedlora.methods import server_opt
from fedlora.methods.base import ClientInfo, ModelInfo, ModuleSpec
from fedlora.methods.fslora import draw_sketch
from fedlora.payload import pack_adapter, pack_extras
from fedlora.types import Contribution, LowRank, Payload, TrainPlan

SEQ_CLS = tasks.get("seq_cls")

SHAPES = {"q": (6, 5), "v": (4, 7)}
RANK = 4
W = torch.tensor([0.3, 0.7], dtype=torch.float64)
LR, WD, EPS = 0.01, 0.1, 1e-8


def head(dtype=torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {
        "classifier.weight": torch.randn(2, 3, generator=gen, dtype=dtype),
        "classifier.bias": torch.zeros(2, dtype=dtype),
    }


def start(name: str, params: dict, dtype=torch.float64, rank: int = RANK):
    """Method and a server state whose global adapter has random non-zero B and A."""
    method = methods.build(name, params)
    specs = {m: ModuleSpec(*s) for m, s in SHAPES.items()}
    state = method.init_server(ModelInfo(specs, rank, head(dtype)), seed=0)
    gen = torch.Generator().manual_seed(1)
    adapter = {
        m: LowRank(torch.randn(d, rank, generator=gen, dtype=dtype), torch.randn(rank, k, generator=gen, dtype=dtype))
        for m, (d, k) in SHAPES.items()
    }
    return method, dataclasses.replace(state, adapter=adapter)


def perturbation(adapter, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {
        m: LowRank(
            torch.randn(lr.B.shape, generator=gen, dtype=lr.B.dtype),
            torch.randn(lr.A.shape, generator=gen, dtype=lr.A.dtype),
        )
        for m, lr in adapter.items()
    }


def client_round(method, state, client: int, rnd: int, seed: int, rank: int = RANK):
    """broadcast → prepare → 'training' (plan adapter + a known perturbation, head + 1) → upload."""
    info = ClientInfo(client, rank)
    down = method.broadcast(state, info, rnd)
    plan, cs = method.prepare(method.init_client(info), down, info, rnd)
    pert = perturbation(plan.adapter, seed)
    trained = {m: LowRank(lr.B + pert[m].B, lr.A + pert[m].A) for m, lr in plan.adapter.items()}
    extras = {n: t + 1.0 + client for n, t in plan.extras.items()}
    up, _ = method.upload(cs, trained, extras, info, rnd)
    return down, plan, pert, extras, up


def aggregate(method, state, ups, weights=W, order=(0, 1), rnd: int = 1):
    contributions = [Contribution(c, float(weights[c]), ups[c]) for c in order]
    return method.aggregate(state, contributions, rnd)


def adamw_first_step(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return p * (1 - LR * WD) - LR * g / (g.abs() + EPS)


def dense_sketch(indices: torch.Tensor, rank: int) -> torch.Tensor:
    S = torch.zeros(rank, rank, dtype=torch.float64)
    S[indices, indices] = rank / len(indices)
    return S


# ---------------------------------------------------------------------------------------------------------------
# FSLoRA


def fslora_expected(state, rounds, weights, step):
    """Global factors and head after one server step, from the clients' selected components (dense, float64)."""
    out = {}
    for m, lr in state.adapter.items():
        dB, dA = torch.zeros_like(lr.B), torch.zeros_like(lr.A)
        for w, (down, _, pert, _, _) in zip(weights, rounds, strict=True):
            idx = down.tensors[f"lora.{m}.A.indices"].long()
            scale = RANK / len(idx)
            dB[:, idx] += float(w) * pert[m].B / scale
            dA[idx, :] += float(w) * pert[m].A
        out[m] = LowRank(step(lr.B, -dB), step(lr.A, -dA))
    heads = {
        n: step(t, -sum(float(w) * (r[3][n] - t) for w, r in zip(weights, rounds, strict=True)))
        for n, t in state.extras.items()
    }
    return out, heads


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fslora_golden_two_clients(optimizer):
    params = {"sketch_ratio": [0.5, 0.25], "server_optimizer": optimizer}
    params |= (
        {"server_lr": 1.0, "server_weight_decay": 0.0}
        if optimizer == "sgd"
        else {"server_lr": LR, "server_weight_decay": WD}
    )
    method, state = start("fslora", params)
    rounds = [client_round(method, state, c, 1, seed=10 + c) for c in (0, 1)]
    for c, (down, plan, *_rest) in enumerate(rounds):
        m = [2, 1][c]
        assert plan.rank == m
        for mod, lr in state.adapter.items():
            idx = down.tensors[f"lora.{mod}.B.indices"].long()
            assert len(idx) == m and torch.equal(idx, down.tensors[f"lora.{mod}.A.indices"].long())
            # the client's adapter applies exactly B̃ S_u A
            torch.testing.assert_close(plan.adapter[mod].dense(), lr.B @ dense_sketch(idx, RANK) @ lr.A)
    new, report = aggregate(method, state, [r[4] for r in rounds])
    step = (lambda p, g: p - g) if optimizer == "sgd" else adamw_first_step
    expected, heads = fslora_expected(state, rounds, W, step)
    for mod in SHAPES:
        torch.testing.assert_close(new.adapter[mod].B, expected[mod].B, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new.adapter[mod].A, expected[mod].A, rtol=1e-12, atol=1e-12)
    for n in heads:
        torch.testing.assert_close(new.extras[n], heads[n], rtol=1e-12, atol=1e-12)
    assert new.optimizer.step == 1
    assert (optimizer == "adamw") == bool(new.optimizer.exp_avg)
    assert report.diagnostics["sketch_sizes"] == {0: 2, 1: 1}


def test_fslora_sketch_is_unbiased_and_seeded():
    rank, m = 8, 3
    total = torch.zeros(rank, dtype=torch.float64)
    draws = 3000
    for rnd in range(draws):
        idx = draw_sketch(0, rnd, 0, ["q"], rank, m)["q"]
        assert len(set(idx.tolist())) == m
        total[idx] += rank / m
    assert torch.allclose(total / draws, torch.ones(rank, dtype=torch.float64), atol=0.1)  # E[S_u] = I
    assert torch.equal(draw_sketch(3, 2, 1, ["q", "v"], rank, m)["v"], draw_sketch(3, 2, 1, ["q", "v"], rank, m)["v"])
    assert not all(
        torch.equal(draw_sketch(3, 2, c, ["q"], rank, m)["q"], draw_sketch(3, 2, 0, ["q"], rank, m)["q"])
        for c in range(1, 6)
    )


def test_fslora_identical_clients_full_sketch_sgd1_is_fedavg():
    method, state = start(
        "fslora", {"sketch_ratio": 1.0, "server_optimizer": "sgd", "server_lr": 1.0, "server_weight_decay": 0.0}
    )
    rounds = [client_round(method, state, c, 1, seed=42) for c in (0, 1)]  # same perturbation, full sketch
    new, report = aggregate(method, state, [r[4] for r in rounds])
    for mod in SHAPES:
        B = rounds[0][1].adapter[mod].B + rounds[0][2][mod].B
        A = rounds[0][1].adapter[mod].A + rounds[0][2][mod].A
        torch.testing.assert_close(new.adapter[mod].dense(), B @ A, rtol=1e-10, atol=1e-10)
    assert report.divergence < 1e-6  # identical clients: the new global is their update (error identity ~1e-8)


def test_fslora_permutation_and_inputs_not_mutated():
    method, state = start("fslora", {"sketch_ratio": [0.5, 0.75], "server_lr": LR})
    ups = [client_round(method, state, c, 1, seed=20 + c)[4] for c in (0, 1)]
    before = [{n: t.clone() for n, t in u.tensors.items()} for u in ups]
    state_before = {m: (lr.B.clone(), lr.A.clone()) for m, lr in state.adapter.items()}
    a, _ = aggregate(method, state, ups, order=(0, 1))
    b, _ = aggregate(method, state, ups, order=(1, 0))
    for mod in SHAPES:
        torch.testing.assert_close(a.adapter[mod].B, b.adapter[mod].B, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(a.adapter[mod].A, b.adapter[mod].A, rtol=1e-13, atol=1e-13)
    assert all(torch.equal(b[n], t) for b, u in zip(before, ups, strict=True) for n, t in u.tensors.items())
    assert all(
        torch.equal(state_before[m][0], lr.B) and torch.equal(state_before[m][1], lr.A)
        for m, lr in state.adapter.items()
    )


def test_fslora_bytes_and_only_selected_components_travel():
    method, state = start("fslora", {"sketch_ratio": [0.5, 0.25]}, dtype=torch.float32)
    head_bytes = sum(t.numel() * 4 for t in head().values())
    for c, m in ((0, 2), (1, 1)):
        down, _, _, _, up = client_round(method, state, c, 1, seed=c)
        formula = sum(m * (d + k) * 4 + 2 * m * 4 for d, k in SHAPES.values()) + head_bytes
        assert down.nbytes == up.nbytes == formula
        assert all(n.endswith((".values", ".indices")) or n.startswith("extra.") for n in up.tensors)
        for mod, (d, k) in SHAPES.items():
            assert tuple(up.tensors[f"lora.{mod}.B.values"].shape) == (d, m)
            assert tuple(up.tensors[f"lora.{mod}.A.values"].shape) == (m, k)
            assert up.tensors[f"lora.{mod}.A.indices"].dtype == torch.int32


def test_fslora_rejects_an_upload_with_foreign_components():
    method, state = start("fslora", {"sketch_ratio": 0.5})
    ups = [client_round(method, state, c, 1, seed=c)[4] for c in (0, 1)]
    with pytest.raises(ValueError, match="client 1.*sketch"):
        aggregate(method, state, [ups[0], ups[0]])  # client 0's components sent as client 1's


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.2, [0.5, 2.0], [], "half", True])
def test_fslora_bad_sketch_ratio(value):
    with pytest.raises(ValueError, match=r"method\.sketch_ratio = .*\(0, 1\]"):
        methods.build("fslora", {"sketch_ratio": value})


def test_fslora_sketch_ratio_list_too_short_names_the_client():
    method, state = start("fslora", {"sketch_ratio": [0.5, 1.0]})
    with pytest.raises(ValueError, match="client 2.*sketch_ratio"):
        method.broadcast(state, ClientInfo(2, RANK), 1)


@pytest.mark.parametrize("name", ["fslora", "flasc"])
@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("server_lr", 0.0, r"method\.server_lr = 0\.0.*> 0"),
        ("server_optimizer", "adam", "method.server_optimizer"),
        ("server_weight_decay", -1.0, r"method\.server_weight_decay"),
    ],
)
def test_bad_server_optimizer_keys(name, key, value, match):
    with pytest.raises(ValueError, match=match):
        methods.build(name, {key: value})


# ---------------------------------------------------------------------------------------------------------------
# FLASC


def kept(tensors: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """The test's own top-k: entries whose magnitude is at least the k-th largest over all tensors (no ties)."""
    flat = torch.cat([t.reshape(-1).abs() for t in tensors.values()])
    k = int(flat.numel() * density)
    threshold = torch.sort(flat, descending=True).values[k - 1]
    return {n: t.abs() >= threshold for n, t in tensors.items()}


def lora_named(adapter) -> dict[str, torch.Tensor]:
    return {f"lora.{m}.{f}": getattr(lr, f) for m, lr in adapter.items() for f in "AB"}


def sparse_mean(rounds, keep, density: float) -> dict[str, torch.Tensor]:
    """Σ_u w_u (Δ_u ⊙ keep(Δ_u)): the weighted mean of the clients' sparsified deltas (the known perturbations)."""
    deltas = [lora_named(pert) for _, _, pert, _, _ in rounds]
    masks = [keep(d, density) for d in deltas]
    return {n: sum(float(w) * d[n] * m[n] for w, d, m in zip(W, deltas, masks, strict=True)) for n in deltas[0]}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_flasc_golden_two_clients(optimizer):
    params = {"density_down": 0.5, "density_up": 0.25, "server_optimizer": optimizer}
    params |= (
        {"server_lr": 1.0, "server_weight_decay": 0.0}
        if optimizer == "sgd"
        else {"server_lr": LR, "server_weight_decay": WD}
    )
    method, state = start("flasc", params)
    P = lora_named(state.adapter)
    down_mask = kept(P, 0.5)
    rounds = [client_round(method, state, c, 1, seed=30 + c) for c in (0, 1)]
    for _, plan, *_ in rounds:  # every client receives P ⊙ top-k(P)
        for n, t in lora_named(plan.adapter).items():
            torch.testing.assert_close(t, P[n] * down_mask[n], rtol=0, atol=0)
    new, _ = aggregate(method, state, [r[4] for r in rounds])
    step = (lambda p, g: p - g) if optimizer == "sgd" else adamw_first_step
    avg = sparse_mean(rounds, kept, 0.25)
    got = lora_named(new.adapter)
    for n in P:  # the dense global P takes the step (the download mask only applies to what is sent)
        torch.testing.assert_close(got[n], step(P[n], -avg[n]), rtol=1e-12, atol=1e-12)
    for n, t in state.extras.items():
        g = -sum(float(w) * (r[3][n] - t) for w, r in zip(W, rounds, strict=True))
        torch.testing.assert_close(new.extras[n], step(t, g), rtol=1e-12, atol=1e-12)
    exported = lora_named(method.export(new).adapter)
    mask = kept(got, 0.5)
    assert all(torch.equal(exported[n], got[n] * mask[n]) for n in got)


def test_flasc_identical_clients_dense_sgd1_is_fedavg():
    params = {
        "density_down": 1.0,
        "density_up": 1.0,
        "server_optimizer": "sgd",
        "server_lr": 1.0,
        "server_weight_decay": 0.0,
    }
    method, state = start("flasc", params)
    rounds = [client_round(method, state, c, 1, seed=7) for c in (0, 1)]
    new, report = aggregate(method, state, [r[4] for r in rounds])
    for mod, lr in state.adapter.items():
        pert = rounds[0][2][mod]
        torch.testing.assert_close(new.adapter[mod].B, lr.B + pert.B, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new.adapter[mod].A, lr.A + pert.A, rtol=1e-12, atol=1e-12)
    assert report.divergence < 1e-6  # error identity precision ~1e-8


def test_flasc_permutation_and_inputs_not_mutated():
    method, state = start("flasc", {"density_down": 0.5, "density_up": 0.3})
    ups = [client_round(method, state, c, 1, seed=50 + c)[4] for c in (0, 1)]
    before = [{n: t.clone() for n, t in u.tensors.items()} for u in ups]
    P = {n: t.clone() for n, t in lora_named(state.adapter).items()}
    a, _ = aggregate(method, state, ups, order=(0, 1))
    b, _ = aggregate(method, state, ups, order=(1, 0))
    for n, t in lora_named(a.adapter).items():
        torch.testing.assert_close(t, lora_named(b.adapter)[n], rtol=1e-13, atol=1e-13)
    assert all(torch.equal(b[n], t) for b, u in zip(before, ups, strict=True) for n, t in u.tensors.items())
    assert all(torch.equal(P[n], t) for n, t in lora_named(state.adapter).items())


@pytest.mark.parametrize(("down", "up"), [(0.5, 0.1), (1.0, 0.25), (0.3, 1.0)])
def test_flasc_bytes_are_values_plus_int32_indices(down, up):
    method, state = start("flasc", {"density_down": down, "density_up": up}, dtype=torch.float32)
    N = sum(RANK * (d + k) for d, k in SHAPES.values())
    head_bytes = sum(t.numel() * 4 for t in head().values())

    def formula(rho):
        return N * 4 if rho == 1 else int(N * rho) * (4 + 4)

    down_p, _, _, _, up_p = client_round(method, state, 0, 1, seed=3)
    assert down_p.nbytes == formula(down) + head_bytes
    assert up_p.nbytes == formula(up) + head_bytes
    if up < 1:
        assert sum(t.numel() for n, t in up_p.tensors.items() if n.endswith(".values")) == int(N * up)
        assert all(t.dtype == torch.int32 for n, t in up_p.tensors.items() if n.endswith(".indices"))


@pytest.mark.parametrize("key", ["density_down", "density_up"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, r"\(0, 1\]"),
        (0.0, r"\(0, 1\]"),
        (-0.5, r"\(0, 1\]"),
        (1.01, r"\(0, 1\]"),
        ("dense", "a number"),
        (True, "a number"),
    ],
)
def test_flasc_bad_density(key, value, expected):
    with pytest.raises(ValueError, match=rf"method\.{key} = .*{expected}"):
        methods.build("flasc", {key: value})


def kept_per_tensor(tensors: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """The test's own per-tensor top-k: each tensor's entries at least its own k_t-th largest magnitude."""
    return {n: kept({n: t}, density)[n] for n, t in tensors.items()}


def test_flasc_per_tensor_scope_golden_two_clients():
    params = {"density_down": 0.5, "density_up": 0.25, "topk_scope": "per_tensor"}
    params |= {"server_optimizer": "sgd", "server_lr": 1.0, "server_weight_decay": 0.0}
    method, state = start("flasc", params)
    # B two orders of magnitude below A, as early in training: the global ranking would drop it entirely.
    state = dataclasses.replace(state, adapter={m: LowRank(lr.B * 1e-2, lr.A) for m, lr in state.adapter.items()})
    P = lora_named(state.adapter)
    down_mask = kept_per_tensor(P, 0.5)
    rounds = [client_round(method, state, c, 1, seed=60 + c) for c in (0, 1)]
    for _, plan, *_ in rounds:
        for n, t in lora_named(plan.adapter).items():
            torch.testing.assert_close(t, P[n] * down_mask[n], rtol=0, atol=0)
            assert int((t != 0).sum()) == int(P[n].numel() * 0.5)  # B travels too, ⌊ρ·n_t⌋ entries each
    new, _ = aggregate(method, state, [r[4] for r in rounds])
    avg = sparse_mean(rounds, kept_per_tensor, 0.25)
    got = lora_named(new.adapter)
    for n in P:
        torch.testing.assert_close(got[n], P[n] + avg[n], rtol=1e-12, atol=1e-12)


def test_flasc_global_scope_sends_no_b_while_b_is_small():
    """The official code's global ranking: with B far below A (B starts at 0), the download carries only A, so the
    global model's ΔW is 0 and its divergence 1; the per-tensor scope sends B."""
    method, state = start("flasc", {"density_down": 0.25, "density_up": 0.25})
    state = dataclasses.replace(state, adapter={m: LowRank(lr.B * 1e-3, lr.A) for m, lr in state.adapter.items()})
    exported = method.export(state).adapter
    assert all(not lr.B.any() and lr.A.any() for lr in exported.values())
    rounds = [client_round(method, state, c, 1, seed=70 + c) for c in (0, 1)]
    assert all(not lr.B.any() for _, plan, *_ in rounds for lr in plan.adapter.values())
    per_tensor = methods.build("flasc", {"density_down": 0.25, "density_up": 0.25, "topk_scope": "per_tensor"})
    assert all(lr.B.any() for lr in per_tensor.export(state).adapter.values())
    # the diagnostic that says so in metrics.jsonl: no B entry among those sent, then B's own share per tensor
    small = [client_round(method, state, c, 1, seed=0)[4] for c in (0, 1)]
    zeros = {c: Payload({n: t * 0 for n, t in u.tensors.items()}, u.meta) for c, u in enumerate(small)}
    assert aggregate(method, state, zeros)[1].diagnostics["b_share_down"] == 0.0
    sizes = {n: t.numel() for n, t in lora_named(state.adapter).items()}
    b_share = sum(int(v * 0.25) for n, v in sizes.items() if n.endswith(".B")) / sum(
        int(v * 0.25) for v in sizes.values()
    )
    assert aggregate(per_tensor, state, zeros)[1].diagnostics["b_share_down"] == pytest.approx(b_share)


def test_flasc_per_tensor_bytes():
    method, state = start("flasc", {"density_down": 0.3, "density_up": 0.1, "topk_scope": "per_tensor"}, torch.float32)
    sizes = [n for d, k in SHAPES.values() for n in (d * RANK, RANK * k)]
    head_bytes = sum(t.numel() * 4 for t in head().values())
    down_p, _, _, _, up_p = client_round(method, state, 0, 1, seed=3)
    assert down_p.nbytes == sum(int(n * 0.3) for n in sizes) * 8 + head_bytes
    assert up_p.nbytes == sum(int(n * 0.1) for n in sizes) * 8 + head_bytes


def test_flasc_bad_topk_scope():
    with pytest.raises(
        ValueError, match=r"method\.topk_scope = 'layer' for method 'flasc': expected one of 'global', 'per_tensor'"
    ):
        methods.build("flasc", {"topk_scope": "layer"})


def test_flasc_freeze_to_mask_sends_the_download_support_as_grad_masks():
    method, state = start("flasc", {"density_down": 0.4, "freeze_to_mask": True})
    info = ClientInfo(0, RANK)
    plan, _ = method.prepare(None, method.broadcast(state, info, 1), info, 1)
    keep = kept(lora_named(state.adapter), 0.4)
    for mod, (mA, mB) in plan.grad_masks.items():
        assert torch.equal(mA, keep[f"lora.{mod}.A"]) and torch.equal(mB, keep[f"lora.{mod}.B"])
    plain, _ = methods.build("flasc", {"density_down": 0.4}).prepare(None, method.broadcast(state, info, 1), info, 1)
    assert plain.grad_masks is None


@pytest.mark.parametrize("name", ["fslora", "flasc"])
def test_whole_adapters_are_refused_as_deltas(name):
    """``fedlora aggregate`` sends adapters, not this round's deltas: a clear error, not a silent wrong step."""
    method, state = start(name, {})
    adapter_payload = Payload(pack_adapter(state.adapter) | pack_extras(head()))
    with pytest.raises(ValueError, match="client 0: .*deltas.*not one"):
        method.aggregate(state, [Contribution(0, 1.0, adapter_payload)], 1)


def test_server_adamw_matches_torch_over_steps():
    gen = torch.Generator().manual_seed(0)
    params = {
        "a": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "b": torch.randn(5, generator=gen, dtype=torch.float64),
    }
    ref = {n: torch.nn.Parameter(t.clone()) for n, t in params.items()}
    opt = torch.optim.AdamW(ref.values(), lr=0.01, weight_decay=0.1)
    state, cur = server_opt.OptState(), params
    for _ in range(4):
        grads = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in params.items()}
        for n, p in ref.items():
            p.grad = grads[n].clone()
        opt.step()
        cur, state = server_opt.step(cur, grads, state, server_opt.ServerOptimizer("adamw", 0.01, 0.1))
    for n, p in ref.items():
        torch.testing.assert_close(cur[n], p.detach(), rtol=1e-12, atol=1e-14)
    assert state.step == 4


# ---------------------------------------------------------------------------------------------------------------
# Training loop: gradient masks


def test_grad_masks_keep_masked_entries_bit_identical_under_adamw_with_weight_decay():
    model = tiny_peft()
    gen = torch.Generator().manual_seed(3)
    specs = peft_io.module_specs(model)
    adapter = {
        m: LowRank(torch.randn(s.d, 4, generator=gen), torch.randn(4, s.k, generator=gen)) for m, s in specs.items()
    }
    masks = {
        m: (torch.rand(4, s.k, generator=gen) < 0.5, torch.rand(s.d, 4, generator=gen) < 0.5) for m, s in specs.items()
    }
    data = {
        "input_ids": torch.randint(1, 50, (12, 6), generator=gen),
        "attention_mask": torch.ones(12, 6, dtype=torch.long),
        "labels": torch.randint(0, 2, (12,), generator=gen),
    }
    settings = training.TrainSettings(lr=0.05, weight_decay=0.5, max_grad_norm=1.0, batch_size=4, local_steps=3)

    def run(plan):
        peft_io.load_plan(model, plan, seed=0)
        initial = {m: (A.detach().clone(), B.detach().clone()) for m, (A, B) in peft_io.lora_parameters(model).items()}
        training.train_client(model, SEQ_CLS.loss, plan, data, settings, seed=0)
        return initial, {m: (A.detach(), B.detach()) for m, (A, B) in peft_io.lora_parameters(model).items()}

    initial, after = run(TrainPlan(rank=4, adapter=adapter, grad_masks=masks))
    for m, (keepA, keepB) in masks.items():
        for keep, before, now in ((keepA, initial[m][0], after[m][0]), (keepB, initial[m][1], after[m][1])):
            assert torch.equal(now[~keep], before[~keep])  # bit-identical
            assert not torch.equal(now[keep], before[keep])  # the rest trained
    initial, after = run(TrainPlan(rank=4, adapter=adapter))  # control: without masks every entry moves
    assert all(not torch.equal(after[m][0][~masks[m][0]], initial[m][0][~masks[m][0]]) for m in masks)


def test_fslora_client_trains_the_global_b_columns_through_peft():
    """With s = α/r, PEFT's B at rank m_u after the download is exactly the global PEFT B's selected columns, so
    the client's AdamW steps are the paper's (α = 6 ≠ r = 4)."""
    model = tiny_peft()
    specs = peft_io.module_specs(model)
    method = methods.build("fslora", {"sketch_ratio": 0.5})
    state = method.init_server(ModelInfo(specs, 4), seed=0)
    gen = torch.Generator().manual_seed(4)
    adapter = {
        m: LowRank(torch.randn(s.d, 4, generator=gen), torch.randn(4, s.k, generator=gen)) for m, s in specs.items()
    }
    state = dataclasses.replace(state, adapter=adapter)
    info = ClientInfo(0, 4)
    download = method.broadcast(state, info, 1)
    plan, _ = method.prepare(None, download, info, 1)
    peft_io.load_plan(model, plan, seed=0)
    s_global = 6.0 / 4
    for m, (A, B) in peft_io.lora_parameters(model).items():
        idx = download.tensors[f"lora.{m}.B.indices"].long()
        assert A.shape[0] == 2
        torch.testing.assert_close(B.detach(), adapter[m].B[:, idx] / s_global)
        torch.testing.assert_close(A.detach(), adapter[m].A[idx, :])


def test_grad_masks_with_a_wrong_shape_fail_clearly():
    model = tiny_peft()
    specs = peft_io.module_specs(model)
    module = sorted(specs)[0]
    bad = {module: (torch.ones(3, specs[module].k, dtype=torch.bool), torch.ones(specs[module].d, 4, dtype=torch.bool))}
    data = {
        "input_ids": torch.ones(2, 3, dtype=torch.long),
        "attention_mask": torch.ones(2, 3, dtype=torch.long),
        "labels": torch.zeros(2, dtype=torch.long),
    }
    with pytest.raises(ValueError, match=r"grad_masks.*A: mask shape \(3, 32\), expected.*\(4, 32\)"):
        plan = TrainPlan(rank=4, adapter=None, grad_masks=bad)
        training.train_client(model, SEQ_CLS.loss, plan, data, training.TrainSettings(local_steps=1), 0)


# ---------------------------------------------------------------------------------------------------------------
# Integration: 2 clients × 2 rounds on the packaged MiniLM and real Rotten Tomatoes snippets


def run_tiny(rt_csv: Path, out: Path, *extra: str) -> list[dict]:
    run_dir, summary = engines.run(tiny_config(rt_csv, out, *extra), out)
    records = read_records(run_dir)
    assert [r["round"] for r in records] == [1, 2] and summary["rounds"] == 2
    for r in records:
        assert_counted(r["global_accuracy"])
        assert math.isfinite(r["global_loss"])
    return records


HEAD_BYTES = (2 * 384 + 2) * 4  # MiniLM classifier weight + bias, float32
MODULES, D = 12, 384  # query and value of 6 layers, all 384 × 384


@pytest.mark.integration
def test_fslora_runs_on_minilm(rt_csv, tmp_path):
    records = run_tiny(rt_csv, tmp_path / "run", "federation.method=fslora", "method.sketch_ratio=[0.5, 1.0]")
    per_client = [MODULES * (m * 2 * D * 4 + 2 * m * 4) + HEAD_BYTES for m in (4, 8)]  # r = 8
    assert all(r["bytes_up"] == sum(per_client) == r["bytes_down"] for r in records)
    assert records[-1]["diagnostics"]["sketch_sizes"] == {"0": 4, "1": 8}


@pytest.mark.integration
def test_flasc_runs_on_minilm(rt_csv, tmp_path):
    records = run_tiny(
        rt_csv, tmp_path / "run", "federation.method=flasc", "method.density_up=0.1", "method.density_down=0.5"
    )
    N = MODULES * 8 * 2 * D
    assert all(r["bytes_up"] == 2 * (int(N * 0.1) * 8 + HEAD_BYTES) for r in records)
    assert all(r["bytes_down"] == 2 * (int(N * 0.5) * 8 + HEAD_BYTES) for r in records)
