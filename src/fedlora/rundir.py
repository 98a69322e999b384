"""The run directory, shared by every engine: its name, the refusal to reuse one that holds a run, checkpoints,
the final outputs and the summary.

A run directory holds ``config.toml`` (the resolved config), ``metrics.jsonl`` (one record per round),
``checkpoint.pt`` (the ``RunState`` after the last finished round, for ``--resume``), and at the end ``adapter/``
(the global model as a PEFT adapter directory, plus ``base_edits.safetensors`` for methods that edit base
weights) and ``summary.json``.

Crash safety: every file is written by staging (``<name>.tmp`` in the same directory), fsync, rename over the
old one and fsync of the directory; the adapter directory is staged whole (``adapter.tmp/``) and renamed in place
of the old one, before ``summary.json``. So a run killed at any moment (even SIGKILL inside a write) leaves each
file either at its previous or at its new content, and ``--resume`` continues from the last checkpoint (from
round 1 when only ``config.toml`` was written; only the outputs when every round had finished) to the same
results as an uninterrupted run. The environment variable ``FEDLORA_TEST_KILL = "<file>:<n>"`` (test-only) kills
the process with SIGKILL in the n-th staged write of ``<file>`` (e.g. ``checkpoint.pt:2``), after half of the
staged file was written and before the rename.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora import adapter_card, keep, peft_io
from fedlora import config as cfgmod
from fedlora.evaluation import global_model, load_global
from fedlora.experiment import Experiment
from fedlora.tracking import Trackers
from fedlora.types import RunState

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
KILL_ENV = "FEDLORA_TEST_KILL"
_staged: dict[str, int] = {}


def default_run_dir(cfg: cfgmod.ExperimentConfig) -> Path:
    return Path(cfg.output.dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}-{cfg.federation.method}")


def check_fresh_dir(run_dir: Path) -> None:
    """A run may start in ``run_dir``: no run there yet, and writable (checked before anything loads)."""
    check_writable(run_dir)
    if (run_dir / CHECKPOINT).exists() or (run_dir / METRICS).exists():
        raise FileExistsError(
            f"output.dir = {str(run_dir)!r} already holds a run; choose another output.dir or continue it with "
            f"`fedlora run --resume {run_dir}`"
        )


def check_writable(run_dir: Path) -> None:
    """``run_dir`` exists as a writable directory, or can be created: its nearest existing ancestor is a writable
    directory. Nothing is created."""
    existing = next(p for p in (run_dir.absolute(), *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(
            f"output.dir = {str(run_dir)!r}: {existing} is a file, not a directory; choose another output.dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"output.dir = {str(run_dir)!r}: {existing} is not writable by this user (or on a read-only file system); "
            "choose another output.dir, e.g. output.dir=runs/NAME"
        )


def start(exp: Experiment, run_dir: Path, resume: bool) -> RunState:
    """The run's state: from the checkpoint (the model brought to it) when resuming, else a fresh server state,
    with the resolved config written to ``config.toml``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / CHECKPOINT).exists():
        state = load_checkpoint(run_dir)
        restore_model(exp, state)
        write_metrics(run_dir, state)  # a kill between the checkpoint and metrics.jsonl left the latter behind
        return state
    if resume and not (run_dir / "config.toml").exists():
        load_checkpoint(run_dir)  # the error: nothing to resume
    if not resume:
        write_atomic(run_dir / "config.toml", cfgmod.dump_toml(exp.cfg).encode())
    return RunState(1, exp.method.init_server(exp.info, exp.cfg.seed), {})


def record_round(run_dir: Path, state: RunState, trackers: Trackers) -> None:
    """After a round: the checkpoint and metrics.jsonl (atomically), and the round's record to the trackers."""
    save_checkpoint(run_dir, state)
    trackers.log_round(state.records[-1])


def finish(exp: Experiment, run_dir: Path, state: RunState, trackers: Trackers) -> dict[str, Any]:
    """After the last round: the outputs and the summary (also to the trackers); returns the summary."""
    summary = save_outputs(exp, run_dir, state)
    trackers.log_summary(summary)
    return summary


def save_checkpoint(run_dir: Path, state: RunState) -> None:
    """The checkpoint, then metrics.jsonl, each replaced atomically (see the module docstring)."""
    stage(run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))
    write_metrics(run_dir, state)


