"""Multi-task federations (``data.tasks``): several classification datasets in one shared label space, spread over
the clients by a Dirichlet over the clients per task and, within a task, by the label partition.

Label space. Task t's labels are the rows [start_t, stop_t) of one classification head, in ``data.tasks`` order
(task 0 first). Every example carries its task id; the task's loss and its prediction see only its own rows
(``fedlora.tasks.multi_seq_cls``), so the one head is in effect one head per task.

Partition, every draw seeded by ``seed`` (FL-TAC's setup, arXiv 2404.15384, with a label Dirichlet added within
each task):

1. per task, a held-out global test split of ``data.test_fraction`` of its examples; with a validation fraction
   (``data.val_fraction``, or ``output.keep = "best"``) then a validation split of that share of the rest, from its
   own random stream (without one no number is drawn for it, so the partition is the same as without validation);
2. per task t, client shares p_t ~ Dir(task_alpha · 1_C); shares below ``MIN_SHARE`` (1 %) are set to 0 and the
   rest renormalised, as in FL-TAC's official code, so a client may hold no example of a task;
3. within task t, its training examples are split over the clients: with ``partition = "iid"`` in proportions p_t;
   with ``"dirichlet"``, per label k a draw q_{t,k} ~ Dir(alpha · 1_C) and label k's examples split in proportions
   ∝ p_t[c]·q_{t,k}[c] (Hsu et al.'s label Dirichlet, tilted by the task shares). Counts are exact
   (largest remainders), so with ``iid`` client c holds exactly its share of task t;
4. each client's part of each task is split into its own train and test parts (``data.local_test_fraction``).

A draw that leaves some client fewer than max(1, ``data.min_partition_size``) training examples is redrawn (the
attempt number enters the seed), up to ``ATTEMPTS`` times; then an error names the client.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedlora import data as datamod

MIN_SHARE = 0.01
"""Client shares of a task below this are zeroed (FL-TAC's ``min_frac``)."""

ATTEMPTS = 20
"""Partition draws tried before a too-small client is an error."""

TEST_SPLIT, SHARES, LOCAL_SPLIT, VALIDATION_SPLIT = 0, 1, 2, 3
"""Independent random streams: a task's global test split, the partition draws, a client's local split, a task's
validation split."""


@dataclass(frozen=True)
class TaskExamples:
    """Texts of several tasks in one label space: ``labels`` index ``label_names`` (every task's labels, task by
    task), ``tasks`` the task of each example, ``spans[t]`` = (start, stop) the label rows of task t."""

    texts: list[str]
    labels: list[int]
    tasks: list[int]
    label_names: list[str]
    spans: tuple[tuple[int, int], ...]
    task_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TaskExamples:
        """The examples at ``indices``, in that order."""
        pick = [int(i) for i in indices]
        return TaskExamples(
            [self.texts[i] for i in pick],
            [self.labels[i] for i in pick],
            [self.tasks[i] for i in pick],
            self.label_names,
            self.spans,
            self.task_names,
        )

    def label_counts(self) -> list[int]:
        """Examples per label of the shared label space."""
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.label_names)).tolist()

    def task_counts(self) -> tuple[int, ...]:
        """Examples per task."""
        return tuple(np.bincount(np.asarray(self.tasks, dtype=np.int64), minlength=len(self.spans)).tolist())

    def majority_share(self) -> float:
        """The accuracy of predicting each task's most frequent label (prediction sees only the task's own labels):
        Σ_t max_k n_{t,k} / n; NaN without examples."""
        if not self.texts:
            return float("nan")
        counts = self.label_counts()
        return sum(max(counts[a:b]) for a, b in self.spans) / len(self.texts)


