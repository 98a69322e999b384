"""The shared training loop and evaluation under ``model.precision``: bf16 autocast on the forward pass only."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_peft
from fedlora import peft_io, training
from fedlora.types import TrainPlan


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
    seen = _linear_output_dtypes(model, lambda: training.train_client(model, plan, _data(), settings, 0))
    assert seen == {dtype}
    for m, (A, B) in peft_io.lora_parameters(model).items():
        assert A.dtype == B.dtype == torch.float32
        assert not torch.equal(B.detach(), before[m][1])  # B starts at 0 and trained
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_evaluation_runs_in_bfloat16_and_is_close_to_float32():
    model = tiny_peft()
    data = _data(n=60)
    seen = _linear_output_dtypes(model, lambda: training.evaluate(model, data, "bf16", batch_size=16))
    assert seen == {torch.bfloat16}
    correct32, loss32, n32 = training.evaluate_sums(model, data, "fp32", batch_size=16)
    correct16, loss16, n16 = training.evaluate_sums(model, data, "bf16", batch_size=16)
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
            training.train_client(model, TrainPlan(rank=previous_rank, adapter=None), _data(), settings, seed=7)
        plan = TrainPlan(rank=4, adapter=None, extras=head)
        results.append(training.train_client(model, plan, _data(), settings, seed=1))
    fresh, after_rank_change = results
    assert fresh.loss == after_rank_change.loss
    for m, lr in fresh.adapter.items():
        assert torch.equal(lr.A, after_rank_change.adapter[m].A) and torch.equal(lr.B, after_rank_change.adapter[m].B)
