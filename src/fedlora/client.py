"""A client's round, the same on every engine: download → ``method.prepare`` → train → local evaluation →
``method.upload``.

The method turns the download into a ``TrainPlan``; the shared loop trains it on the task's loss
(``fedlora.training``, which touches the PEFT edge once on the way in and once on the way out); in a round that
evaluates, the client's own trained adapter is evaluated on its own test split (the local metrics); the method
then decides what goes up and what stays in the client state. A client with a simulated fault
(``faults.clients``, ``fedlora.faults``) raises or hangs before training, or has its upload corrupted after
``method.upload``, the same way on every engine.

A method may return several plans (FL-TAC: one adapter per local task, each plan naming its task). They train one
after another on the same model, each on its task's examples; in a round that evaluates, each trained adapter is
evaluated on the client's test examples of its task, and the local metrics combine those sums. ``upload`` then gets
the trained adapters and extras as tuples, in plan order.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedlora import faults
from fedlora.evaluation import scope, sums
from fedlora.experiment import CLIENT, FAULTS, Experiment, derive_seed, train_settings
from fedlora.payload import reference_tensors
from fedlora.tasks import Encoded, add_sums
from fedlora.training import TrainResult, train_client
from fedlora.types import Contribution, Payload, TrainPlan


@dataclass(frozen=True)
class ClientOutcome:
    """One client's round: its upload, the task's metrics of its own trained adapter on its own split (None in a
    round that evaluates nothing; the every-round metrics only between full evaluations), its training loss, what
    it downloaded, timings, its new client state."""

    contribution: Contribution
    local: Mapping[str, float] | None
    train_loss: float
    bytes_down: int
    train_seconds: float
    eval_seconds: float
    client_state: Any


def client_round(exp: Experiment, download: Payload, client_state: Any, c: int, rnd: int) -> ClientOutcome:
    """prepare → train → local evaluation → upload, for client ``c`` in round ``rnd`` given its download."""
    fault = exp.cfg.faults.clients.get(str(c))
    faults.before_training(fault, c, rnd, exp.cfg.federation.round_timeout)
    info = exp.client_info(c)
    plan, client_state = exp.method.prepare(client_state, download, info, rnd)
    plans = (plan,) if isinstance(plan, TrainPlan) else tuple(plan)
    data, full = exp.clients[c], scope(exp, rnd)
    results, parts, eval_seconds = [], [], 0.0
    for i, p in enumerate(plans):
        seed = derive_seed(exp.cfg.seed, CLIENT, rnd, c, *([i] if len(plans) > 1 else []))
        train = task_subset(data.train, p.task)
        results.append(train_client(exp.model, exp.task.loss, p, train, train_settings(exp.cfg, rnd), seed))
        started = time.perf_counter()
        if full is not None:
            parts.append(sums(exp, task_subset(data.test, p.task), full))
        eval_seconds += time.perf_counter() - started
    local = exp.task.finish(add_sums(parts)) if full is not None else None
    trained, extras = _outputs(results, single=isinstance(plan, TrainPlan))
    upload, client_state = exp.method.upload(client_state, trained, extras, info, rnd)
    # several plans upload under slot prefixes no plan names: their faults measure from zero, as faults.py documents
    start = reference_tensors(plan.adapter, plan.extras, plan.cores) if isinstance(plan, TrainPlan) else {}
    upload = faults.corrupt(fault, upload, start, derive_seed(exp.cfg.seed, FAULTS, rnd, c))
    contribution = Contribution(c, float(data.num_examples), upload)
    loss = sum(r.loss * r.steps for r in results) / max(sum(r.steps for r in results), 1)
    seconds = sum(r.seconds for r in results)
    return ClientOutcome(contribution, local, loss, download.nbytes, seconds, eval_seconds, client_state)


def _outputs(results: list[TrainResult], single: bool) -> tuple[Any, Any]:
    if single:
        return results[0].adapter, results[0].extras
    return tuple(r.adapter for r in results), tuple(r.extras for r in results)


def task_subset(data: Encoded, task: int | None) -> Encoded:
    """The examples of one task of a multi-task federation (all of them for ``task = None``)."""
    if task is None:
        return data
    if "task" not in data:
        raise ValueError(f"TrainPlan.task = {task}, but the client's examples carry no task ids (data.tasks unset)")
    keep = data["task"] == task
    return {k: v[keep] for k, v in data.items()}
