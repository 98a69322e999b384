"""The Python API: what the command line does, as functions that return typed results.

    import fedlora

    cfg = fedlora.load_config("configs/default.toml", federation={"rounds": 3}, seed=1)
    result = fedlora.run(cfg)                        # or fedlora.run("configs/default.toml", train={"lr": 2e-3})
    result.summary["final_global_accuracy"], result.records[-1]["divergence"], result.adapter_dir
    results = fedlora.compare(cfg, ["fedit", "flora_na"], out="runs/cmp")
    fedlora.evaluate(result.run_dir).metrics, fedlora.predict(result.adapter_dir, ["a fine film"])[0]["label"]

Overrides are given as keyword arguments: a section name with a dict of its keys (``train={"lr": 2e-3}``,
``model={"lora": {"r": 16}}``), a top-level key (``seed=1``), or dotted keys (``**{"federation.rounds": 3}``);
they are applied as ``key=value`` overrides on the command line are, so unknown keys fail with the valid ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fedlora import config as cfgmod
from fedlora import engines, rundir

ConfigLike = cfgmod.ExperimentConfig | str | Path | None

Execute = Callable[[cfgmod.ExperimentConfig, Path, bool], tuple[Path, Mapping[str, Any]]]
"""(config, run directory, resume) -> (run directory, summary): how a run is carried out; ``engines.run`` by
default, wrapped by the command line to show progress."""


@dataclass(frozen=True)
class RunResult:
    """A finished run: its directory, resolved config, summary (summary.json) and per-round records
    (metrics.jsonl)."""

    run_dir: Path
    config: cfgmod.ExperimentConfig
    summary: Mapping[str, Any]
    records: Sequence[Mapping[str, Any]]

    @property
    def adapter_dir(self) -> Path:
        """The global model as a PEFT adapter directory (``PeftModel.from_pretrained`` loads it)."""
        return self.run_dir / "adapter"


def load_config(config: ConfigLike = None, **overrides: Any) -> cfgmod.ExperimentConfig:
    """A validated config from a TOML path, an existing config, or the defaults (None), with ``overrides``."""
    dotted = [cfgmod.override(key, value) for key, value in _dotted(overrides)]
    if isinstance(config, cfgmod.ExperimentConfig):
        return cfgmod.with_overrides(config, dotted)
    return cfgmod.load_config(config, dotted)


def _dotted(overrides: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"train": {"lr": 1e-3}, "seed": 1}`` -> ``[("train.lr", 1e-3), ("seed", 1)]``."""
    out = []
    for key, value in overrides.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out += _dotted(value, name)
        else:
            out.append((name, value))
    return out


def run(
    config: ConfigLike = None, *, resume: str | Path | None = None, progress: Any | None = None, **overrides: Any
) -> RunResult:
    """Run an experiment (or continue the one saved in ``resume``) on its engine; see :func:`load_config`.
    ``progress`` receives ``round_started(rnd, n_clients)``, ``client_done(client)``, ``round_done(rnd, record)``."""
    if resume is not None:
        if config is not None or overrides:
            raise ValueError("resume takes no config or overrides: the run's saved config.toml is used")
        cfg, run_dir = resumed_config(resume), Path(resume)
    else:
        cfg = load_config(config, **overrides)
        run_dir = rundir.default_run_dir(cfg)
    run_dir, summary = engines.run(cfg, run_dir, resume is not None, progress)
    return _result(run_dir, cfg, summary)


def resumed_config(run_dir: str | Path) -> cfgmod.ExperimentConfig:
    """The saved config of the run to continue in ``run_dir``; a one-line error when there is none."""
    file = Path(run_dir) / "config.toml"
    if not file.is_file():
        what = "does not exist" if not Path(run_dir).exists() else "holds no run (no config.toml)"
        raise FileNotFoundError(
            f"--resume {run_dir}: the directory {what}; give the run directory `fedlora run` printed"
        )
    return cfgmod.load_config(file)


