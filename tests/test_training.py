"""The shared training loop and evaluation under ``model.precision``: bf16 autocast on the forward pass only."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_peft
from fedlora import config, peft_io, tasks, training
from fedlora.types import LowRank, TrainPlan

SEQ_CLS = tasks.get("seq_cls")


def _data(n: int = 24, length: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, length - 3 :] = 0  # some padding, trimmed per batch
    return {
        "input_ids": torch.randint(1, 50, (n, length), generator=gen),
        "attention_mask": mask,
        "labels": torch.randint(0, 2, (n,), generator=gen),
    }


def _linear_output_dtypes(model: torch.nn.Module, run) -> set[torch.dtype]:
    """The dtypes the encoder's dense layers computed in while ``run()`` ran."""
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for name, m in model.named_modules()
        if name.endswith("intermediate.dense")
    ]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    assert seen, "no dense layer ran"
    return seen


@pytest.mark.parametrize("variant", ["lora", "dora", "hira"])
@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_training_computes_in_the_precision_and_keeps_float32_parameters(precision, dtype, variant):
    model = tiny_peft(variant=variant)
    before = {m: (A.detach().clone(), B.detach().clone()) for m, (A, B) in peft_io.lora_parameters(model).items()}
    settings = training.TrainSettings(lr=1e-2, batch_size=8, local_steps=3, precision=precision)
    plan = TrainPlan(rank=4, adapter=None)
    seen = _linear_output_dtypes(model, lambda: training.train_client(model, SEQ_CLS.loss, plan, _data(), settings, 0))
    assert seen == {dtype}
    for m, (A, B) in peft_io.lora_parameters(model).items():
        assert A.dtype == B.dtype == torch.float32
        assert not torch.equal(B.detach(), before[m][1])  # B starts at 0 and trained
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_evaluation_runs_in_bfloat16_and_is_close_to_float32():
    model = tiny_peft()
    data = _data(n=60)
    fp32, bf16 = (config.load_config(None, [f"model.precision={p}"]) for p in ("fp32", "bf16"))
    seen = _linear_output_dtypes(model, lambda: SEQ_CLS.evaluate(model, data, None, bf16))
    assert seen == {torch.bfloat16}
    correct32, loss32, n32 = SEQ_CLS.evaluate(model, data, None, fp32).values()
    correct16, loss16, n16 = SEQ_CLS.evaluate(model, data, None, bf16).values()
    assert n32 == n16 == 60
    assert abs(correct32 - correct16) <= 3  # only near-ties may flip
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert loss16 != loss32  # really computed differently


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model.precision = 'fp16': expected 'fp32' or 'bf16'"):
        training.autocast("fp16")


def test_training_does_not_depend_on_the_rank_the_model_had_before():
    """Heterogeneous ranks: a process that trained a rank-2 client before gives a rank-4 client exactly the
    result of a fresh process (PEFT's re-init at a new rank must not shift the dropout stream)."""
    settings = training.TrainSettings(lr=1e-2, batch_size=8, local_steps=3)
    head = peft_io.read_adapter(tiny_peft())[1]  # the plan carries the head, as the runner's plans do
    results = []
    for previous_rank in (None, 2):
        model = tiny_peft(dropout=0.3)
        if previous_rank is not None:
            plan = TrainPlan(rank=previous_rank, adapter=None)
            training.train_client(model, SEQ_CLS.loss, plan, _data(), settings, seed=7)
        plan = TrainPlan(rank=4, adapter=None, extras=head)
        results.append(training.train_client(model, SEQ_CLS.loss, plan, _data(), settings, seed=1))
    fresh, after_rank_change = results
    assert fresh.loss == after_rank_change.loss
    for m, lr in fresh.adapter.items():
        assert torch.equal(lr.A, after_rank_change.adapter[m].A) and torch.equal(lr.B, after_rank_change.adapter[m].B)


