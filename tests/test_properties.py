"""Property-based tests (hypothesis) over every registered method's server step, and over the parsers that take
outside input (the config, payloads, screening).

Uploads are built by each method's own client hooks (init_server → broadcast → prepare → a "trained" adapter of
the plan's shapes, moved only where the plan lets it train → upload), so methods registered later are covered
without special cases. Expected values are dense float64 definitions computed here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora import config, methods, screening
from fedlora.methods.base import ClientInfo, ModelInfo, ModuleSpec
from fedlora.payload import unpack_adapter, unpack_base_edits, unpack_extras, unpack_sparse
from fedlora.types import (
    CORE_SUFFIX,
    FEATURE_MEAN,
    FEATURE_VAR,
    UNFOLDED_B_SUFFIX,
    Contribution,
    LowRank,
    Payload,
)

SPECS = {"q": ModuleSpec(12, 8), "v": ModuleSpec(7, 10)}  # ranks 5-6 (pFedLoRU keeps 4 personal)
HEAD = {"classifier.weight": torch.zeros(2, 8), "classifier.bias": torch.zeros(2)}
EXAMPLES = 20
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL = methods.available()
EXACT = [m for m in ALL if methods.capabilities(m).exact]


def _model_info(name: str, rank: int) -> ModelInfo:
    gen = torch.Generator().manual_seed(123)
    info = ModelInfo(SPECS, rank, {n: torch.randn(t.shape, generator=gen) for n, t in HEAD.items()})
    if methods.capabilities(name).needs_base_weights:
        weights = {m: torch.randn(s.d, s.k, generator=gen) for m, s in SPECS.items()}
        info = ModelInfo(info.specs, rank, info.extras, weights, {m: 2.0 for m in SPECS})
    return info


def _trained(plan, gen: torch.Generator) -> dict[str, LowRank]:
    """A "trained" adapter: the plan's start (a PEFT-style init when it has none) moved where it may train."""
    out = {}
    for m, spec in SPECS.items():
        if plan.adapter is not None:
            B, A = plan.adapter[m].B.clone(), plan.adapter[m].A.clone()
        else:
            B, A = torch.zeros(spec.d, plan.rank), torch.randn(plan.rank, spec.k, generator=gen) / math.sqrt(spec.k)
        masks = (plan.grad_masks or {}).get(m, (torch.ones_like(A), torch.ones_like(B)))
        if "A" in plan.trainable:
            A = A + 0.3 * torch.randn(A.shape, generator=gen) * masks[0].to(A.dtype)
        if "B" in plan.trainable:
            B = B + 0.3 * torch.randn(B.shape, generator=gen) * masks[1].to(B.dtype)
        out[m] = LowRank(B, A)
    return out


def client_round(name: str, ranks: list[int], weights: list[float], seed: int):
    """(method, server state, contributions with normalised weights, the clients' trained adapters). A client of a
    method that trains several adapters (one per local task) uploads them all; the first is its "trained" one."""
    method = methods.build(name)
    state = method.init_server(_model_info(name, max(ranks)), seed)
    gen = torch.Generator().manual_seed(seed)
    total = sum(weights)
    contributions, trained = [], []
    for c, (rank, w) in enumerate(zip(ranks, weights, strict=True)):
        info = ClientInfo(c, rank, examples=10 + c)
        plan, client_state = method.prepare(method.init_client(info), method.broadcast(state, info, 1), info, 1)
        plans = plan if isinstance(plan, tuple) else (plan,)
        adapters = [_trained(p, gen) for p in plans]
        extras = [_trained_extras(p, a, gen) for p, a in zip(plans, adapters, strict=True)]
        if isinstance(plan, tuple):
            upload, _ = method.upload(client_state, tuple(adapters), tuple(extras), info, 1)
        else:
            upload, _ = method.upload(client_state, adapters[0], extras[0], info, 1)
        contributions.append(Contribution(c, w / total, upload))
        trained.append(adapters[0])
    return method, state, contributions, trained