def compare(
    config: ConfigLike,
    methods: Sequence[str],
    *,
    out: str | Path | None = None,
    resume: bool = False,
    execute: Execute | None = None,
    **overrides: Any,
) -> dict[str, RunResult]:
    """Every method of ``methods`` on the same clients and seed, one run directory each under ``out``, plus
    ``comparison.md`` / ``comparison.json``. With ``resume``, finished runs are kept and interrupted ones resume
    (their saved config must equal this comparison's)."""
    from fedlora import methods as registry
    from fedlora import plots

    for name in methods:
        registry.capabilities(name)  # unknown names fail before anything runs
    base = load_config(config, **overrides)
    out = Path(out or base.output.dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}-compare")
    results = {}
    for name in methods:
        cfg = cfgmod.with_overrides(base, [f"federation.method={name}", f"output.dir={json.dumps(str(out / name))}"])
        results[name] = _compare_one(cfg, out / name, resume, execute or _engine)
    summaries = {n: dict(r.summary) for n, r in results.items()}
    (out / "comparison.md").write_text(plots.markdown_table(summaries))
    (out / "comparison.json").write_text(json.dumps(summaries, indent=2))
    return results


def _engine(cfg: cfgmod.ExperimentConfig, run_dir: Path, resume: bool) -> tuple[Path, Mapping[str, Any]]:
    return engines.run(cfg, run_dir, resume)


def _compare_one(cfg: cfgmod.ExperimentConfig, run_dir: Path, resume: bool, execute: Execute) -> RunResult:
    if not resume or not (run_dir / rundir.CHECKPOINT).exists():
        return _result(run_dir, cfg, execute(cfg, run_dir, False)[1])
    if (run_dir / "config.toml").read_text() != cfgmod.dump_toml(cfg):
        raise ValueError(f"--resume: {run_dir}/config.toml differs from this comparison's config; use another --out")
    summary = run_dir / "summary.json"
    if summary.exists():
        return _result(run_dir, cfg, json.loads(summary.read_text()))
    return _result(run_dir, cfg, execute(cfg, run_dir, True)[1])


def aggregate(
    adapter_dirs: Sequence[str | Path],
    method: str,
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    merged_out: str | Path | None = None,
    allow_mixed_base: bool = False,
) -> Any:
    """One server step of ``method`` over PEFT adapter directories trained elsewhere (what ``fedlora aggregate``
    does): writes the aggregated adapter to ``out`` (and the merged model to ``merged_out`` with ``base_model``),
    refusing to overwrite any input or non-empty directory; returns the ``AggregateResult`` (report, weights)."""
    from fedlora.aggregate_dirs import aggregate_dirs

    return aggregate_dirs(
        method,
        adapter_dirs,
        out,
        weights,
        params,
        base_model=base_model,
        merged_out=merged_out,
        allow_mixed_base=allow_mixed_base,
    )


def evaluate(
    run_or_adapter: str | Path, data: str | Path | None = None, *, task: str | None = None, device: str | None = None
) -> Any:
    """A saved adapter (a run directory, or its ``adapter/``) on the run's held-out test set, or on ``data``;
    returns ``fedlora.inference.EvalResult`` (metrics, the baseline, what the run recorded for that round).
    ``task``: in a multi-task run, the task whose labels ``data`` holds, or the one task of the test set."""
    from fedlora import inference

    return inference.evaluate(inference.load(run_or_adapter, device), None if data is None else str(data), task)


def predict(
    adapter: str | Path, texts: Sequence[str], *, task: str | None = None, device: str | None = None
) -> list[dict[str, Any]]:
    """The task's output for each text with a saved adapter (classification: ``label`` and ``probabilities``;
    generation: the generated ``text``); ``task``: in a multi-task run, the task the texts belong to."""
    from fedlora import inference

    return inference.predict(inference.load(inference.require_adapter_dir(adapter), device), texts, task)


def _result(run_dir: Path, cfg: cfgmod.ExperimentConfig, summary: Mapping[str, Any]) -> RunResult:
    lines = (run_dir / rundir.METRICS).read_text().splitlines()
    return RunResult(run_dir, cfg, summary, [json.loads(line) for line in lines if line.strip()])
