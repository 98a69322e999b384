"""fedlora.tracking: records fed to TensorBoard and MLflow and read back from what they wrote (event files through
TensorBoard's own reader, the MLflow store through MLflow's client)."""

from __future__ import annotations

import json
import sys

import pytest

from fedlora import config, tracking

MODULE = "bert.encoder.layer.0.attention.self.query"


def record(rnd: int, accuracy: float | None = 0.5) -> dict:
    """A metrics.jsonl record as the runner writes it (a skipped evaluation has null accuracies)."""
    return {
        "round": rnd,
        "evaluated": accuracy is not None,
        "majority_share": 0.5765,
        "global_accuracy": accuracy,
        "divergence": 0.01 * rnd,
        "divergence_per_module": {MODULE: 0.02 * rnd},
        "diagnostics": {MODULE: {"p": [0.25, 0.75], "iterations": 3}},
        "clients_local_accuracy": [0.7, 0.8],
        "bytes_up": 1000 * rnd,
        "failed_clients": {"2": "RuntimeError: out of memory"},
    }


def make_config(tmp_path, *trackers: str):
    names = ", ".join(f'"{t}"' for t in trackers)
    return config.load_config(None, [f"output.trackers=[{names}]", f"output.dir={tmp_path}", "data.alpha=0.1"])


def test_flatten_names_every_leaf():
    assert dict(tracking.flatten(record(2))) == {
        "round": 2.0,
        "evaluated": 1.0,
        "majority_share": 0.5765,
        "global_accuracy": 0.5,
        "divergence": 0.02,
        f"divergence_per_module/{MODULE}": 0.04,
        f"diagnostics/{MODULE}/p/0": 0.25,
        f"diagnostics/{MODULE}/p/1": 0.75,
        f"diagnostics/{MODULE}/iterations": 3.0,
        "clients_local_accuracy/0": 0.7,
        "clients_local_accuracy/1": 0.8,
        "bytes_up": 2000.0,
        "failed_clients/2": "RuntimeError: out of memory",
    }
    assert "global_accuracy" not in dict(tracking.flatten(record(1, accuracy=None)))


def test_unknown_or_repeated_tracker_names_are_refused_with_the_valid_ones():
    expected = 'expected a list of distinct names from "tensorboard", "mlflow"'
    with pytest.raises(config.ConfigError, match=r'^output.trackers = \["wandb"\]: ' + expected):
        config.load_config(None, ['output.trackers=["wandb"]'])
    with pytest.raises(config.ConfigError, match=r'^output.trackers = \["mlflow", "mlflow"\]: '):
        config.load_config(None, ['output.trackers=["mlflow", "mlflow"]'])
    assert set(tracking._BACKENDS) == set(tracking.TRACKERS) == {"tensorboard", "mlflow"}


@pytest.mark.parametrize(("name", "module"), [("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_package_names_the_extra(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    message = f'output.trackers includes "{name}", whose package is not installed: pip install "fedlora[{name}]"'
    with pytest.raises(tracking.TrackerUnavailable) as err:
        tracking.open(make_config(tmp_path, name), tmp_path)
    assert str(err.value) == message


def test_no_trackers_log_nothing(tmp_path):
    with tracking.open(make_config(tmp_path), tmp_path) as trackers:
        trackers.log_round(record(1))
        trackers.log_summary({"rounds": 1})
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_events_hold_every_key_and_a_resume_replaces_the_rounds_it_repeats(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg = make_config(tmp_path, "tensorboard")
    with pytest.raises(KeyboardInterrupt), tracking.open(cfg, tmp_path) as trackers:
        for rnd, acc in ((1, 0.50), (2, None), (3, 0.60)):
            trackers.log_round(record(rnd, acc))
        raise KeyboardInterrupt  # interrupted after round 3, checkpointed after round 2
    with tracking.open(cfg, tmp_path, resume=True) as trackers:
        trackers.log_round(record(3, 0.65))
        trackers.log_round(record(4, 0.70))
        trackers.log_summary({"rounds": 4, "final_global_accuracy": 0.70, "method": "flora_na"})

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert scalars["global_accuracy"] == pytest.approx({1: 0.50, 3: 0.65, 4: 0.70})
    assert scalars[f"divergence_per_module/{MODULE}"] == pytest.approx({1: 0.02, 2: 0.04, 3: 0.06, 4: 0.08})
    assert scalars[f"diagnostics/{MODULE}/p/1"] == pytest.approx({1: 0.75, 2: 0.75, 3: 0.75, 4: 0.75})
    assert scalars["evaluated"] == {1: 1.0, 2: 0.0, 3: 1.0, 4: 1.0}
    assert scalars["summary/final_global_accuracy"] == pytest.approx({4: 0.70})
    assert "round" not in scalars
    texts = events.Tags()["tensors"]
    assert "failed_clients/2/text_summary" in texts and "config/text_summary" in texts
    table = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| data.alpha | 0.1 |" in table and '| output.trackers | ["tensorboard"] |' in table
    hparams = events.PluginTagToContent("hparams")  # the HParams dashboard's entry for this run
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert (
        start.hparams["data.alpha"].number_value == 0.1 and start.hparams["model.name"].string_value == "fedlora:minilm"
    )
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"summary/rounds", "summary/final_global_accuracy"}


def test_mlflow_logs_into_the_run_directory_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = make_config(tmp_path, "mlflow")
    with pytest.raises(KeyboardInterrupt), tracking.open(cfg, tmp_path) as trackers:
        trackers.log_round(record(1, 0.5))
        raise KeyboardInterrupt
    run_id = json.loads((tmp_path / tracking.MLFLOW_RUN_FILE).read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FAILED"
    with tracking.open(cfg, tmp_path, resume=True) as trackers:
        trackers.log_round(record(2, None))
        trackers.log_summary({"rounds": 2, "final_global_accuracy": 0.5, "method": "flora_na"})

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    params = config.to_flat(cfg)
    assert set(run.data.params) == set(params) and run.data.params["model.name"] == params["model.name"]
    assert run.data.params["data.alpha"] == "0.1" and run.data.params["output.trackers"] == '["mlflow"]'
    history = {
        k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in ("divergence", "evaluated")
    }
    assert history == {"divergence": [(1, 0.01), (2, 0.02)], "evaluated": [(1, 1.0), (2, 0.0)]}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "global_accuracy")] == [(1, 0.5)]
    assert run.data.metrics[f"diagnostics/{MODULE}/p/0"] == 0.25
    assert run.data.metrics["summary/final_global_accuracy"] == 0.5 and run.data.tags["summary/method"] == "flora_na"
    assert client.get_experiment(run.info.experiment_id).name == "fedlora"
    (artifact,) = (tmp_path / "mlartifacts").rglob("rounds/2/failed_clients/2.txt")  # artifacts beside the store
    assert artifact.read_text() == "RuntimeError: out of memory"


def test_mlflow_uses_the_store_named_by_the_environment(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts a store's default artifact root, ./mlruns, in the working directory
    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "grid")
    run_dir = tmp_path / "run"
    with tracking.open(make_config(run_dir, "mlflow"), run_dir) as trackers:
        trackers.log_round(record(1))
    assert not (run_dir / "mlflow.db").exists()
    (experiment,) = [e for e in MlflowClient(store).search_experiments() if e.name == "grid"]
    (run,) = MlflowClient(store).search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.data.metrics["global_accuracy"] == 0.5
    assert json.loads((run_dir / tracking.MLFLOW_RUN_FILE).read_text())["tracking_uri"] == store