def write_metrics(run_dir: Path, state: RunState) -> None:
    """metrics.jsonl from the run state's records, atomically."""
    write_atomic(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in state.records).encode())


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds either its old content or ``data``, whenever the process dies."""
    stage(path, lambda tmp: tmp.write_bytes(data))


def stage(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` a staging file (or directory) beside ``path``, fsync it, rename it over ``path``, fsync the
    directory. A staged directory replaces ``path`` after the old one is removed."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    write(tmp)
    for f in sorted(tmp.rglob("*")) if tmp.is_dir() else [tmp]:
        if f.is_file():
            _fsync(f)
    _test_kill(path, tmp)
    if tmp.is_dir() and path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_kill(path: Path, tmp: Path) -> None:
    """Test-only: SIGKILL in the n-th staged write of ``path.name`` when ``FEDLORA_TEST_KILL`` says so, after
    truncating the staged file to half (a write cut short)."""
    target = os.environ.get(KILL_ENV, "")
    if not target:
        return
    _staged[path.name] = _staged.get(path.name, 0) + 1
    if target == f"{path.name}:{_staged[path.name]}":
        if tmp.is_file():
            os.truncate(tmp, tmp.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(run_dir: Path) -> RunState:
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"--resume {run_dir}: no {CHECKPOINT} there (the run saved no round yet)")
    return torch.load(path, weights_only=False)


def restore_model(exp: Experiment, state: RunState) -> None:
    """Bring a freshly built model to the checkpoint: replay every base edit the global model holds."""
    if state.next_round > 1:
        load_global(exp, exp.method.export(state.server))


def save_outputs(exp: Experiment, run_dir: Path, state: RunState) -> dict[str, Any]:
    """The kept global model (``output.keep``: the last round's, or the best round's) as a PEFT directory (+ base
    edits + head) that describes itself (``adapter_card``), and summary.json."""
    model = state.best.model if state.best is not None else global_model(exp, state)[0]
    load_global(exp, model)
    summary = summarize(state.records, exp.cfg, exp.metrics[0], exp.task.higher_is_better)

    def write_adapter(tmp: Path) -> None:
        peft_io.save_model_adapter(exp.model, tmp)
        if model.base_edits:
            peft_io.write_base_edits(tmp / peft_io.BASE_EDITS_FILE, model.base_edits)
        adapter_card.describe(tmp, exp, state.records, summary)

    stage(run_dir / "adapter", write_adapter)
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def summarize(
    records: Sequence[Mapping[str, Any]],
    cfg: cfgmod.ExperimentConfig,
    primary: str = "accuracy",
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """The reported numbers from the per-round records: evaluation numbers over the rounds that evaluated them
    (the last round evaluates everything), the baselines beside them, divergence, bytes and time over every
    round. ``primary``: the task's primary metric, for the best round and the local means."""
    if not records:
        return {"method": cfg.federation.method, "rounds": 0}
    last = records[-1]
    evaluated = [r for r in records if r.get(f"global_{primary}") is not None]
    best = (max if higher_is_better else min)(evaluated, key=lambda r: r[f"global_{primary}"])
    local = [r[f"local_{primary}"] for r in records if r.get(f"local_{primary}") is not None]
    summary: dict[str, Any] = {"method": cfg.federation.method, "rounds": len(records)}
    summary["evaluated_rounds"] = [r["round"] for r in records if r.get("evaluated", True)]
    summary |= {k: last[k] for k in ("majority_share", "local_majority_share") if k in last}
    summary |= {k.replace("global_", "final_global_", 1): v for k, v in last.items() if _is_global_metric(k, v)}
    return (
        summary
        | _kept(records, cfg, primary, higher_is_better)
        | {
            f"best_global_{primary}": best[f"global_{primary}"],
            "best_round": best["round"],
            f"mean_local_{primary}": float(np.mean(local)),
            f"final_local_{primary}": last[f"local_{primary}"],
            "final_local_global_gap": last["local_global_gap"],
            "mean_divergence": float(np.mean([r["divergence"] for r in records])),
            "final_divergence": last["divergence"],
            "total_bytes_up": int(sum(r["bytes_up"] for r in records)),
            "total_bytes_down": int(sum(r["bytes_down"] for r in records)),
            "wall_seconds": float(sum(r["seconds"] for r in records)),
            "missing_clients": missing_clients(records),
            "excluded_clients": missing_clients(records, "excluded_clients"),
        }
        | ({"epsilon": last["epsilon"], "delta": cfg.privacy.delta} if "epsilon" in last else {})
    )


def _kept(
    records: Sequence[Mapping[str, Any]], cfg: cfgmod.ExperimentConfig, primary: str, higher_is_better: bool
) -> dict[str, Any]:
    """``saved_round``: the round whose global model ``adapter/`` holds (``output.keep``); with a validation split,
    its best value and round (``best_val_<primary>``, ``best_val_round``)."""
    best = keep.best_record(records, f"val_{primary}", higher_is_better)
    out: dict[str, Any] = {"keep": cfg.output.keep, "saved_round": records[-1]["round"]}
    if best is not None:
        out |= {f"best_val_{primary}": best[f"val_{primary}"], "best_val_round": best["round"]}
        if cfg.output.keep == "best":
            out["saved_round"] = best["round"]
    return out


def _is_global_metric(key: str, value: Any) -> bool:
    """A held-out metric of the global model (``global_accuracy``, ``global_loss``, ...), not a per-client one."""
    return key.startswith("global_") and not key.endswith("_on_local") and isinstance(value, float | int)


def missing_clients(records: Sequence[Mapping[str, Any]], key: str = "failed_clients") -> dict[str, list[int]]:
    """{client: the rounds it was sampled but left out of}: it failed, timed out or its node was down
    (``failed_clients``), or screening refused its upload (``excluded_clients``)."""
    out: dict[str, list[int]] = {}
    for r in records:
        for c in r.get(key, {}):
            out.setdefault(str(c), []).append(int(r["round"]))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))
