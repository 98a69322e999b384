"""The ``fedlora`` command line: run, compare, plot, aggregate, methods."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode="markdown", help="Federated fine-tuning with LoRA."
)
console = Console()
# run and compare take [CONFIG.toml] [key=value ...] as extra arguments (parsed by _split_config_args)
_EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


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
        self.progress.console.print(
            f"round {rnd}: global acc {record['global_accuracy']:.4f}, local acc {record['local_accuracy']:.4f}, "
            f"divergence {record['divergence']:.3g}, {record['seconds']:.1f} s"
        )


def _describe(cfg: Any) -> str:
    """One line naming what is about to run, so the console log says which experiment it shows."""
    f, d, m = cfg.federation, cfg.data, cfg.model
    partition = f"dirichlet α={d.alpha}" if d.partition == "dirichlet" else d.partition
    return (
        f"{f.method} on {d.dataset} ({d.num_clients} clients, {partition}), {m.name} with {m.lora.variant} "
        f"r={m.lora.r}, {f.rounds} rounds, {m.precision} precision, engine {f.engine}, seed {cfg.seed}"
    )


def _execute(cfg: Any, run_dir: Path | None, resume: bool) -> tuple[Path, dict[str, Any]]:
    from fedlora import config, runner

    console.print(("resuming " if resume else "") + _describe(cfg))
    if warning := config.emulated_bf16_warning(cfg.model.precision):
        console.print(f"[bold yellow]warning:[/] {warning}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        return runner.run(cfg, run_dir, resume, RichProgress(progress, cfg.federation.rounds))


def _summary_table(rows: dict[str, dict[str, Any]]) -> Table:
    """One row per method; compact (two-line headers, no vertical rules) so names and values stay whole in 80
    columns."""
    cols = [
        ("final_global_accuracy", "global\nacc", ".4f"),
        ("best_global_accuracy", "best\nglobal", ".4f"),
        ("final_local_accuracy", "local\nacc", ".4f"),
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
        table.add_row(name, *[(f"{s[k] / 1e6:.2f}" if f == "mb" else format(s[k], f)) for k, _, f in cols])
    return table


@app.command(context_settings=_EXTRA_ARGS, options_metavar="[OPTIONS] [CONFIG.toml] [KEY=VALUE]...")
def run(
    ctx: typer.Context,
    resume: Annotated[Path | None, typer.Option(help="Continue the run saved in this directory.")] = None,
) -> None:
    """Run a federated experiment: fedlora run [CONFIG.toml] [key=value ...]. No arguments: the default."""
    from fedlora import config, runner

    path, overrides = _split_config_args(list(ctx.args))
    try:
        if resume is not None:
            if path is not None or overrides:
                _fail("--resume takes no config or overrides: the run's saved config.toml is used")
            cfg = config.load_config(resume / "config.toml")
            run_dir, summary = _execute(cfg, resume, True)
        else:
            cfg = config.load_config(path, overrides)
            run_dir, summary = _execute(cfg, runner.default_run_dir(cfg), False)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    console.print(_summary_table({cfg.federation.method: summary}))
    console.print(f"run directory: {run_dir}")


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

    from fedlora import config, methods, plots

    path, overrides = _split_config_args(list(ctx.args))
    names = [m.strip() for m in methods_.split(",") if m.strip()]
    try:
        for name in names:
            methods.capabilities(name)
        base = config.load_config(path, overrides)
        out = out or Path(base.output.dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}-compare")
        cfgs = {n: config.with_overrides(base, [f"federation.method={n}", f"output.dir={out / n}"]) for n in names}
        summaries = {n: _compare_one(c, out / n, resume) for n, c in cfgs.items()}
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    (out / "comparison.md").write_text(plots.markdown_table(summaries))
    (out / "comparison.json").write_text(json.dumps(summaries, indent=2))
    plots.plot_runs([out / n for n in names], out)
    console.print(_summary_table(summaries))
    console.print(f"comparison: {out / 'comparison.md'}")


def _compare_one(cfg: Any, run_dir: Path, resume: bool) -> dict[str, Any]:
    from fedlora import config, runner

    if not resume or not (run_dir / runner.CHECKPOINT).exists():
        return _execute(cfg, run_dir, False)[1]
    saved = (run_dir / "config.toml").read_text()
    if saved != config.dump_toml(cfg):
        raise ValueError(f"--resume: {run_dir}/config.toml differs from this comparison's config; use another --out")
    summary = run_dir / "summary.json"
    if summary.exists():
        console.print(f"{cfg.federation.method}: finished earlier, kept ({summary})")
        return dict(json.loads(summary.read_text()))
    return _execute(cfg, run_dir, True)[1]


@app.command()
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (each with metrics.jsonl).")],
    out: Annotated[Path | None, typer.Option(help="Where to write the PNGs (default: the first run).")] = None,
) -> None:
    """PNGs: accuracy vs round, divergence vs round, per-module divergence heatmap, accuracy vs bytes."""
    from fedlora import plots

    try:
        written = plots.plot_runs(run_dirs, out or run_dirs[0])
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    for p in written:
        console.print(str(p))


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
    name: Annotated[str | None, typer.Argument(help="A method: list its method.* keys and defaults.")] = None,
) -> None:
    """Every registered method with its capabilities and communication formulas; with a NAME, its
    hyperparameters (the ``method.*`` config keys), their types and defaults."""
    from fedlora import methods

    if name is not None:
        try:
            params = methods.params_class(name)
        except ValueError as e:
            _fail(str(e))
        _print_params(name, params)
        return
    table = Table(title="fedlora methods (sizes per adapted d×k matrix, per client, per round)")
    table.add_column("key", no_wrap=True)  # the name to type stays whole on narrow terminals
    columns = ("exact", "hetero ranks", "writes base", "personal", "per-client download", "variants")
    for col in (*columns, "uplink", "downlink", "paper"):
        table.add_column(col, overflow="fold")
    for name in methods.available():
        c = methods.capabilities(name)
        yes = {True: "yes", False: "no"}
        table.add_row(
            name,
            yes[c.exact],
            c.heterogeneous_ranks,
            yes[c.writes_base],
            yes[c.personalised],
            yes[c.per_client_download],
            ", ".join(c.variants),
            c.uplink,
            c.downlink,
            c.paper,
        )
    console.print(table)


def _print_params(name: str, params: type) -> None:
    """One row per ``method.*`` key of a method's hyperparameter dataclass: key, type, default."""
    import dataclasses

    table = Table(title=f"{name}: method.* keys (their meaning and allowed values: docs/methods.md)")
    for col in ("key", "type", "default"):
        table.add_column(col, overflow="fold")
    fields = dataclasses.fields(params)
    for f in fields:
        table.add_row(f"method.{f.name}", str(f.type), repr(f.default))
    if not fields:
        table.add_row("(none)", "", "")
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
