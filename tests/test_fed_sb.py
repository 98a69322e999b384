"""Fed-SB: ΔW = s·B·R·A with B, A frozen and shared, only the r×r R trained and averaged.

Expected values are dense float64 products computed here from the clients' raw cores and the shared factors (whose
subspaces are checked against the test's own SVD of the base weight), with non-square modules, LoRA scale s = α/r
with α ≠ r, and unequal weights; never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_peft
from fedlora import faults, methods, peft_io, privacy, screening, training
from fedlora.methods.base import ClientInfo, ModelInfo, ModuleSpec
from fedlora.methods.fed_sb import FedSBParams
from fedlora.payload import reference_tensors, unpack_extras
from fedlora.types import CORE_SUFFIX, Contribution, LowRank, Payload
from test_client_side_methods import A_BYTES, B_BYTES, HEAD0, HEAD_BYTES, SCALE, SHAPES, W3, R, keys_of, play
from test_multitask_methods import _data, _loss
from test_new_wave_methods import HEAD, MODULES, R8, D, run_tiny

F64 = torch.float64
C_BYTES = len(SHAPES) * R * R * 4  # r² per module, float32


def base_weights(seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(d, k, generator=gen) for m, (d, k) in SHAPES.items()}


def start(init: str = "weight_svd", weights: dict | None = None):
    method = methods.build("fed_sb", {"init": init})
    specs = {m: ModuleSpec(*s) for m, s in SHAPES.items()}
    info = ModelInfo(specs, R, HEAD0, weights or base_weights(), {m: SCALE for m in SHAPES})
    return method, method.init_server(info, seed=3)


def train_core(plan, gen):
    """A simulated local training: a new random core per module (A, B̃ untouched), B̃·C folded as training returns
    it, and a trained head."""
    assert plan.trainable == frozenset({"C"})
    adapter, extras = {}, {}
    for m, lr in plan.adapter.items():
        C = plan.cores[m] + torch.randn(R, R, generator=gen)
        extras[f"{m}{CORE_SUFFIX}"] = C
        adapter[m] = LowRank(lr.B @ C, lr.A.clone())
    extras |= {n: torch.randn(t.shape, generator=gen) for n, t in HEAD0.items()}
    return adapter, extras


def projector(Q: torch.Tensor) -> torch.Tensor:
    return Q @ Q.T


def test_shared_factors_are_the_scaled_principal_subspaces_of_the_base_weight():
    W0 = base_weights()
    method, server = start(weights=W0)
    down = method.broadcast(server, ClientInfo(0, R), 1)
    for m in SHAPES:
        B = down.tensors[f"lora.{m}.B"].double() / SCALE  # PEFT's B: B̃ = s·B
        A = down.tensors[f"lora.{m}.A"].double()
        assert torch.allclose(B.T @ B, torch.eye(R, dtype=F64), atol=1e-6)
        assert torch.allclose(A @ A.T, torch.eye(R, dtype=F64), atol=1e-6)
        U, _, Vh = torch.linalg.svd(W0[m].double())
        assert torch.allclose(projector(B), projector(U[:, :R]), atol=1e-6)
        assert torch.allclose(projector(A.T), projector(Vh[:R].T), atol=1e-6)
        assert float(down.tensors[f"lora.{m}.C"].abs().max()) == 0  # R0 = 0: the model starts at the base
    for lr in method.export(server).adapter.values():
        assert float(lr.dense().abs().max()) == 0


def test_aggregate_is_the_dense_weighted_mean_update_over_rounds():
    method, server = start()
    frozen = method.broadcast(server, ClientInfo(0, R), 1).tensors
    B = {m: frozen[f"lora.{m}.B"].double() / SCALE for m in SHAPES}
    A = {m: frozen[f"lora.{m}.A"].double() for m in SHAPES}
    states = {}
    for rnd in (1, 2, 3):
        server, report, log = play(method, server, states, rnd, W3, train=train_core)
        exported = method.export(server)
        for m in SHAPES:
            ideal = sum(w * SCALE * B[m] @ log[c]["head"][f"{m}{CORE_SUFFIX}"].double() @ A[m] for c, w in W3.items())
            assert torch.allclose(exported.adapter[m].dense().double(), ideal, rtol=1e-5, atol=1e-6)
            assert report.modules[m].divergence < 1e-6
            # every client started this round from the same R̄ (the previous aggregate)
            starts = [log[c]["plan"].cores[m] for c in W3]
            assert all(torch.equal(s, starts[0]) for s in starts)
        head = {n: sum(w * unpack_extras(log[c]["up"].tensors)[n].double() for c, w in W3.items()) for n in HEAD0}
        assert all(torch.allclose(exported.extras[n].double(), head[n], atol=1e-6) for n in HEAD0)


def test_bytes_are_r_squared_per_module_and_the_head_with_b_and_a_once():
    method, server = start()
    states = {}
    for rnd in (1, 2):
        server, report, log = play(method, server, states, rnd, W3, train=train_core)
        for c, entry in log.items():
            assert keys_of(entry["up"]) == {"C"}
            assert entry["up"].nbytes == C_BYTES + HEAD_BYTES == report.bytes_up[c]
            first = rnd == 1
            assert keys_of(entry["down"]) == ({"A", "B", "C"} if first else {"C"})
            assert entry["down"].nbytes == C_BYTES + HEAD_BYTES + (A_BYTES + B_BYTES if first else 0)
            assert report.bytes_down[c] == C_BYTES + HEAD_BYTES  # the next round's download: R̄ and the head
    # a client first seen later still receives the frozen factors once
    assert keys_of(method.broadcast(server, ClientInfo(9, R), 3)) == {"A", "B", "C"}


def test_random_init_is_orthonormal_seeded_and_needs_no_base_weights():
    method = methods.build("fed_sb", {"init": "random"})
    info = ModelInfo({m: ModuleSpec(*s) for m, s in SHAPES.items()}, R, HEAD0, scales={m: SCALE for m in SHAPES})
    one, two = method.init_server(info, 5), method.init_server(info, 5)
    for m in SHAPES:
        B, A = one.frozen[m].B.double() / SCALE, one.frozen[m].A.double()
        assert torch.allclose(B.T @ B, torch.eye(R, dtype=F64), atol=1e-6)
        assert torch.allclose(A @ A.T, torch.eye(R, dtype=F64), atol=1e-6)
        assert torch.equal(one.frozen[m].B, two.frozen[m].B)


def test_refusals_are_one_clear_line():
    with pytest.raises(ValueError, match=r"method\.init = 'gradient' for method 'fed_sb': expected one of"):
        methods.build("fed_sb", {"init": "gradient"})
    with pytest.raises(ValueError, match=r"^method\.init = 'x': expected one of 'weight_svd', 'random'$"):
        FedSBParams(init="x")  # type: ignore[arg-type]
    method = methods.build("fed_sb")
    with pytest.raises(ValueError, match=r"fed_sb: method.init = 'weight_svd' needs the frozen base weights"):
        method.init_server(ModelInfo({"q": ModuleSpec(4, 3)}, 2, {}), 0)
    method, server = start()
    with pytest.raises(ValueError, match=r"fed_sb: client 3 has rank 2.*needs equal ranks"):
        method.broadcast(server, ClientInfo(3, 2), 1)
    _, _, log = play(method, server, {}, 1, {0: 1.0}, train=train_core)
    for factor in ("A", "B"):
        bad = log[0]["up"].tensors | {f"lora.q.{factor}": torch.zeros(1)}
        with pytest.raises(ValueError, match=rf"fed_sb: the upload of client 0 carries lora.<module>.{factor}"):
            method.aggregate(server, [Contribution(0, 1.0, Payload(bad))], 1)
    info = ClientInfo(0, R)
    plan, cs = method.prepare(method.init_client(info), method.broadcast(server, info, 1), info, 1)
    moved = {m: LowRank(lr.B, lr.A + 1.0) for m, lr in plan.adapter.items()}
    cores = {f"{m}{CORE_SUFFIX}": torch.eye(R) for m in SHAPES}
    with pytest.raises(RuntimeError, match=r"fed_sb: client 0, module q: factor A changed during training"):
        method.upload(cs, moved, cores, info, 1)
    with pytest.raises(RuntimeError, match=r"fed_sb: client 0: training returned no core"):
        method.upload(cs, plan.adapter, {}, info, 1)


def test_registered_with_capabilities():
    caps = methods.capabilities("fed_sb")
    assert (caps.exact, caps.secure_aggregation, caps.not_a_sum, caps.heterogeneous_ranks) == (True, True, "", "no")
    assert caps.needs_base_weights and "arXiv 2502.15436" in caps.paper and "r²" in caps.uplink
    assert methods.make_params("fed_sb") == FedSBParams("weight_svd")


def test_uploaded_cores_are_measured_against_the_global_core_for_screening_dp_and_faults():
    """The reference of a round is (B̃R̄, A), the head and R̄ as lora.<m>.C: an upload's change is R_u − R̄ (plus its
    head's change), central DP clips that change and the Fed-SB server step then averages the clipped cores."""
    method, server = start()
    states = {}
    server, _, _ = play(method, server, states, 1, W3, train=train_core)  # R̄ ≠ 0 from here on
    g = method.export(server)
    reference = reference_tensors(g.adapter, g.extras, g.cores)
    assert all(torch.equal(reference[f"lora.{m}.C"], server.R[m]) for m in SHAPES)
    _, _, log = play(method, server, dict(states), 2, W3, train=train_core)
    contribs = [Contribution(c, w, log[c]["up"]) for c, w in W3.items()]
    for c in W3:
        t = log[c]["up"].tensors
        want = sum(float((t[f"lora.{m}.C"].double() - server.R[m].double()).norm()) ** 2 for m in SHAPES)
        want += sum(float((t[n].double() - reference[n].double()).norm()) ** 2 for n in t if n.startswith("extra."))
        assert screening.update_norm(t, reference) == pytest.approx(math.sqrt(want), rel=1e-9)
    clip = 0.5 * min(screening.update_norm(c.payload.tensors, reference) for c in contribs)
    done = privacy.privatize(contribs, reference, clip_norm=clip, noise_multiplier=0.0, seed=0)
    new, _ = method.aggregate(server, done.contributions, 2)
    for m in SHAPES:
        want = server.R[m].double() + sum(
            c.weight * (clip / done.norms[c.client]) * (c.payload.tensors[f"lora.{m}.C"].double() - server.R[m])
            for c in contribs
        )
        assert torch.allclose(new.R[m].double(), want, atol=1e-6)
    # a client's fault scales its core's change from the core it started from
    plan = log[0]["plan"]
    start_tensors = reference_tensors(plan.adapter, plan.extras, plan.cores)
    scaled = faults.corrupt("scale:3", log[0]["up"], start_tensors, seed=0).tensors
    for m in SHAPES:
        moved = log[0]["up"].tensors[f"lora.{m}.C"].double() - plan.cores[m].double()
        assert torch.allclose(scaled[f"lora.{m}.C"].double(), plan.cores[m].double() + 3 * moved, atol=1e-5)


