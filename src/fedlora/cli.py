"""The ``fedlora`` command line: run, compare, plot, aggregate, eval, predict, methods."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode="markdown", help="Federated fine-tuning with LoRA."
)
console = Console()
# run and compare take [CONFIG.toml] [key=value ...] as extra arguments (parsed by _split_config_args)
_EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _version(show: bool) -> None:
    if show:
        from fedlora import __version__

        console.print(f"fedlora {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Federated fine-tuning with LoRA."""


def _fail(message: str) -> NoReturn:
    """Print ``error: <message>`` (the message escaped, so rich never reads its brackets as markup) and exit 2."""
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # one line, never cropped
    raise typer.Exit(2)


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.toml] [key=value ...]``: the first argument is a config file unless it is an override."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


class RichProgress:
    """Rounds and clients as two progress bars, shown once the experiment is set up."""

    def __init__(self, progress: Progress, rounds: int) -> None:
        self.progress = progress
        self.total = rounds
        self.rounds: Any = None
        self.clients: Any = None

    def round_started(self, rnd: int, n_clients: int) -> None:
        if self.rounds is None:
            self.rounds = self.progress.add_task("rounds", total=self.total, completed=rnd - 1)
            self.clients = self.progress.add_task("clients", total=n_clients)
        self.progress.update(self.clients, completed=0, total=n_clients, description=f"round {rnd} clients")

    def client_done(self, client: int) -> None:
        self.progress.advance(self.clients)

    def round_done(self, rnd: int, record: dict[str, Any]) -> None:
        self.progress.advance(self.rounds)
        tail = f"divergence {record['divergence']:.3g}, {record['seconds']:.1f} s"
        if "global_accuracy" not in record:  # a causal LM: the NLL every round, generation in full evaluations
            self.progress.console.print(f"round {rnd}: {_causal_progress(record)}, {tail}")
            return
        if record["global_accuracy"] is None:
            self.progress.console.print(f"round {rnd}: not evaluated (eval.every), {tail}")
            return
        self.progress.console.print(f"round {rnd}: {classification_progress(record)}, {tail}")


def classification_progress(record: dict[str, Any]) -> str:
    """An evaluated classification round: global and local accuracy beside their majority-class shares, and in a
    multi-task federation each task's global accuracy."""
    from fedlora.plots import recorded_tasks

    tasks = recorded_tasks(record)
    shown = [f"{t} {record[f'global_accuracy_{t}']:.4f}" for t in tasks if record[f"global_accuracy_{t}"] is not None]
    per_task = f"; by task {', '.join(shown)}" if shown else ""
    return (
        f"global acc {record['global_accuracy']:.4f} (majority class {record['majority_share']:.4f}{per_task}), "
        f"local acc {record['local_accuracy']:.4f} (majority {record['local_majority_share']:.4f})"
    )


def _causal_progress(record: dict[str, Any]) -> str:
    """A causal LM's round: global and local NLL, and what generation measured when it ran."""
    text = f"global NLL {record['global_loss']:.4f}, local NLL {record['local_loss']:.4f}"
    for metric in GENERATION_METRICS:
        if record.get(f"global_{metric}") is not None:
            name = metric.replace("_", " ")
            text += f", global {name} {record[f'global_{metric}']:.4f} ± {record[f'global_{metric}_se']:.4f}"
    return text


GENERATION_METRICS = ("exact_match", "pass_at_1")


def _describe(cfg: Any) -> str:
    """One line naming what is about to run, so the console log says which experiment it shows."""
    f, d, m = cfg.federation, cfg.data, cfg.model
    partition = f"dirichlet α={d.alpha}" if d.partition == "dirichlet" else d.partition
    data = d.dataset if d.tasks is None else f"tasks {' + '.join(d.tasks)} (task α={d.task_alpha})"
    return (
        f"{f.method} on {data} ({d.num_clients} clients, {partition}), {m.name} with {m.lora.variant} "
        f"r={m.lora.r}, {f.rounds} rounds, {m.precision} precision, engine {f.engine}, seed {cfg.seed}"
    )