def _trained_extras(plan, adapter: dict[str, LowRank], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The plan's fully trained tensors (the head when it has none) moved; for a tri-factor plan, a trained core
    per module and the trained B̃ itself (the adapter's B then holds B̃·C, as ``LiveAdapter.read`` returns it); the
    feature statistics when the plan asks for them."""
    extras = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in (plan.extras or HEAD).items()}
    for m, core in (plan.cores or {}).items():
        C = core + 0.1 * torch.randn(core.shape, generator=gen)
        extras |= {f"{m}{CORE_SUFFIX}": C, f"{m}{UNFOLDED_B_SUFFIX}": adapter[m].B}
        adapter[m] = LowRank(adapter[m].B @ C, adapter[m].A)
    if plan.feature_statistics:
        extras |= {FEATURE_MEAN: torch.randn(6, generator=gen), FEATURE_VAR: torch.rand(6, generator=gen) + 0.1}
    return extras


def effective(model) -> dict[str, torch.Tensor]:
    """What a model applies per module, dense float64: base edits + adapter."""
    out = {m: torch.zeros(s.d, s.k, dtype=torch.float64) for m, s in SPECS.items()}
    for edit in model.base_edits:
        for m in edit.modules():
            out[m] += edit.delta(m).double()
    for m, lr in (model.adapter or {}).items():
        out[m] += lr.B.double() @ lr.A.double()
    return out


def _ranks(name: str) -> st.SearchStrategy[list[int]]:
    if methods.capabilities(name).heterogeneous_ranks == "no":
        return st.integers(5, 6).flatmap(lambda r: st.lists(st.just(r), min_size=2, max_size=4))
    return st.lists(st.integers(5, 6), min_size=2, max_size=4)


def _inputs(name: str):
    return _ranks(name).flatmap(
        lambda ranks: st.tuples(
            st.just(ranks),
            st.lists(st.floats(0.05, 10.0), min_size=len(ranks), max_size=len(ranks)),
            st.integers(0, 2**16),
        )
    )


# ---- every method's server step -----------------------------------------------------------------------------------


def _check_server_step(name, inputs):
    ranks, weights, seed = inputs
    method, state, contributions, _ = client_round(name, ranks, weights, seed)
    before = copy.deepcopy((state, contributions))
    new, _ = method.aggregate(state, contributions, 1)
    # no input mutated
    for a, b in zip(contributions, before[1], strict=True):
        assert a.payload.tensors.keys() == b.payload.tensors.keys()
        assert all(torch.equal(a.payload.tensors[n], b.payload.tensors[n]) for n in a.payload.tensors), name
    assert _same_tree(state, before[0]), f"{name}: aggregate changed its input state"
    # finite output for finite input
    exported = method.export(new)
    applied = effective(exported)
    assert all(bool(torch.isfinite(t).all()) for t in applied.values()), name
    assert all(bool(torch.isfinite(t).all()) for t in exported.extras.values()), name
    # the same clients with their weights in another order give the same model
    order = list(reversed(range(len(contributions))))
    other, _ = method.aggregate(state, [contributions[i] for i in order], 1)
    permuted = effective(method.export(other))
    for m in SPECS:
        torch.testing.assert_close(permuted[m], applied[m], rtol=1e-6, atol=1e-6, msg=f"{name} {m}")


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same_tree(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


@pytest.mark.parametrize("name", ALL)
def test_server_step_invariants(name):
    """Permuting the clients (with their weights) changes nothing, no input is mutated, the output is finite."""

    @SETTINGS
    @given(_inputs(name))
    def check(inputs):
        _check_server_step(name, inputs)

    check()


@pytest.mark.parametrize("name", EXACT)
def test_exact_methods_apply_the_weighted_mean_update(name):
    """What the model applies after the round, minus the base edits it held before, is Σ w_u B̃_u A_u."""

    @SETTINGS
    @given(_inputs(name))
    def check(inputs):
        ranks, weights, seed = inputs
        method, state, contributions, trained = client_round(name, ranks, weights, seed)
        new, _ = method.aggregate(state, contributions, 1)
        held = {m: torch.zeros(s.d, s.k, dtype=torch.float64) for m, s in SPECS.items()}
        for edit in method.export(state).base_edits:
            for m in edit.modules():
                held[m] += edit.delta(m).double()
        after = effective(method.export(new))
        for m in SPECS:
            mean = sum(
                c.weight * (t[m].B.double() @ t[m].A.double()) for c, t in zip(contributions, trained, strict=True)
            )
            torch.testing.assert_close(after[m] - held[m], mean, rtol=1e-5, atol=1e-6, msg=f"{name} {m}")

    check()


def _divergence(applied: torch.Tensor, target: torch.Tensor) -> float:
    return float((applied - target).norm() / target.norm())


@SETTINGS
@given(_inputs("fedit"))
def test_fedit_is_no_closer_than_flora_na_which_is_no_closer_than_eckart_young(inputs):
    ranks, weights, seed = inputs
    ranks = [max(ranks)] * len(ranks)
    results = {}
    for name in ("fedit", "flora_na"):
        method, state, contributions, trained = client_round(name, ranks, weights, seed)
        new, _ = method.aggregate(state, contributions, 1)
        results[name] = effective(method.export(new))
    for m in SPECS:
        target = sum(
            c.weight * (t[m].B.double() @ t[m].A.double()) for c, t in zip(contributions, trained, strict=True)
        )
        S = torch.linalg.svdvals(target)
        r = ranks[0]
        eckart_young = float(S[r:].norm() / S.norm())
        fedit, flora_na = _divergence(results["fedit"][m], target), _divergence(results["flora_na"][m], target)
        assert fedit >= flora_na - 1e-6, (m, fedit, flora_na)
        assert flora_na >= eckart_young - 1e-6, (m, flora_na, eckart_young)


# ---- the config parser ---------------------------------------------------------------------------------------------

KEYS = [k for k in config.to_flat(config.ExperimentConfig())] + [
    "faults.clients",
    "faults.clients.1",
    "method.solver",
    "model.lora.ranks",
    "federation.clients_per_round",
    "nope",
    "model..r",
    "data.alpha.x",
]
VALUES = st.one_of(
    st.integers(-5, 20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "[]", "[1, 2]", '"x"', '{1 = "nan"}', "{a = 1}", "nan", "inf", "[", '"']),
    st.text(max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_the_config_parser_gives_a_config_or_one_clear_error_naming_the_key(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        config.load_config(None, overrides)
    except config.ConfigError as e:
        message = str(e)
        assert "\n" not in message and "Traceback" not in message
        assert any(k.split(".")[0] in message for k, _ in pairs) or "override" in message, message


# ---- payloads and screening ----------------------------------------------------------------------------------------

NAMES = st.one_of(
    st.sampled_from(
        [
            "lora.q.A",
            "lora.q.B",
            "lora.v.A",
            "lora.v.B",
            "lora.q.A.values",
            "lora.q.A.indices",
            "lora.v.B.values",
            "lora.v.B.indices",
            "extra.classifier.weight",
            "extra.classifier.bias",
            "base.1.q.left",
            "base.1.q.right",
            "base.2.v.dense",
            "base.x.q.left",
            "base.1.left",
            "base..q.dense",
            "lora.",
            "extra.",
            "lora.k.A",
            "lora.q.C",
        ]
    ),
    st.text(max_size=10),
)
TENSORS = st.tuples(
    st.lists(st.integers(0, 11), min_size=0, max_size=3),
    st.sampled_from([torch.float32, torch.float64, torch.int32, torch.int64]),
    st.sampled_from([0.0, 1.0, math.nan, math.inf, -3.0]),
).map(
    lambda spec: (
        torch.full(spec[0], spec[2]).to(spec[1]) if spec[1].is_floating_point else torch.full(spec[0], 2, dtype=spec[1])
    )
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(NAMES, TENSORS, max_size=6))
def test_payload_parsers_and_screening_never_end_in_a_traceback(tensors):
    for parse in (lambda t: unpack_adapter(t, "client 3"), unpack_extras, unpack_base_edits, unpack_sparse):
        try:
            parse(tensors)
        except ValueError as e:
            assert "\n" not in str(e)
    reason = screening.form_problem(tensors, ModelInfo(SPECS, 4, HEAD), 4)
    assert reason is None or isinstance(reason, str)
    norms = screening.screen([Contribution(0, 1.0, Payload(tensors))], ModelInfo(SPECS, 4, HEAD), [4], {}, "norm")
    assert len(norms) == 3