# ---- the PEFT edge: only R moves --------------------------------------------------------------------------------


def edge_start():
    model = tiny_peft()  # rank 4, α = 6: s = 1.5
    specs = peft_io.module_specs(model)
    _, extras = peft_io.read_adapter(model)
    scales = {m: peft_io.lora_scale(model, m) for m in specs}
    assert all(s == 1.5 for s in scales.values())
    method = methods.build("fed_sb")
    server = method.init_server(ModelInfo(specs, 4, extras, peft_io.base_weights(model), scales), 0)
    info = ClientInfo(0, 4)
    plan, cs = method.prepare(method.init_client(info), method.broadcast(server, info, 1), info, 1)
    return model, method, plan, cs, info


def test_a_train_step_moves_only_r_and_leaves_a_and_b_bit_identical():
    model, _, plan, _, _ = edge_start()
    live = peft_io.load_plan(model, plan, seed=0)
    lora = {n: p for n, p in model.named_parameters() if ("lora_A" in n or "lora_B" in n) and not n.endswith(".core")}
    assert sum(n.endswith("parametrizations.weight.original") for n in lora) == len(live.cores) == 2  # B under R
    assert lora and not any(p.requires_grad for p in lora.values())
    before = {n: p.detach().clone() for n, p in lora.items()}
    cores_before = {m: c.detach().clone() for m, c in live.cores.items()}
    optimizer = torch.optim.AdamW(live.parameters, lr=0.05, weight_decay=0.1)  # decay would move frozen entries
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        _loss(model, _data(8)).backward()
        optimizer.step()
    after = {n: p.detach() for n, p in model.named_parameters() if n in before}
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert all(float((live.cores[m].detach() - cores_before[m]).abs().max()) > 1e-4 for m in live.cores)


