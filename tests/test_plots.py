"""fedlora.plots and `fedlora plot` on synthetic run directories with known numbers: labels, line counts, integer
round ticks, baselines, axis limits, seed means and the figures that need several α."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedlora import plots
from fedlora.cli import app

MODULES = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


def write_run(
    path: Path,
    method: str = "fedit",
    seed: int = 0,
    alpha: float = 0.5,
    lr: float = 5e-4,
    dataset: str = "fedlora:rotten-tomatoes",
    accuracy: list[float | None] | None = None,
    **fields: list | float,
) -> Path:
    """A run directory: config.toml with the given keys; metrics.jsonl with one record per accuracy value (None: an
    unevaluated round). Other record keys come from ``fields``: a list (one value per round) or a constant."""
    accuracy = [0.50, 0.55, 0.60] if accuracy is None else accuracy
    path.mkdir(parents=True)
    path.joinpath("config.toml").write_text(
        f'seed = {seed}\n\n[data]\ndataset = "{dataset}"\npartition = "dirichlet"\nalpha = {alpha}\n\n'
        f'[federation]\nmethod = "{method}"\n\n[train]\nlr = {lr}\n\n[output]\ndir = "{path}"\n'
    )
    records = []
    for i, acc in enumerate(accuracy):
        record = {"round": i + 1, "global_accuracy": acc, "bytes_up": 1_000_000, "bytes_down": 2_000_000}
        record.update({k: (v[i] if isinstance(v, list) else v) for k, v in fields.items()})
        records.append(record)
    path.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def curves(ax) -> dict[str, tuple[list[float], list[float]]]:
    """{label: (x, y)} of the axes' data lines (baselines and reference lines left out)."""
    lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in lines}


def errorbars(ax) -> dict[str, tuple[list[float], list[float]]]:
    """{label: (x, y)} of the axes' error-bar series."""
    return {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in ax.containers}


