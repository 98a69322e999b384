"""``fedlora eval`` and ``fedlora predict`` (and ``fedlora.evaluate`` / ``fedlora.predict``) on what a real run
saved: the packaged MiniLM, a base-editing method (so the adapter, the head and the base edits must all load), and
the run's own numbers to repeat."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

import fedlora
from conftest import read_records, tiny_config
from fedlora import engines
from fedlora.cli import app

pytestmark = pytest.mark.integration
cli = CliRunner()


@pytest.fixture(scope="module")
def run_dir(rt_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / "run"
    engines.run(tiny_config(rt_csv, out, "federation.method=fedex_lora", "train.lr=5e-3"), out)
    assert (out / "adapter" / "base_edits.safetensors").exists()
    return out


def test_eval_repeats_the_runs_test_set_numbers(run_dir):
    last = read_records(run_dir)[-1]
    result = fedlora.evaluate(run_dir)
    assert result.round == last["round"] and result.examples == 48
    assert result.metrics["accuracy"] == last["global_accuracy"]
    assert result.metrics["loss"] == pytest.approx(last["global_loss"], rel=1e-5)
    assert result.recorded == {"accuracy": last["global_accuracy"], "loss": last["global_loss"]}
    assert result.baseline == last["majority_share"]


def test_eval_without_the_base_edits_would_not_repeat_them(run_dir, monkeypatch):
    """The base edits matter for this run: skipping them changes the loss (so the test above checks they load)."""
    from fedlora import peft_io

    monkeypatch.setattr(peft_io, "apply_base_edits", lambda model, edits: None)
    result = fedlora.evaluate(run_dir)
    assert result.metrics["loss"] != pytest.approx(read_records(run_dir)[-1]["global_loss"], rel=1e-5)


def test_cli_eval_prints_metrics_beside_the_recorded_ones_and_the_baseline(run_dir):
    res = cli.invoke(app, ["eval", str(run_dir / "adapter")])
    assert res.exit_code == 0, res.output
    last = read_records(run_dir)[-1]
    assert f"accuracy {last['global_accuracy']:.4f} (the run recorded {last['global_accuracy']:.4f})" in res.output
    assert f"baseline (always the most frequent label) {last['majority_share']:.4f}" in res.output
    data = json.loads(cli.invoke(app, ["eval", str(run_dir), "--json"]).output)
    assert data["metrics"]["accuracy"] == last["global_accuracy"]


def test_eval_on_a_file_agrees_with_predict(run_dir, rt_csv, tmp_path):
    frame = pd.read_csv(rt_csv).iloc[:30]
    path = tmp_path / "some.csv"
    frame.to_csv(path, index=False)
    result = fedlora.evaluate(run_dir, path)
    predicted = fedlora.predict(run_dir / "adapter", frame["text"].tolist())
    hits = [p["label"] == label for p, label in zip(predicted, frame["label"], strict=True)]
    assert result.examples == 30 and result.recorded == {}
    assert result.metrics["accuracy"] == pytest.approx(sum(hits) / 30)
    assert result.baseline == pytest.approx(frame["label"].value_counts().max() / 30)


def test_predict_gives_a_label_by_name_and_every_labels_probability(run_dir, rt_csv):
    names = sorted(pd.read_csv(rt_csv)["label"].unique())
    outputs = fedlora.predict(run_dir / "adapter", ["a moving, beautifully made film", "dull and far too long"])
    for out in outputs:
        assert sorted(out["probabilities"]) == names
        assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert out["label"] == max(out["probabilities"], key=out["probabilities"].get)


def test_cli_predict_reads_texts_and_a_file(run_dir, tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("first text\n\nsecond text\n")
    res = cli.invoke(app, ["predict", str(run_dir / "adapter"), "an argument", "--file", str(lines), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in res.output.splitlines()]
    assert [r["input"] for r in rows] == ["an argument", "first text", "second text"]
    expected = fedlora.predict(run_dir / "adapter", ["an argument", "first text", "second text"])
    assert [r["label"] for r in rows] == [e["label"] for e in expected]


def test_predict_on_a_run_directory_names_its_adapter(run_dir):
    res = cli.invoke(app, ["predict", str(run_dir), "text"])
    assert res.exit_code == 2
    assert "is a run directory, not an adapter directory" in res.output
    assert str(run_dir / "adapter") in res.output.replace("\n", "")


def test_a_task_name_for_a_single_task_run_is_refused(run_dir):
    res = cli.invoke(app, ["predict", str(run_dir / "adapter"), "a text", "--task", "rt"])
    assert res.exit_code == 2 and "--task rt: the run of" in res.output and "has one task" in res.output


def test_eval_of_an_adapter_not_saved_by_a_run_is_one_line(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    res = cli.invoke(app, ["eval", str(tmp_path)])
    assert res.exit_code == 2 and "has no fedlora.json" in res.output
    assert "Traceback" not in res.output


def test_eval_data_with_a_label_the_adapter_does_not_know_is_named(run_dir, tmp_path):
    path = tmp_path / "odd.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["fresh", "sideways"]}).to_csv(path, index=False)
    res = cli.invoke(app, ["eval", str(run_dir), "--data", str(path)])
    assert res.exit_code == 2 and "'sideways'" in res.output and "not among the adapter's labels" in res.output


def test_an_aggregate_of_run_adapters_describes_itself_and_predicts_as_they_do(run_dir, tmp_path):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(run_dir / "adapter", twin)
    out = tmp_path / "agg"
    fedlora.aggregate([run_dir / "adapter", twin], "fedit", out)  # the mean of two equal adapters is that adapter
    assert (out / "base_edits.safetensors").exists() and (out / "fedlora.json").exists()
    assert "fedit aggregate of 2 adapters" in (out / "README.md").read_text()
    texts = ["a moving, beautifully made film", "dull and far too long"]
    assert fedlora.predict(out, texts) == fedlora.predict(run_dir / "adapter", texts)
    assert fedlora.evaluate(out).metrics == fedlora.evaluate(run_dir).metrics


def test_adapters_trained_for_other_labels_are_not_aggregated(run_dir, tmp_path):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(run_dir / "adapter", twin)
    info = json.loads((twin / "fedlora.json").read_text())
    info["id2label"] = {"0": "spam", "1": "ham"}
    (twin / "fedlora.json").write_text(json.dumps(info))
    res = cli.invoke(
        app, ["aggregate", str(run_dir / "adapter"), str(twin), "--method", "fedit", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "adapter 1" in res.output and "id2label" in res.output
    assert not (tmp_path / "o").exists()