def task_name(dataset: str) -> str:
    """A task's name in metric keys, from its dataset: ``fedlora:rotten-tomatoes`` -> ``rotten_tomatoes``, a file
    ``data/my-set.csv.gz`` -> ``my_set``, a Hugging Face name ``user/set`` -> ``set``."""
    stem = dataset.removeprefix("fedlora:").rstrip("/").rsplit("/", 1)[-1]
    stem = re.sub(r"(\.(csv|json|jsonl|parquet))?(\.(bz2|gz|xz|zip|zst))?$", "", stem, flags=re.IGNORECASE)
    return re.sub(r"[^0-9a-zA-Z]+", "_", stem).strip("_").lower() or "task"


def task_names(datasets: Sequence[str]) -> tuple[str, ...]:
    """Every task's name; two datasets that would share a name are an error naming both."""
    names = tuple(task_name(d) for d in datasets)
    for i, name in enumerate(names):
        if name in names[:i]:
            other = datasets[names.index(name)]
            raise datamod.DataError(
                f"data.tasks: {other!r} and {datasets[i]!r} would both be reported as task {name!r}; rename one file"
            )
    return names


def combine(datasets: Sequence[datamod.TextDataset], names: Sequence[str]) -> TaskExamples:
    """One ``TaskExamples`` of every dataset, task t's labels shifted past those of tasks 0..t-1."""
    texts, labels, tasks, label_names, spans = [], [], [], [], []
    for t, (ds, name) in enumerate(zip(datasets, names, strict=True)):
        start = len(label_names)
        texts += ds.texts
        labels += [start + y for y in ds.labels]
        tasks += [t] * len(ds)
        label_names += [f"{name}/{label}" for label in ds.label_names]
        spans.append((start, len(label_names)))
    return TaskExamples(texts, labels, tasks, label_names, tuple(spans), tuple(names))


# --------------------------------------------------------------------------------------------- the partition


def exact_counts(total: int, shares: np.ndarray) -> np.ndarray:
    """``total`` split in proportions ``shares`` (summing to 1) as integers summing exactly to ``total``: the floors,
    then one more for the largest remainders (earlier entries first on ties)."""
    raw = shares * total
    counts = np.floor(raw).astype(np.int64)
    rest = total - int(counts.sum())
    order = sorted(range(len(shares)), key=lambda i: (-(raw[i] - counts[i]), i))
    counts[order[:rest]] += 1
    return counts


def task_shares(rng: np.random.Generator, num_clients: int, alpha: float) -> np.ndarray:
    """p ~ Dir(alpha · 1_C) with shares below ``MIN_SHARE`` set to 0 and the rest renormalised (uniform if all are)."""
    p = rng.dirichlet([alpha] * num_clients)
    p = np.where(p < MIN_SHARE, 0.0, p)
    return p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)


def partition_task(
    labels: np.ndarray, num_clients: int, task_alpha: float, partition: str, alpha: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray]:
    """One task's training examples over the clients: (per client the indices into ``labels``, the task shares p).
    See the module docstring; the draws are, in order: p, then for ``iid`` one permutation, for ``dirichlet`` per
    label (ascending) q then a permutation of that label's examples."""
    p = task_shares(rng, num_clients, task_alpha)
    if partition == "iid":
        order = rng.permutation(len(labels))
        return np.split(order, np.cumsum(exact_counts(len(labels), p))[:-1]), p
    if partition != "dirichlet":
        raise datamod.DataError(f"data.partition={partition!r}: a multi-task federation takes 'iid' or 'dirichlet'")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in np.unique(labels):
        q = rng.dirichlet([alpha] * num_clients)
        w = p * q
        w = w / w.sum() if w.sum() > 0 else p
        members = rng.permutation(np.flatnonzero(labels == k))
        for c, chunk in enumerate(np.split(members, np.cumsum(exact_counts(len(members), w))[:-1])):
            parts[c].append(chunk)
    return [np.concatenate(chunks) if chunks else np.zeros(0, np.int64) for chunks in parts], p


