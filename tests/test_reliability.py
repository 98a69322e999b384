"""Simulated faults, screening before aggregation and central differential privacy: the pure functions against
hand computations and dense definitions, the config keys, and an in-process run that survives its faulty
clients (on the real packaged MiniLM and the 240-example Rotten Tomatoes sample)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import read_records, tiny_config
from fedlora import config, engines, faults, methods, privacy, screening
from fedlora.methods.base import ModelInfo, ModuleSpec
from fedlora.payload import pack_adapter, pack_extras, pack_sparse
from fedlora.types import Contribution, LowRank, Payload

SPECS = {"q": ModuleSpec(12, 7), "v": ModuleSpec(5, 9)}
HEAD = {"classifier.weight": torch.zeros(2, 7), "classifier.bias": torch.zeros(2)}


def adapter(rank: int, seed: int, scale: float = 1.0) -> dict[str, LowRank]:
    gen = torch.Generator().manual_seed(seed)
    return {
        m: LowRank(scale * torch.randn(s.d, rank, generator=gen), scale * torch.randn(rank, s.k, generator=gen))
        for m, s in SPECS.items()
    }


def head(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=gen) for n, t in HEAD.items()}


def upload(rank: int = 4, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return pack_adapter(adapter(rank, seed, scale)) | pack_extras(head(seed))


INFO = ModelInfo(SPECS, 4, HEAD)


# ---- faults ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nan", "inf", "random", "shape", "raise", "hang", "scale:10", "scale:-0.5"])
def test_valid_fault_specs(spec):
    assert faults.problem(spec) is None


@pytest.mark.parametrize("spec", ["nann", "scale", "scale:x", "scale:inf", "scale:nan", 3, ""])
def test_invalid_fault_specs_say_what_is_expected(spec):
    assert "scale:F" in faults.problem(spec)


@pytest.mark.parametrize("spec, value", [("nan", math.nan), ("inf", math.inf)])
def test_nan_and_inf_hit_one_seeded_entry_of_every_float_tensor_and_leave_indices(spec, value):
    tensors = upload() | pack_sparse("lora.q.A", torch.ones(3), torch.tensor([0, 5, 9]))
    out = faults.corrupt(spec, Payload(tensors, {"rank": 4}), {}, seed=7).tensors
    assert out.keys() == tensors.keys()
    for name, t in tensors.items():
        if not t.is_floating_point():
            assert torch.equal(out[name], t)
            continue
        changed = ~(out[name] == t)
        assert int(changed.sum()) == 1, name
        bad = out[name][changed]
        assert bool(bad.isnan().all()) if spec == "nan" else bool((bad == value).all())
    again = faults.corrupt(spec, Payload(tensors), {}, seed=7).tensors
    assert all(torch.equal(again[n].isfinite(), out[n].isfinite()) for n in tensors)  # seeded: the same entries


def test_scale_multiplies_the_update_from_the_start_and_the_leading_block_of_a_lower_rank_start():
    start_adapter, start_head = adapter(6, seed=1), head(1)  # the plan started at rank 6; the upload is rank 4
    start = pack_adapter(start_adapter) | pack_extras(start_head)
    tensors = upload(rank=4, seed=2)
    out = faults.corrupt("scale:3", Payload(tensors), start, seed=0).tensors
    for m in SPECS:
        A0, B0 = start_adapter[m].A[:4].double(), start_adapter[m].B[:, :4].double()
        torch.testing.assert_close(out[f"lora.{m}.A"].double(), A0 + 3 * (tensors[f"lora.{m}.A"].double() - A0))
        torch.testing.assert_close(out[f"lora.{m}.B"].double(), B0 + 3 * (tensors[f"lora.{m}.B"].double() - B0))
    for n, h0 in start_head.items():
        torch.testing.assert_close(out[f"extra.{n}"], h0 + 3 * (tensors[f"extra.{n}"] - h0))
    alone = faults.corrupt("scale:3", Payload({"lora.q.A.values": torch.ones(3)}), {}, seed=0).tensors
    assert torch.equal(alone["lora.q.A.values"], torch.full((3,), 3.0))  # no start: the tensor itself


def test_random_keeps_shapes_and_the_norm_of_the_update_but_not_its_values():
    start = upload(seed=1)
    tensors = upload(seed=2)
    out = faults.corrupt("random", Payload(tensors), start, seed=5).tensors

    def update_norm(t):
        return math.sqrt(sum(float((t[n].double() - start[n].double()).norm()) ** 2 for n in tensors))

    assert {n: t.shape for n, t in out.items()} == {n: t.shape for n, t in tensors.items()}
    assert update_norm(out) == pytest.approx(update_norm(tensors), rel=1e-6)
    assert all(not torch.allclose(out[n], tensors[n]) for n in tensors)


def test_shape_breaks_the_first_float_tensor_only():
    tensors = upload()
    out = faults.corrupt("shape", Payload(tensors), {}, seed=0).tensors
    first = sorted(tensors)[0]
    assert out[first].shape != tensors[first].shape
    assert all(torch.equal(out[n], tensors[n]) for n in tensors if n != first)


def test_raise_fault_raises_naming_the_client_and_round():
    with pytest.raises(faults.InjectedFault, match="client 3, round 2: injected failure"):
        faults.before_training("raise", 3, 2, 600.0)
    faults.before_training(None, 3, 2, 600.0)
    faults.before_training("nan", 3, 2, 600.0)


# ---- screening ---------------------------------------------------------------------------------------------------


def _refusal(tensors, rank=4):
    return screening.form_problem(tensors, INFO, rank)


def test_a_well_formed_upload_passes_at_its_rank_or_below():
    assert _refusal(upload(rank=4)) is None
    assert _refusal(upload(rank=2)) is None
    assert _refusal({k: v for k, v in upload().items() if k.endswith(".B")}) is None  # one factor (FFA-LoRA)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t | {"lora.q.A": t["lora.q.A"].clone().fill_(math.nan)}, "lora.q.A: 28 NaN/Inf values"),
        (lambda t: t | {"extra.classifier.bias": torch.tensor([1.0, math.inf])}, "extra.classifier.bias: 1 NaN"),
        (lambda t: t | {"lora.q.A": t["lora.q.A"][:, :-1]}, r"lora.q.A: shape \(4, 6\), expected \(r, 7\)"),
        (lambda t: t | {"lora.v.B": torch.zeros(5, 4, dtype=torch.float64)}, "lora.v.B: dtype torch.float64"),
        (lambda t: t | {"lora.q.A": torch.zeros(3, 7)}, "lora.q: A has rank 3, B has rank 4"),
        (lambda t: t | {"lora.k.A": torch.zeros(4, 7)}, "unexpected tensor 'lora.k.A'"),
        (lambda t: t | {"base.1.q.dense": torch.zeros(12, 7)}, "unexpected tensor 'base.1.q.dense'"),
        (lambda t: t | {"extra.pooler.weight": torch.zeros(2)}, "unexpected tensor 'extra.pooler.weight'"),
        (lambda t: t | {"extra.classifier.weight": torch.zeros(2, 8)}, r"extra.classifier.weight: shape \(2, 8\)"),
    ],
)
def test_each_malformed_upload_is_refused_with_the_tensor_and_what_was_expected(change, message):
    import re

    reason = _refusal(change(upload()))
    assert reason is not None and re.search(message, reason), reason


def test_a_rank_above_the_clients_own_is_refused():
    assert "1 ≤ r ≤ 2 (the client's rank)" in _refusal(upload(rank=4), rank=2)


def test_sparse_indices_are_checked_against_their_values_and_range():
    good = pack_sparse("lora.q.A", torch.ones(3), torch.tensor([0, 5, 27]))  # flat into (4, 7): < 28
    assert _refusal(good) is None
    far = pack_sparse("lora.q.A", torch.ones(3), torch.tensor([0, 5, 28]))
    assert "expected in [0, 28)" in _refusal(far)
    rows = pack_sparse("lora.q.A", torch.ones(2, 7), torch.tensor([1, 3]))  # whole rank components (rows of A)
    assert _refusal(rows) is None
    assert "2 indices for 3 values" in _refusal(pack_sparse("lora.q.B", torch.ones(12, 3), torch.tensor([0, 1])))
    wide = {"lora.q.A.indices": torch.tensor([0], dtype=torch.int64), "lora.q.A.values": torch.ones(1)}
    assert "expected 1-D torch.int32" in _refusal(wide)


def _contributions(uploads):
    return [Contribution(c, 1.0 / len(uploads), Payload(t)) for c, t in enumerate(uploads)]


def test_names_that_differ_from_the_majority_are_refused_and_the_rest_kept():
    ups = [upload(seed=i) for i in range(4)]
    ups[2] = {k: v for k, v in ups[2].items() if k != "lora.v.B"}  # a module with A only
    kept, refused, _ = screening.screen(_contributions(ups), INFO, [4] * 4, {})
    assert [c.client for c in kept] == [0, 1, 3]
    assert set(refused) == {2} and "missing ['lora.v.B']" in refused[2]


def _dense(tensors, module):
    return tensors[f"lora.{module}.B"].double() @ tensors[f"lora.{module}.A"].double()


def test_update_norm_equals_the_dense_norm_of_the_change_including_a_single_factor_upload():
    glob, mine = upload(rank=4, seed=1), upload(rank=4, seed=2)
    dense = sum(float((_dense(mine, m) - _dense(glob, m)).norm()) ** 2 for m in SPECS)
    dense += sum(float((mine[n] - glob[n]).double().norm()) ** 2 for n in mine if n.startswith("extra."))
    assert screening.update_norm(mine, glob) == pytest.approx(math.sqrt(dense), rel=1e-9)
    only_b = {k: v for k, v in mine.items() if k.endswith(".B")}  # FFA-LoRA: A is the global one
    with_global_a = only_b | {k: v for k, v in glob.items() if k.endswith(".A")}
    expected = math.sqrt(sum(float((_dense(with_global_a, m) - _dense(glob, m)).norm()) ** 2 for m in SPECS))
    assert screening.update_norm(only_b, glob) == pytest.approx(expected, rel=1e-9)


def test_robust_z_against_a_hand_computation_and_zero_mad():
    z = screening.robust_z({0: 1.0, 1: 2.0, 2: 3.0, 3: 10.0})
    # median 2.5, |x - 2.5| = 1.5, 0.5, 0.5, 7.5 -> MAD 1.0
    assert z == pytest.approx({0: 1.5 / 1.4826, 1: 0.5 / 1.4826, 2: 0.5 / 1.4826, 3: 7.5 / 1.4826})
    assert screening.robust_z({0: 1.0, 1: 1.0, 2: 1.0, 3: 5.0}) == {0: 0.0, 1: 0.0, 2: 0.0, 3: math.inf}


def test_norm_screening_refuses_a_scaled_update_and_keeps_the_honest_clients():
    glob = upload(seed=10)
    ups = [{n: glob[n] + 0.01 * (i + 1) * torch.randn_like(glob[n]) for n in glob} for i in range(5)]
    ups[3] = faults.corrupt("scale:20", Payload(ups[3]), glob, seed=0).tensors
    kept, refused, norms = screening.screen(_contributions(ups), INFO, [4] * 5, glob, "norm", 3.5)
    assert [c.client for c in kept] == [0, 1, 2, 4]
    assert set(refused) == {3} and "robust z" in refused[3] and "federation.screen_z = 3.5" in refused[3]
    assert norms[3] > 10 * max(norms[c] for c in (0, 1, 2, 4))
    kept, refused, norms = screening.screen(_contributions(ups), INFO, [4] * 5, glob, "finite")
    assert len(kept) == 5 and refused == {} and norms == {}


# ---- central differential privacy ----------------------------------------------------------------------------------


def _fedit_round(contributions, glob_adapter):
    method = methods.build("fedit")
    state = method.init_server(INFO, seed=0)
    state = type(state)(adapter=glob_adapter, extras=dict(HEAD))
    return method.aggregate(state, contributions, rnd=1)[0]


def test_clipping_without_noise_gives_the_global_model_plus_the_weighted_sum_of_clipped_updates():
    glob_adapter = adapter(4, seed=0)
    glob = pack_adapter(glob_adapter) | pack_extras(HEAD)
    weights = [0.5, 0.3, 0.2]
    ups = [{n: glob[n] + s * torch.randn_like(glob[n]) for n in glob} for s in (0.01, 0.5, 2.0)]
    contributions = [Contribution(c, w, Payload(u)) for c, (w, u) in enumerate(zip(weights, ups, strict=True))]
    before = [{n: t.clone() for n, t in u.items()} for u in ups]
    done = privacy.privatize(contributions, glob, clip_norm=1.0, noise_multiplier=0.0, seed=0)
    assert all(torch.equal(u[n], b[n]) for u, b in zip(ups, before, strict=True) for n in u)  # inputs unchanged
    expected = {n: glob[n].double().clone() for n in glob}
    for c, (w, u) in enumerate(zip(weights, ups, strict=True)):
        norm = math.sqrt(sum(float((u[n].double() - glob[n].double()).norm()) ** 2 for n in glob))
        assert done.norms[c] == pytest.approx(norm)
        for n in glob:
            expected[n] += w * min(1.0, 1.0 / norm) * (u[n].double() - glob[n].double())
    new = _fedit_round(done.contributions, glob_adapter)
    for m, lr in new.adapter.items():
        torch.testing.assert_close(lr.A.double(), expected[f"lora.{m}.A"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lr.B.double(), expected[f"lora.{m}.B"], rtol=1e-5, atol=1e-6)
    for n, t in new.extras.items():
        torch.testing.assert_close(t.double(), expected[f"extra.{n}"], rtol=1e-5, atol=1e-6)


def test_the_noise_is_one_gaussian_draw_of_the_stated_std_that_reaches_the_weighted_sum_whole():
    big = {"q": ModuleSpec(300, 200)}
    gen = torch.Generator().manual_seed(0)
    glob_adapter = {"q": LowRank(torch.randn(300, 8, generator=gen), torch.randn(8, 200, generator=gen))}
    glob = pack_adapter(glob_adapter)
    weights = [0.6, 0.4]
    ups = [{n: t + 1e-3 * torch.randn(t.shape, generator=gen) for n, t in glob.items()} for _ in weights]
    contributions = [Contribution(c, w, Payload(u)) for c, (w, u) in enumerate(zip(weights, ups, strict=True))]
    clipped = privacy.privatize(contributions, glob, clip_norm=5.0, noise_multiplier=0.0, seed=3).contributions
    noised = privacy.privatize(contributions, glob, clip_norm=5.0, noise_multiplier=2.0, seed=3)
    assert noised.noise_std == pytest.approx(2.0 * 5.0 * 0.6)  # z · C · max w
    residuals = [
        {n: a.payload.tensors[n].double() - b.payload.tensors[n].double() for n in glob}
        for a, b in zip(noised.contributions, clipped, strict=True)
    ]
    for n in glob:
        torch.testing.assert_close(residuals[0][n], residuals[1][n], rtol=0, atol=1e-4)  # one shared draw
    values = torch.cat([r.flatten() for r in residuals[0].values()])
    assert float(values.mean()) == pytest.approx(0.0, abs=4 * noised.noise_std / math.sqrt(values.numel()))
    assert float(values.std()) == pytest.approx(noised.noise_std, rel=0.02)
    method = methods.build("fedit")
    state = method.init_server(ModelInfo(big, 8), seed=0)
    state = type(state)(adapter=glob_adapter, extras=None)
    plain = method.aggregate(state, clipped, 1)[0].adapter["q"]
    private = method.aggregate(state, noised.contributions, 1)[0].adapter["q"]
    torch.testing.assert_close(private.A.double() - plain.A.double(), residuals[0]["lora.q.A"], rtol=0, atol=1e-4)


def test_privatize_refuses_uploads_of_different_shapes_or_without_a_reference():
    glob = upload(rank=4)
    mixed = _contributions([upload(rank=4), upload(rank=2)])
    with pytest.raises(ValueError, match="client 1's upload differs in names or shapes"):
        privacy.privatize(mixed, glob, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="client 0 uploaded 'extra.classifier.bias'"):
        privacy.privatize(_contributions([upload()]), pack_adapter(adapter(4, 0)), 1.0, 1.0, 0)


def test_epsilon_grows_with_rounds_and_sampling_and_shrinks_with_noise_within_the_classic_rdp_bound():
    eps = privacy.epsilon(1.0, 1.0, 20, 1e-5)
    # RDP of T Gaussian mechanisms: T·α/(2z²); the classic conversion ε ≤ RDP(α) + log(1/δ)/(α − 1) at any α
    classic = min(20 * a / 2 + math.log(1e5) / (a - 1) for a in [1 + x / 100 for x in range(1, 5000)])
    assert 0.6 * classic < eps <= classic
    assert privacy.epsilon(1.0, 1.0, 10, 1e-5) < eps < privacy.epsilon(0.5, 1.0, 20, 1e-5)
    assert privacy.epsilon(1.0, 0.2, 20, 1e-5) < eps
    assert privacy.epsilon(1.0, 1.0, 0, 1e-5) == 0.0 and privacy.epsilon(0.0, 1.0, 3, 1e-5) == math.inf


# ---- config ------------------------------------------------------------------------------------------------------


def test_reliability_keys_parse_and_round_trip(tmp_path):
    cfg = config.load_config(
        None,
        [
            'faults.clients={1 = "nan", 3 = "scale:10"}',
            "federation.screen=norm",
            "federation.screen_z=2.5",
            "federation.method=fedit",
            "privacy.mechanism=central_dp",
            "privacy.noise_multiplier=0.3",
        ],
    )
    assert cfg.faults.clients == {"1": "nan", "3": "scale:10"} and cfg.federation.screen == "norm"
    assert config.from_flat(config.to_flat(cfg)) == cfg
    (tmp_path / "c.toml").write_text(config.dump_toml(cfg))
    assert config.load_config(tmp_path / "c.toml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (['faults.clients={12 = "nan"}'], r'faults.clients.12 = "nan": expected a client id in \[0, 10\)'),
        (['faults.clients={1 = "nann"}'], 'faults.clients.1 = "nann": expected one of "nan"'),
        (['faults.clients={x = "nan"}'], "faults.clients.x"),
        (["federation.screen=median"], 'federation.screen = "median": expected one of "finite", "norm"'),
        (["federation.screen_z=0"], "federation.screen_z = 0.0: expected a positive float"),
        (
            ["privacy.mechanism=central_dp"],
            "method 'flora_na'.s server step is not a weighted sum of uploads: it solves",
        ),
        (["privacy.mechanism=dp_sgd"], "local DP-SGD through Opacus is not available"),
        (["privacy.clip_norm=-1"], "privacy.clip_norm = -1.0: expected a positive float"),
        (["privacy.delta=1"], r"privacy.delta = 1.0: expected a float in \(0, 1\)"),
        (
            [
                "federation.method=fedit",
                "privacy.mechanism=central_dp",
                "data.num_clients=2",
                "model.lora.ranks=[4, 8]",
            ],
            "expected equal ranks with privacy.mechanism",
        ),
        (
            ["federation.method=fedloru", "method.reset=client", "privacy.mechanism=central_dp"],
            'method.reset = "client": expected "server"',
        ),
        (["federation.tls=true"], "federation.tls = true: expected false: it applies to federation.engine"),
    ],
)
def test_bad_reliability_keys_fail_with_one_clear_line(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load_config(None, overrides)


def test_every_method_either_sums_its_uploads_or_says_why_not():
    for name in methods.available():
        caps = methods.capabilities(name)
        assert caps.secure_aggregation != bool(caps.not_a_sum), name
    assert "each client's factors" in methods.capabilities("flora_na").not_a_sum


# ---- an in-process run with faulty clients -------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_in_process_run_survives_raising_hanging_nan_and_scaled_clients(rt_csv, tmp_path):
    """7 clients, one round: 0-2 honest, 3 scaled ×20 (a norm outlier), 4 NaN, 5 hangs (the worker running it is
    replaced after federation.round_timeout), 6 raises (recorded in one line, as in the main process)."""
    faulty = 'faults.clients={3 = "scale:20", 4 = "nan", 5 = "hang", 6 = "raise"}'
    cfg = tiny_config(
        rt_csv,
        tmp_path / "run",
        "federation.method=fedit",
        "data.num_clients=7",
        "data.partition=iid",
        "federation.screen=norm",
        "federation.workers=2",
        "federation.round_timeout=30",
        "federation.rounds=1",
        faulty,
    )
    run_dir, summary = engines.run(cfg, tmp_path / "run")
    for record in read_records(run_dir):
        assert record["clients"] == [0, 1, 2]
        assert set(record["excluded_clients"]) == {"3", "4"}
        assert "robust z" in record["excluded_clients"]["3"] and "NaN/Inf" in record["excluded_clients"]["4"]
        assert record["failed_clients"] == {
            "5": "no reply within federation.round_timeout = 30.0 s",
            "6": "InjectedFault: client 6, round 1: injected failure (faults.clients = 'raise')",
        }
        assert record["faults"] == {"3": "scale:20", "4": "nan", "5": "hang", "6": "raise"}
        assert math.isfinite(record["global_loss"])
    assert summary["excluded_clients"] == {"3": [1], "4": [1]} and summary["missing_clients"] == {"5": [1], "6": [1]}
    with pytest.raises(ValueError, match='faults.clients.5 = "hang" on federation.engine = .inprocess. needs'):
        engines.run(config.with_overrides(cfg, ["federation.workers=0", f"output.dir={tmp_path / 'seq'}"]))
