"""Every failure a user can cause ends in one ``error:`` line that says what to do (exit code 2), before anything
expensive loads; user text in it is printed as typed (brackets included)."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from fedlora import peft_io, rundir
from fedlora.cli import app

cli = CliRunner()


def error_line(args: list[str]) -> str:
    """The one ``error:`` line of a failing command (exit code 2, no traceback)."""
    res = cli.invoke(app, args, terminal_width=100)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the errors below must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(peft_io, "load_base_model", refuse)


def test_an_output_dir_inside_a_file_is_refused_before_the_model_loads(tmp_path, no_model_load):
    (tmp_path / "file").write_text("x")
    line = error_line(["run", f"output.dir={tmp_path / 'file' / 'run'}"])
    assert f"{tmp_path / 'file'} is a file, not a directory" in line and "output.dir" in line


def test_an_unwritable_output_dir_is_refused_before_the_model_loads(tmp_path, monkeypatch, no_model_load):
    real_access = os.access
    monkeypatch.setattr(rundir.os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    line = error_line(["run", f"output.dir={tmp_path / 'run'}"])
    assert f"{tmp_path} is not writable" in line and "choose another output.dir" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["someorg/not-a-cached-model", "./no/such/model-dir"])
def test_a_model_not_in_the_local_cache_says_runs_are_offline_and_how_to_get_it(tmp_path, name):
    line = error_line(["run", f"model.name={name}", f"output.dir={tmp_path / 'r'}"])
    assert f"model.name = '{name}'" in line and "runs are offline (HF_HUB_OFFLINE=1)" in line
    assert f"hf download {name}" in line and "~/.cache/huggingface" in line


def test_a_dataset_not_in_the_local_cache_says_runs_are_offline_and_how_to_get_it(tmp_path):
    line = error_line(["run", "data.dataset=someorg/not-a-cached-set", f"output.dir={tmp_path / 'r'}"])
    assert "runs are offline (HF_DATASETS_OFFLINE=1)" in line
    assert "datasets.load_dataset('someorg/not-a-cached-set')" in line and "local csv/json/jsonl/parquet" in line


def test_a_missing_config_file_is_named(tmp_path):
    line = error_line(["run", str(tmp_path / "nope.toml")])
    assert f"config file {tmp_path / 'nope.toml'} does not exist" in line and "default experiment" in line


def test_resume_from_a_missing_or_empty_directory_is_named(tmp_path):
    assert "the directory does not exist" in error_line(["run", "--resume", str(tmp_path / "gone")])
    assert "holds no run (no config.toml)" in error_line(["run", "--resume", str(tmp_path)])


def test_bracketed_user_text_is_printed_as_typed(tmp_path):
    name = str(tmp_path / "[bold]reviews[/bold].csv")
    res = cli.invoke(app, ["run", f"data.dataset={name}", f"output.dir={tmp_path / 'r'}"], terminal_width=400)
    assert res.exit_code == 2
    assert res.output.count("[bold]reviews[/bold].csv") == 2, res.output  # the run's description and the error


def test_keep_best_on_a_task_without_a_validation_split_is_refused_not_ignored(rt_csv, tmp_path, monkeypatch):
    """Every built-in task carves a validation split; a task that does not (here seq_cls made to drop it) is
    refused rather than keeping the last round under the name of the best."""
    import dataclasses

    from fedlora.tasks.seq_cls import SequenceClassification

    carve = SequenceClassification.load
    monkeypatch.setattr(
        SequenceClassification, "load", lambda self, cfg: dataclasses.replace(carve(self, cfg), validation=None)
    )
    args = [f"data.dataset={rt_csv}", "data.num_clients=2", "output.keep=best", f"output.dir={tmp_path}/r"]
    line = error_line(["run", *args])
    assert "need a validation split" in line and "(seq_cls)" in line and "output.keep = 'last'" in line
