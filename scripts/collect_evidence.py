"""Markdown tables for docs/results.md from the runs of scripts/evidence.sh (or evidence-v1.sh).

    .venv/bin/python scripts/collect_evidence.py [runs/evidence-v2]

One table per cell (dataset, alpha, seed; its finished runs, if the grid is still running) with the majority-class
shares beside the accuracies, per-round global accuracy, global loss, divergence and local accuracy of each
finished run (rounds that did not evaluate are blank), a mean ± std table over the seeds of each cell that has
several, with each method's paired differences from FedIT seed by seed (the seed draws the test split, the
partition and the initialisation for every method of a cell alike, so a paired difference is free of the seed-to-seed
spread the methods share), a table per dataset of each method's final global accuracy against the Dirichlet alpha
(seed 0), and the clients' B/A balance spread: per round, max_u ρ_u / min_u ρ_u
with ρ_u = ‖B̃_u‖_F / ‖A_u‖_F (1 means every client has the same LoRA gauge; FLoRA-NA can only beat FedIT by much
when this spread is large). A multi-task cell (runs whose metrics name tasks, ``fedlora.plots.recorded_tasks``)
also gets a table of each task's final global and local accuracy and of the scalar diagnostics of the last
evaluated round (FL-TAC's cluster purity, FedLEASE's cluster count).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from fedlora.plots import markdown_table, read_metrics, recorded_tasks

COLUMNS = [
    ("final_global_accuracy", "final global acc", "{:.4f}"),
    ("best_global_accuracy", "best global acc", "{:.4f}"),
    ("majority_share", "majority class", "{:.4f}"),
    ("mean_local_accuracy", "mean local acc", "{:.4f}"),
    ("final_local_accuracy", "final local acc", "{:.4f}"),
    ("local_majority_share", "local majority", "{:.4f}"),
    ("final_local_global_gap", "local-global gap", "{:+.4f}"),
    ("mean_divergence", "mean divergence", "{:.3g}"),
    ("total_bytes_up", "MB up", "mb"),
    ("total_bytes_down", "MB down", "mb"),
    ("wall_seconds", "seconds", "{:.0f}"),
]


def _fmt(values: list[float], fmt: str) -> str:
    if fmt == "mb":
        values = [v / 1e6 for v in values]
        fmt = "{:.2f}"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(statistics.stdev(values))}"


def balance_spread(run: Path) -> tuple[float, float]:
    """(median over rounds, max over rounds) of max_u ρ_u / min_u ρ_u."""
    spreads = []
    for r in read_metrics(run):
        b = [x for x in r.get("client_balance", []) if x == x and x > 0]
        if b:
            spreads.append(max(b) / min(b))
    return (statistics.median(spreads), max(spreads)) if spreads else (float("nan"), float("nan"))


PER_ROUND = [("global_accuracy", "global acc", "{:.4f}"), ("global_loss", "global loss", "{:.4f}")]
PER_ROUND += [("divergence", "divergence", "{:.3g}"), ("local_accuracy", "local acc", "{:.3f}")]
PER_ROUND += [("local_global_gap", "gap", "{:+.3f}")]


def per_round_table(cell: Path, methods: list[str]) -> str:
    """Rows (metric, method), columns the rounds, from each run's metrics.jsonl."""
    records = {m: read_metrics(cell / m) for m in methods}
    rounds = max(len(r) for r in records.values())
    lines = ["| round | " + " | ".join(str(i) for i in range(1, rounds + 1)) + " |", "|---" * (rounds + 1) + "|"]
    for key, title, fmt in PER_ROUND:
        for m in methods:
            values = [fmt.format(r[key]) if r.get(key) is not None else "" for r in records[m]]
            lines.append(f"| {m} {title} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def finished_runs(cell: Path) -> dict[str, dict]:
    """{method: summary} of the runs of one cell that finished (summary.json), in the comparison's order when the
    cell finished (comparison.json), else by name: a partly run grid is reported as far as it got."""
    if (cell / "comparison.json").exists():
        return json.loads((cell / "comparison.json").read_text())
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(cell.glob("*/summary.json"))}


def main(root: Path) -> None:
    by_setting: dict[str, list[dict]] = defaultdict(list)
    for cell in sorted(p for p in root.iterdir() if p.is_dir()):
        summaries = finished_runs(cell)
        if not summaries:
            continue
        print(f"### {cell.name}\n")
        print(markdown_table(summaries))
        print(per_round_table(cell, list(summaries)))
        spreads = {m: balance_spread(cell / m) for m in summaries}
        print(
            "B/A balance spread max ρ / min ρ (median over rounds, max): "
            + ", ".join(f"{m} {a:.2f} ({b:.2f})" for m, (a, b) in spreads.items())
            + "\n"
        )
        print(per_task_table(cell, list(summaries)))
        by_setting[cell.name.rsplit("-seed", 1)[0]].append(summaries)
    for dataset in sorted({c.split("-alpha")[0] for c in by_setting}):
        print(alpha_table(root, dataset))
    for setting, seeds in by_setting.items():
        if len(seeds) < 2:
            continue
        print(f"### {setting}: mean ± std over {len(seeds)} seeds\n")
        print("| method | " + " | ".join(t for _, t, _ in COLUMNS) + " |")
        print("|---" * (len(COLUMNS) + 1) + "|")
        for m in seeds[0]:
            runs = [s[m] for s in seeds if m in s]
            vals = [_fmt([r[k] for r in runs], f) for k, _, f in COLUMNS]
            print(f"| {m} ({len(runs)} seeds) | " + " | ".join(vals) + " |")
        print()
        print(paired_table(setting, seeds))