def _execute(cfg: Any, run_dir: Path | None, resume: bool) -> tuple[Path, dict[str, Any]]:
    from fedlora import config, engines

    console.print(("resuming " if resume else "") + _describe(cfg), markup=False, soft_wrap=True)  # user text
    if warning := config.emulated_bf16_warning(cfg.model.precision):
        console.print(f"[bold yellow]warning:[/] {warning}")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        return engines.run(cfg, run_dir, resume, RichProgress(progress, cfg.federation.rounds))


def _summary_table(rows: dict[str, dict[str, Any]]) -> Table:
    """One row per method; compact (two-line headers, no vertical rules) so names and values stay whole in 80
    columns. Classification shows accuracies; a causal LM its NLLs and what generation measured."""
    causal = all("final_global_accuracy" not in s for s in rows.values())
    generated = [m for m in GENERATION_METRICS if any(f"final_global_{m}" in s for s in rows.values())]
    cols = [
        ("final_global_loss", "global\nNLL", ".4f"),
        ("best_global_loss", "best\nNLL", ".4f"),
        ("final_local_loss", "local\nNLL", ".4f"),
        *[(f"final_global_{m}", m.replace("_at_", "@").replace("_", "\n"), ".4f") for m in generated],
    ]
    if not causal:
        cols = [
            ("final_global_accuracy", "global\nacc", ".4f"),
            ("best_global_accuracy", "best\nglobal", ".4f"),
            ("final_local_accuracy", "local\nacc", ".4f"),
        ]
    cols += [
        ("final_local_global_gap", "gap", "+.4f"),
        ("mean_divergence", "mean\ndiv", ".3g"),
        ("total_bytes_up", "MB\nup", "mb"),
        ("total_bytes_down", "MB\ndown", "mb"),
        ("wall_seconds", "seconds", ".0f"),
    ]
    table = Table(title="summary", box=None, padding=(0, 1), header_style="bold underline")
    table.add_column("method", no_wrap=True)
    for _, title, _ in cols:
        table.add_column(title, justify="right", no_wrap=True)
    for name, s in rows.items():
        table.add_row(name, *[_cell(s.get(k), f) for k, _, f in cols])
    return table


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    return f"{value / 1e6:.2f}" if fmt == "mb" else format(value, fmt)


LEGEND = """\
global acc: the global model on the held-out test set (last round); best global: its best evaluated round.
local acc: each client's own adapter on its own test split, averaged; gap: local minus the global model on the
same splits. mean div: ‖M − ΔW‖_F / ‖M‖_F, the aggregate's error against the ideal update M = Σ w_u B_u A_u,
averaged over rounds (0 for exact methods). MB: payload bytes over the run."""

CAUSAL_LEGEND = """\
global NLL: the global model's mean NLL per response token on the held-out test set (last round); best NLL: its
lowest round. local NLL: each client's own adapter on its own test split, averaged; gap: the global model minus
the clients' own adapters on the same splits (in NLL). exact match / pass@1: greedy generation judged, last round.
mean div: ‖M − ΔW‖_F / ‖M‖_F against the ideal update M = Σ w_u B_u A_u, averaged over rounds. MB: payload bytes."""


