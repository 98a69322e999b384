"""FFA-LoRA, FedSA-LoRA and RoLoRA: the methods that change what clients train and what travels.

Method-level rounds are played through the whole protocol (broadcast → prepare → a simulated training step that
replaces exactly the trainable factors → upload → aggregate). Expected values come from dense float64 products
computed here or from hand-computed numbers, never from the code under test. Non-square modules, LoRA scale
s = α/r with α ≠ r folded into the simulated B̃, unequal weights.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_counted
from fedlora import engines, evaluation, methods
from fedlora.methods.base import ClientInfo, ModelInfo, ModuleSpec
from fedlora.types import Contribution, LowRank, Payload
from test_runner import tiny

R, ALPHA = 3, 5.0
SCALE = ALPHA / R
SHAPES = {"q": (12, 7), "v": (5, 9)}
HEAD0 = {"classifier.weight": torch.zeros(2, 4), "classifier.bias": torch.zeros(2)}
F32 = 4
HEAD_BYTES = (2 * 4 + 2) * F32
B_BYTES = sum(R * d for d, _ in SHAPES.values()) * F32
A_BYTES = sum(R * k for _, k in SHAPES.values()) * F32


def start(name: str, rank: int = R):
    method = methods.build(name)
    info = ModelInfo({m: ModuleSpec(*s) for m, s in SHAPES.items()}, rank, HEAD0)
    return method, method.init_server(info, seed=0)


def fake_train(plan, gen):
    """New random values for exactly the trainable factors (B̃ carries the scale), frozen ones as received, and
    a trained head."""
    out = {}
    for m, lr in plan.adapter.items():
        B = SCALE * torch.randn(lr.B.shape, generator=gen) if "B" in plan.trainable else lr.B.clone()
        A = torch.randn(lr.A.shape, generator=gen) / math.sqrt(lr.A.shape[1]) if "A" in plan.trainable else lr.A.clone()
        out[m] = LowRank(B, A)
    head = {n: torch.randn(t.shape, generator=gen) for n, t in HEAD0.items()}
    return out, head


def play(method, server, states, rnd, weights, seed=0, train=fake_train):
    """One round for the clients in ``weights`` (client -> normalised weight); ``states`` is updated in place.
    Returns the new server state, the report and per client its download, plan, trained adapter, head, upload."""
    gen = torch.Generator().manual_seed(1000 * rnd + seed)
    log, contributions = {}, []
    for c, w in weights.items():
        info = ClientInfo(c, R)
        down = method.broadcast(server, info, rnd)
        plan, cs = method.prepare(states.get(c, method.init_client(info)), down, info, rnd)
        trained, head = train(plan, gen)
        up, cs = method.upload(cs, trained, head, info, rnd)
        states[c] = cs
        log[c] = {"down": down, "plan": plan, "trained": trained, "head": head, "up": up}
        contributions.append(Contribution(c, w, up))
    server, report = method.aggregate(server, contributions, rnd)
    return server, report, log


def dense(lr: LowRank) -> torch.Tensor:
    return lr.B.double() @ lr.A.double()


def ideal(log, weights, module):
    """Σ_u w_u B̃_u A_u in float64 from what each client trained."""
    return sum(w * dense(log[c]["trained"][module]) for c, w in weights.items())


def keys_of(payload, prefix="lora."):
    return {k.rsplit(".", 1)[1] for k in payload.tensors if k.startswith(prefix)}


W3 = {0: 0.2, 1: 0.5, 2: 0.3}


# ---- FFA-LoRA ------------------------------------------------------------------------------------------------


def test_ffa_golden_two_clients():
    method = methods.build("ffa_lora")
    shapes = {"q": (2, 7), "v": (2, 9)}
    server = method.init_server(ModelInfo({m: ModuleSpec(*s) for m, s in shapes.items()}, 1, {}), 0)
    A0 = {m: a.clone() for m, a in server.A.items()}
    Bs = {0: torch.tensor([[1.0], [2.0]]), 1: torch.tensor([[3.0], [-1.0]])}
    contributions = []
    for c, w in ((0, 0.25), (1, 0.75)):
        info = ClientInfo(c, 1)
        plan, cs = method.prepare(method.init_client(info), method.broadcast(server, info, 1), info, 1)
        trained = {m: LowRank(Bs[c], lr.A.clone()) for m, lr in plan.adapter.items()}
        up, _ = method.upload(cs, trained, {}, info, 1)
        contributions.append(Contribution(c, w, up))
    server, report = method.aggregate(server, contributions, 1)
    for m in shapes:
        assert server.B[m].tolist() == [[2.5], [-0.25]]  # 0.25·1 + 0.75·3, 0.25·2 − 0.75·1
        assert torch.equal(server.A[m], A0[m])
        got = dense(method.export(server).adapter[m])
        want = 0.25 * Bs[0].double() @ A0[m].double() + 0.75 * Bs[1].double() @ A0[m].double()
        assert torch.allclose(got, want, atol=1e-6)
    assert report.divergence < 1e-6


def test_ffa_a_is_shared_frozen_sent_once_and_never_uploaded():
    method, server = start("ffa_lora")
    A0 = {m: a.clone() for m, a in server.A.items()}
    states = {}
    for rnd in (1, 2, 3):
        server, report, log = play(method, server, states, rnd, W3)
        for c, entry in log.items():
            assert entry["plan"].trainable == frozenset({"B"})
            assert all(torch.equal(entry["plan"].adapter[m].A, A0[m]) for m in SHAPES)  # same A everywhere
            assert keys_of(entry["up"]) == {"B"}
            assert entry["up"].nbytes == B_BYTES + HEAD_BYTES == report.bytes_up[c]
            assert ("A" in keys_of(entry["down"])) == (rnd == 1)
            assert entry["down"].nbytes == B_BYTES + HEAD_BYTES + (A_BYTES if rnd == 1 else 0)
            assert report.bytes_down[c] == B_BYTES + HEAD_BYTES
        for m in SHAPES:  # exact: B̄A0 = Σ w B̃_u A0
            assert torch.allclose(dense(method.export(server).adapter[m]), ideal(log, W3, m), rtol=1e-5, atol=1e-6)
        assert report.divergence < 1e-6
        head = sum(w * log[c]["head"]["classifier.weight"].double() for c, w in W3.items())
        assert torch.allclose(server.extras["classifier.weight"].double(), head, atol=1e-6)


def test_ffa_late_client_receives_a_once_and_lost_state_is_a_clear_error():
    method, server = start("ffa_lora")
    states = {}
    server, _, _ = play(method, server, states, 1, {0: 0.5, 1: 0.5})
    assert "A" in keys_of(method.broadcast(server, ClientInfo(2, R), 2))  # never took part
    assert "A" not in keys_of(method.broadcast(server, ClientInfo(1, R), 2))
    info = ClientInfo(1, R)
    with pytest.raises(ValueError, match=r"ffa_lora: client 1 has no local copy of factor A .*lora.<module>.A"):
        method.prepare(method.init_client(info), method.broadcast(server, info, 2), info, 2)


@pytest.mark.parametrize("name", ["ffa_lora", "fedsa_lora", "rolora"])
def test_permutation_identical_clients_and_inputs_not_mutated(name):
    method, server = start(name)
    _, _, log = play(method, server, {}, 1, W3)
    contributions = [Contribution(c, w, log[c]["up"]) for c, w in W3.items()]
    before = copy.deepcopy(contributions)

    def shared(state):  # what the aggregation produced, as the next download carries it (client 0 took part)
        return method.broadcast(state, ClientInfo(0, R), 2).tensors

    a, b = (
        shared(method.aggregate(server, contributions, 1)[0]),
        shared(method.aggregate(server, contributions[::-1], 1)[0]),
    )
    assert a.keys() == b.keys() and a
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    for x, y in zip(contributions, before, strict=True):
        assert all(torch.equal(x.payload.tensors[k], y.payload.tensors[k]) for k in x.payload.tensors)
    same = shared(method.aggregate(server, [Contribution(c, w, log[0]["up"]) for c, w in W3.items()], 1)[0])
    lora = {k: t for k, t in same.items() if k.startswith("lora.")}
    assert lora and all(torch.allclose(t, log[0]["up"].tensors[k], atol=1e-6) for k, t in lora.items())


def test_ffa_refuses_an_upload_carrying_a_and_unequal_ranks():
    method, server = start("ffa_lora")
    _, _, log = play(method, server, {}, 1, {0: 1.0})
    bad = log[0]["up"].tensors | {"lora.q.A": server.A["q"]}
    with pytest.raises(ValueError, match=r"client 0 carries lora.<module>.A .*only B travels"):
        method.aggregate(server, [Contribution(0, 1.0, Payload(bad))], 1)
    with pytest.raises(ValueError, match=r"client 3 has rank 2.*needs equal ranks"):
        method.broadcast(server, ClientInfo(3, 2), 1)


# ---- RoLoRA --------------------------------------------------------------------------------------------------


def test_rolora_alternates_b_then_a_exactly_with_the_right_bytes():
    method, server = start("rolora")
    A0 = {m: a.clone() for m, a in ((m, lr.A) for m, lr in server.adapter.items())}
    states = {}
    expected = {1: ("B", B_BYTES), 2: ("A", A_BYTES), 3: ("B", B_BYTES)}
    for rnd, (factor, up_bytes) in expected.items():
        prev = {m: (lr.B.clone(), lr.A.clone()) for m, lr in server.adapter.items()}
        server, report, log = play(method, server, states, rnd, W3)
        for entry in log.values():
            plan = entry["plan"]
            assert plan.trainable == frozenset({factor})
            assert keys_of(entry["up"]) == {factor}
            assert entry["up"].nbytes == up_bytes + HEAD_BYTES
            # download: the frozen factor; in round 1 also the B = 0 it starts from
            other = "A" if factor == "B" else "B"
            assert keys_of(entry["down"]) == ({"A", "B"} if rnd == 1 else {other})
            for m in SHAPES:  # training starts from the global factors of the previous round
                assert torch.equal(plan.adapter[m].B, prev[m][0]) and torch.equal(plan.adapter[m].A, prev[m][1])
        if rnd == 1:
            assert all(float(log[0]["plan"].adapter[m].B.abs().max()) == 0 for m in SHAPES)
            assert all(torch.equal(log[0]["plan"].adapter[m].A, A0[m]) for m in SHAPES)
        for m in SHAPES:
            assert torch.allclose(dense(server.adapter[m]), ideal(log, W3, m), rtol=1e-5, atol=1e-6)
        assert report.divergence < 1e-6
        next_factor = "A" if factor == "B" else "B"
        next_bytes = (A_BYTES if next_factor == "B" else B_BYTES) + HEAD_BYTES  # next round sends the frozen one
        assert all(v == next_bytes for v in report.bytes_down.values())


def test_rolora_golden_two_clients_round_two():
    method = methods.build("rolora")
    server = method.init_server(ModelInfo({"q": ModuleSpec(2, 3)}, 1, {}), 0)
    B = torch.tensor([[2.0], [-1.0]])
    server = type(server)({"q": LowRank(B, server.adapter["q"].A)}, None, {0: 1, 1: 1})  # after round 1
    A_up = {0: torch.tensor([[1.0, 0.0, 2.0]]), 1: torch.tensor([[-3.0, 4.0, 0.0]])}
    contributions = [Contribution(c, w, Payload({"lora.q.A": A_up[c]})) for c, w in ((0, 0.25), (1, 0.75))]
    new, report = method.aggregate(server, contributions, 2)
    assert new.adapter["q"].A.tolist() == [[-2.0, 3.0, 0.5]]
    assert torch.equal(new.adapter["q"].B, B)
    want = 0.25 * B.double() @ A_up[0].double() + 0.75 * B.double() @ A_up[1].double()
    assert torch.allclose(dense(new.adapter["q"]), want)
    assert report.divergence < 1e-7


def test_rolora_missed_round_resends_both_and_lost_state_is_a_clear_error():
    method, server = start("rolora")
    states = {}
    server, _, _ = play(method, server, states, 1, {0: 0.5, 1: 0.5})
    server, _, _ = play(method, server, states, 2, {0: 1.0})
    assert keys_of(method.broadcast(server, ClientInfo(1, R), 3)) == {"A", "B"}  # skipped round 2
    assert keys_of(method.broadcast(server, ClientInfo(0, R), 3)) == {"A"}
    _, _, log = play(method, server, states, 3, {0: 0.5, 1: 0.5})
    for m in SHAPES:  # client 1 starts B from the global B̄, not from its own round-1 B
        assert torch.equal(log[1]["plan"].adapter[m].B, server.adapter[m].B)
    info = ClientInfo(0, R)
    with pytest.raises(ValueError, match=r"rolora: client 0 has no local copy of factor B .*lora.<module>.B"):
        method.prepare(method.init_client(info), method.broadcast(server, info, 3), info, 3)


# ---- FedSA-LoRA ----------------------------------------------------------------------------------------------


def test_fedsa_b_and_head_stay_local_and_persist():
    method, server = start("fedsa_lora")
    states = {}
    logs = []
    for rnd in (1, 2, 3):
        prev_states = dict(states)
        server, report, log = play(method, server, states, rnd, W3)
        logs.append(log)
        for c, entry in log.items():
            up, plan = entry["up"], entry["plan"]
            assert set(up.tensors) == {f"lora.{m}.A" for m in SHAPES}  # no B, no head
            assert up.nbytes == A_BYTES == report.bytes_up[c]
            assert plan.trainable == frozenset({"A", "B"})
            if rnd == 1:
                assert entry["down"].nbytes == A_BYTES + B_BYTES + HEAD_BYTES  # initial B = 0 and head, once
                assert all(float(plan.adapter[m].B.abs().max()) == 0 for m in SHAPES)
            else:
                assert entry["down"].nbytes == A_BYTES and keys_of(entry["down"]) == {"A"}
                old = logs[-2][c]
                for m in SHAPES:  # its own B from last round, Ā from the server
                    assert torch.equal(plan.adapter[m].B, old["trained"][m].B)
                    assert torch.equal(prev_states[c].B[m], old["trained"][m].B)
                for n in HEAD0:
                    assert torch.equal(plan.extras[n], old["head"][n])
            assert report.bytes_down[c] == A_BYTES
        for m in SHAPES:
            Abar = sum(w * log[c]["trained"][m].A.double() for c, w in W3.items())
            assert torch.allclose(server.A[m].double(), Abar, atol=1e-6)
    assert not torch.equal(states[0].B["q"], states[1].B["q"])


def test_fedsa_golden_two_clients_and_evaluation_model():
    method = methods.build("fedsa_lora")
    server = method.init_server(ModelInfo({"q": ModuleSpec(2, 3)}, 1, {"h": torch.zeros(2)}), 0)
    A_up = {0: torch.tensor([[1.0, 0.0, 2.0]]), 1: torch.tensor([[-3.0, 4.0, 0.0]])}
    B_own = {0: torch.tensor([[1.0], [2.0]]), 1: torch.tensor([[3.0], [-1.0]])}
    heads = {0: torch.tensor([4.0, 0.0]), 1: torch.tensor([0.0, 8.0])}
    contributions, states = [], {}
    for c, w in ((0, 0.25), (1, 0.75)):
        info = ClientInfo(c, 1)
        _, cs = method.prepare(method.init_client(info), method.broadcast(server, info, 1), info, 1)
        up, states[c] = method.upload(cs, {"q": LowRank(B_own[c], A_up[c])}, {"h": heads[c]}, info, 1)
        contributions.append(Contribution(c, w, up))
    server, _ = method.aggregate(server, contributions, 1)
    assert server.A["q"].tolist() == [[-2.0, 3.0, 0.5]]
    model, errors = method.evaluation_model(server, states)
    assert model.adapter["q"].B.tolist() == [[2.5], [-0.25]]
    assert torch.equal(model.adapter["q"].A, server.A["q"])
    assert model.extras["h"].tolist() == [1.0, 6.0]
    M = 0.25 * B_own[0].double() @ A_up[0].double() + 0.75 * B_own[1].double() @ A_up[1].double()
    applied = torch.tensor([[2.5], [-0.25]], dtype=torch.float64) @ torch.tensor(
        [[-2.0, 3.0, 0.5]], dtype=torch.float64
    )
    want = float(torch.linalg.norm(M - applied) / torch.linalg.norm(M))
    assert errors["q"].divergence == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match=r"needs client 1's own B"):
        method.evaluation_model(server, {0: states[0]})
    info = ClientInfo(1, 1)
    with pytest.raises(ValueError, match=r"fedsa_lora: client 1 has no local copy of factor B .*lora.<module>.B"):
        method.prepare(method.init_client(info), method.broadcast(server, info, 2), info, 2)


def test_fedsa_refuses_uploads_with_local_parts():
    method, server = start("fedsa_lora")
    _, _, log = play(method, server, {}, 1, {0: 1.0})
    up = log[0]["up"]
    with pytest.raises(ValueError, match=r"client 0 carries lora.<module>.B"):
        method.aggregate(server, [Contribution(0, 1.0, Payload(up.tensors | {"lora.q.B": torch.zeros(12, R)}))], 1)
    with pytest.raises(ValueError, match=r"client 0 uploaded extra.classifier.bias, which stays local"):
        method.aggregate(
            server, [Contribution(0, 1.0, Payload(up.tensors | {"extra.classifier.bias": torch.zeros(2)}))], 1
        )


def test_fedsa_evaluation_report_round_trips_the_client_state_without_A():
    method, server = start("fedsa_lora")
    states = {}
    play(method, server, states, 1, W3)
    for c, state in states.items():
        report = method.evaluation_report(state)
        assert not any(name.endswith(".A") for name in report.tensors)
        back = method.from_evaluation_report(report)
        assert set(back.B) == set(state.B) and all(torch.equal(back.B[m], state.B[m]) for m in state.B), c
        assert set(back.extras) == set(state.extras or {})
        assert all(torch.equal(back.extras[n], state.extras[n]) for n in back.extras), c


def test_the_global_model_is_the_evaluation_model_only_when_the_method_defines_it():
    from types import SimpleNamespace

    method, server = start("fedsa_lora")
    states = {}
    server, _, log = play(method, server, states, 1, W3)
    model, errors = evaluation.global_model(
        SimpleNamespace(method=method), SimpleNamespace(server=server, clients=states)
    )
    for m in SHAPES:
        Bbar = sum(w * log[c]["trained"][m].B.double() for c, w in W3.items())
        assert torch.allclose(model.adapter[m].B.double(), Bbar, atol=1e-6)
    assert set(errors) == set(SHAPES)
    ffa, ffa_server = start("ffa_lora")
    model, errors = evaluation.global_model(SimpleNamespace(method=ffa), SimpleNamespace(server=ffa_server, clients={}))
    assert errors is None and set(model.adapter) == set(SHAPES)


# ---- shared --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ffa_lora", "fedsa_lora", "rolora"])
def test_registered_with_capabilities_and_no_unknown_keys(name):
    assert name in methods.available()
    cap = methods.capabilities(name)
    assert cap.heterogeneous_ranks == "no" and cap.uplink and cap.downlink and "arXiv" in cap.paper
    assert cap.personalised == (name == "fedsa_lora") and cap.exact == (name != "fedsa_lora")
    with pytest.raises(ValueError, match=rf"unknown key 'method.rank' for method '{name}': valid keys are none"):
        methods.build(name, {"rank": 4})


# ---- integration: real MiniLM, real Rotten Tomatoes snippets ------------------------------------------------

MODULES, D = 12, 384  # MiniLM: 6 layers × (query, value), 384 × 384
R8 = 8
MINI_HEAD = (2 * D + 2) * F32
FACTOR = MODULES * R8 * D * F32  # r·d = r·k here


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["ffa_lora", "fedsa_lora", "rolora"])
def test_two_clients_two_rounds_on_minilm(rt_csv, tmp_path, name):
    cfg = tiny(rt_csv, tmp_path / "run", f"federation.method={name}", "data.num_clients=2", "data.partition=iid")
    run_dir, summary = engines.run(cfg, tmp_path / "run")
    r1, r2 = _records(run_dir)
    assert r1["clients"] == r2["clients"] == [0, 1]
    if name == "fedsa_lora":
        assert r1["bytes_up"] == r2["bytes_up"] == 2 * FACTOR  # A only: no B, no head
        assert r1["bytes_down"] == 2 * (2 * FACTOR + MINI_HEAD) and r2["bytes_down"] == 2 * FACTOR
        assert r1["divergence"] == pytest.approx(r1["fedit_divergence"], rel=1e-4) and r1["divergence"] > 0
    else:
        assert r1["bytes_up"] == r2["bytes_up"] == 2 * (FACTOR + MINI_HEAD)
        assert r1["bytes_down"] == 2 * (2 * FACTOR + MINI_HEAD) and r2["bytes_down"] == 2 * (FACTOR + MINI_HEAD)
        assert r1["divergence"] < 1e-5 and r2["divergence"] < 1e-5
    assert_counted(summary["final_global_accuracy"])
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")  # FedSA: Ā with the clients' mean B
    assert all(float(t.abs().max()) > 0 for k, t in saved.items() if "lora_B" in k)