def test_train_client_returns_r_that_the_upload_sends_alone():
    model, method, plan, cs, info = edge_start()
    settings = training.TrainSettings(lr=5e-2, batch_size=8, local_steps=3)
    result = training.train_client(model, _loss, plan, _data(), settings, 0)
    for m, lr in result.adapter.items():
        core = result.extras[f"{m}{CORE_SUFFIX}"]
        assert torch.equal(lr.A, plan.adapter[m].A) and float(core.abs().max()) > 0  # R moved from R0 = 0
        torch.testing.assert_close(lr.B, plan.adapter[m].B @ core, rtol=1e-5, atol=1e-6)
    up, _ = method.upload(cs, result.adapter, result.extras, info, 1)
    assert keys_of(up) == {"C"} and not any(CORE_SUFFIX in n for n in up.tensors)
    assert all(math.isfinite(float(t.abs().max())) for t in up.tensors.values())


# ---- end to end on the packaged MiniLM ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fed_sb_two_clients_two_rounds_on_minilm(rt_csv, tmp_path):
    run_dir, (r1, r2) = run_tiny(rt_csv, tmp_path, "federation.method=fed_sb")
    core = MODULES * R8 * R8 * 4
    assert r1["bytes_up"] == r2["bytes_up"] == 2 * (core + HEAD)  # R and the head only
    assert r1["bytes_down"] == 2 * (core + MODULES * R8 * 2 * D * 4 + HEAD)  # B, A once
    assert r2["bytes_down"] == 2 * (core + HEAD)
    for r in (r1, r2):
        assert r["divergence"] < 1e-5 and not r["failed_clients"]
        assert math.isfinite(r["global_loss"]) and math.isfinite(r["local_loss"])
    saved = peft_io.read_adapter_dir(run_dir / "adapter").adapter
    for lr in saved.values():
        assert torch.allclose(lr.A @ lr.A.T, torch.eye(R8), atol=1e-5) and float(lr.B.abs().max()) > 0


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fed_sb_under_central_dp_and_norm_screening_on_minilm(rt_csv, tmp_path):
    extra = ["federation.method=fed_sb", "privacy.mechanism=central_dp", "privacy.noise_multiplier=0.1"]
    _, records = run_tiny(rt_csv, tmp_path, *extra, "federation.screen=norm", "method.init=random")
    for r in records:
        assert math.isfinite(r["epsilon"]) and r["dp_noise_std"] > 0 and not r["failed_clients"]
        assert all(math.isfinite(v) for v in r["dp_update_norms"].values())
        assert math.isfinite(r["global_loss"])
