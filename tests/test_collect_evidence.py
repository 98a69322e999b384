"""scripts/collect_evidence.py: the paired per-seed differences from FedIT and the per-task table of a multi-task
cell, on hand-made summaries and metrics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "collect_evidence.py"


def load_script():
    spec = importlib.util.spec_from_file_location("collect_evidence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(accuracy: float, divergence: float) -> dict:
    return {"final_global_accuracy": accuracy, "mean_divergence": divergence}


def test_paired_differences_per_seed_with_mean_std_and_wins():
    seeds = [
        {"fedit": summary(0.80, 0.10), "flora_na": summary(0.79, 0.08), "flexlora": summary(0.81, 0.03)},
        {"fedit": summary(0.70, 0.12), "flora_na": summary(0.72, 0.09)},
        {"fedit": summary(0.75, 0.11), "flora_na": summary(0.78, 0.10)},
    ]
    table = load_script().paired_table("rt-alpha0.5", seeds).splitlines()
    assert table[0] == "### rt-alpha0.5: paired differences from fedit (method − fedit), seed by seed"
    (row,) = [line for line in table if line.startswith("| flora_na")]
    # accuracy differences -0.01, +0.02, +0.03: mean 0.0133, sample std 0.0208; ahead in 2 of 3;
    # divergence differences -0.02, -0.03, -0.01: mean -0.02, std 0.01; lower (ahead) in 3 of 3
    assert row == (
        "| flora_na (3 seeds) | -0.0100 / +0.0200 / +0.0300 | +0.0133 ± 0.0208 | 2 of 3 "
        "| -0.02 / -0.03 / -0.01 | -0.02 ± 0.01 | 3 of 3 |"
    )
    assert not any(line.startswith("| flexlora") for line in table)  # one seed: no spread to report


def test_no_table_when_no_method_shares_two_seeds_with_fedit():
    seeds = [{"fedit": summary(0.8, 0.1)}, {"fedit": summary(0.7, 0.1), "flora_na": summary(0.7, 0.1)}]
    assert load_script().paired_table("cell", seeds) == ""


def write_metrics(run: Path, records: list[dict]) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def task_record(rnd: int, rt: float, bbc: float, **diagnostics: float) -> dict:
    return {
        "round": rnd,
        "evaluated": True,
        "global_accuracy_on_local": 0.5,  # not a task, though it shares the prefix
        "global_accuracy_rt": rt,
        "global_loss_rt": 0.6,
        "local_accuracy_rt": rt + 0.1,
        "global_accuracy_bbc": bbc,
        "global_loss_bbc": 1.0,
        "local_accuracy_bbc": None,  # no client holds the task's test examples
        "diagnostics": {"assignment": [[0, 1]], **diagnostics},
    }


def test_per_task_table_reads_each_task_from_the_last_evaluated_round(tmp_path):
    write_metrics(tmp_path / "fedit", [task_record(2, 0.6, 0.3), task_record(4, 0.7, 0.4), {"round": 5}])
    write_metrics(tmp_path / "fl_tac", [task_record(4, 0.8, 0.9, cluster_purity=0.75)])
    table = load_script().per_task_table(tmp_path, ["fedit", "fl_tac"]).splitlines()
    assert (
        table[0]
        == "| method | round | bbc global acc | bbc local acc | rt global acc | rt local acc | cluster_purity |"
    )
    assert table[2] == "| fedit | 4 | 0.4000 |  | 0.7000 | 0.8000 |  |"
    assert table[3] == "| fl_tac | 4 | 0.9000 |  | 0.8000 | 0.9000 | 0.75 |"


def test_no_per_task_table_for_a_single_task_cell(tmp_path):
    write_metrics(tmp_path / "fedit", [{"round": 1, "evaluated": True, "global_accuracy": 0.7, "global_loss": 0.5}])
    assert load_script().per_task_table(tmp_path, ["fedit"]) == ""
