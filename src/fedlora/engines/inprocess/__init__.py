"""The in-process engine (``federation.engine = "inprocess"``): one process and one shared model whose adapter is
swapped per client, with a round's clients trained in parallel worker processes (``federation.workers``).

Each round: sample clients (seeded by the round), compute their downloads, run every client's round (in this
process or on the pool), then close the round (aggregate, evaluate, record) and checkpoint. Every random choice
derives from (``seed``, round, client), so a resumed run ends with the same results as an uninterrupted one, and
the results do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fedlora import config as cfgmod
from fedlora import devices, rundir, server, tracking
from fedlora.client import ClientOutcome, client_round
from fedlora.engines.inprocess.workers import EvalTask, TrainTask, WorkerPool
from fedlora.evaluation import Evaluation, collect, evaluate_here, targets
from fedlora.experiment import Experiment, build
from fedlora.methods.base import GlobalModel
from fedlora.types import RunState

__all__ = ["num_workers", "run", "run_round"]


def run(
    cfg: cfgmod.ExperimentConfig, run_dir: Path | None = None, resume: bool = False, progress: Any | None = None
) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) an experiment in this process; returns the run directory and the summary."""
    check_hang(cfg)
    run_dir = run_dir or rundir.default_run_dir(cfg)
    if not resume:
        rundir.check_fresh_dir(run_dir)
    exp = build(cfg)
    state = rundir.start(exp, run_dir, resume)
    with tracking.open(cfg, run_dir, resume) as trackers, _pool(cfg) as pool:
        for rnd in range(state.next_round, cfg.federation.rounds + 1):
            if progress is not None:
                progress.round_started(rnd, len(server.sample_clients(exp, rnd)))
            run_round(exp, state, rnd, pool, progress.client_done if progress is not None else None)
            rundir.record_round(run_dir, state, trackers)
            if progress is not None:
                progress.round_done(rnd, state.records[-1])
        return run_dir, rundir.finish(exp, run_dir, state, trackers)


def run_round(
    exp: Experiment,
    state: RunState,
    rnd: int,
    pool: WorkerPool | None = None,
    on_client: Callable[[int], None] | None = None,
) -> None:
    """One round, in place on ``state``. A client that raises is left out (recorded in ``failed_clients``);
    fewer answers than ``federation.min_clients`` fail the round."""
    started = time.perf_counter()
    sampled = server.sample_clients(exp, rnd)
    states, downloads = server.client_states(exp, state, sampled), server.downloads(exp, state, sampled, rnd)
    done = (lambda i: on_client(sampled[i])) if on_client is not None else None
    if pool is None:
        results = {}
        for i, c in enumerate(sampled):
            results[c] = _guarded(exp, downloads[c], states[c], c, rnd)
            if done is not None:
                done(i)
    else:
        edits = exp.method.export(state.server).base_edits
        tasks = [TrainTask(c, rnd, downloads[c], states[c]) for c in sampled]
        results = dict(zip(sampled, pool.map(tasks, edits, done), strict=True))
    outcomes = [v for _, (status, v) in sorted(results.items()) if status == "ok"]
    failed = {c: v for c, (status, v) in sorted(results.items()) if status != "ok"}
    evaluate = evaluate_here if pool is None else _pool_evaluator(pool)
    server.close_round(exp, state, rnd, outcomes, failed, evaluate, started, parallel=pool is not None)


def _guarded(exp: Experiment, download: Any, client_state: Any, c: int, rnd: int) -> tuple[str, Any]:
    """One client's round in this process; an error is kept as its reason (one bad client never loses the
    others' work)."""
    try:
        outcome: ClientOutcome = client_round(exp, download, client_state, c, rnd)
        return "ok", outcome
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}"


def _pool_evaluator(pool: WorkerPool) -> server.Evaluate:
    """The global model's evaluation spread over the pool: the test set in slices and each client's split."""

    def evaluate(exp: Experiment, model: GlobalModel, clients: Sequence[int], full: bool) -> Evaluation:
        work = targets(exp, clients)
        tasks = [EvalTask(model.adapter, model.extras, (t,), full) for t in work]
        results: dict[Any, Any] = {}
        for status, value in pool.map(tasks, model.base_edits):
            if status != "ok":
                raise RuntimeError(f"evaluation failed in a worker process: {value}")
            results |= value
        return collect(exp, results, clients)

    return evaluate


def num_workers(cfg: cfgmod.ExperimentConfig) -> int:
    """``federation.workers``, or automatically: min(2, CPU cores) when more than one client trains per round on
    the CPU; 0 on a GPU, where the clients share the one model in this process (its adapter swapped per client)
    rather than hold a copy of the model per worker in the GPU's memory."""
    if cfg.federation.workers is not None:
        return cfg.federation.workers
    per_round = cfg.federation.clients_per_round or cfg.data.num_clients
    if per_round == 1 or devices.shares_one_model(cfg.model.device):
        return 0
    return min(2, os.cpu_count() or 1)


@contextlib.contextmanager
def _pool(cfg: cfgmod.ExperimentConfig) -> Iterator[WorkerPool | None]:
    n = num_workers(cfg)
    if n == 0:
        yield None
        return
    with WorkerPool(cfg, n, cfg.federation.round_timeout) as pool:
        yield pool


def check_hang(cfg: cfgmod.ExperimentConfig) -> None:
    """A ``hang`` fault needs worker processes: the main process cannot give up on a client it is running."""
    hanging = sorted(c for c, f in cfg.faults.clients.items() if f == "hang")
    if hanging and num_workers(cfg) == 0:
        raise ValueError(
            f"faults.clients.{hanging[0]} = \"hang\" on federation.engine = 'inprocess' needs federation.workers ≥ 1: "
            "a worker that overruns federation.round_timeout is replaced, the main process cannot abandon a client"
        )
