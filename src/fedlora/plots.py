"""Figures and tables from fedlora run directories.

Reads each run's ``config.toml`` and ``metrics.jsonl`` only (never the engine); matplotlib is imported when a
figure is drawn, and figures are built without pyplot, so plotting changes no global state.

One curve per run, labelled by the config keys whose values differ between the runs (``fedit, α=0.1, seed=1``);
runs that differ only in ``seed`` become one curve, the mean with a ±1 sample standard deviation band. Rounds
whose evaluation was skipped (``eval.every`` > 1: null values) and keys a run does not record are left out, so a
figure shows what exists; a figure with nothing to show raises :class:`NoData` with the reason.
"""

from __future__ import annotations

import json
import math
import textwrap
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DPI = 120
_STYLE = {"axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8}
MIN_SHARE_SPAN = 0.1
"""The smallest y-range of an accuracy axis: 0.002 between two runs never fills a panel."""
LOG_FLOOR = 1e-10
"""Divergences below this (exact methods: 0 or float rounding) are drawn at it on a log axis."""
DIVERGENCE = "‖M − ΔW‖_F / ‖M‖_F"
IDEAL = "M = Σ_u w_u B̃_u A_u: the ideal update\n(w_u: client u's weight; B̃_u = s·B_u, s: LoRA scale)"

# Short names of config keys in labels; "" shows the value alone.
_SHORT = {"federation.method": "", "data.dataset": "", "data.alpha": "α", "model.lora.alpha": "lora α"}
_FIRST = ("federation.method", "data.dataset", "data.alpha", "seed")


class NoData(Exception):
    """A figure has nothing to draw; the message says which keys or runs are missing."""


# --------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Run:
    """One run directory: its flat config (dotted keys, as in ``config.toml``) and its per-round records."""

    path: Path
    config: Mapping[str, Any]
    records: tuple[Mapping[str, Any], ...]

    def per_round(self, key: str) -> dict[int, float]:
        """{round: value} over the rounds where ``key`` holds a finite number."""
        return {int(r["round"]): float(r[key]) for r in self.records if _is_number(r.get(key))}

    def final(self, key: str) -> float | None:
        values = self.per_round(key)
        return values[max(values)] if values else None

    def mean(self, key: str) -> float | None:
        values = list(self.per_round(key).values())
        return float(np.mean(values)) if values else None

    def cumulative_mb(self) -> dict[int, float]:
        """{round: MB (10⁶ bytes) up + down from round 1 to this round}."""
        sent = [(int(r["round"]), r.get("bytes_up", 0) + r.get("bytes_down", 0)) for r in self.records]
        return dict(zip([n for n, _ in sent], np.cumsum([b for _, b in sent]) / 1e6, strict=True))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl``, one dict per round."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not a fedlora run directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recorded_tasks(record: Mapping[str, Any]) -> list[str]:
    """The tasks of a multi-task run's metrics record, in record order: each name t with both a ``global_loss_<t>``
    and a ``global_accuracy_<t>`` key (``global_accuracy_on_local`` alone, or a causal LM's ``global_loss_on_local``,
    names no task); [] for a single-task run."""
    losses = [k.removeprefix("global_loss_") for k in record if k.startswith("global_loss_")]
    return [t for t in losses if f"global_accuracy_{t}" in record]


def read_run(run_dir: Path) -> Run:
    """A run directory (``metrics.jsonl`` required, ``config.toml`` read when present)."""
    path = Path(run_dir)
    records = tuple(read_metrics(path))
    config_file = path / "config.toml"
    config = dict(_flatten(tomllib.loads(config_file.read_text()))) if config_file.exists() else {}
    return Run(path, config, records)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            yield from _flatten(value, name)
        else:
            yield name, value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------------------------
# Labels and series


def _compared(config: Mapping[str, Any], ignore: Iterable[str]) -> dict[str, Any]:
    """The config keys that can tell runs apart: ``output.*`` never does (where a run was written)."""
    skip = set(ignore)
    return {k: v for k, v in config.items() if not k.startswith("output.") and k not in skip}


def _fingerprint(config: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    return json.dumps(_compared(config, ignore), sort_keys=True, default=str)


def describe(runs: Sequence[Run], ignore: Iterable[str] = ()) -> list[str]:
    """Per run, the values of the config keys that differ between ``runs`` (``ignore``, ``output.*`` and
    :func:`version_keys` left out), e.g. ``flora_na, α=0.1, lr=0.001``; the method name when nothing differs."""
    configs = [_compared(r.config, [*ignore, *version_keys(runs)]) for r in runs]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    differing = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
    differing.sort(key=lambda k: (_FIRST.index(k) if k in _FIRST else len(_FIRST), keys.index(k)))
    names = _short_names(differing)
    labels = [", ".join(_part(names[k], c[k]) for k in differing if k in c) for c in configs]
    return [label or str(r.config.get("federation.method", r.path.name)) for label, r in zip(labels, runs, strict=True)]


def version_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys that only some runs record and that hold one value wherever recorded: the runs were made by
    fedlora versions with and without the option, so the key tells nothing about how they differ."""
    keys = list(dict.fromkeys(k for r in runs for k in r.config))
    partial = [k for k in keys if any(k not in r.config for r in runs)]
    return [k for k in partial if len({json.dumps(r.config[k], default=str) for r in runs if k in r.config}) == 1]


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key's short name: a fixed one, else its last part unless another key ends the same way."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: _SHORT.get(k, tail if last.count(tail) == 1 else k) for k, tail in zip(keys, last, strict=True)}


def _part(name: str, value: Any) -> str:
    shown = _show(value)
    return shown if not name else f"{name}={shown}"


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_show, value)) + "]"
    text = str(value)
    if text.startswith("fedlora:"):
        return text.removeprefix("fedlora:")
    return Path(text).name if "/" in text else text


@dataclass(frozen=True)
class Curve:
    """A series' values at the rounds (or other x) every one of its runs has; ``std`` None for a single run."""

    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray | None


@dataclass(frozen=True)
class Series:
    """What one curve shows: one run, or runs that differ only in their seed (drawn as mean ± std)."""

    name: str
    runs: tuple[Run, ...]

    @property
    def label(self) -> str:
        """The name, with the number of seeds when the series is their mean ± std."""
        return self.name + (f" (mean ± std, {len(self.runs)} seeds)" if len(self.runs) > 1 else "")

    @property
    def mean_label(self) -> str:
        """The label of a figure that shows the mean only (heatmaps, gap panels)."""
        return self.name + (f" (mean over {len(self.runs)} seeds)" if len(self.runs) > 1 else "")

    def curve(self, key: str) -> Curve:
        return _aligned([r.per_round(key) for r in self.runs])

    def baseline(self, key: str | None) -> float | None:
        """The mean over the series' runs of a per-run constant such as ``majority_share`` (None if absent)."""
        values = [v for r in self.runs if key and (v := r.final(key)) is not None]
        return float(np.mean(values)) if values else None


def _aligned(per_run: Sequence[Mapping[int, float]]) -> Curve:
    common = sorted(set.intersection(*(set(v) for v in per_run))) if per_run else []
    stack = np.array([[v[n] for n in common] for v in per_run], dtype=float).reshape(len(per_run), len(common))
    std = stack.std(axis=0, ddof=1) if len(per_run) > 1 else None
    return Curve(np.array(common, dtype=float), stack.mean(axis=0), std)


@dataclass
class Selection:
    """The runs of one plot and their series; ``warnings`` say what the reader should know about the labels."""

    runs: list[Run]
    series: list[Series] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def select(runs: Sequence[Run]) -> Selection:
    """One series per run, or per group of runs that differ only in ``seed`` (all seeds distinct). Runs whose
    configs are identical are labelled by their directory names, with a warning; keys that only some runs record
    (:func:`version_keys`) are not differences, also with a warning."""
    sel = Selection(list(runs))
    labels = describe(runs)
    absent = version_keys(runs)
    if absent:
        shown = ", ".join(absent[:6]) + (f" and {len(absent) - 6} more" if len(absent) > 6 else "")
        sel.warnings.append(
            f"{len(absent)} config key(s) recorded by only some runs (made by different fedlora versions) and "
            f"equal wherever recorded are not treated as differences: {shown}"
        )
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(_fingerprint(run.config, ["seed", *absent]), []).append(i)
    for members in groups.values():
        seeds = [runs[i].config.get("seed") for i in members]
        if len(members) > 1 and len(set(seeds)) == len(seeds):
            label = describe(runs, ignore=["seed"])[members[0]]
            sel.series.append(Series(label, tuple(runs[i] for i in members)))
        else:
            sel.series.extend(_single_runs(runs, members, labels, sel.warnings, absent))
    return sel


def _single_runs(
    runs: Sequence[Run], members: Sequence[int], labels: Sequence[str], warnings: list[str], absent: Sequence[str]
) -> list:
    """One series per run; runs with identical configs (``absent`` keys aside) get their directory name in the
    label, and a warning."""
    same: dict[str, list[int]] = {}
    for i in members:
        same.setdefault(_fingerprint(runs[i].config, absent), []).append(i)
    series = []
    for twins in same.values():
        if len(twins) > 1:
            names = ", ".join(str(runs[i].path) for i in twins)
            warnings.append(f"runs {names} have the same config: their curves are labelled by directory name")
        for i in twins:
            suffix = f" ({runs[i].path.name})" if len(twins) > 1 else ""
            series.append(Series(labels[i] + suffix, (runs[i],)))
    return series


# --------------------------------------------------------------------------------------------------------------
# What is plotted


@dataclass(frozen=True)
class Metric:
    """A per-round key: the panel title, the y-label, its baseline key and how its axis is scaled."""

    key: str
    title: str
    ylabel: str
    baseline: str | None = None
    scale: str = "linear"  # "share" (accuracy-like, in [0, 1]), "log" or "linear"


_GLOBAL = "global model on the held-out test set"
GLOBAL_ACCURACY = Metric("global_accuracy", _GLOBAL, "accuracy", "majority_share", "share")
GLOBAL_EXACT_MATCH = Metric("global_exact_match", _GLOBAL, "exact match", None, "share")
LOCAL_ACCURACY = Metric(
    "local_accuracy",
    "each client's own adapter on its own test split\n(mean over the round's clients)",
    "accuracy",
    "local_majority_share",
    "share",
)
GLOBAL_LOSS = Metric("global_loss", _GLOBAL, "loss: mean cross-entropy (nats)")
TRAIN_LOSS = Metric("train_loss", "clients' training loss\n(mean over clients and local steps)", "loss (nats)")
DIVERGENCE_METRIC = Metric(
    "divergence",
    f"aggregation error per round\n{IDEAL};\nΔW: the aggregated update",
    f"divergence {DIVERGENCE}",
    scale="log",
)
_BASELINE_NAMES = {
    "majority_share": "majority class of the test set",
    "local_majority_share": "majority class of each client's split (mean)",
}


def _score(runs: Sequence[Run]) -> Metric:
    """Accuracy when the runs record it, else exact match (causal LMs)."""
    for metric in (GLOBAL_ACCURACY, GLOBAL_EXACT_MATCH):
        if any(r.per_round(metric.key) for r in runs):
            return metric
    raise NoData("no run records global_accuracy or global_exact_match")


# --------------------------------------------------------------------------------------------------------------
# Figures


def accuracy_figure(sel: Selection) -> Any:
    """Global accuracy (or exact match) and mean local accuracy per round, with their majority-class baselines."""
    return _rounds_figure(sel, [GLOBAL_ACCURACY, GLOBAL_EXACT_MATCH, LOCAL_ACCURACY])


def loss_figure(sel: Selection) -> Any:
    """The global model's test loss and the clients' training loss per round."""
    return _rounds_figure(sel, [GLOBAL_LOSS, TRAIN_LOSS])


def divergence_figure(sel: Selection) -> Any:
    """The aggregation error against the ideal update per round, log scale (exact methods at the floor)."""
    return _rounds_figure(sel, [DIVERGENCE_METRIC])


def task_accuracy_figure(sel: Selection) -> Any:
    """A multi-task federation's accuracy per task and round: the global model on the task's held-out test examples
    (top row) and each client's own adapter on its own examples of the task (bottom row), one column per task."""
    tasks = list(dict.fromkeys(t for run in sel.runs for r in run.records for t in recorded_tasks(r)))
    if not tasks:
        raise NoData("no run records a per-task accuracy (a multi-task federation, data.tasks)")
    local = "each client's own adapter on its own examples\n(mean over the round's clients holding the task)"
    rows = [
        [Metric(f"global_accuracy_{t}", f"{t}: {_GLOBAL}", "accuracy", scale="share") for t in tasks],
        [Metric(f"local_accuracy_{t}", f"{t}: {local}", "accuracy", scale="share") for t in tasks],
    ]
    fig, axes = _figure(2, len(tasks), width=5.2, height=4.2)
    for row_axes, metrics in zip(axes, rows, strict=True):
        for ax, metric in zip(row_axes, metrics, strict=True):
            _rounds_panel(ax, sel.series, metric)
    _legend(fig)
    return fig


def _rounds_figure(sel: Selection, metrics: Sequence[Metric]) -> Any:
    shown = [m for m in metrics if any(s.curve(m.key).x.size for s in sel.series)]
    if not shown:
        raise NoData(f"no run records {' or '.join(m.key for m in metrics)}")
    fig, axes = _figure(1, len(shown), width=5.2, height=4.2)
    for ax, metric in zip(axes[0], shown, strict=True):
        _rounds_panel(ax, sel.series, metric)
    _legend(fig)
    return fig


def _rounds_panel(ax: Any, series: Sequence[Series], metric: Metric) -> None:
    values: list[float] = []
    for color, s in zip(_colors(len(series)), series, strict=True):
        curve = s.curve(metric.key)
        values += _draw(ax, curve, color, s.label, floor=metric.scale == "log")
    values += _baselines(ax, series, metric.baseline)
    ax.set(title=metric.title, xlabel="round", ylabel=metric.ylabel)
    _integer_ticks(ax.xaxis)
    _scale(ax, metric.scale, values)


def _draw(ax: Any, curve: Curve, color: Any, label: str, floor: bool = False) -> list[float]:
    """A curve with markers, and its ± std band; returns every y drawn (for the axis limits)."""
    if not curve.x.size:
        return []
    low_end = LOG_FLOOR if floor else -np.inf
    mean = np.maximum(curve.mean, low_end)
    ax.plot(curve.x, mean, marker="o", markersize=3, color=color, label=label)
    if curve.std is None:
        return list(mean)
    low, high = np.maximum(curve.mean - curve.std, low_end), np.maximum(curve.mean + curve.std, low_end)
    ax.fill_between(curve.x, low, high, color=color, alpha=0.2, linewidth=0)
    return [*low, *high]


def _baselines(ax: Any, series: Sequence[Series], key: str | None) -> list[float]:
    """The baseline ``key`` as a dashed line: one black line when every series has the same value, else one line
    per series in its colour. A series' value is the mean over its runs (seeds split the test set differently)."""
    values = [s.baseline(key) for s in series]
    found = [(color, v) for color, v in zip(_colors(len(series)), values, strict=True) if v is not None]
    if key is None or not found:
        return []
    name = _BASELINE_NAMES[key]
    if len(found) == len(series) and len({round(v, 6) for _, v in found}) == 1:
        per_run = {round(v, 6) for s in series for r in s.runs if (v := r.final(key)) is not None}
        name += ", mean over runs" if len(per_run) > 1 else ""
        found = [("black", found[0][1])]
    for color, value in found:
        ax.axhline(value, color=color, linestyle="--", linewidth=1, label=f"{name} ({value:.4f})")
    return [v for _, v in found]


def _scale(ax: Any, scale: str, values: Sequence[float]) -> None:
    if scale == "log":
        ax.set_yscale("log")
        if min(values, default=1.0) <= LOG_FLOOR:
            ax.axhline(LOG_FLOOR, color="grey", linestyle=":", linewidth=1, label=f"0 (exact), drawn at {LOG_FLOOR:g}")
    elif scale == "share" and values:
        ax.set_ylim(*share_limits(values))


def share_limits(values: Sequence[float]) -> tuple[float, float]:
    """y-limits of an accuracy axis: every value (curves, bands, baselines) inside, a span of at least
    :data:`MIN_SHARE_SPAN`, within [0, 1], plus a 5 % margin."""
    low, high = min(values), max(values)
    if high - low < MIN_SHARE_SPAN:
        centre = (low + high) / 2
        low, high = centre - MIN_SHARE_SPAN / 2, centre + MIN_SHARE_SPAN / 2
        low, high = (0.0, MIN_SHARE_SPAN) if low < 0 else (1 - MIN_SHARE_SPAN, 1.0) if high > 1 else (low, high)
    margin = 0.05 * (high - low)
    return max(0.0, low - margin), min(1.0, high + margin)


def local_global_gap_figure(sel: Selection) -> Any:
    """Per series: local accuracy and the global model's accuracy on the same clients' splits, gap shaded."""
    pairs = [(s, s.curve("local_accuracy"), s.curve("global_accuracy_on_local")) for s in sel.series]
    pairs = [(s, local, glob) for s, local, glob in pairs if local.x.size and glob.x.size]
    if not pairs:
        raise NoData("no run records both local_accuracy and global_accuracy_on_local")
    columns = min(4, len(pairs))
    fig, axes = _figure(math.ceil(len(pairs) / columns), columns, width=4.2, height=3.4, sharey=True)
    values: list[float] = []
    for ax, (s, local, glob) in zip(axes.flat, pairs, strict=False):
        values += _gap_panel(ax, s.mean_label, local, glob)
    for ax in axes.flat[len(pairs) :]:
        ax.set_visible(False)
    axes.flat[0].set_ylim(*share_limits(values))
    fig.suptitle("local accuracy (each client's own adapter) vs the global model, on the clients' own test splits")
    _legend(fig)
    return fig


def _gap_panel(ax: Any, title: str, local: Curve, glob: Curve) -> list[float]:
    rounds = np.intersect1d(local.x, glob.x)
    lo, gl = local.mean[np.isin(local.x, rounds)], glob.mean[np.isin(glob.x, rounds)]
    ax.plot(rounds, lo, marker="o", markersize=3, color="tab:blue", label="local accuracy (own adapter)")
    ax.plot(rounds, gl, marker="o", markersize=3, color="tab:orange", label="global model on the same splits")
    ax.fill_between(rounds, gl, lo, color="tab:blue", alpha=0.15, linewidth=0, label="gap = local − global")
    ax.set(title=_wrapped(title, 4.2), xlabel="round", ylabel="accuracy")
    _integer_ticks(ax.xaxis)
    return [*lo, *gl]


def divergence_heatmap_figure(sel: Selection) -> Any:
    """Per series, the divergence of every adapted module per round, on one colour scale shared by all panels."""
    grids = [(s, *_module_grid(s)) for s in sel.series]
    grids = [g for g in grids if g[2].size]
    if not grids:
        raise NoData("no run records divergence_per_module")
    modules = list(dict.fromkeys(m for _, names, _, _ in grids for m in names))
    labels, pattern = module_labels(modules)
    vmax = max(float(np.nanmax(grid)) for _, _, grid, _ in grids) or 1.0
    height = 0.9 + 0.16 * len(modules)
    fig, axes = _figure(len(grids), 1, width=9, height=height, sharex=False)
    for ax, (s, names, grid, rounds) in zip(axes[:, 0], grids, strict=True):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(names)), [labels[modules.index(m)] for m in names], fontsize=7)
        ax.set_xticks(range(len(rounds)), [str(int(n)) for n in rounds])
        ax.set(title=_wrapped(s.mean_label, 9), xlabel="round")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label=f"divergence of module m: {DIVERGENCE.replace('M', 'M_m')}")
    ideal = IDEAL.replace("\n", " ")
    about = f"M_m: module m's part of {ideal}; ΔW_m: its aggregate"
    fig.suptitle(f"per-module divergence\n{_wrapped(about, 9)}{pattern}", fontsize=10)
    return fig