def _report(summaries: dict[str, dict[str, Any]], run_dirs: list[Path]) -> None:
    """The summary table, the baselines, a legend, and what to do next."""
    console.print(_summary_table(summaries))
    first = next(iter(summaries.values()))
    if first.get("majority_share") is not None:
        console.print(
            f"baselines: always predicting the test set's most frequent label scores {first['majority_share']:.4f}; "
            f"on the clients' own splits {first['local_majority_share']:.4f} (mean)",
            markup=False,
        )
    causal = all("final_global_accuracy" not in s for s in summaries.values())
    console.print(CAUSAL_LEGEND if causal else LEGEND, markup=False, style="dim")
    dirs, predicted = " ".join(str(d) for d in run_dirs), "its answer" if causal else "label, probability"
    console.print(
        "next:\n"
        f"  fedlora plot {dirs}                     # accuracy, divergence, bytes\n"
        f"  fedlora compare --methods fedit,flora_na,flexlora ...   # the same clients under other methods\n"
        f"  fedlora eval {run_dirs[0]}          # the saved adapter again, or on --data FILE\n"
        f'  fedlora predict {run_dirs[0] / "adapter"} "some text"   # {predicted}\n'
        f"  the trained global adapter: {run_dirs[0] / 'adapter'} (PeftModel.from_pretrained loads it; model card "
        "README.md)",
        markup=False,
        soft_wrap=True,  # commands stay on one line, to be copied
    )


@app.command(context_settings=_EXTRA_ARGS, options_metavar="[OPTIONS] [CONFIG.toml] [KEY=VALUE]...")
def run(
    ctx: typer.Context,
    resume: Annotated[Path | None, typer.Option(help="Continue the run saved in this directory.")] = None,
) -> None:
    """Run a federated experiment: fedlora run [CONFIG.toml] [key=value ...]. No arguments: the default."""
    from fedlora import api, config, rundir

    path, overrides = _split_config_args(list(ctx.args))
    if resume is not None and (path is not None or overrides):
        _fail("--resume takes no config or overrides: the run's saved config.toml is used")
    try:
        cfg = api.resumed_config(resume) if resume is not None else config.load_config(path, overrides)
        run_dir = resume if resume is not None else rundir.default_run_dir(cfg)
        run_dir, summary = _execute(cfg, run_dir, resume is not None)
    except (ValueError, OSError, RuntimeError) as e:  # OSError: missing files, unwritable directories
        _fail(str(e))
    except KeyboardInterrupt:
        _interrupted(f"fedlora run --resume {run_dir}", run_dir / rundir.CHECKPOINT)
    _report({cfg.federation.method: summary}, [run_dir])
    console.print(f"run directory: {run_dir}", markup=False, soft_wrap=True)


def _interrupted(command: str, saved: Path | None) -> None:
    """Ctrl-C: a round's checkpoint is written atomically, so the last finished round is on disk; say how to
    continue (exit code 130, as a shell reports an interrupt). ``saved``: what exists once something can be
    resumed."""
    if saved is not None and saved.exists():
        console.print(
            f"\ninterrupted; every finished round is kept. Continue with:\n  {command}", markup=False, soft_wrap=True
        )
    else:
        console.print("\ninterrupted before the first round finished; nothing to resume.", markup=False)
    raise typer.Exit(130)


