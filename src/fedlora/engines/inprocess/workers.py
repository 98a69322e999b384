"""Clients of a round in parallel worker processes (the in-process engine's ``federation.workers``).

Each worker builds its own copy of the experiment (model, tokenised data) once, runs with one torch thread,
and serves two kinds of task over a pipe: one client's round (prepare → train → local evaluation → upload, the
same ``fedlora.client.client_round`` the sequential path calls) and the global model's evaluation sums on some
evaluation targets (``fedlora.evaluation``).
The main process keeps every piece of state: it computes each client's download, sends each worker the base
edits it has not applied yet, collects outcomes, and aggregates them in client order, so the results do not
depend on which worker ran which client. A task that has not answered within ``timeout`` seconds (the engine passes
``federation.round_timeout``) is given up: its worker is killed and replaced by a fresh one, and the task's result
is an error naming the timeout. Workers are stopped (by PID, with a timeout) on exit or failure.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from fedlora.types import BaseEdit, Payload

STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class TrainTask:
    client: int
    rnd: int
    download: Payload
    client_state: Any


@dataclass(frozen=True)
class EvalTask:
    """Evaluate the global model (adapter + head; base edits are synced separately) on evaluation targets
    (``fedlora.evaluation.targets``)."""

    adapter: Any
    extras: Any
    targets: tuple[tuple[Any, ...], ...]
    full: bool = True


def _worker_main(conn: Connection, cfg: Any) -> None:
    from fedlora import peft_io
    from fedlora.client import client_round
    from fedlora.evaluation import sums, target_set
    from fedlora.experiment import build

    torch.set_num_threads(1)
    exp = build(cfg)
    conn.send(("ready", None))
    while True:
        kind, payload = conn.recv()
        if kind == "stop":
            return
        try:
            edits, task = payload
            peft_io.apply_base_edits(exp.model, edits)
            if isinstance(task, TrainTask):
                result: Any = client_round(exp, task.download, task.client_state, task.client, task.rnd)
            else:
                peft_io.write_adapter(exp.model, task.adapter, task.extras, rank=exp.info.rank, seed=cfg.seed)
                result = {t: sums(exp, target_set(exp, t), task.full) for t in task.targets}
            conn.send(("ok", result))
        except Exception as e:  # one line, as the sequential path records it
            conn.send(("error", f"{type(e).__name__}: {e}"))


class WorkerPool:
    """``n`` worker processes, each with its own experiment copy; use as a context manager. ``timeout``: seconds
    a task may take before its worker is replaced (None: no limit)."""

    def __init__(self, cfg: Any, n: int, timeout: float | None = None) -> None:
        self.cfg, self.timeout = cfg, timeout
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.versions: list[int] = []
        for _ in range(n):
            self._spawn()
        for w in range(n):
            self._ready(w)

    def _spawn(self, w: int | None = None) -> None:
        """Start a worker process (in slot ``w``, replacing the one there; else a new slot)."""
        parent, child = mp.get_context("spawn").Pipe()
        proc = mp.get_context("spawn").Process(target=_worker_main, args=(child, self.cfg), daemon=True)
        proc.start()
        child.close()
        if w is None:
            self.conns.append(parent)
            self.procs.append(proc)
            self.versions.append(0)
        else:
            self.conns[w], self.procs[w], self.versions[w] = parent, proc, 0

    def _ready(self, w: int) -> None:
        status, _ = self._recv(self.conns[w])
        if status != "ready":
            raise RuntimeError("a worker process failed to start")

    def _replace(self, w: int) -> None:
        """Kill worker ``w`` (it overran its task) and start a fresh one in its slot."""
        self.procs[w].kill()
        self.procs[w].join(STOP_TIMEOUT)
        self.conns[w].close()
        self._spawn(w)
        self._ready(w)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, conn: Connection) -> tuple[str, Any]:
        try:
            return conn.recv()
        except EOFError:
            return "error", "the worker process died"

    def _send(self, w: int, task: Any, edits: Sequence[BaseEdit]) -> None:
        new = tuple(e for e in edits if e.version > self.versions[w])
        self.conns[w].send(("task", (new, task)))
        if new:
            self.versions[w] = new[-1].version

    def map(
        self, tasks: Sequence[Any], edits: Sequence[BaseEdit], on_done: Callable[[int], None] | None = None
    ) -> list[tuple[str, Any]]:
        """Run tasks on free workers as they come free; results in task order, each ("ok"|"error", value).
        ``on_done(i)`` is called as task i finishes (progress)."""
        results: list[tuple[str, Any] | None] = [None] * len(tasks)
        pending = list(enumerate(tasks))
        busy: dict[int, tuple[int, float]] = {}  # worker -> (task, deadline)

        def start(w: int) -> None:
            if pending and self.procs[w].is_alive():
                i, task = pending.pop(0)
                self._send(w, task, edits)
                busy[w] = (i, time.monotonic() + self.timeout if self.timeout is not None else float("inf"))

        def finish(w: int, result: tuple[str, Any]) -> None:
            i, _ = busy.pop(w)
            results[i] = result
            if on_done is not None:
                on_done(i)
            start(w)

        for w in range(len(self.conns)):
            start(w)
        while busy:
            wait_for = min(deadline for _, deadline in busy.values()) - time.monotonic()
            ready = wait([self.conns[w] for w in busy], timeout=max(wait_for, 0.0) if wait_for < 1e9 else None)
            for conn in ready:
                w = self.conns.index(conn)  # type: ignore[arg-type]
                finish(w, self._recv(conn))  # type: ignore[arg-type]
            for w, (_, deadline) in list(busy.items()):
                if time.monotonic() > deadline:
                    self._replace(w)
                    finish(w, ("error", f"no reply within federation.round_timeout = {self.timeout} s"))
        if pending:
            raise RuntimeError("every worker process died")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs, strict=True):
            if proc.is_alive():
                with contextlib.suppress(BrokenPipeError, OSError):
                    conn.send(("stop", None))
        for proc in self.procs:
            proc.join(STOP_TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join(STOP_TIMEOUT)
        for conn in self.conns:
            conn.close()
