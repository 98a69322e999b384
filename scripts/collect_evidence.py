"""Markdown tables for docs/results.md from the runs of scripts/evidence.sh.

    .venv/bin/python scripts/collect_evidence.py [runs/evidence]

One table per (dataset, alpha, seed) cell (its finished runs, if the grid is still running), per-round global
loss, divergence and local accuracy of each finished run, a mean ± std table over the seeds of each cell that has
several, and the clients' B/A balance spread: per round, max_u ρ_u / min_u ρ_u
with ρ_u = ‖B̃_u‖_F / ‖A_u‖_F (1 means every client has the same LoRA gauge; FLoRA-NA can only beat FedIT by much
when this spread is large).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from fedlora.plots import markdown_table, read_metrics

COLUMNS = [
    ("final_global_accuracy", "final global acc", "{:.4f}"),
    ("best_global_accuracy", "best global acc", "{:.4f}"),
    ("mean_local_accuracy", "mean local acc", "{:.4f}"),
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


PER_ROUND = [("global_loss", "global loss", "{:.4f}"), ("divergence", "divergence", "{:.3g}")]
PER_ROUND += [("local_accuracy", "local acc", "{:.3f}")]


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
        by_setting[cell.name.rsplit("-seed", 1)[0]].append(summaries)
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


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/evidence"))