def _tri_factor_plan(model, trainable):
    """Canonical (B̃, A) and an r×r core C per module, seeded; B̃ nonzero so that ∂/∂C is not zero."""
    gen = torch.Generator().manual_seed(11)
    specs = peft_io.module_specs(model)
    adapter = {
        m: LowRank(torch.randn(s.d, 4, generator=gen), torch.randn(4, s.k, generator=gen)) for m, s in specs.items()
    }
    cores = {m: torch.eye(4) + 0.1 * torch.randn(4, 4, generator=gen) for m in specs}
    return TrainPlan(rank=4, adapter=adapter, cores=cores, trainable=frozenset(trainable)), adapter, cores


def test_a_tri_factor_core_applies_b_c_a_and_trains_alone():
    """ΔW = B̃·C·A in the forward pass (α = 6 ≠ r = 4, non-square: the layers are 32×32 but the check is on the
    dense definition); with trainable = {C} only the cores move; the trained core comes back as the extra
    <module>.lora_core and folded into B̃, and the model keeps applying B̃·C·A after reading."""
    model = tiny_peft()
    plan, adapter, cores = _tri_factor_plan(model, {"C"})
    live = peft_io.load_plan(model, plan, seed=0)
    layer = dict(model.base_model.model.named_modules())[sorted(adapter)[0]]
    m = sorted(adapter)[0]
    x = torch.randn(3, adapter[m].shape[1], generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    dense = adapter[m].B.double() @ cores[m].double() @ adapter[m].A.double()
    torch.testing.assert_close(delta.double(), x.double() @ dense.T, rtol=1e-5, atol=1e-5)
    training_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".core") or "modules_to_save" in n for n in training_names)  # C and the head only
    assert len(live.parameters) == len(training_names) and set(live.cores.values()) <= set(live.parameters)
    settings = training.TrainSettings(lr=1e-2, batch_size=8, local_steps=3)
    result = training.train_client(model, SEQ_CLS.loss, plan, _data(), settings, 0)
    for name, lr in result.adapter.items():
        trained_core = result.extras[f"{name}{peft_io.CORE_SUFFIX}"]
        assert not torch.equal(trained_core, cores[name])
        torch.testing.assert_close(lr.A, adapter[name].A)  # A frozen
        torch.testing.assert_close(lr.B, adapter[name].B @ trained_core, rtol=1e-5, atol=1e-6)  # folded
    with torch.no_grad():
        after = layer(x) - layer.base_layer(x)
    folded = result.adapter[m]
    torch.testing.assert_close(
        after.double(), x.double() @ (folded.B.double() @ folded.A.double()).T, atol=1e-5, rtol=1e-5
    )


def test_a_plan_without_cores_leaves_no_core_behind():
    model = tiny_peft()
    plan, adapter, _ = _tri_factor_plan(model, {"C", "B"})
    training.train_client(model, SEQ_CLS.loss, plan, _data(), training.TrainSettings(local_steps=1), 0)
    plain = TrainPlan(rank=4, adapter=adapter)
    live = peft_io.load_plan(model, plain, seed=0)
    assert not live.cores and "lora_core" not in " ".join(n for n, _ in model.named_parameters())
    back, extras = peft_io.read_adapter(model)
    assert not any("lora_core" in e for e in extras)
    for m in adapter:  # the plan's own B̃, not B̃·C from the run before
        torch.testing.assert_close(back[m].B, adapter[m].B)


def test_core_misuse_is_refused_clearly():
    model = tiny_peft()
    with pytest.raises(ValueError, match="trainable has 'C' but the plan has no cores"):
        peft_io.load_plan(model, TrainPlan(rank=4, adapter=None, trainable=frozenset({"C"})), seed=0)
    plan, _, cores = _tri_factor_plan(model, {"C"})
    bad = {m: c[:3, :3] for m, c in cores.items()}
    with pytest.raises(ValueError, match=r"cores\[.*shape \(3, 3\), expected \(r, r\) = \(4, 4\)"):
        peft_io.load_plan(model, TrainPlan(rank=4, adapter=plan.adapter, cores=bad), seed=0)
