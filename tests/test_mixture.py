"""Mixtures of LoRA experts (``fedlora.mixture``, bound to PEFT in ``fedlora.peft_io``): the router's top-M
selection, task routing, and the forward pass against the dense definition."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_peft
from fedlora import mixture, peft_io, training
from fedlora.types import LowRank, TrainPlan


def test_router_weights_keep_the_top_slots_renormalised_and_sum_them_per_expert():
    """S = 3 slots over the live adapter and E = 1 expert (top 2): slots → [live, expert 0, live]. Logits
    (x · R rows) = (2, 0, 1): softmax ∝ (e², 1, e); the top two are slots 0 and 2, both live: weight 1 on the live
    adapter, 0 on the expert. With logits (0, 2, 1) the top two are slots 1 (expert) and 2 (live)."""
    slots = torch.tensor([-1, 0, -1])
    router = torch.eye(3)
    w = mixture.router_weights(torch.tensor([[2.0, 0.0, 1.0]]), router, slots, num_experts=1)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0]]))
    w = mixture.router_weights(torch.tensor([[0.0, 2.0, 1.0]]), router, slots, num_experts=1)
    e2, e1 = math.exp(2.0), math.exp(1.0)
    torch.testing.assert_close(w, torch.tensor([[e1 / (e1 + e2), e2 / (e1 + e2)]]))
    # M = 3 (E = 2), slots [0, live, 1, live, live] (FedLEASE's own expert 1): top 3 of 5 by hand
    slots = torch.tensor([0, -1, 1, -1, -1])
    logits = torch.tensor([[3.0, 0.0, 2.0, 1.0, -1.0]])
    w = mixture.router_weights(logits, torch.eye(5), slots, num_experts=2)
    top = torch.tensor([math.exp(3.0), math.exp(2.0), math.exp(1.0)])
    top = top / top.sum()
    torch.testing.assert_close(w, torch.tensor([[top[2], top[0], top[1]]]), rtol=1e-6, atol=1e-7)


def test_task_weights_pick_each_examples_task_expert():
    w = mixture.task_weights(torch.tensor([1, 0, 1]), torch.tensor([-1, 0]), num_experts=1, ndim=3)
    assert w.shape == (3, 1, 2)
    torch.testing.assert_close(w[:, 0], torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))


def _experts(model, E: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    specs = peft_io.module_specs(model)
    live = {
        m: LowRank(torch.randn(s.d, 4, generator=gen), torch.randn(4, s.k, generator=gen) / 6) for m, s in specs.items()
    }
    others = {
        m: (torch.randn(E, 4, s.k, generator=gen) / 6, torch.randn(E, s.d, 4, generator=gen)) for m, s in specs.items()
    }
    return live, others


def _layer(model, module):
    return dict(model.base_model.model.named_modules())[module]


def test_a_router_mixture_applies_the_weighted_experts_exactly():
    """α = 6 ≠ r = 4 (the live adapter's PEFT B is B̃/s; the experts are canonical): the layer adds
    w_live(x)·B̃A x + Σ_e w_e(x)·B̃_e A_e x per token, with the weights of ``router_weights``: dense reference."""
    model = tiny_peft()
    live, others = _experts(model, E=2)
    gen = torch.Generator().manual_seed(4)
    extras = {}
    for m, (A, B) in others.items():
        router = torch.randn(5, A.shape[2], generator=gen)
        extras |= mixture.pack(m, mixture.LayerMixture(A, B, router, torch.tensor([0, -1, 1, -1, -1])))
    peft_io.write_adapter(model, live, extras, rank=4, seed=0)
    model.eval()
    m = sorted(live)[0]
    layer, (A, B) = _layer(model, m), others[m]
    x = torch.randn(2, 3, A.shape[2], generator=gen)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    w = mixture.router_weights(x, extras[f"{m}{mixture.ROUTER}"], torch.tensor([0, -1, 1, -1, -1]), 2).double()
    dense = [live[m].B.double() @ live[m].A.double()] + [B[e].double() @ A[e].double() for e in range(2)]
    expected = sum(w[..., i : i + 1] * (x.double() @ d.T) for i, d in enumerate(dense))
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-5)


def test_task_routing_needs_the_task_ids_and_applies_each_tasks_expert():
    model = tiny_peft()
    live, others = _experts(model, E=1)
    extras = {}
    for m, (A, B) in others.items():
        extras |= mixture.pack(m, mixture.LayerMixture(A, B, task_expert=torch.tensor([0, -1])))
    peft_io.write_adapter(model, live, extras, rank=4, seed=0)
    model.eval()
    m = sorted(live)[0]
    layer, (A, B) = _layer(model, m), others[m]
    x = torch.randn(2, 3, A.shape[2], generator=torch.Generator().manual_seed(5))
    with pytest.raises(RuntimeError, match="routes by task .* no task ids"), torch.no_grad():
        layer(x)
    with torch.no_grad(), peft_io.task_routing(model, torch.tensor([1, 0])):
        delta = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(
        delta[0].double(), x[0].double() @ (live[m].B.double() @ live[m].A.double()).T, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        delta[1].double(), x[1].double() @ (B[0].double() @ A[0].double()).T, rtol=1e-5, atol=1e-5
    )


def test_the_router_trains_comes_back_and_a_plain_plan_removes_the_mixture(tmp_path):
    model = tiny_peft()
    live, others = _experts(model, E=1)
    extras = {}
    for m, (A, B) in others.items():
        extras |= mixture.pack(m, mixture.LayerMixture(A, B, torch.zeros(3, A.shape[2]), torch.tensor([0, -1, -1])))
    data = {
        "input_ids": torch.randint(1, 50, (16, 6), generator=torch.Generator().manual_seed(1)),
        "attention_mask": torch.ones(16, 6, dtype=torch.long),
        "labels": torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2)),
    }
    plan = TrainPlan(rank=4, adapter=live, extras=extras, trainable=frozenset({"A", "B", "R"}))
    settings = training.TrainSettings(lr=5e-2, batch_size=8, local_steps=3)
    result = training.train_client(model, lambda mdl, b: mdl(**b).loss, plan, data, settings, seed=0)
    routers = {m: result.extras[f"{m}{mixture.ROUTER}"] for m in live}
    assert all(float(r.abs().max()) > 0 for r in routers.values())  # moved from zero
    assert not any(n.endswith(mixture.EXPERTS_A) for n in result.extras)  # frozen experts are not returned
    peft_io.save_model_adapter(model, tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / peft_io.MIXTURE_FILE)
    assert set(saved) == set(extras) and torch.equal(saved[next(iter(extras))], extras[next(iter(extras))])
    peft_io.write_adapter(model, live, {}, rank=4, seed=0)  # a plan without a mixture: plain LoRA again
    m = sorted(live)[0]
    layer = _layer(model, m)
    x = torch.randn(2, 3, live[m].shape[1])
    model.eval()
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(
        delta.double(), x.double() @ (live[m].B.double() @ live[m].A.double()).T, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda e, m: e.pop(f"{m}{mixture.SLOTS}"), r"a router needs both"),
        (
            lambda e, m: e.__setitem__(f"{m}{mixture.SLOTS}", torch.tensor([0, 0, 0])),
            r"no slot points at expert\(s\) \[-1\]",
        ),
        (
            lambda e, m: e.__setitem__(f"{m}{mixture.SLOTS}", torch.tensor([0, 1, -1])),
            r"entries \[-1, 0, 1\], expected experts in \[−1, 1\)",
        ),
        (
            lambda e, m: e.__setitem__(f"{m}{mixture.EXPERTS_A}", torch.zeros(1, 3, 32)),
            r"experts A \(1, 3, 32\).*expected",
        ),
    ],
)
def test_malformed_mixtures_are_refused_naming_the_module(mutate, match):
    model = tiny_peft()
    live, others = _experts(model, E=1)
    extras = {}
    for m, (A, B) in others.items():
        extras |= mixture.pack(m, mixture.LayerMixture(A, B, torch.zeros(3, A.shape[2]), torch.tensor([0, -1, -1])))
    mutate(extras, sorted(live)[0])
    with pytest.raises(ValueError, match=match):
        peft_io.write_adapter(model, live, extras, rank=4, seed=0)
    only_one = {n: t for n, t in extras.items() if n.startswith(sorted(live)[0])}
    with pytest.raises(ValueError, match="a mixture covers every adapted module"):
        peft_io.write_adapter(model, live, only_one, rank=4, seed=0)
