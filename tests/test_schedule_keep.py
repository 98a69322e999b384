"""The learning-rate schedule (``train.lr_schedule``) and the choice of the saved round (``output.keep``) as pure
functions, their config checks, and the validation split they rely on."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fedlora import config, keep, schedule
from fedlora.data import TextDataset, federate
from fedlora.methods.base import GlobalModel
from fedlora.types import LowRank


def train_cfg(**values):
    return config.load_config(None, [f"train.{k}={v}" for k, v in values.items()]).train


def test_constant_is_lr_every_round():
    t = train_cfg(lr=3e-4)
    assert [schedule.lr_at(t, r, 5) for r in range(1, 6)] == [3e-4] * 5


def test_cosine_decays_from_below_lr_to_lr_min_at_the_last_round():
    t = train_cfg(lr=1e-3, lr_schedule="cosine", lr_min=1e-5)
    lrs = [schedule.lr_at(t, r, 4) for r in range(1, 5)]
    assert lrs == pytest.approx([1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * r / 4)) for r in range(1, 5)])
    assert lrs[0] < 1e-3 and lrs[-1] == pytest.approx(1e-5)
    assert all(a > b for a, b in itertools.pairwise(lrs))


def test_linear_warmup_ramps_over_warmup_rounds_then_holds():
    t = train_cfg(lr=1e-3, lr_schedule="linear_warmup", warmup_rounds=3)
    assert [schedule.lr_at(t, r, 6) for r in range(1, 7)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_a_round_outside_the_run_is_refused():
    with pytest.raises(ValueError, match="round 6 is outside 1..5"):
        schedule.lr_at(train_cfg(), 6, 5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lr_schedule": "linear_warmup"}, "train.warmup_rounds"),
        ({"warmup_rounds": 2}, 'train.lr_schedule = "constant" has no warm-up'),
        ({"lr_schedule": "cosine", "warmup_rounds": 2}, "train.warmup_rounds"),
        ({"lr_min": 1e-5}, 'only train.lr_schedule = "cosine"'),
        ({"lr_schedule": "cosine", "lr": 1e-4, "lr_min": 1e-3}, "train.lr_min"),
        ({"lr_schedule": "step"}, "train.lr_schedule"),
    ],
)
def test_schedule_parameters_that_would_be_ignored_are_errors(values, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")):
        train_cfg(**values)


def model_with(value: float) -> GlobalModel:
    return GlobalModel({"m": LowRank(torch.full((3, 2), value), torch.ones(2, 4))}, {"head": torch.zeros(2)}, ())


def test_keep_takes_the_first_round_reaching_the_best_validation_value():
    records, best = [], None
    for rnd, acc in enumerate([0.6, 0.8, 0.7, 0.8], start=1):
        records.append({"round": rnd, "val_accuracy": acc})
        best = keep.update(best, records, model_with(float(rnd)), "accuracy", higher_is_better=True)
    assert best is not None and best.round == 2
    assert torch.equal(best.model.adapter["m"].B, torch.full((3, 2), 2.0))


def test_keep_follows_lower_is_better_and_skips_unevaluated_rounds():
    records, best = [], None
    for rnd, loss in enumerate([2.0, None, 1.5, float("nan")], start=1):
        records.append({"round": rnd, "val_loss": loss})
        best = keep.update(best, records, model_with(float(rnd)), "loss", higher_is_better=False)
    assert best is not None and best.round == 3


def test_the_kept_model_is_a_copy_that_later_training_cannot_change():
    model = model_with(1.0)
    best = keep.update(None, [{"round": 1, "val_accuracy": 0.5}], model, "accuracy", True)
    model.adapter["m"].B.add_(5.0)
    model.extras["head"].add_(5.0)
    assert torch.equal(best.model.adapter["m"].B, torch.full((3, 2), 1.0))
    assert torch.equal(best.model.extras["head"], torch.zeros(2))


def test_keep_best_needs_a_validation_split_by_default_only():
    assert config.validation_fraction(config.load_config(None, ["output.keep=best"])) == config.DEFAULT_VAL_FRACTION
    assert config.validation_fraction(config.load_config(None, [])) == 0.0
    assert config.validation_fraction(config.load_config(None, ["data.val_fraction=0.25"])) == 0.25


def dataset(n: int = 400) -> TextDataset:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n).tolist()
    return TextDataset([f"text {i}" for i in range(n)], labels, ["neg", "pos"])


def test_validation_split_comes_from_training_data_and_leaves_the_test_set_alone():
    ds = dataset()
    without = federate(ds, num_clients=3, partition="iid", seed=4)
    with_val = federate(ds, num_clients=3, partition="iid", seed=4, val_fraction=0.25)
    assert without.validation is None
    assert with_val.test.texts == without.test.texts  # the test set never changes
    val = set(with_val.validation.texts)
    train = {t for tr, te in with_val.clients for t in tr.texts + te.texts}
    assert not val & train and not val & set(with_val.test.texts)
    assert len(val) == round(0.25 * (len(ds.texts) - len(without.test.texts)))
    assert val | train | set(with_val.test.texts) == set(ds.texts)