def _module_grid(s: Series) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(modules, grid[module, round] averaged over the series' runs, rounds) over the rounds every run has."""
    per_run = [
        {int(r["round"]): r["divergence_per_module"] for r in run.records if r.get("divergence_per_module")}
        for run in s.runs
    ]
    rounds = sorted(set.intersection(*(set(p) for p in per_run)))
    if not rounds:
        return [], np.empty((0, 0)), np.empty(0)
    modules = list(per_run[0][rounds[0]])
    grid = np.mean([[[p[n].get(m, np.nan) for n in rounds] for m in modules] for p in per_run], axis=0)
    return modules, np.asarray(grid, dtype=float), np.array(rounds)


def module_labels(modules: Sequence[str]) -> tuple[list[str], str]:
    """Short module names (the dotted parts that vary, a number with the name before it: ``layer 0 query``) and
    the pattern they fill, e.g. ``\\nmodules m = bert.encoder.layer.*.attention.self.*`` ("" when kept whole)."""
    parts = [m.split(".") for m in modules]
    if len(modules) < 2 or len({len(p) for p in parts}) != 1:
        return list(modules), ""
    varying = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    fixed = parts[0]

    def named(p: list[str], i: int) -> str:  # a number keeps the fixed name before it: "layer 0"
        return f"{fixed[i - 1]} {p[i]}" if p[i].isdigit() and i > 0 and i - 1 not in varying else p[i]

    labels = [" ".join(named(p, i) for i in varying) for p in parts]
    pattern = ".".join("*" if i in varying else part for i, part in enumerate(fixed))
    return labels, f"\nmodules m = {pattern}"


def accuracy_vs_bytes_figure(sel: Selection) -> Any:
    """Global accuracy (or exact match) against the cumulative bytes sent up and down."""
    score = _score(sel.runs)
    fig, axes = _figure(1, 1, width=6.5, height=4.4)
    ax = axes[0][0]
    values: list[float] = []
    for color, s in zip(_colors(len(sel.series)), sel.series, strict=True):
        values += _draw(ax, _score_vs_mb(s, score.key), color, s.label)
    values += _baselines(ax, sel.series, score.baseline)
    ax.set(title=f"{_GLOBAL}, against communication", xlabel="cumulative MB sent, up + down (10⁶ bytes)")
    ax.set_ylabel(score.ylabel)
    _scale(ax, score.scale, values)
    _legend(fig)
    return fig


def _score_vs_mb(s: Series, key: str) -> Curve:
    per_round = _aligned([r.per_round(key) for r in s.runs])
    megabytes = _aligned([r.cumulative_mb() for r in s.runs])
    x = megabytes.mean[np.isin(megabytes.x, per_round.x)]
    return Curve(x, per_round.mean, per_round.std)


def accuracy_vs_alpha_figure(sel: Selection) -> Any:
    """Final global accuracy (or exact match) against the Dirichlet α, one line per method (runs that differ
    in other keys too get their own line), one panel per dataset; mean ± std over seeds."""
    score = _score(sel.runs)
    ylabel = f"final {score.ylabel} ({_GLOBAL})"
    return _alpha_figure(sel.runs, lambda r: r.final(score.key), ylabel, score.baseline, log=False)


def divergence_vs_alpha_figure(sel: Selection) -> Any:
    """Mean divergence over the rounds against the Dirichlet α, one line per method, one panel per dataset."""
    ylabel = f"divergence {DIVERGENCE}, mean over rounds"
    return _alpha_figure(sel.runs, lambda r: r.mean("divergence"), ylabel, None, log=True)


def _alpha_figure(runs: Sequence[Run], value: Callable[[Run], float | None], ylabel: str, baseline, log: bool):
    dirichlet = [r for r in runs if r.config.get("data.partition", "dirichlet") == "dirichlet"]
    dirichlet = [r for r in dirichlet if _is_number(r.config.get("data.alpha")) and value(r) is not None]
    alphas = sorted({float(r.config["data.alpha"]) for r in dirichlet})
    if len(alphas) < 2:
        raise NoData(f"the Dirichlet runs with data span {len(alphas)} value(s) of data.alpha; at least 2 are needed")
    panels: dict[str, list[Run]] = {}
    for run in dirichlet:
        panels.setdefault(_show(run.config.get("data.dataset", "")), []).append(run)
    fig, axes = _figure(1, len(panels), width=5.2, height=4.2)
    for ax, (dataset, members) in zip(axes[0], panels.items(), strict=True):
        _alpha_panel(ax, members, value, baseline, log)
        ax.set(title=f"{dataset}: after the last round", xlabel="Dirichlet α (data.alpha; smaller = more skewed)")
        ax.set_ylabel(ylabel)
    _legend(fig)
    return fig


def _alpha_panel(ax: Any, runs: Sequence[Run], value: Callable[[Run], float | None], baseline, log: bool) -> None:
    lines: dict[str, list[Run]] = {}
    for label, run in zip(describe(runs, ignore=["data.alpha", "seed", "data.dataset"]), runs, strict=True):
        lines.setdefault(label, []).append(run)
    drawn: list[float] = []
    for color, (label, members) in zip(_colors(len(lines)), lines.items(), strict=True):
        by_alpha: dict[float, list[float]] = {}
        for run in members:
            by_alpha.setdefault(float(run.config["data.alpha"]), []).append(value(run))
        x = sorted(by_alpha)
        mean = np.array([np.mean(by_alpha[a]) for a in x])
        std = np.array([np.std(by_alpha[a], ddof=1) if len(by_alpha[a]) > 1 else 0.0 for a in x])
        centre, low, high = (np.maximum(v, LOG_FLOOR if log else -np.inf) for v in (mean, mean - std, mean + std))
        seeds = max(map(len, by_alpha.values()))
        shown = label + (f" (mean ± std, {seeds} seeds)" if seeds > 1 else "")
        yerr = [centre - low, high - centre] if seeds > 1 else None
        ax.errorbar(x, centre, yerr=yerr, marker="o", capsize=3, color=color, label=shown)
        drawn += [*low, *high]
    alphas = sorted({float(r.config["data.alpha"]) for r in runs})
    ax.set_xscale("log")
    ax.set_xticks(alphas, [f"{a:g}" for a in alphas])
    ax.minorticks_off()
    drawn += _baselines(ax, [Series("", tuple(runs))], baseline)
    _scale(ax, "log" if log else "share", drawn)


# --------------------------------------------------------------------------------------------------------------
# Layout


def _figure(rows: int, columns: int, width: float, height: float, **kwargs: Any) -> tuple[Any, np.ndarray]:
    """A Figure (no pyplot: nothing global changes) with a rows × columns grid of axes, always 2-D."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * columns, height * rows), layout="constrained", dpi=DPI)
    axes = fig.subplots(rows, columns, squeeze=False, **kwargs)
    return fig, axes


def _legend(fig: Any) -> None:
    """One legend for the figure, below the panels, from every labelled artist of its axes (no duplicates), in
    as many columns as its longest entry allows, entries wider than the figure wrapped at spaces; the figure grows
    by the legend's height."""
    entries: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    width = int(fig.get_figwidth() * 14)  # characters of legend text across the figure
    labels = [textwrap.fill(label, width - 6, break_long_words=False) for label in entries]
    longest = max((len(line) for label in labels for line in label.splitlines()), default=1)
    columns = max(1, min(len(labels), width // (longest + 6)))
    lines = max((label.count("\n") + 1 for label in labels), default=1)
    fig.set_figheight(fig.get_figheight() + 0.25 * lines * math.ceil(len(labels) / columns))
    fig.legend(list(entries.values()), labels, loc="outside lower center", ncols=columns, fontsize=8)


def _wrapped(text: str, inches: float) -> str:
    """``text`` broken at spaces to fit a title ``inches`` wide."""
    return textwrap.fill(text, max(20, int(inches * 12)), break_long_words=False)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


# --------------------------------------------------------------------------------------------------------------
# Public API


FIGURES: dict[str, Callable[[Selection], Any]] = {
    "accuracy": accuracy_figure,
    "task_accuracy": task_accuracy_figure,
    "local_global_gap": local_global_gap_figure,
    "loss": loss_figure,
    "divergence": divergence_figure,
    "divergence_heatmap": divergence_heatmap_figure,
    "accuracy_vs_bytes": accuracy_vs_bytes_figure,
    "accuracy_vs_alpha": accuracy_vs_alpha_figure,
    "divergence_vs_alpha": divergence_vs_alpha_figure,
}
"""name -> builder; ``fedlora plot`` writes ``<name>.png`` for each one that has data."""


@dataclass
class Plotted:
    """What :func:`plot_runs` did: the files written, the figures skipped (name -> why) and the warnings."""

    written: list[Path]
    skipped: dict[str, str]
    warnings: list[str]


def figure_names(only: str | None) -> list[str]:
    """The figures named in a comma-separated list (None: all); an unknown name is a ValueError."""
    if only is None:
        return list(FIGURES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    for name in names:
        if name not in FIGURES:
            raise ValueError(f"unknown figure {name!r}: expected one of {', '.join(FIGURES)}")
    return names


def figures(run_dirs: Sequence[Path], names: Sequence[str] | None = None) -> tuple[dict[str, Any], Plotted]:
    """The figures of ``run_dirs`` (name -> matplotlib Figure) and a :class:`Plotted` with nothing written yet."""
    from matplotlib import rc_context

    sel = select([read_run(d) for d in run_dirs])
    drawn, skipped = {}, {}
    with rc_context(_STYLE):
        for name in names or FIGURES:
            try:
                drawn[name] = FIGURES[name](sel)
            except NoData as e:
                skipped[name] = str(e)
    return drawn, Plotted([], skipped, sel.warnings)


def plot_runs(run_dirs: Sequence[Path], out: Path, names: Sequence[str] | None = None) -> Plotted:
    """Write ``<name>.png`` into ``out`` for every figure of ``run_dirs`` that has data."""
    drawn, plotted = figures(run_dirs, names)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in drawn.items():
        fig.savefig(out / f"{name}.png")
        plotted.written.append(out / f"{name}.png")
    return plotted


def markdown_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per run of the reported numbers (``summary.json``), as a markdown table: the accuracies with their
    majority-class baselines beside them (global: the test set's; local: the mean of the clients' own splits), the
    round of the best global accuracy, the local-global gap, divergence, bytes and wall time. Causal-LM runs
    (no accuracy): :func:`nll_table`."""
    if all("final_global_accuracy" not in s for s in summaries.values()):
        return nll_table(summaries)
    head = (
        "| method | final global acc | majority class | best global acc (round) | mean local acc | final local acc "
        "| local majority | local-global gap | mean divergence | final divergence | MB up | MB down | seconds |\n"
        + "|---" * 13
        + "|\n"
    )
    return head + "\n".join(_table_row(name, s) for name, s in summaries.items()) + "\n"


def nll_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Causal-LM runs as a markdown table: the final and best global NLL (per response token), the local NLL, the
    local-global gap (in NLL: global minus local), the final global exact match or pass@1 with its standard error,
    divergence, bytes and wall time."""
    generated = [m for m in ("exact_match", "pass_at_1") if any(f"final_global_{m}" in s for s in summaries.values())]
    head = (
        "| method | final global NLL | best global NLL (round) | mean local NLL | final local NLL | local-global gap "
        + "".join(f"| final global {m.replace('_', ' ')} (± se) " for m in generated)
        + "| mean divergence | final divergence | MB up | MB down | seconds |\n"
        + "|---" * (11 + len(generated))
        + "|\n"
    )
    rows = []
    for name, s in summaries.items():
        num = _formatter(s)
        best = num("best_global_loss") + (f" ({s['best_round']})" if "best_round" in s else "")
        cells = [num("final_global_loss"), best, num("mean_local_loss"), num("final_local_loss")]
        cells += [num("final_local_global_gap", "+.4f")]
        cells += [f"{num(f'final_global_{m}')} ± {num(f'final_global_{m}_se')}" for m in generated]
        cells += [num("mean_divergence", ".3g"), num("final_divergence", ".3g")]
        cells += [f"{s['total_bytes_up'] / 1e6:.2f}", f"{s['total_bytes_down'] / 1e6:.2f}", num("wall_seconds", ".0f")]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def _formatter(s: Mapping[str, Any]) -> Callable[..., str]:
    """``num(key, fmt)``: the summary value formatted, or – when missing."""

    def num(key: str, fmt: str = ".4f") -> str:
        value = s.get(key)
        return "–" if value is None else format(value, fmt)

    return num


def _table_row(name: str, s: Mapping[str, Any]) -> str:
    num = _formatter(s)

    best = num("best_global_accuracy") + (f" ({s['best_round']})" if "best_round" in s else "")
    cells = [
        num("final_global_accuracy"),
        num("majority_share"),
        best,
        num("mean_local_accuracy"),
        num("final_local_accuracy"),
        num("local_majority_share"),
        num("final_local_global_gap", "+.4f"),
        num("mean_divergence", ".3g"),
        num("final_divergence", ".3g"),
        f"{s['total_bytes_up'] / 1e6:.2f}",
        f"{s['total_bytes_down'] / 1e6:.2f}",
        num("wall_seconds", ".0f"),
    ]
    return f"| {name} | " + " | ".join(cells) + " |"
