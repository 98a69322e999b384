"""What a run saves in ``adapter/``: the kept round's weights (``output.keep``), the learning rate each round
trained with (``train.lr_schedule``), and a directory that describes itself (portable base model name, labels,
task, a model card), on the real packaged MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_records, tiny_config
from fedlora import adapter_card, client, engines, evaluation
from fedlora.data import load_dataset

pytestmark = pytest.mark.integration
WARMUP = ("train.lr_schedule=linear_warmup", "train.warmup_rounds=1", "train.lr=1e-3")


@pytest.fixture(scope="module")
def best_run(rt_csv, tmp_path_factory):
    """A 2-round run with ``output.keep = "best"`` whose validation accuracy is made best in round 1, and the
    learning rates the clients trained with."""
    out = tmp_path_factory.mktemp("best") / "run"
    real_validation, real_train = evaluation.validation_metrics, client.train_client
    calls, lrs = [], []

    def validation_worse_each_round(exp, full=True):
        calls.append(1)
        return real_validation(exp, full) | {"accuracy": 1.0 / len(calls)}

    def recording_train(model, loss, plan, data, settings, seed):
        lrs.append(settings.lr)
        return real_train(model, loss, plan, data, settings, seed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "validation_metrics", validation_worse_each_round)
        mp.setattr(client, "train_client", recording_train)
        run_dir, summary = engines.run(tiny_config(rt_csv, out, "output.keep=best", *WARMUP), out)
    return run_dir, summary, lrs


def test_the_kept_adapter_is_the_best_validation_rounds(best_run, rt_csv, tmp_path):
    run_dir, summary, _ = best_run
    records = read_records(run_dir)
    assert [r["val_accuracy"] for r in records] == [1.0, 0.5]
    assert summary["keep"] == "best" and summary["saved_round"] == 1 and summary["best_val_round"] == 1
    # the same run stopped after round 1 (same validation split) saves the same global model
    one = tiny_config(rt_csv, tmp_path / "one", "federation.rounds=1", "data.val_fraction=0.1", *WARMUP)
    engines.run(one, tmp_path / "one")
    kept, last = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (run_dir, tmp_path / "one"))
    assert kept.keys() == last.keys()
    assert all(torch.equal(kept[k], last[k]) for k in kept)
    assert json.loads((run_dir / "adapter" / "fedlora.json").read_text())["round"] == 1


def test_each_round_trains_and_records_the_scheduled_learning_rate(best_run):
    run_dir, _, lrs = best_run
    assert [r["lr"] for r in read_records(run_dir)] == [5e-4, 1e-3]
    assert lrs == [5e-4, 5e-4, 1e-3, 1e-3]  # 2 clients a round


def test_the_adapter_names_its_base_model_labels_and_task(best_run, rt_csv):
    run_dir, _, _ = best_run
    adapter = run_dir / "adapter"
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == "fedlora:minilm"  # not a path into the virtual environment
    info = json.loads((adapter / "fedlora.json").read_text())
    names = load_dataset(str(rt_csv)).label_names
    assert info["base_model"] == "fedlora:minilm" and info["task"] == "seq_cls"
    assert info["num_labels"] == len(names) == 2
    assert info["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert info["label2id"] == {n: i for i, n in enumerate(names)}
    read = adapter_card.read(adapter)
    assert read.config.output.keep == "best" and read.num_labels == 2 and read.base_edits is None


def test_the_model_card_is_generated_from_the_run(best_run):
    run_dir, summary, _ = best_run
    card = (run_dir / "adapter" / "README.md").read_text()
    record = read_records(run_dir)[0]
    assert "library_name: peft" in card and "fedlora:minilm" in card
    assert f"`{summary['method']}`" in card and "2 rounds" in card and "round 1" in card
    assert f"| `global_accuracy` | {record['global_accuracy']:.4g} |" in card
    assert f"| `majority_share` | {record['majority_share']:.4g} |" in card
    assert "[More Information Needed]" not in card  # not PEFT's empty template


def test_an_adapter_without_a_description_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no fedlora.json"):
        adapter_card.read(Path(tmp_path))