@app.command(context_settings=_EXTRA_ARGS, options_metavar="[OPTIONS] [CONFIG.toml] [KEY=VALUE]...")
def compare(
    ctx: typer.Context,
    methods_: Annotated[str, typer.Option("--methods", help="Comma-separated method names.")],
    out: Annotated[Path | None, typer.Option(help="Directory for the runs, table and plots.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep finished runs under --out, continue interrupted ones.")
    ] = False,
) -> None:
    """Run several methods on the same partition and seed: fedlora compare [CONFIG] --methods a,b [k=v ...].

    With ``--resume`` a comparison that was interrupted continues: methods whose run under ``--out`` finished
    (summary.json) are kept, an interrupted one resumes from its checkpoint (its saved config must equal the
    one this command resolves), the others start."""
    from datetime import datetime

    from fedlora import api, config, plots

    path, overrides = _split_config_args(list(ctx.args))
    names = [m.strip() for m in methods_.split(",") if m.strip()]
    try:
        base = config.load_config(path, overrides)
        out = out or Path(base.output.dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}-compare")
        results = api.compare(base, names, out=out, resume=resume, execute=_execute)
    except (ValueError, OSError, RuntimeError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        again = " ".join(["fedlora compare", *ctx.args, "--methods", methods_, "--out", str(out), "--resume"])
        _interrupted(again, out)  # out is None only before the config loaded: nothing to resume
    plots.plot_runs([r.run_dir for r in results.values()], out)
    _report({n: dict(r.summary) for n, r in results.items()}, [r.run_dir for r in results.values()])
    console.print(f"comparison: {out / 'comparison.md'}", markup=False, soft_wrap=True)


@app.command()
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (each with metrics.jsonl).")],
    out: Annotated[Path | None, typer.Option(help="Where to write the PNGs (default: the first run).")] = None,
    only: Annotated[str | None, typer.Option(help="Comma-separated figure names (default: all).")] = None,
) -> None:
    """PNGs of one or more runs, one curve per run labelled by the config keys that differ (runs differing only
    in seed: mean ± std): accuracy, task_accuracy (multi-task runs), local_global_gap, loss, divergence,
    divergence_heatmap, accuracy_vs_bytes, accuracy_vs_alpha and divergence_vs_alpha (when the runs span several
    Dirichlet α)."""
    from fedlora import plots

    try:
        plotted = plots.plot_runs(run_dirs, out or run_dirs[0], plots.figure_names(only))
    except (ValueError, OSError) as e:
        _fail(str(e))
    for warning in plotted.warnings:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}")
    for name, reason in plotted.skipped.items():
        console.print(f"{name}: not drawn: {escape(reason)}")
    if not plotted.written:
        _fail("no figure to draw: the runs have no data for the figures asked for")
    for path in plotted.written:
        console.print(escape(str(path)))


@app.command()
def aggregate(
    adapter_dirs: Annotated[list[Path], typer.Argument(help="PEFT adapter directories, one per site.")],
    method: Annotated[str, typer.Option(help="A registered method (see `fedlora methods`).")],
    out: Annotated[Path, typer.Option(help="Output PEFT adapter directory (new, or an empty directory).")],
    weights: Annotated[str | None, typer.Option(help="Comma-separated client weights (default uniform).")] = None,
    param: Annotated[list[str] | None, typer.Option(help="A method hyperparameter key=value (repeatable).")] = None,
    base_model: Annotated[str | None, typer.Option(help="Base model id or path, for --merged-out.")] = None,
    merged_out: Annotated[Path | None, typer.Option(help="Also write the merged full model here (new).")] = None,
    allow_mixed_base: Annotated[
        bool, typer.Option("--allow-mixed-base", help="Accept adapters naming different base models.")
    ] = False,
) -> None:
    """Aggregate adapters trained at several sites into one PEFT adapter (+ base edits where the method makes them)."""
    request = _parse_aggregate(adapter_dirs, method, out, weights, param, base_model, merged_out, allow_mixed_base)
    _report_aggregate(_run_aggregate(request))