@dataclass(frozen=True)
class TaskFederation:
    """A multi-task federation: the global test set (every task's held-out split), per client its (train, test)
    parts, per task the client shares p_t drawn (``shares[t][c]``), and the validation split (every task's; None
    without a validation fraction)."""

    test: TaskExamples
    clients: list[tuple[TaskExamples, TaskExamples]]
    shares: list[list[float]]
    validation: TaskExamples | None = None


def federate_tasks(
    examples: TaskExamples,
    *,
    num_clients: int,
    task_alpha: float,
    partition: str,
    alpha: float,
    min_partition_size: int,
    test_fraction: float,
    local_test_fraction: float,
    seed: int,
    val_fraction: float = 0.0,
) -> TaskFederation:
    """Split every task's global test part (and validation part), partition the rest over the clients, split each
    client's part of each task into its own train and test parts (module docstring)."""
    tasks = np.asarray(examples.tasks)
    labels = np.asarray(examples.labels)
    held, validation, pools = [], [], []
    for t in range(len(examples.spans)):
        members = np.flatnonzero(tasks == t)
        order = np.random.default_rng(np.random.SeedSequence([seed, TEST_SPLIT, t])).permutation(members)
        num_test = round(len(members) * test_fraction)
        held.append(order[:num_test])
        rest = np.sort(order[num_test:])
        if val_fraction:
            rest = np.random.default_rng(np.random.SeedSequence([seed, VALIDATION_SPLIT, t])).permutation(rest)
            num_val = round(len(rest) * val_fraction)
            validation.append(rest[:num_val])
            rest = np.sort(rest[num_val:])
        pools.append(rest)
    need = max(1, min_partition_size)
    for attempt in range(ATTEMPTS):
        parts, shares = _draw(pools, labels, num_clients, task_alpha, partition, alpha, seed, attempt)
        clients = [_local_split(examples, parts, c, local_test_fraction, seed) for c in range(num_clients)]
        small = [c for c, (train, _) in enumerate(clients) if len(train) < need]
        if not small:
            val = examples.subset(np.concatenate(validation)) if val_fraction else None
            return TaskFederation(examples.subset(np.concatenate(held)), clients, shares, val)
    raise datamod.DataError(
        f"data.tasks: after {ATTEMPTS} draws client {small[0]} still holds {len(clients[small[0]][0])} training "
        f"examples, fewer than max(1, data.min_partition_size) = {need} (data.task_alpha = {task_alpha}); use "
        "fewer clients, a larger data.task_alpha, a smaller data.min_partition_size or more data"
    )


def _draw(
    pools: list[np.ndarray],
    labels: np.ndarray,
    num_clients: int,
    task_alpha: float,
    partition: str,
    alpha: float,
    seed: int,
    attempt: int,
) -> tuple[list[list[np.ndarray]], list[list[float]]]:
    """parts[t][c]: indices (into the combined examples) of task t held by client c; shares[t]: p_t."""
    parts, shares = [], []
    for t, pool in enumerate(pools):
        rng = np.random.default_rng(np.random.SeedSequence([seed, SHARES, attempt, t]))
        local, p = partition_task(labels[pool], num_clients, task_alpha, partition, alpha, rng)
        parts.append([np.sort(pool[i]) for i in local])
        shares.append(p.tolist())
    return parts, shares


def _local_split(
    examples: TaskExamples, parts: list[list[np.ndarray]], c: int, fraction: float, seed: int
) -> tuple[TaskExamples, TaskExamples]:
    """Client c's (train, test): each task's part split with ``round(n · fraction)`` test examples."""
    train, test = [], []
    for t, per_client in enumerate(parts):
        order = np.random.default_rng(np.random.SeedSequence([seed, LOCAL_SPLIT, c, t])).permutation(per_client[c])
        num_test = round(len(order) * fraction)
        test.append(order[:num_test])
        train.append(order[num_test:])
    return examples.subset(np.concatenate(train)), examples.subset(np.concatenate(test))