def per_task_table(cell: Path, methods: list[str]) -> str:
    """Per method, each task's global and local accuracy and the scalar diagnostics of its last evaluated round;
    "" for a single-task cell."""
    last = {m: [r for r in read_metrics(cell / m) if r.get("evaluated")][-1] for m in methods}
    tasks = sorted({t for r in last.values() for t in recorded_tasks(r)})
    if not tasks:
        return ""
    diagnostics = sorted(
        {k for r in last.values() for k, v in r.get("diagnostics", {}).items() if isinstance(v, float | int)}
    )
    titles = [f"{t} {where} acc" for t in tasks for where in ("global", "local")] + diagnostics
    lines = ["| method | round | " + " | ".join(titles) + " |", "|---" * (len(titles) + 2) + "|"]
    for m, r in last.items():
        accuracies = [r.get(f"{where}_accuracy_{t}") for t in tasks for where in ("global", "local")]
        shown = ["" if v is None else f"{v:.4f}" for v in accuracies]
        shown += [f"{r['diagnostics'][k]:.4g}" if k in r.get("diagnostics", {}) else "" for k in diagnostics]
        lines.append(f"| {m} | {r['round']} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


PAIRED = [("final_global_accuracy", "final global acc", "{:+.4f}"), ("mean_divergence", "mean divergence", "{:+.3g}")]


def paired_table(setting: str, seeds: list[dict], reference: str = "fedit") -> str:
    """Per method, its difference from ``reference`` at each seed where both ran, their mean ± std and in how
    many seeds the method is ahead (higher accuracy, lower divergence); "" when no method shares two seeds."""
    rows = []
    for m in dict.fromkeys(m for s in seeds for m in s):
        pairs = [(s[m], s[reference]) for s in seeds if m in s and reference in s]
        if m == reference or len(pairs) < 2:
            continue
        cells = []
        for key, _, fmt in PAIRED:
            diffs = [run[key] - ref[key] for run, ref in pairs]
            ahead = sum(d > 0 if key.endswith("accuracy") else d < 0 for d in diffs)
            shown = " / ".join(fmt.format(d) for d in diffs)
            spread = f"{fmt.format(statistics.fmean(diffs))} ± {fmt.format(statistics.stdev(diffs)).lstrip('+')}"
            cells.append(f"{shown} | {spread} | {ahead} of {len(diffs)}")
        rows.append(f"| {m} ({len(pairs)} seeds) | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = [f"### {setting}: paired differences from {reference} (method − {reference}), seed by seed\n"]
    titles = [f"{t} per seed | {t} mean ± std | seeds ahead" for _, t, _ in PAIRED]
    head.append("| method | " + " | ".join(titles) + " |")
    head.append("|---" * (3 * len(PAIRED) + 1) + "|")
    return "\n".join(head + rows) + "\n"


def alpha_table(root: Path, dataset: str, seed: int = 0) -> str:
    """Each method's final global accuracy (and mean divergence) against the Dirichlet alpha, 10 clients, one seed."""
    cells = {}
    for cell in root.glob(f"{dataset}-alpha*-seed{seed}"):
        alpha = cell.name.removeprefix(f"{dataset}-alpha").removesuffix(f"-seed{seed}")
        if alpha.replace(".", "", 1).isdigit():
            cells[float(alpha)] = finished_runs(cell)
    alphas = sorted(cells)
    if len(alphas) < 2:
        return ""
    methods = list(dict.fromkeys(m for a in alphas for m in cells[a]))
    lines = [f"### {dataset}: final global accuracy (mean divergence) against alpha, seed {seed}\n"]
    lines.append("| method | " + " | ".join(f"α = {a:g}" for a in alphas) + " |")
    lines.append("|---" * (len(alphas) + 1) + "|")
    majority = [next(iter(cells[a].values())).get("majority_share") for a in alphas]
    lines.append("| majority class | " + " | ".join("–" if v is None else f"{v:.4f}" for v in majority) + " |")
    for m in methods:
        row = [cells[a].get(m) for a in alphas]
        shown = ["" if s is None else f"{s['final_global_accuracy']:.4f} ({s['mean_divergence']:.3g})" for s in row]
        lines.append(f"| {m} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/evidence-v2"))