@app.command("eval")
def eval_(
    run_or_adapter: Annotated[Path, typer.Argument(help="A run directory, or the adapter directory a run saved.")],
    data: Annotated[
        str | None,
        typer.Option(help="A data file with the run's text and label columns (default: the run's test set)."),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Multi-task runs: the task whose labels --data holds, or the one task of the test set."),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps (default: the run's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Evaluate a saved adapter: on the run's held-out test set (the numbers repeat the run's), or on --data."""
    import json
    from dataclasses import asdict

    from fedlora import inference

    try:
        result = inference.evaluate(inference.load(run_or_adapter, device), data, task)
    except (ValueError, RuntimeError, OSError) as e:
        _fail(str(e))
    if as_json:
        console.print_json(json.dumps(asdict(result)))
        return
    console.print(
        f"{result.source}: {result.examples} examples, the global model of round {result.round}",
        markup=False,
        soft_wrap=True,
    )
    for name, value in result.metrics.items():
        recorded = f" (the run recorded {result.recorded[name]:.4f})" if name in result.recorded else ""
        console.print(f"  {name} {value:.4f}{recorded}", markup=False)
    if result.baseline is not None:
        console.print(f"  baseline (always the most frequent label) {result.baseline:.4f}", markup=False)


@app.command()
def predict(
    adapter: Annotated[Path, typer.Argument(help="The adapter directory a run saved (<run>/adapter).")],
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to predict for.")] = None,
    file: Annotated[
        Path | None, typer.Option(help="One text per line, or a csv/json/jsonl/parquet file's text column.")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Multi-task runs: the task the texts belong to.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps (default: the run's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per text.")] = False,
) -> None:
    """Predict with a saved adapter: fedlora predict ADAPTER "text" ... | --file F (label and probabilities, or the
    generated text)."""
    import json

    from fedlora import inference

    try:
        loaded = inference.load(inference.require_adapter_dir(adapter), device)
        given = list(texts or []) + (inference.read_texts(file, loaded.config.data.text_column) if file else [])
        outputs = inference.predict(loaded, given, task)
    except (ValueError, RuntimeError, OSError) as e:
        _fail(str(e))
    for text, out in zip(given, outputs, strict=True):
        if as_json:
            console.print(json.dumps({"input": text} | out), markup=False, soft_wrap=True)
        elif "label" in out:
            console.print(f"{out['label']}\t{out['probabilities'][out['label']]:.3f}\t{text}", markup=False)
        else:
            console.print(f"{text}\n→ {out.get('text', out)}", markup=False)


def _parse_aggregate(
    dirs: list[Path],
    method: str,
    out: Path,
    weights: str | None,
    param: list[str] | None,
    base_model: str | None,
    merged_out: Path | None,
    allow_mixed_base: bool,
) -> dict[str, Any]:
    """The keyword arguments of ``aggregate_dirs`` from the command line's strings."""
    from fedlora.config import parse_value

    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        _fail(f"--weights {weights!r}: expected comma-separated numbers")
    try:
        params = dict(_parse_param(p, parse_value) for p in param or [])
    except ValueError as e:
        _fail(str(e))
    return {
        "method_name": method,
        "dirs": dirs,
        "out": out,
        "weights": w,
        "params": params,
        "base_model": base_model,
        "merged_out": merged_out,
        "allow_mixed_base": allow_mixed_base,
    }


def _run_aggregate(request: dict[str, Any]) -> Any:
    """``aggregate_dirs``; any error becomes one ``error:`` line and exit code 2 (nothing is written then)."""
    from fedlora.aggregate_dirs import aggregate_dirs

    try:
        return aggregate_dirs(**request)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        _fail(str(e))


def _report_aggregate(result: Any) -> None:
    """The per-module errors as a table, then the weights and what was written."""
    r = result.report
    table = Table(title=f"divergence from the ideal update Σ w_u s_u B_u A_u (relative; {r.error:.3e} absolute)")
    for col in ("module", "divergence", "Eckart–Young", "FedIT", "‖M − ΔW‖"):
        table.add_column(col, justify="right" if col != "module" else "left")
    for m, e in r.modules.items():
        table.add_row(escape(m), f"{e.divergence:.3e}", f"{e.eckart_young:.3e}", f"{e.fedit:.3e}", f"{e.error:.3e}")
    table.add_row("overall", f"{r.divergence:.3e}", f"{r.eckart_young:.3e}", f"{r.fedit:.3e}", f"{r.error:.3e}")
    console.print(table)
    written = f"{result.out}" + (f" and {result.merged_out}" if result.merged_out is not None else "")
    console.print(escape(f"weights {[f'{x:.4f}' for x in result.weights]}; wrote {written}"))


def _parse_param(text: str, parse_value: Any) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"--param {text!r}: expected key=value")
    key, value = text.split("=", 1)
    return key.strip().removeprefix("method."), parse_value(value)


@app.command("methods")
def list_methods(
    name: Annotated[str | None, typer.Argument(help="A method: its description and method.* keys.")] = None,
) -> None:
    """Every registered method with its capabilities and communication; with a NAME, the method's description
    (paper and update rule) and its hyperparameters (the ``method.*`` config keys) with types and defaults."""
    from fedlora import method_help, methods

    if name is None:
        console.print(_capabilities_table(methods.available()))
        _print_lines(["", "Communication: scalars sent per adapted d×k matrix, per client, per round."])
        for key in methods.available():
            _print_lines(_communication(key))
        _print_lines(["", "Secure aggregation and central DP need an uplink the server only sums:"])
        console.print(_privacy_table(methods.available()))
        _print_lines(["", "Why not:"])
        for key in methods.available():
            if not methods.capabilities(key).secure_aggregation:
                text = method_help.outside_brackets(f"{key}: {methods.capabilities(key).not_a_sum}")
                _print_lines(method_help.fill_units(text, console.width, "  ", "    "))
        return
    try:
        params = methods.params_class(name)
    except ValueError as e:
        _fail(str(e))
    _print_params(name, params)


def _capabilities_table(names: list[str]) -> Table:
    """One row per method; two-line headers and short values, so the table fits 80 columns without breaks."""
    from fedlora import methods

    table = Table(
        box=None, padding=(0, 1), header_style="bold underline", title="fedlora methods", title_justify="left"
    )
    columns = (
        "method",
        "exact",
        "hetero\nranks",
        "writes\nbase",
        "person-\nalised",
        "per-client\ndownload",
        "variants",
    )
    for column in columns:
        table.add_column(column, no_wrap=True)
    yes = {True: "yes", False: "no"}
    for key in names:
        c = methods.capabilities(key)
        flags = (c.writes_base, c.personalised, c.per_client_download)
        table.add_row(key, yes[c.exact], c.heterogeneous_ranks, *(yes[f] for f in flags), ", ".join(c.variants))
    return table


def _privacy_table(names: list[str]) -> Table:
    """Per method: whether its uplink works under secure aggregation, and under central DP (with its conditions)."""
    from fedlora import methods, privacy

    table = Table(box=None, padding=(0, 1), header_style="bold underline")
    for column in ("method", "secure\naggregation", "central\nDP"):
        table.add_column(column, no_wrap=True)
    for key in names:
        secure = methods.capabilities(key).secure_aggregation
        table.add_row(key, "yes" if secure else "no", privacy.support(key))
    return table


def _communication(key: str) -> list[str]:
    """The method's paper and its scalars sent per adapted d×k matrix, per client, per round, in lines that fit
    the console and never break inside brackets (a formula such as ``min((Σ_u r_u)(d+k), d·k)`` stays whole)."""
    from fedlora import method_help, methods

    c, width = methods.capabilities(key), console.width
    lines = [""] + method_help.fill_units(method_help.outside_brackets(f"{key}: {c.paper}"), width, hang="    ")
    for label, text in (("up:  ", c.uplink), ("down:", c.downlink)):
        lines += method_help.fill_units(method_help.outside_brackets(text), width, f"  {label} ", " " * 8)
    return lines


def _print_lines(lines: list[str]) -> None:
    """Plain text: no markup, no highlighting, no wrapping (the lines fit)."""
    from rich.text import Text

    for line in lines:
        console.print(Text(line), no_wrap=True)


def _print_params(name: str, params: type) -> None:
    """The method's description from its module docstring, then one row per ``method.*`` key: key, type in
    words (allowed values as ``a | b``), default as written in a config."""
    from fedlora import method_help

    _print_lines(method_help.wrap(method_help.description(name, params), console.width))
    _print_lines(_communication(name))
    rows = method_help.parameters(params)
    if not rows:
        _print_lines(["", f"{name} has no method.* keys."])
        return
    _print_lines(["", f"{name}: method.* keys (set in [method] of a config, or as method.KEY=VALUE)"])
    table = Table(box=None, padding=(0, 1), header_style="bold underline")
    for column in ("key", "type", "default"):
        table.add_column(column, no_wrap=column == "key")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
