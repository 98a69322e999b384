"""End to end on the real packaged MiniLM: a two-task federation (Rotten Tomatoes snippets and BBC News articles as
local files) with FedIT, CE-LoRA, FL-TAC and FedLEASE in process, and FL-TAC on Flower's simulation runtime against
the in-process engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import read_records
from fedlora import config, engines, inference, peft_io
from fedlora.aggregate_dirs import aggregate_dirs
from fedlora.experiment import global_test_set

MODULES, D = 12, 384  # MiniLM: 6 layers × (query, value), 384 × 384
F32 = 4
R = 4
HEAD = (2 + 5) * (D + 1) * F32  # one head, the rows of both tasks
FACTORS = MODULES * 2 * R * D * F32  # A and B of every module


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """60 seeded Rotten Tomatoes snippets and 60 BBC News articles (cut to 200 characters) as CSV files."""
    import pandas as pd

    from fedlora.data import load_dataset

    out = tmp_path_factory.mktemp("tasks")
    paths = []
    for spec, name in (("fedlora:rotten-tomatoes", "rt"), ("fedlora:bbc-news", "bbc")):
        ds = load_dataset(spec)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:60].tolist()
        texts = [ds.texts[i][:200] for i in idx]
        pd.DataFrame({"text": texts, "label": [ds.label_names[ds.labels[i]] for i in idx]}).to_csv(
            out / f"{name}.csv", index=False
        )
        paths.append(out / f"{name}.csv")
    return paths[0], paths[1]


def tiny(two_tasks, out: Path, *extra: str):
    rt, bbc = two_tasks
    base = [f'data.tasks=["{rt}", "{bbc}"]', "data.num_clients=3", "data.task_alpha=1.0", "data.min_partition_size=5"]
    base += ["data.max_length=32", "federation.rounds=2", "train.local_steps=2", "train.batch_size=8"]
    base += [f"model.lora.r={R}", f"output.dir={out}", "federation.workers=0"]
    return config.load_config(None, [*base, *extra])


def _check_tasks(record: dict) -> None:
    """Both tasks reported; the overall accuracy is the per-task accuracies weighted by the global test set's 12
    examples of each task."""
    assert {"global_accuracy_rt", "global_accuracy_bbc", "local_accuracy_rt", "local_accuracy_bbc"} <= set(record)
    expected = (record["global_accuracy_rt"] + record["global_accuracy_bbc"]) / 2
    assert record["global_accuracy"] == pytest.approx(expected)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fedit_and_ce_lora_on_two_tasks(two_tasks, tmp_path):
    fedit_dir, _ = engines.run(tiny(two_tasks, tmp_path / "fedit", "federation.method=fedit"), tmp_path / "fedit")
    ce_dir, summary = engines.run(tiny(two_tasks, tmp_path / "ce", "federation.method=ce_lora"), tmp_path / "ce")
    fedit, (r1, r2) = read_records(fedit_dir), read_records(ce_dir)
    for r in (*fedit, r1, r2):
        _check_tasks(r)
    assert fedit[0]["bytes_up"] == 3 * (FACTORS + HEAD)
    cores = MODULES * R * R * F32
    assert r1["bytes_up"] == 3 * (cores + 2 * D * F32)  # the cores and, once, the feature statistics
    assert r2["bytes_up"] == 3 * cores and r2["bytes_down"] == 3 * cores
    assert r1["bytes_down"] == 3 * (cores + FACTORS + HEAD)  # the initial A, B = 0 and head, once
    weights = r2["diagnostics"]["weights"]
    assert len(weights) == 3 and all(sum(row) == pytest.approx(1.0) for row in weights)
    assert summary["final_local_accuracy"] == r2["local_accuracy"]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fedlease_warms_up_clusters_and_trains_its_experts(two_tasks, tmp_path):
    cfg = tiny(
        two_tasks, tmp_path / "run", "federation.method=fedlease", "method.warmup_rounds=1", "federation.rounds=3"
    )
    run_dir, _ = engines.run(cfg, tmp_path / "run")
    r1, r2, r3 = read_records(run_dir)
    for r in (r1, r2, r3):
        _check_tasks(r)
    assert r1["diagnostics"]["experts"] == 2  # three clients: M = 2 is the only silhouette candidate
    assert set(r1["diagnostics"]["clusters"]) == {"0", "1", "2"}
    assert r1["bytes_up"] == 3 * (FACTORS + HEAD)
    routers = MODULES * 3 * D * F32  # 2M − 1 = 3 slots
    assert r2["bytes_up"] == 3 * (FACTORS + HEAD + routers)
    assert r2["bytes_down"] == 3 * (2 * FACTORS + routers + HEAD)  # both experts, the cluster's router and head
    saved = load_file(run_dir / "adapter" / peft_io.MIXTURE_FILE)
    assert any(n.endswith(".lora_router") for n in saved) and any(n.endswith(".lora_experts.A") for n in saved)
    evaluated = inference.evaluate(inference.load(run_dir))  # the experts and routers load with the adapter
    assert evaluated.metrics["loss"] == pytest.approx(r3["global_loss"], rel=1e-5)
    assert evaluated.metrics["accuracy_bbc"] == r3["global_accuracy_bbc"]


def _fl_tac_checks(records: list[dict]) -> None:
    for r in records:
        _check_tasks(r)
        d = r["diagnostics"]
        assert d["clusters"] == 2 and 0.0 <= d["cluster_matched_accuracy"] <= d["cluster_purity"] <= 1.0
        slots = len(d["assignment"])
        assert r["bytes_up"] == slots * (FACTORS + HEAD)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_fl_tac_on_flower_simulation_matches_the_in_process_engine(two_tasks, tmp_path):
    """One adapter per local task, clustered on the server; the nodes report their adapters' tasks for the
    evaluation-only task-routed model and the purity. The same records on both engines."""
    pytest.importorskip("flwr")
    from test_flower import EXCLUDED, assert_close_records

    ref_dir, ref_summary = engines.run(tiny(two_tasks, tmp_path / "ref", "federation.method=fl_tac"), tmp_path / "ref")
    sim_cfg = tiny(two_tasks, tmp_path / "sim", "federation.method=fl_tac", "federation.engine=flower-simulation")
    sim_dir, sim_summary = engines.run(sim_cfg, tmp_path / "sim")
    ref, sim = read_records(ref_dir), read_records(sim_dir)
    _fl_tac_checks(ref)
    for r, s in zip(ref, sim, strict=True):
        assert_close_records(
            {k: v for k, v in r.items() if k not in EXCLUDED}, {k: s[k] for k in r if k not in EXCLUDED}
        )
        assert s["flower_bytes_report"] > 0  # the nodes' task lists, evaluation-only
    assert (
        json.loads((ref_dir / "summary.json").read_text())["final_global_accuracy"]
        == sim_summary["final_global_accuracy"]
    )
    assert ref_summary["total_bytes_up"] == sim_summary["total_bytes_up"]


@pytest.mark.integration
def test_fl_tac_client_with_a_scale_fault_is_scaled_not_crashed(two_tasks, tmp_path):
    """An FL-TAC client uploads several adapters under slot prefixes that no single plan names; a simulated
    ``scale`` fault on it multiplies its uploads (measured from zero) and the round goes on."""
    args = ["federation.method=fl_tac", "federation.rounds=1"]
    clean_dir, _ = engines.run(tiny(two_tasks, tmp_path / "clean", *args), tmp_path / "clean")
    faulty = tiny(two_tasks, tmp_path / "faulty", *args, 'faults.clients={1 = "scale:50"}')
    faulty_dir, _ = engines.run(faulty, tmp_path / "faulty")
    (clean,), (record,) = read_records(clean_dir), read_records(faulty_dir)
    assert record["faults"] == {"1": "scale:50"} and record["clients"] == clean["clients"] == [0, 1, 2]
    assert record["failed_clients"] == {}
    a = load_file(clean_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(faulty_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    lora = [k for k in a if "lora_B" in k]
    # the same seed and clients: without the fault the adapters would be equal (0.27 here with it)
    assert lora and max((b[k] - a[k]).norm() / a[k].norm().clamp_min(1e-12) for k in lora) > 0.05


@pytest.mark.integration
def test_saved_fl_tac_adapter_evaluates_and_predicts_task_by_task(two_tasks, tmp_path, monkeypatch):
    """eval and predict load the task adapters and their table saved beside the adapter and repeat the run's
    numbers, on the whole test set, on one task of it, and on a file of one task; the adapter alone would not."""
    args = ["federation.method=fl_tac", "federation.rounds=1", "seed=8", "train.lr=5e-3", "train.local_steps=4"]
    run_dir, _ = engines.run(tiny(two_tasks, tmp_path / "run", *args), tmp_path / "run")
    (record,) = read_records(run_dir)
    assert record["diagnostics"]["task_clusters"] == [0, 1]  # (seed 8) so the two tasks use different adapters
    assert (run_dir / "adapter" / peft_io.MIXTURE_FILE).exists()
    loaded = inference.load(run_dir)
    whole = inference.evaluate(loaded)
    assert set(whole.recorded) == {"accuracy", "loss", "accuracy_rt", "accuracy_bbc", "loss_rt", "loss_bbc"}
    assert all(whole.metrics[k] == pytest.approx(v, rel=1e-5) for k, v in whole.recorded.items())
    with monkeypatch.context() as patch:  # the adapter alone would not repeat them
        patch.setattr(peft_io, "_load_mixture", lambda *args: None)
        alone = inference.evaluate(inference.load(run_dir)).metrics["loss"]
        assert alone != pytest.approx(record["global_loss"], rel=1e-4)
    bare = shutil.copytree(run_dir / "adapter", tmp_path / "bare")
    (bare / peft_io.MIXTURE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="names a mixture of experts mixture.safetensors, which is missing"):
        inference.load(bare)
    card = (run_dir / "adapter" / "README.md").read_text()
    assert f"`{two_tasks[0]}` + `{two_tasks[1]}` (one task each)" in card and '"some text" --task NAME' in card
    assert "but without `mixture.safetensors`" in card

    one = inference.evaluate(loaded, task="rt")
    assert one.examples == 12 and one.metrics["accuracy"] == record["global_accuracy_rt"]
    assert "accuracy_bbc" not in one.metrics

    test = global_test_set(loaded.config, loaded.task.load(loaded.config))
    rows = [
        (x, test.label_names[y].split("/", 1)[1])
        for x, y, t in zip(test.texts, test.labels, test.tasks, strict=True)
        if t == 0
    ]
    frame = pd.DataFrame(rows, columns=["text", "label"])
    frame.to_csv(tmp_path / "rt_test.csv", index=False)
    from_file = inference.evaluate(loaded, str(tmp_path / "rt_test.csv"), task="rt")
    assert from_file.metrics["loss_rt"] == pytest.approx(record["global_loss_rt"], rel=1e-5)
    predicted = inference.predict(loaded, list(frame["text"]), task="rt")
    assert {p["task"] for p in predicted} == {"rt"}
    assert all(set(p["probabilities"]) == set(pd.read_csv(two_tasks[0])["label"]) for p in predicted)
    right = sum(p["label"] == label for p, label in zip(predicted, frame["label"], strict=True))
    assert right / len(frame) == record["global_accuracy_rt"]

    with pytest.raises(ValueError, match=r"adapter 0 .* holds mixture.safetensors.* would drop them"):
        aggregate_dirs("fedit", [run_dir / "adapter", run_dir / "adapter"], tmp_path / "out")
    with pytest.raises(ValueError, match="cannot be merged into the base weights"):
        peft_io.merge_to_base("fedlora:minilm", run_dir / "adapter", None, tmp_path / "merged")
    with pytest.raises(ValueError, match=r"several tasks \['rt', 'bbc'\]; name the task with --task"):
        inference.predict(loaded, ["a text"])
    with pytest.raises(ValueError, match=r"--task imdb: not a task of the run .* its tasks are \['rt', 'bbc'\]"):
        inference.evaluate(loaded, task="imdb")


@pytest.mark.integration
def test_keep_best_on_two_tasks_saves_the_round_with_the_best_validation_accuracy(two_tasks, tmp_path):
    """Each task gives a validation part (data.val_fraction of what its test split leaves); the kept round is the
    first with the best validation accuracy, and the saved adapter repeats that round's test numbers."""
    cfg = tiny(two_tasks, tmp_path / "run", "output.keep=best", "data.val_fraction=0.25", "federation.rounds=3")
    run_dir, summary = engines.run(cfg, tmp_path / "run")
    records = read_records(run_dir)
    values = [r["val_accuracy"] for r in records]
    best = records[values.index(max(values))]
    assert summary["saved_round"] == best["round"]
    result = inference.evaluate(inference.load(run_dir))
    assert result.round == best["round"] and result.metrics["loss"] == pytest.approx(best["global_loss"], rel=1e-5)
