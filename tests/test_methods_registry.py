"""The registry, hyperparameter validation and bad-input errors of the aggregation path."""

from __future__ import annotations

import pytest
import torch

from conftest import make_clients
from fedlora import methods
from fedlora.methods.base import ClientInfo, ModelInfo
from fedlora.payload import pack_adapter
from fedlora.types import Contribution, LowRank, Payload
from fedlora.validation import normalize_weights


def test_registry_lists_the_foundation_methods():
    assert methods.available()[:6] == ["fedit", "flora_na", "flora", "fedex_lora", "flexlora", "hetlora"]


def test_unknown_method_lists_valid_names_and_suggests():
    with pytest.raises(ValueError, match=r"unknown method 'flora-na'.*fedit, flora_na.*did you mean 'flora_na'"):
        methods.build("flora-na")


def test_unknown_method_key_names_the_key_and_valid_keys():
    with pytest.raises(ValueError, match=r"method.solvr.*valid keys are .*method.solver.*did you mean 'method.solver'"):
        methods.build("flora_na", {"solvr": "als"})


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("flora_na", {"solver": "sgd"}, r"method.solver = 'sgd'.*expected one of 'newton', 'als', 'adam'"),
        ("flora_na", {"max_iter": 0}, r"method.max_iter = 0"),
        ("flexlora", {"split": "left"}, r"method.split = 'left'"),
        ("hetlora", {"reg_gamma": 1.5}, r"method.reg_gamma = 1.5: expected a value in \(0, 1\]"),
    ],
)
def test_out_of_range_hyperparameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        methods.build(name, params)


def test_every_method_declares_capabilities_and_paper():
    for name in methods.available():
        cap = methods.capabilities(name)
        assert cap.heterogeneous_ranks in {"native", "zero-pad", "no"}
        assert cap.uplink and cap.downlink and cap.paper


def _contribs(adapters, weights=None):
    w = weights or [1.0 / max(len(adapters), 1)] * len(adapters)
    return [Contribution(i, wi, Payload(pack_adapter(a))) for i, (wi, a) in enumerate(zip(w, adapters, strict=True))]


def _agg(name, adapters, weights=None):
    method = methods.build(name)
    return method.aggregate(method.init_server(ModelInfo({}, 2), 0), _contribs(adapters, weights), 1)


def test_mismatched_module_sets_name_the_client_and_modules():
    a, b = (c.canonical() for c in make_clients({"q": (4, 3), "v": (4, 3)}, [2, 2], 3.0))
    del b["v"]
    with pytest.raises(ValueError, match=r"client 1: module set differs.*missing \['v'\]"):
        _agg("fedit", [a, b])


def test_mismatched_shapes_name_client_module_and_expected_shape():
    (a,) = (c.canonical() for c in make_clients({"q": (4, 3)}, [2], 3.0))
    (b,) = (c.canonical() for c in make_clients({"q": (3, 4)}, [2], 3.0))
    with pytest.raises(ValueError, match=r"client 1, module q: update shape \(d, k\) = \(3, 4\), expected \(4, 3\)"):
        _agg("flora_na", [a, b])


def test_nan_values_are_refused_with_client_module_factor():
    a, b = (c.canonical() for c in make_clients({"q": (4, 3)}, [2, 2], 3.0))
    bad = b["q"].A.clone()
    bad[0, 0] = float("nan")
    b["q"] = LowRank(b["q"].B, bad)
    with pytest.raises(ValueError, match=r"client 1, module q: lora A has 1 NaN/Inf"):
        _agg("flexlora", [a, b])


def test_ranks_a_method_cannot_take():
    a, b = (c.canonical() for c in make_clients({"q": (4, 3)}, [2, 3], 3.0))
    with pytest.raises(ValueError, match=r"client 1: rank \[3\] differs.*fedex_lora needs equal ranks"):
        _agg("fedex_lora", [a, b])


def test_empty_client_list():
    with pytest.raises(ValueError, match="client list is empty"):
        _agg("fedit", [])


def test_payload_with_only_one_factor_is_refused():
    (a,) = (c.canonical() for c in make_clients({"q": (4, 3)}, [2], 3.0))
    method = methods.build("fedit")
    payload = Payload({"lora.q.A": a["q"].A})
    with pytest.raises(ValueError, match=r"client 0: modules \['q'\] carry only one"):
        method.aggregate(method.init_server(ModelInfo({}, 2), 0), [Contribution(0, 1.0, payload)], 1)


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0, -1.0], r"client 1 has negative weight -1.0"),
        ([0.0, 0.0], r"sum to 0.0"),
        ([1.0], r"got 1 values for 2 clients"),
        ([1.0, float("inf")], r"must be finite"),
    ],
)
def test_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        normalize_weights(weights, 2)


def test_weights_are_normalised_and_uniform_by_default():
    assert normalize_weights([2.0, 6.0], 2).tolist() == [0.25, 0.75]
    assert normalize_weights(None, 4).tolist() == [0.25] * 4


def test_head_is_averaged_with_the_aggregation_weights():
    a, b = (c.canonical() for c in make_clients({"q": (4, 3)}, [2, 2], 3.0))
    method = methods.build("fedit")
    heads = [torch.ones(2, 3), 3 * torch.ones(2, 3)]
    contribs = [
        Contribution(i, w, Payload(pack_adapter(ad) | {"extra.classifier.weight": h}))
        for i, (w, ad, h) in enumerate(zip([0.25, 0.75], [a, b], heads, strict=True))
    ]
    state, report = method.aggregate(method.init_server(ModelInfo({}, 2), 0), contribs, 1)
    assert torch.allclose(state.extras["classifier.weight"], 2.5 * torch.ones(2, 3))
    assert report.bytes_up[0] == 8 * 2 * (4 + 3) + 4 * 6  # float64 factors, float32 head
    plan, _ = method.prepare(None, method.broadcast(state, ClientInfo(0, 2), 2), ClientInfo(0, 2), 2)
    assert torch.equal(plan.extras["classifier.weight"], state.extras["classifier.weight"])


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"shared_coefficients": "yes"}, r"method.shared_coefficients = 'yes' .* expected true or false"),
        ({"max_iter": True}, r"method.max_iter = True .* expected an integer"),
        ({"tol": "small"}, r"method.tol = 'small' .* expected a number"),
        ({"solver": "adam", "shared_coefficients": True}, r"dense baseline"),
    ],
)
def test_hyperparameter_types_are_checked(params, match):
    with pytest.raises(ValueError, match=match):
        methods.build("flora_na", params)


def test_integer_hyperparameters_widen_to_float():
    assert methods.make_params("flora_na", {"tol": 0}).tol == 0.0
