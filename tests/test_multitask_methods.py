"""CE-LoRA, FL-TAC and FedLEASE: each server step against a hand-computed or dense reference, what travels, and the
client steps on a tiny PEFT model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_peft
from fedlora import methods, mixture, peft_io, training
from fedlora.methods.base import ClientInfo, ModelInfo, ModuleSpec
from fedlora.methods.ce_lora import CEClient, bhattacharyya
from fedlora.methods.fedlease import b_distances, choose_clusters, slots
from fedlora.methods.fl_tac import FLTACClient, pack_prefixed, purity
from fedlora.payload import pack_extras, unpack_factors
from fedlora.types import (
    CORE_SUFFIX,
    FEATURE_MEAN,
    FEATURE_VAR,
    UNFOLDED_B_SUFFIX,
    Contribution,
    LowRank,
    Payload,
    TrainPlan,
)

SPECS = {"q": ModuleSpec(5, 3), "v": ModuleSpec(4, 6)}  # non-square, unequal
R = 2


def _info(extras=None, task_labels=()):
    return ModelInfo(SPECS, R, extras or {"head.w": torch.zeros(3, 2)}, task_labels=task_labels)


def _adapter(gen, scale=1.0, center=None):
    out = {}
    for m, s in SPECS.items():
        B, A = torch.randn(s.d, R, generator=gen), torch.randn(R, s.k, generator=gen)
        if center is not None:
            B, A = center[m].B + scale * B, center[m].A + scale * A
        out[m] = LowRank(B, A)
    return out


# ---- CE-LoRA ---------------------------------------------------------------------------------------------------


def test_bhattacharyya_has_its_closed_form():
    one = torch.ones(1)
    assert bhattacharyya(torch.zeros(1), one, torch.ones(1), one) == pytest.approx(math.exp(-1 / 8))
    # N(0, 1) vs N(0, 4): D_B = ½ ln((1 + 4)/2 / 2) = ½ ln(5/4)
    assert bhattacharyya(torch.zeros(1), one, torch.zeros(1), 4 * one) == pytest.approx(math.exp(-0.5 * math.log(1.25)))
    x = torch.randn(7)
    assert bhattacharyya(x, x.abs(), x, x.abs()) == pytest.approx(1.0)


def _reference_pi(cores, stats, w, T, beta):
    """The documented weights, written out with numpy loops."""
    U = len(cores)
    dev = [np.concatenate([(c[m] - np.eye(R)).ravel() for m in sorted(c)]) for c in cores]
    pi = np.zeros((U, U))
    for u in range(U):
        s = []
        for v in range(U):
            cos = dev[u] @ dev[v] / (np.linalg.norm(dev[u]) * np.linalg.norm(dev[v]))
            (mu, vu), (mv, vv) = stats[u], stats[v]
            db = 0.25 * np.sum((mu - mv) ** 2 / (vu + vv)) + 0.5 * np.sum(np.log((vu + vv) / 2 / np.sqrt(vu * vv)))
            s.append(beta * cos + (1 - beta) * np.exp(-db))
        e = np.array(w) * np.exp(np.array(s) / T)
        pi[u] = e / e.sum()
    return pi


def _ce_round(method, cores, stats, weights, state=None, rnd=1):
    state = state or method.init_server(_info(), 0)
    contribs = []
    for c, (core, (mean, var), w) in enumerate(zip(cores, stats, weights, strict=True)):
        tensors = {f"lora.{m}.C": core[m] for m in SPECS} | {"stats.mean": mean, "stats.var": var}
        contribs.append(Contribution(c, w, Payload(tensors)))
    return method.aggregate(state, contribs, rnd)


def test_ce_lora_personalised_cores_match_the_documented_weights():
    gen = torch.Generator().manual_seed(0)
    cores = [{m: torch.eye(R) + 0.3 * torch.randn(R, R, generator=gen) for m in SPECS} for _ in range(3)]
    stats = [(torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    method = methods.build("ce_lora", {"temperature": 0.3, "param_weight": 0.7})
    state, report = _ce_round(method, cores, stats, weights)
    np_cores = [{m: c[m].double().numpy() for m in c} for c in cores]
    np_stats = [(a.double().numpy(), b.double().numpy()) for a, b in stats]
    pi = _reference_pi(np_cores, np_stats, weights, 0.3, 0.7)
    np.testing.assert_allclose(np.array(report.diagnostics["weights"]), pi, rtol=1e-10)
    for u in range(3):
        for m in SPECS:
            expected = sum(pi[u, v] * np_cores[v][m] for v in range(3))
            np.testing.assert_allclose(state.personal[u][m].double().numpy(), expected, rtol=1e-6, atol=1e-7)
    # the personalised core is what goes down, alone (plus the initial A, B = 0 and head for a new client)
    down = method.broadcast(state, ClientInfo(1, R), 2)
    torch.testing.assert_close(unpack_factors(down.tensors, "C")["q"], state.personal[1]["q"])
    assert not unpack_factors(down.tensors, "A") and down.nbytes == sum(R * R * 4 for _ in SPECS)
    new = method.broadcast(state, ClientInfo(7, R), 2)
    assert set(unpack_factors(new.tensors, "A")) == set(SPECS) and "extra.head.w" in new.tensors


def test_ce_lora_limits_fedavg_at_high_temperature_and_separates_planted_groups_at_low():
    gen = torch.Generator().manual_seed(1)
    a, b = ({m: torch.eye(R) + torch.randn(R, R, generator=gen) for m in SPECS} for _ in range(2))
    cores = [a, a, b]
    near, far = (torch.zeros(6), torch.ones(6)), (torch.full((6,), 30.0), torch.ones(6))
    stats = [near, near, far]
    weights = [0.25, 0.25, 0.5]
    hot, _ = _ce_round(methods.build("ce_lora", {"temperature": 1e9}), cores, stats, weights)
    fedavg = {m: sum(w * c[m] for w, c in zip(weights, cores, strict=True)) for m in SPECS}
    for u in range(3):
        torch.testing.assert_close(hot.personal[u]["q"], fedavg["q"])
    cold, report = _ce_round(methods.build("ce_lora", {"temperature": 0.01}), cores, stats, weights)
    assert report.diagnostics["weights"][0][2] < 1e-30 and report.diagnostics["weights"][2][0] < 1e-30
    torch.testing.assert_close(cold.personal[0]["v"], a["v"])  # clients 0 and 1 share a, client 2 is apart
    torch.testing.assert_close(cold.personal[2]["v"], b["v"])


def test_ce_lora_client_step_sends_only_the_core_and_statistics_once():
    method = methods.build("ce_lora")
    server = method.init_server(_info(), 0)
    client = ClientInfo(0, R)
    plan, cs = method.prepare(method.init_client(client), method.broadcast(server, client, 1), client, 1)
    assert plan.trainable == frozenset({"A", "B", "C"}) and plan.feature_statistics
    assert all(torch.equal(c, torch.eye(R)) for c in plan.cores.values())
    assert all(float(lr.B.abs().max()) == 0 for lr in plan.adapter.values())
    gen = torch.Generator().manual_seed(2)
    trained = _adapter(gen)
    extras = {"head.w": torch.ones(3, 2), FEATURE_MEAN: torch.zeros(4), FEATURE_VAR: torch.ones(4)}
    extras |= {f"{m}{CORE_SUFFIX}": torch.eye(R) * 2 for m in SPECS}
    extras |= {f"{m}{UNFOLDED_B_SUFFIX}": trained[m].B / 2 for m in SPECS}
    up, cs = method.upload(cs, trained, extras, client, 1)
    assert sorted(up.tensors) == ["lora.q.C", "lora.v.C", "stats.mean", "stats.var"]
    assert up.nbytes == 2 * R * R * 4 + 2 * 4 * 4
    torch.testing.assert_close(cs.B["q"], trained["q"].B / 2)  # its own B̃, the core unfolded
    assert torch.equal(cs.extras["head.w"], torch.ones(3, 2))  # the head stays local
    plan2, _ = method.prepare(cs, Payload({f"lora.{m}.C": torch.eye(R) for m in SPECS}), client, 2)
    assert not plan2.feature_statistics and torch.equal(plan2.adapter["q"].A, trained["q"].A)


def test_ce_lora_evaluation_model_is_the_weighted_tri_factor_average():
    method = methods.build("ce_lora")
    gen = torch.Generator().manual_seed(3)
    states = {}
    for c in range(2):
        a = _adapter(gen)
        states[c] = CEClient(
            {m: a[m].A for m in SPECS},
            {m: a[m].B for m in SPECS},
            {m: torch.eye(R) + torch.randn(R, R, generator=gen) for m in SPECS},
            {"head.w": torch.full((3, 2), float(c))},
            True,
        )
    cores = [states[c].C for c in range(2)]
    stats = [(torch.zeros(3), torch.ones(3))] * 2
    state, _ = _ce_round(method, cores, stats, [0.25, 0.75])
    model, errors = method.evaluation_model(state, states)
    for m in SPECS:
        B = 0.25 * states[0].B[m] @ states[0].C[m] + 0.75 * states[1].B[m] @ states[1].C[m]
        A = 0.25 * states[0].A[m] + 0.75 * states[1].A[m]
        torch.testing.assert_close(model.adapter[m].B, B)
        torch.testing.assert_close(model.adapter[m].A, A)
        ideal = sum(
            w * states[c].B[m].double() @ states[c].C[m].double() @ states[c].A[m].double()
            for c, w in ((0, 0.25), (1, 0.75))
        )
        assert errors[m].divergence == pytest.approx(
            float((ideal - B.double() @ A.double()).norm() / ideal.norm()), rel=1e-6
        )
    torch.testing.assert_close(model.extras["head.w"], torch.full((3, 2), 0.75))
    report = method.evaluation_report(states[1])
    back = method.from_evaluation_report(report)
    assert torch.equal(back.C["v"], states[1].C["v"]) and torch.equal(back.B["q"], states[1].B["q"])


def _data(n=16):
    gen = torch.Generator().manual_seed(6)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[::2, 4:] = 0
    return {
        "input_ids": torch.randint(1, 50, (n, 6), generator=gen),
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (n,), generator=gen),
    }


def _loss(model, batch):
    return model(**batch).loss


def test_training_moves_c_from_b_zero_when_b_trains_too_and_never_with_c_alone():
    """The official init B = 0 makes ∂/∂C zero; training C alone (the code's default) leaves C = I, while training
    A, B and C together (the code as committed, and fedlora) moves C after B has moved."""
    model = tiny_peft()
    specs = peft_io.module_specs(model)
    init = {m: LowRank(torch.zeros(s.d, 4), torch.randn(4, s.k) / 6) for m, s in specs.items()}
    cores = {m: torch.eye(4) for m in specs}
    settings = training.TrainSettings(lr=5e-2, batch_size=8, local_steps=4)
    alone = training.train_client(
        model, _loss, TrainPlan(4, init, cores=cores, trainable=frozenset({"C"})), _data(), settings, 0
    )
    assert all(torch.equal(alone.extras[f"{m}{CORE_SUFFIX}"], torch.eye(4)) for m in specs)
    joint = TrainPlan(4, init, cores=cores, trainable=frozenset({"A", "B", "C"}), feature_statistics=True)
    result = training.train_client(model, _loss, joint, _data(), settings, 0)
    for m in specs:
        core = result.extras[f"{m}{CORE_SUFFIX}"]
        own = result.extras[f"{m}{UNFOLDED_B_SUFFIX}"]
        assert float((core - torch.eye(4)).abs().max()) > 1e-4 and float(own.abs().max()) > 0
        torch.testing.assert_close(result.adapter[m].B, own @ core, rtol=1e-5, atol=1e-6)  # the folded product
    assert result.extras[FEATURE_MEAN].shape == (32,) and float(result.extras[FEATURE_VAR].min()) >= 0


def test_feature_statistics_are_the_mean_pooled_last_hidden_state():
    model = tiny_peft()
    peft_io.write_adapter(model, None, {}, rank=4, seed=0)
    data = _data(10)
    stats = training.feature_statistics(model, data, "fp32")
    with torch.no_grad():
        hidden = model(
            input_ids=data["input_ids"], attention_mask=data["attention_mask"], output_hidden_states=True
        ).hidden_states[-1]
    pooled = torch.stack([hidden[i, : int(data["attention_mask"][i].sum())].mean(0) for i in range(10)]).double()
    torch.testing.assert_close(stats[FEATURE_MEAN].double(), pooled.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[FEATURE_VAR].double(), pooled.var(0, unbiased=False), rtol=1e-4, atol=1e-6)


# ---- FL-TAC ----------------------------------------------------------------------------------------------------


def test_purity_and_matched_accuracy_by_hand():
    assert purity([0, 0, 1, 1, 1], [0, 0, 0, 1, 1]) == pytest.approx((0.8, 0.8))
    assert purity([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx((1.0, 0.5))  # pure clusters, one task split in two
    assert purity([0, 0, 0, 0], [0, 0, 1, 1]) == pytest.approx((0.5, 0.5))


def _planted(gen, k=3, per=4, spread=0.01):
    centres = [_adapter(gen, 1.0) for _ in range(k)]
    heads = [torch.randn(3, 2, generator=gen) for _ in range(k)]
    members = []
    for i in range(k * per):
        g = i % k
        a = {
            m: LowRank(
                centres[g][m].B + spread * torch.randn_like(centres[g][m].B),
                centres[g][m].A + spread * torch.randn_like(centres[g][m].A),
            )
            for m in SPECS
        }
        members.append((g, a, {"head.w": heads[g] + spread * torch.randn(3, 2, generator=gen)}))
    return members


def test_fl_tac_recovers_planted_clusters_exactly_and_averages_them_with_the_examples():
    """Twelve adapters around three centres, two adapters per client (slots), unequal example counts: K-means with
    K = 3 must recover the planted partition, and each cluster's average is the dense example-weighted mean."""
    gen = torch.Generator().manual_seed(4)
    members = _planted(gen)
    counts = [3 + i for i in range(len(members))]
    contribs = []
    for c in range(6):
        tensors, meta = {}, {}
        for j in range(2):
            i = 2 * c + j
            tensors |= pack_prefixed(f"slot.{j}", members[i][1], members[i][2])
            meta[f"slot.{j}.examples"] = counts[i]
        contribs.append(Contribution(c, 1 / 6, Payload(tensors, meta)))
    method = methods.build("fl_tac", {"clusters": 3})
    state, report = method.aggregate(method.init_server(_info(task_labels=((0, 1), (1, 2), (2, 3))), 0), contribs, 1)
    found = [k for _, _, k in report.diagnostics["assignment"]]
    planted = [g for g, _, _ in members]
    assert len({(p, f) for p, f in zip(planted, found, strict=True)}) == 3  # a bijection between the partitions
    for g in range(3):
        idx = [i for i in range(12) if planted[i] == g]
        w = torch.tensor([counts[i] for i in idx], dtype=torch.float64)
        w = w / w.sum()
        adapter, head = state.clusters[found[idx[0]]]
        for m in SPECS:
            torch.testing.assert_close(
                adapter[m].B.double(), sum(wi * members[i][1][m].B.double() for wi, i in zip(w, idx, strict=True))
            )
            torch.testing.assert_close(
                adapter[m].A.double(), sum(wi * members[i][1][m].A.double() for wi, i in zip(w, idx, strict=True))
            )
        torch.testing.assert_close(
            head["head.w"].double(), sum(wi * members[i][2]["head.w"].double() for wi, i in zip(w, idx, strict=True))
        )
    assert report.divergence > 0  # each cluster's FedIT average is inexact against its own ideal
    # each adapter continues from its own cluster's average
    down = method.broadcast(state, ClientInfo(2, R, tasks=(5, 6)), 2)
    plans, _ = method.prepare(FLTACClient((0, 1)), down, ClientInfo(2, R, tasks=(5, 6)), 2)
    for j, plan in enumerate(plans):
        expected = state.clusters[found[4 + j]][0]
        assert torch.equal(plan.adapter["q"].B, expected["q"].B) and plan.task == j


def test_fl_tac_uploads_name_slots_not_tasks_and_the_evaluation_model_routes_by_task():
    method = methods.build("fl_tac")
    info = _info(extras={"classifier.weight": torch.zeros(5, 2)}, task_labels=((0, 2), (2, 5)))
    state = method.init_server(info, 0)
    assert state.clusters_wanted == 2  # K = the number of tasks
    gen = torch.Generator().manual_seed(5)
    client = ClientInfo(0, R, tasks=(0, 9))  # holds task 1 only
    plans, cs = method.prepare(method.init_client(client), method.broadcast(state, client, 1), client, 1)
    assert [p.task for p in plans] == [1] and cs.tasks == (1,)
    up, _ = method.upload(cs, (_adapter(gen),), ({"classifier.weight": torch.ones(5, 2)},), client, 1)
    assert all(n.startswith("slot.0.") for n in up.tensors) and dict(up.meta) == {"rank": R, "slot.0.examples": 9}
    # two clusters, each holding one task: the global model routes task t to its cluster, head rows per task
    a0, a1 = _adapter(gen), _adapter(gen)
    h0, h1 = torch.zeros(5, 2), torch.ones(5, 2)
    contribs = [
        Contribution(0, 0.5, Payload(pack_prefixed("slot.0", a0, {"classifier.weight": h0}), {"slot.0.examples": 4})),
        Contribution(1, 0.5, Payload(pack_prefixed("slot.0", a1, {"classifier.weight": h1}), {"slot.0.examples": 6})),
    ]
    state, _ = method.aggregate(state, contribs, 1)
    model, errors = method.evaluation_model(state, {0: FLTACClient((1,)), 1: FLTACClient((0,))})
    assert not errors and model.diagnostics["cluster_purity"] == 1.0
    torch.testing.assert_close(model.adapter["q"].B, a1["q"].B)  # task 0 (client 1's) is the live adapter
    torch.testing.assert_close(model.extras[f"q{mixture.EXPERTS_B}"][0], a0["q"].B)
    assert model.extras[f"q{mixture.TASK_EXPERT}"].tolist() == [-1, 0]
    torch.testing.assert_close(model.extras["classifier.weight"], torch.cat([h1[:2], h0[2:]]))
    report = method.evaluation_report(FLTACClient((1,)))
    assert method.from_evaluation_report(report).tasks == (1,)


def test_fl_tac_carries_a_skipping_client_to_the_nearest_new_cluster():
    method = methods.build("fl_tac", {"clusters": 2})
    gen = torch.Generator().manual_seed(7)
    members = _planted(gen, k=2, per=2)
    contribs = [
        Contribution(c, 0.25, Payload(pack_prefixed("slot.0", members[c][1], members[c][2]), {"slot.0.examples": 5}))
        for c in range(4)
    ]
    state, _ = method.aggregate(method.init_server(_info(), 0), contribs, 1)
    old = state.assignment[(3, 0)]
    state, _ = method.aggregate(state, contribs[:3], 2)  # client 3 skips round 2
    assert state.assignment[(3, 0)] == state.assignment[(1, 0)]  # same planted group as client 1
    assert old is not None


# ---- FedLEASE --------------------------------------------------------------------------------------------------


def test_b_distances_by_hand():
    """Two modules: client 0 and 1 have parallel B in q and orthogonal in v → (0 + 1) / 2; client 2 opposite to 0 in
    both → (2 + 2) / 2."""
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    A = torch.zeros(2, 3)
    clients = [
        {"q": LowRank(e1, A), "v": LowRank(e1, A)},
        {"q": LowRank(3 * e1, A), "v": LowRank(e2, A)},
        {"q": LowRank(-e1, A), "v": LowRank(-e1, A)},
    ]
    d = b_distances(clients)
    np.testing.assert_allclose(d, [[0, 0.5, 2.0], [0.5, 0, 1.5], [2.0, 1.5, 0]], atol=1e-12)


def test_fedlease_finds_the_planted_number_of_clusters():
    gen = torch.Generator().manual_seed(8)
    dirs = [torch.randn(5, 2, generator=gen) for _ in range(3)]
    clients, planted = [], []
    for i in range(9):
        g = i % 3
        clients.append({"q": LowRank(dirs[g] + 0.05 * torch.randn(5, 2, generator=gen), torch.zeros(2, 3))})
        planted.append(g)
    labels, scores = choose_clusters(b_distances(clients), max_clusters=5)
    assert max(labels) + 1 == 3 and max(scores, key=scores.get) == 3
    assert len({(p, f) for p, f in zip(planted, labels, strict=True)}) == 3
    assert set(scores) == {2, 3, 4, 5}
    assert choose_clusters(b_distances(clients[:2]), 4)[0] == [0, 0]  # too few clients for a silhouette


def test_fedlease_slots_point_the_extra_slots_at_the_own_expert():
    table, others = slots(3, 1)
    assert table.tolist() == [0, -1, 1, -1, -1] and others == [0, 2]
    assert slots(1, 0)[0].tolist() == [-1]


def test_fedlease_warm_up_clustering_experts_and_routers():
    """Two warm-up rounds of local training (nothing averaged), then three planted groups of B: the experts are the
    example-weighted averages of their groups; after training each expert, router and head are averaged within
    its cluster only; every client gets all experts, its cluster's router, 2M − 1 slots with the top M."""
    method = methods.build("fedlease", {"warmup_rounds": 2, "max_clusters": 4})
    state = method.init_server(_info(), 0)
    gen = torch.Generator().manual_seed(9)
    members = _planted(gen, k=3, per=3, spread=0.01)
    examples = [2 + i for i in range(9)]
    for rnd in (1, 2):
        down = method.broadcast(state, ClientInfo(0, R, examples=examples[0]), rnd)
        assert (down.nbytes > 0) == (rnd == 1)  # the init once, then each client continues from its own
        contribs = [
            Contribution(
                c,
                1 / 9,
                Payload(
                    {f"lora.{m}.{f}": getattr(members[c][1][m], f) for m in SPECS for f in "AB"}
                    | pack_extras(members[c][2]),
                    {"examples": examples[c]},
                ),
            )
            for c in range(9)
        ]
        state, report = method.aggregate(state, contribs, rnd)
    assert report.diagnostics["experts"] == 3 and float(state.routers[0]["q"].abs().max()) > 0
    groups = [state.groups[c] for c in range(9)]
    for g in range(3):
        idx = [c for c in range(9) if groups[c] == g]
        w = torch.tensor([examples[c] for c in idx], dtype=torch.float64)
        w = w / w.sum()
        torch.testing.assert_close(
            state.experts[g]["v"].B.double(),
            sum(wi * members[c][1]["v"].B.double() for wi, c in zip(w, idx, strict=True)),
        )
    client = ClientInfo(4, R, examples=examples[4])
    down = method.broadcast(state, client, 3)
    plan, cs = method.prepare(method.init_client(client), down, client, 3)
    g = state.groups[4]
    assert plan.trainable == frozenset({"A", "B", "R"}) and torch.equal(plan.adapter["q"].A, state.experts[g]["q"].A)
    assert plan.extras[f"q{mixture.SLOTS}"].tolist() == slots(3, g)[0].tolist()
    assert plan.extras[f"q{mixture.ROUTER}"].shape == (5, SPECS["q"].k)
    # after training: upload own expert, router, head; the server averages within the cluster only
    trained = _adapter(gen)
    extras = {"head.w": torch.ones(3, 2)} | {f"{m}{mixture.ROUTER}": torch.full((5, SPECS[m].k), 2.0) for m in SPECS}
    up, _ = method.upload(cs, trained, extras, client, 3)
    assert sorted(n for n in up.tensors if n.startswith("router.")) == ["router.q", "router.v"]
    before = dict(state.experts)
    state, _ = method.aggregate(state, [Contribution(4, 1.0, up)], 3)
    torch.testing.assert_close(state.experts[g]["q"].B, trained["q"].B)
    assert all(state.experts[e] is before[e] for e in range(3) if e != g)
    torch.testing.assert_close(state.routers[g]["q"], torch.full((5, 3), 2.0))
    model = method.export(state)  # all experts, the mean router on the first M slots
    assert model.extras[f"q{mixture.SLOTS}"].tolist() == [-1, 0, 1] and model.extras[f"q{mixture.ROUTER}"].shape == (
        3,
        3,
    )


@pytest.mark.parametrize("name", ["ce_lora", "fl_tac", "fedlease"])
def test_registered_with_capabilities(name):
    cap = methods.capabilities(name)
    assert cap.personalised and cap.heterogeneous_ranks == "no" and cap.variants == ("lora",)
    with pytest.raises(ValueError, match=f"unknown key 'method.nope' for method '{name}'"):
        methods.build(name, {"nope": 1})


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("ce_lora", r"ce_lora: the upload of client 0 carries lora.<module>.B .* only C travels"),
        ("fl_tac", r"fl_tac: the upload of client 0 carries no adapter \(slot.<j>.lora...\)"),
        ("fedlease", r"fedlease: client 0's upload has meta examples = None, expected a positive count"),
    ],
)
def test_adapter_directories_are_refused_with_the_reason(tmp_path, name, match):
    from fedlora.aggregate_dirs import aggregate_dirs

    dirs = []
    for c in range(2):
        model = tiny_peft()
        peft_io.write_adapter(model, None, {}, rank=4, seed=c)
        peft_io.save_model_adapter(model, tmp_path / f"site{c}")
        dirs.append(tmp_path / f"site{c}")
    with pytest.raises(ValueError, match=match):
        aggregate_dirs(name, dirs, tmp_path / "out")
    assert not (tmp_path / "out").exists()
