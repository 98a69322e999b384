"""Plots and tables from run directories; reads metrics.jsonl only (matplotlib imported lazily)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a fedlora run directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _label(run_dir: Path) -> str:
    cfg = Path(run_dir) / "config.toml"
    if cfg.exists():
        for line in cfg.read_text().splitlines():
            if line.strip().startswith("method") and "=" in line and "[" not in line:
                return line.split("=", 1)[1].strip().strip('"')
    return Path(run_dir).name


def plot_runs(run_dirs: Sequence[Path], out: Path) -> list[Path]:
    """accuracy.png, divergence.png, divergence_heatmap.png (per run), accuracy_vs_bytes.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {_label(d) if len(run_dirs) > 1 else Path(d).name: read_metrics(d) for d in run_dirs}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, all_recs in runs.items():
        recs = _evaluated(all_recs)
        rounds = [r["round"] for r in recs]
        ax[0].plot(rounds, [r["global_accuracy"] for r in recs], marker="o", label=name)
        ax[1].plot(rounds, [r["local_accuracy"] for r in recs], marker="o", label=name)
    for a, title in zip(
        ax, ("global accuracy (held-out test)", "local accuracy (own adapter, own split)"), strict=True
    ):
        a.set(title=title, xlabel="round", ylabel="accuracy")
        a.legend(fontsize=8)
    written.append(_save(fig, out / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, recs in runs.items():
        ax.plot([r["round"] for r in recs], [max(r["divergence"], 1e-12) for r in recs], marker="o", label=name)
    ax.set(title="divergence ‖M − ΔW‖/‖M‖", xlabel="round", yscale="log")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "divergence.png"))

    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.5 * len(runs)), squeeze=False)
    for ax, (name, recs) in zip(axes[:, 0], runs.items(), strict=True):
        modules = list(recs[0]["divergence_per_module"])
        grid = np.array([[r["divergence_per_module"][m] for r in recs] for m in modules])
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set(title=f"{name}: divergence per module", xlabel="round")
        ax.set_yticks(range(len(modules)), [m.replace("encoder.layer.", "L") for m in modules], fontsize=6)
        ax.set_xticks(range(len(recs)), [r["round"] for r in recs])
        fig.colorbar(im, ax=ax)
    written.append(_save(fig, out / "divergence_heatmap.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, recs in runs.items():
        total = np.cumsum([r["bytes_up"] + r["bytes_down"] for r in recs]) / 1e6
        evaluated = [(t, r["global_accuracy"]) for t, r in zip(total, recs, strict=True)]
        points = [(t, a) for t, a in evaluated if a is not None]
        ax.plot([t for t, _ in points], [a for _, a in points], marker="o", label=name)
    ax.set(title="global accuracy vs communication", xlabel="MB up + down (cumulative)", ylabel="accuracy")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "accuracy_vs_bytes.png"))
    return written


def _evaluated(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds that evaluated (``eval.every`` > 1 leaves the others' accuracies null)."""
    return [r for r in records if r.get("global_accuracy") is not None]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def markdown_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """The protocol's columns (conventions.md §5) as a markdown table."""
    head = (
        "| method | final global acc | best global acc | mean local acc | final local acc | local-global gap | "
        "mean divergence | final divergence | MB up | MB down | seconds |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {n} | {s['final_global_accuracy']:.4f} | {s['best_global_accuracy']:.4f} | "
        f"{s['mean_local_accuracy']:.4f} | {s['final_local_accuracy']:.4f} | {s['final_local_global_gap']:+.4f} | "
        f"{s['mean_divergence']:.3g} | {s['final_divergence']:.3g} | {s['total_bytes_up'] / 1e6:.2f} | "
        f"{s['total_bytes_down'] / 1e6:.2f} | {s['wall_seconds']:.0f} |"
        for n, s in summaries.items()
    ]
    return head + "\n".join(rows) + "\n"
