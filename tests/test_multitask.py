"""Multi-task federations (``data.tasks``): the task-Dirichlet partition, the config keys, and the multi-task
classification task (one head, a label slice per task, per-task metrics)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedlora import config, multitask
from fedlora.data import DataError, TextDataset
from fedlora.tasks.multi_seq_cls import MultiTaskClassification


def _task(n: int, labels: int, tag: str) -> TextDataset:
    return TextDataset(
        [f"{tag}-{i}" for i in range(n)], [i % labels for i in range(n)], [f"y{k}" for k in range(labels)]
    )


def _examples(*sizes: tuple[int, int]) -> multitask.TaskExamples:
    datasets = [_task(n, k, f"t{t}") for t, (n, k) in enumerate(sizes)]
    return multitask.combine(datasets, [f"task{t}" for t in range(len(sizes))])


def _federate(examples, **kw):
    settings = dict(num_clients=4, task_alpha=0.5, partition="iid", alpha=0.5, min_partition_size=0)
    settings |= dict(test_fraction=0.2, local_test_fraction=0.25, seed=3) | kw
    return multitask.federate_tasks(examples, **settings)


def _independent_counts(total: int, shares: np.ndarray) -> list[int]:
    """Largest-remainder rounding, written out for the test: floors, then +1 for the largest remainders."""
    raw = [s * total for s in shares]
    counts = [int(np.floor(x)) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _held_by(fed, t: int) -> list[int]:
    """Examples of task t each client holds (train + its own test part)."""
    return [train.task_counts()[t] + test.task_counts()[t] for train, test in fed.clients]


def test_the_task_mix_is_the_seeded_dirichlet_with_small_shares_zeroed():
    """With labels spread evenly within a task, client c holds exactly its share p_t[c] of task t's training pool,
    p_t ~ Dir(task_alpha) drawn from the documented stream (seed, 1, attempt 0, t), shares below 1 % zeroed."""
    examples = _examples((1000, 2), (600, 3))
    fed = _federate(examples, task_alpha=0.3)
    for t, n in enumerate((1000, 600)):
        rng = np.random.default_rng(np.random.SeedSequence([3, 1, 0, t]))
        p = rng.dirichlet([0.3] * 4)
        p = np.where(p < 0.01, 0.0, p)
        p = p / p.sum()
        np.testing.assert_allclose(fed.shares[t], p)
        assert _held_by(fed, t) == _independent_counts(n - round(n * 0.2), p)
    assert any(s == 0.0 for shares in fed.shares for s in shares)  # α = 0.3 zeroes some shares at this seed


def test_task_shares_have_the_dirichlet_moments_over_seeds():
    """Over 300 seeds the realised share of each of 3 clients has the Dir(2, 2, 2) mean 1/3 and variance
    (1/3)(2/3)/(6 + 1): a task_alpha that were ignored or misapplied would move the variance."""
    examples = _examples((3000, 2))
    shares = np.array(
        [np.array(_held_by(_federate(examples, num_clients=3, task_alpha=2.0, seed=s), 0)) / 2400 for s in range(300)]
    )
    np.testing.assert_allclose(shares.mean(0), 1 / 3, atol=0.02)
    np.testing.assert_allclose(shares.var(0), (1 / 3) * (2 / 3) / 7, rtol=0.2)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_no_example_is_in_two_places_and_none_is_lost(partition):
    examples = _examples((300, 2), (200, 5))
    fed = _federate(examples, partition=partition)
    parts = [fed.test.texts] + [split.texts for pair in fed.clients for split in pair]
    flat = [text for part in parts for text in part]
    assert len(flat) == len(set(flat)) == len(examples)
    for split in [fed.test] + [s for pair in fed.clients for s in pair]:  # labels stay in their task's rows
        for label, task in zip(split.labels, split.tasks, strict=True):
            start, stop = examples.spans[task]
            assert start <= label < stop
    assert fed.test.task_counts() == (60, 40)  # each task's own test fraction


def test_a_validation_split_per_task_leaves_the_test_set_and_loses_nothing():
    """val_fraction carves each task's validation part from what its test split leaves (its own stream): the test
    set is the one without validation, no example is in two places, and without it no validation exists."""
    examples = _examples((300, 2), (200, 5))
    plain, fed = _federate(examples), _federate(examples, val_fraction=0.25)
    assert plain.validation is None and fed.test.texts == plain.test.texts
    assert fed.validation.task_counts() == (60, 40)  # a quarter of the 240 and 160 left by the test split
    parts = [fed.test.texts, fed.validation.texts] + [split.texts for pair in fed.clients for split in pair]
    flat = [text for part in parts for text in part]
    assert len(flat) == len(set(flat)) == len(examples)
    assert all(
        fed.validation.spans[t][0] <= y < fed.validation.spans[t][1]
        for y, t in zip(fed.validation.labels, fed.validation.tasks, strict=True)
    )


def test_the_label_dirichlet_within_a_task_skews_labels_and_large_alpha_gives_the_task_shares():
    examples = _examples((2000, 4))
    pool = 2000 - 400

    def label_share_max(fed) -> float:
        rows = [np.bincount(np.asarray(tr.labels + te.labels), minlength=4) for tr, te in fed.clients]
        return float(np.mean([r.max() / r.sum() for r in rows if r.sum()]))

    skewed = _federate(examples, partition="dirichlet", alpha=0.05)
    flat = _federate(examples, partition="dirichlet", alpha=1e6)
    assert label_share_max(skewed) > 0.7 > 0.35 > label_share_max(flat)
    expected = np.array(flat.shares[0]) * pool  # per label split ∝ p·q with q ≈ uniform: about the task shares
    assert np.abs(np.array(_held_by(flat, 0)) - expected).max() <= 4 + 0.02 * pool


def test_a_client_left_too_small_is_named_after_every_redraw():
    with pytest.raises(DataError, match=r"after 20 draws client \d+ still holds \d+ training examples.*task_alpha"):
        _federate(_examples((60, 2)), num_clients=6, task_alpha=0.05, min_partition_size=8)


def test_task_names_and_collisions():
    assert multitask.task_names(["fedlora:rotten-tomatoes", "data/My Set.csv.gz", "user/sst2"]) == (
        "rotten_tomatoes",
        "my_set",
        "sst2",
    )
    with pytest.raises(DataError, match=r"'a/x.csv' and 'b/x.json' would both be reported as task 'x'"):
        multitask.task_names(["a/x.csv", "b/x.json"])


def test_config_keys_and_their_errors():
    cfg = config.load_config(None, ['data.tasks=["fedlora:rotten-tomatoes", "fedlora:bbc-news"]', "data.task_alpha=2"])
    assert cfg.data.tasks == ("fedlora:rotten-tomatoes", "fedlora:bbc-news") and cfg.data.task_alpha == 2.0
    assert config.from_flat(config.to_flat(cfg)) == cfg
    assert config.load_config(None).data.tasks is None
    for override, match in [
        ("data.tasks=[]", r"data.tasks = \[\]: expected a list of at least one distinct"),
        ('data.tasks=["a", "a"]', r"expected a list of at least one distinct"),
        ("data.task_alpha=0", r"data.task_alpha = 0.0: expected a positive float"),
    ]:
        with pytest.raises(config.ConfigError, match=match):
            config.load_config(None, [override])
    with pytest.raises(config.ConfigError, match=r'data.partition = "pathological": expected "iid" or "dirichlet"'):
        config.load_config(None, ['data.tasks=["a"]', "data.partition=pathological"])


# ---- the task: one head, a label slice per task --------------------------------------------------------------


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: row i of ``logits`` for the i-th example it sees (by its first token)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = logits

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def _batch(tasks, labels, spans):
    n = len(tasks)
    starts = torch.tensor([spans[t][0] for t in tasks])
    stops = torch.tensor([spans[t][1] for t in tasks])
    return {
        "input_ids": torch.arange(n).unsqueeze(1),
        "attention_mask": torch.ones(n, 1, dtype=torch.long),
        "labels": torch.tensor(labels),
        "task": torch.tensor(tasks),
        "label_start": starts,
        "label_stop": stops,
    }


def test_loss_and_predictions_see_only_the_examples_own_task_rows():
    """Two tasks, rows [0, 2) and [2, 5). Example 0 (task 0) has its largest logit on a task-1 row: it must not
    count, the cross-entropy is over its own two rows. Expected values by hand."""
    spans = ((0, 2), (2, 5))
    logits = torch.tensor([[1.0, 0.0, 9.0, 9.0, 9.0], [5.0, 5.0, 0.0, 2.0, 1.0], [0.0, 3.0, 1.0, 1.0, 1.0]])
    batch = _batch([0, 1, 1], [0, 3, 4], spans)
    task = MultiTaskClassification(("a", "b"))
    ce0 = -1.0 + np.log(np.exp(1.0) + np.exp(0.0))
    ce1 = -2.0 + np.log(np.exp(0.0) + np.exp(2.0) + np.exp(1.0))
    ce2 = -1.0 + np.log(3 * np.exp(1.0))
    assert float(task.loss(FixedLogits(logits), batch)) == pytest.approx((ce0 + ce1 + ce2) / 3, rel=1e-6)
    sums = task.evaluate(FixedLogits(logits), batch, None, config.load_config(None, ["model.precision=fp32"]))
    assert sums == pytest.approx(
        {"correct.0": 1, "loss.0": ce0, "n.0": 1, "correct.1": 1, "loss.1": ce1 + ce2, "n.1": 2}
    )
    metrics = task.finish(sums)
    assert metrics == pytest.approx(
        {
            "accuracy": 2 / 3,
            "loss": (ce0 + ce1 + ce2) / 3,
            "accuracy_a": 1.0,
            "accuracy_b": 0.5,
            "loss_a": ce0,
            "loss_b": (ce1 + ce2) / 2,
        }
    )
    assert task.metrics(None, None)[:2] == ("accuracy", "loss") and "accuracy_b" in task.metrics(None, None)
    assert task.finish({"correct.1": 1.0, "loss.1": 0.5, "n.1": 2.0}).keys() == {
        "accuracy",
        "loss",
        "accuracy_b",
        "loss_b",
    }


def test_the_baseline_is_each_tasks_majority_label():
    examples = multitask.combine([TextDataset(list("abcd"), [1, 1, 1, 0], ["n", "p"]), _task(6, 3, "x")], ["s", "t"])
    # task s: 3 of 4 are label 1; task t: labels 0,1,2,0,1,2 → 2 of 6
    assert MultiTaskClassification(("s", "t")).baseline(examples) == pytest.approx((3 + 2) / 10)


def test_round_line_names_each_tasks_global_accuracy():
    from fedlora.cli import classification_progress

    record = {"global_accuracy": 0.55, "majority_share": 0.5245, "local_accuracy": 0.6, "local_majority_share": 0.5}
    one_task = "global acc 0.5500 (majority class 0.5245), local acc 0.6000 (majority 0.5000)"
    assert classification_progress(record) == one_task
    record |= {"global_loss_rt": 0.6, "global_accuracy_rt": 0.7, "global_loss_bbc": 1.2, "global_accuracy_bbc": 0.25}
    record |= {"global_accuracy_on_local": 0.9}  # not a task
    assert classification_progress(record) == (
        "global acc 0.5500 (majority class 0.5245; by task rt 0.7000, bbc 0.2500), local acc 0.6000 (majority 0.5000)"
    )