def dashed(ax) -> dict[str, float]:
    """{label: y} of the horizontal dashed baselines."""
    return {ln.get_label(): ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"}


def draw(run_dirs, names=None):
    figs, plotted = plots.figures(run_dirs, names)
    for fig in figs.values():
        fig.draw_without_rendering()  # ticks and limits as they will be saved
    return figs, plotted


def test_one_curve_per_run_labelled_by_what_differs(tmp_path):
    runs = [
        write_run(tmp_path / "a", alpha=0.1, accuracy=[0.5, 0.6, 0.7]),
        write_run(tmp_path / "b", alpha=0.5, accuracy=[0.4, 0.5, 0.6]),
        write_run(tmp_path / "c", alpha=0.5, lr=1e-3, accuracy=[0.3, 0.4, 0.5]),
    ]
    figs, plotted = draw(runs, ["accuracy"])
    glob = figs["accuracy"].axes[0]
    assert curves(glob) == {
        "α=0.1, lr=0.0005": ([1, 2, 3], [0.5, 0.6, 0.7]),
        "α=0.5, lr=0.0005": ([1, 2, 3], [0.4, 0.5, 0.6]),
        "α=0.5, lr=0.001": ([1, 2, 3], [0.3, 0.4, 0.5]),
    }
    assert glob.get_title() == "global model on the held-out test set"
    assert (glob.get_xlabel(), glob.get_ylabel()) == ("round", "accuracy")
    assert plotted.warnings == []
    assert set(plotted.skipped) == set()  # only "accuracy" was asked for and it has data


def test_methods_are_labelled_by_name_and_dataset_without_prefix(tmp_path):
    runs = [write_run(tmp_path / "x", "flora_na"), write_run(tmp_path / "y", "fedit", dataset="fedlora:bbc-news")]
    figs, _ = draw(runs, ["accuracy"])
    assert set(curves(figs["accuracy"].axes[0])) == {"flora_na, rotten-tomatoes", "fedit, bbc-news"}


def test_identical_configs_are_labelled_by_directory_with_a_warning(tmp_path):
    runs = [write_run(tmp_path / "first"), write_run(tmp_path / "second", accuracy=[0.1, 0.2, 0.3])]
    figs, plotted = draw(runs, ["accuracy"])
    assert set(curves(figs["accuracy"].axes[0])) == {"fedit (first)", "fedit (second)"}
    assert len(plotted.warnings) == 1
    assert str(runs[0]) in plotted.warnings[0] and str(runs[1]) in plotted.warnings[0]


def record_keys(run: Path, toml: str) -> Path:
    """Add config tables to a run, as a newer fedlora version records options an older one lacked."""
    run.joinpath("config.toml").write_text(run.joinpath("config.toml").read_text() + "\n" + toml)
    return run


def test_keys_only_newer_runs_record_are_not_differences(tmp_path):
    old = write_run(tmp_path / "old", "fedit")
    new = record_keys(write_run(tmp_path / "new", "flora_na"), '[privacy]\nclip = 1.0\n\n[model.extra]\nmode = "x"\n')
    figs, plotted = draw([old, new], ["accuracy"])
    assert set(curves(figs["accuracy"].axes[0])) == {"fedit", "flora_na"}
    (warning,) = plotted.warnings
    assert "2 config key(s)" in warning and "privacy.clip" in warning and "model.extra.mode" in warning


def test_a_key_newer_runs_set_differently_is_still_a_difference(tmp_path):
    runs = [
        write_run(tmp_path / "old", "fedit"),
        record_keys(write_run(tmp_path / "a", "fedit"), "[privacy]\nclip = 1.0\n"),
        record_keys(write_run(tmp_path / "b", "fedit"), "[privacy]\nclip = 2.0\n"),
    ]
    figs, plotted = draw(runs, ["accuracy"])
    assert set(curves(figs["accuracy"].axes[0])) == {"fedit", "clip=1", "clip=2"}
    assert plotted.warnings == []


def test_seeds_from_different_versions_still_average(tmp_path):
    runs = [
        write_run(tmp_path / "s0", seed=0),
        record_keys(write_run(tmp_path / "s1", seed=1), "[privacy]\nclip = 1.0\n"),
    ]
    figs, _ = draw(runs, ["accuracy"])
    assert set(curves(figs["accuracy"].axes[0])) == {"fedit (mean ± std, 2 seeds)"}


def test_long_labels_wrap_inside_the_figure(tmp_path):
    tables = [f"[k{i}]\nsetting_with_a_long_name = {{v}}\n" for i in range(12)]
    runs = [record_keys(write_run(tmp_path / f"r{v}"), "\n".join(t.format(v=v) for t in tables)) for v in (1, 2)]
    figs, _ = draw(runs, ["accuracy"])
    fig = figs["accuracy"]
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert any(len(t) > fig.get_figwidth() * 14 for t in (s.replace("\n", " ") for s in texts))  # needed wrapping
    assert all(len(line) <= fig.get_figwidth() * 14 for t in texts for line in t.splitlines())
    box, frame = legend.get_window_extent(), fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0


def test_seeds_of_one_config_become_mean_and_std(tmp_path):
    values = [[0.50, 0.60], [0.54, 0.70], [0.58, 0.65]]
    runs = [write_run(tmp_path / f"s{s}", seed=s, accuracy=v) for s, v in enumerate(values)]
    runs.append(write_run(tmp_path / "other", "flora", accuracy=[0.3, 0.4]))
    figs, _ = draw(runs, ["accuracy"])
    ax = figs["accuracy"].axes[0]
    lines = curves(ax)
    assert set(lines) == {"fedit (mean ± std, 3 seeds)", "flora, seed=0"}
    mean, std = np.mean(values, axis=0), np.std(values, axis=0, ddof=1)
    assert np.allclose(lines["fedit (mean ± std, 3 seeds)"][1], mean)
    (band,) = ax.collections  # only the averaged series has a band
    low_high = band.get_paths()[0].vertices[:, 1]
    assert np.isclose(low_high.min(), (mean - std).min()) and np.isclose(low_high.max(), (mean + std).max())


def test_round_ticks_are_integers_and_skipped_rounds_are_left_out(tmp_path):
    run = write_run(tmp_path / "r", accuracy=[None, 0.55, None, 0.6, 0.62], local_accuracy=[None, 0.7, None, 0.8, 0.8])
    figs, _ = draw([run], ["accuracy", "divergence"])
    for ax in figs["accuracy"].axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    assert curves(figs["accuracy"].axes[0])["fedit"][0] == [2, 4, 5]
    assert curves(figs["accuracy"].axes[1])["fedit"] == ([2, 4, 5], [0.7, 0.8, 0.8])


def test_majority_baseline_is_drawn_and_flat_accuracy_is_not_zoomed(tmp_path):
    run = write_run(tmp_path / "r", accuracy=[0.5804, 0.5765, 0.5765], majority_share=0.5765)
    figs, _ = draw([run], ["accuracy"])
    ax = figs["accuracy"].axes[0]
    assert dashed(ax) == {"majority class of the test set (0.5765)": 0.5765}
    centre = (0.5804 + 0.5765) / 2  # a span of 0.1 around the data, plus 5 %
    assert ax.get_ylim() == pytest.approx((centre - 0.055, centre + 0.055))


def test_accuracy_axis_includes_a_distant_baseline(tmp_path):
    run = write_run(tmp_path / "r", accuracy=[0.80, 0.82, 0.85], majority_share=0.25)
    figs, _ = draw([run], ["accuracy"])
    low, high = figs["accuracy"].axes[0].get_ylim()
    assert low < 0.25 and high > 0.85


def test_share_limits():
    assert plots.share_limits([0.5, 0.5]) == pytest.approx((0.445, 0.555))
    assert plots.share_limits([0.99, 1.0]) == pytest.approx((0.895, 1.0))
    assert plots.share_limits([0.2, 0.8]) == pytest.approx((0.17, 0.83))


def test_differing_baselines_are_drawn_per_series(tmp_path):
    runs = [
        write_run(tmp_path / "rt", majority_share=0.5765),
        write_run(tmp_path / "bbc", dataset="fedlora:bbc-news", majority_share=0.2315),
    ]
    figs, _ = draw(runs, ["accuracy"])
    assert sorted(dashed(figs["accuracy"].axes[0]).values()) == [0.2315, 0.5765]


def test_divergence_is_defined_and_exact_zeros_sit_on_a_labelled_floor(tmp_path):
    runs = [
        write_run(tmp_path / "a", "fedit", divergence=[0.1, 0.05, 0.02]),
        write_run(tmp_path / "b", "flora", divergence=[0.0, 0.0, 0.0]),
    ]
    figs, _ = draw(runs, ["divergence"])
    ax = figs["divergence"].axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_ylabel() == "divergence ‖M − ΔW‖_F / ‖M‖_F"
    assert "M = Σ_u w_u B̃_u A_u" in ax.get_title() and "ΔW:" in ax.get_title()
    assert curves(ax)["flora"][1] == [plots.LOG_FLOOR] * 3
    floor = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert [ln.get_label() for ln in floor] == ["0 (exact), drawn at 1e-10"]


def test_heatmaps_share_one_labelled_colour_scale(tmp_path):
    low = {m: 0.01 * (i + 1) for i, m in enumerate(MODULES)}
    high = {m: 0.2 * (i + 1) for i, m in enumerate(MODULES)}
    runs = [
        write_run(tmp_path / "a", "fedit", divergence_per_module=[low, low, low]),
        write_run(tmp_path / "b", "flora_na", divergence_per_module=[high, high, high]),
    ]
    figs, _ = draw(runs, ["divergence_heatmap"])
    fig = figs["divergence_heatmap"]
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2
    assert {im.get_clim() for im in images} == {(0.0, 0.8)}
    colorbars = [ax for ax in fig.axes if ax.get_ylabel().startswith("divergence of module m")]
    assert len(colorbars) == 1
    panel = fig.axes[0]
    assert [t.get_text() for t in panel.get_yticklabels()] == [
        "layer 0 query",
        "layer 0 value",
        "layer 1 query",
        "layer 1 value",
    ]
    assert [t.get_text() for t in panel.get_xticklabels()] == ["1", "2", "3"]
    assert "bert.encoder.layer.*.attention.self.*" in fig.get_suptitle()


def test_module_labels_keep_whole_names_when_shapes_differ():
    assert plots.module_labels(["h.0.attn.c_attn", "transformer.h.1.attn.c_attn"])[0] == [
        "h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]


def test_local_global_gap_is_shaded_per_series(tmp_path):
    runs = [
        write_run(tmp_path / "a", "fedit", local_accuracy=[0.7, 0.8, 0.9], global_accuracy_on_local=[0.6, 0.6, 0.7]),
        write_run(tmp_path / "b", "flora", local_accuracy=[0.7, 0.7, 0.7], global_accuracy_on_local=[0.7, 0.6, 0.5]),
    ]
    figs, _ = draw(runs, ["local_global_gap"])
    panels = [ax for ax in figs["local_global_gap"].axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["fedit", "flora"]
    assert curves(panels[0]) == {
        "local accuracy (own adapter)": ([1, 2, 3], [0.7, 0.8, 0.9]),
        "global model on the same splits": ([1, 2, 3], [0.6, 0.6, 0.7]),
    }
    assert [c.get_label() for c in panels[1].collections] == ["gap = local − global"]


def test_task_accuracy_has_a_global_and_a_local_panel_per_task(tmp_path):
    tasks = {
        "global_loss_rt": 0.6,
        "global_accuracy_rt": [0.6, None, 0.8],
        "local_accuracy_rt": [0.7, None, 0.9],
        "global_loss_bbc": 1.0,
        "global_accuracy_bbc": [0.3, None, 0.5],
        "local_accuracy_bbc": [None, None, 0.4],  # no client held test examples of the task in round 1
        "global_accuracy_on_local": 0.7,  # not a task
    }
    runs = [write_run(tmp_path / "a", "fedit", **tasks), write_run(tmp_path / "b", "fl_tac", **tasks)]
    figs, _ = draw(runs, ["task_accuracy"])
    panels = figs["task_accuracy"].axes
    assert [ax.get_title().split(":")[0] for ax in panels] == ["rt", "bbc", "rt", "bbc"]
    assert "global model" in panels[0].get_title() and "own adapter" in panels[2].get_title()
    assert curves(panels[1])["fl_tac"] == ([1, 3], [0.3, 0.5])
    assert curves(panels[3])["fedit"] == ([3], [0.4])


def test_no_task_accuracy_for_single_task_runs(tmp_path):
    _, plotted = draw([write_run(tmp_path / "a")], ["task_accuracy"])
    assert plotted.skipped == {
        "task_accuracy": "no run records a per-task accuracy (a multi-task federation, data.tasks)"
    }


def test_accuracy_against_cumulative_bytes(tmp_path):
    run = write_run(tmp_path / "r", accuracy=[0.5, None, 0.7])
    figs, _ = draw([run], ["accuracy_vs_bytes"])
    ax = figs["accuracy_vs_bytes"].axes[0]
    assert curves(ax) == {"fedit": ([3.0, 9.0], [0.5, 0.7])}  # 3 MB a round; round 2 was not evaluated
    assert ax.get_xlabel() == "cumulative MB sent, up + down (10⁶ bytes)"


def test_accuracy_and_divergence_against_alpha_per_method(tmp_path):
    runs = []
    for method in ("fedit", "flora_na"):
        for alpha in (0.1, 0.5):
            for seed in (0, 1):
                final = 0.3 + alpha + 0.1 * seed + (0.05 if method == "flora_na" else 0)
                path = tmp_path / f"{method}-{alpha}-{seed}"
                runs.append(write_run(path, method, seed, alpha, accuracy=[0.4, final], divergence=[alpha, 2 * alpha]))
    figs, plotted = draw(runs, ["accuracy_vs_alpha", "divergence_vs_alpha"])
    assert plotted.skipped == {}
    acc = figs["accuracy_vs_alpha"].axes[0]
    lines = errorbars(acc)
    assert set(lines) == {"fedit (mean ± std, 2 seeds)", "flora_na (mean ± std, 2 seeds)"}
    assert lines["fedit (mean ± std, 2 seeds)"][0] == [0.1, 0.5]
    assert np.allclose(lines["fedit (mean ± std, 2 seeds)"][1], [0.45, 0.85])
    assert np.allclose(lines["flora_na (mean ± std, 2 seeds)"][1], [0.50, 0.90])
    (bars,) = next(c for c in acc.containers if c.get_label().startswith("fedit")).lines[2]
    assert np.allclose([np.ptp(seg[:, 1]) for seg in bars.get_segments()], 2 * np.std([0.0, 0.1], ddof=1))
    assert acc.get_xscale() == "log" and [t.get_text() for t in acc.get_xticklabels()] == ["0.1", "0.5"]
    div = figs["divergence_vs_alpha"].axes[0]
    assert np.allclose(errorbars(div)["fedit (mean ± std, 2 seeds)"][1], [0.15, 0.75])  # mean over rounds of α, 2α


def test_figures_without_data_say_why(tmp_path):
    """A causal-LM run: loss, no accuracy; one α."""
    run = write_run(tmp_path / "lm", accuracy=[None, None], global_loss=[2.5, 2.1])
    figs, plotted = draw([run])
    assert set(figs) == {"loss"}
    assert curves(figs["loss"].axes[0]) == {"fedit": ([1, 2], [2.5, 2.1])}
    assert plotted.skipped["accuracy"] == "no run records global_accuracy or global_exact_match or local_accuracy"
    assert plotted.skipped["accuracy_vs_alpha"] == "no run records global_accuracy or global_exact_match"
    assert "span 0 value(s) of data.alpha" in plotted.skipped["divergence_vs_alpha"]
    assert plotted.skipped["divergence_heatmap"] == "no run records divergence_per_module"


def test_exact_match_replaces_accuracy_when_only_it_exists(tmp_path):
    run = write_run(tmp_path / "lm", accuracy=[None, None], global_exact_match=[0.1, 0.3])
    figs, _ = draw([run], ["accuracy", "accuracy_vs_bytes"])
    assert figs["accuracy"].axes[0].get_ylabel() == "exact match"
    assert curves(figs["accuracy_vs_bytes"].axes[0]) == {"fedit": ([3.0, 6.0], [0.1, 0.3])}


runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """The CLI's console is made at import with the width of the terminal then (80 under xdist): widen it so
    messages are not wrapped."""
    from fedlora import cli

    monkeypatch.setattr(cli.console, "width", 300)


def test_plot_command_writes_pngs_and_reports_skipped_figures(tmp_path):
    runs = [write_run(tmp_path / "a", divergence=[0.1, 0.2, 0.3]), write_run(tmp_path / "b", "flora")]
    out = tmp_path / "plots"
    res = runner.invoke(app, ["plot", str(runs[0]), str(runs[1]), "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "accuracy_vs_bytes.png", "divergence.png"]
    assert "divergence_heatmap: not drawn: no run records divergence_per_module" in res.output
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_command_refuses_unknown_figures_and_empty_requests(tmp_path):
    run = write_run(tmp_path / "a")
    res = runner.invoke(app, ["plot", str(run), "--only", "acuracy"], terminal_width=200)
    assert res.exit_code == 2 and "unknown figure 'acuracy': expected one of accuracy," in res.output
    res = runner.invoke(app, ["plot", str(run), "--only", "divergence_heatmap"], terminal_width=200)
    assert res.exit_code == 2 and "no figure to draw" in res.output
    assert not (run / "divergence_heatmap.png").exists()
    res = runner.invoke(app, ["plot", str(tmp_path / "missing")], terminal_width=200)
    assert res.exit_code == 2 and "metrics.jsonl does not exist" in res.output
