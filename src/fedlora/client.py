"""A client's round, the same on every engine: download → ``method.prepare`` → train → local evaluation →
``method.upload``.

The method turns the download into a ``TrainPlan``; the shared loop trains it on the task's loss
(``fedlora.training``, which touches the PEFT edge once on the way in and once on the way out); in a round that
evaluates, the client's own trained adapter is evaluated on its own test split (the local metrics); the method
then decides what goes up and what stays in the client state. A client with a simulated fault
(``faults.clients``, ``fedlora.faults``) raises or hangs before training, or has its upload corrupted after
``method.upload``, the same way on every engine.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedlora import faults
from fedlora.evaluation import metrics, scope
from fedlora.experiment import CLIENT, FAULTS, Experiment, derive_seed, train_settings
from fedlora.payload import reference_tensors
from fedlora.training import train_client
from fedlora.types import Contribution, Payload


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
    data = exp.clients[c]
    seed = derive_seed(exp.cfg.seed, CLIENT, rnd, c)
    result = train_client(exp.model, exp.task.loss, plan, data.train, train_settings(exp.cfg, rnd), seed)
    started = time.perf_counter()
    full = scope(exp, rnd)
    local = metrics(exp, data.test, full) if full is not None else None
    eval_seconds = time.perf_counter() - started
    upload, client_state = exp.method.upload(client_state, result.adapter, result.extras, info, rnd)
    start = reference_tensors(plan.adapter, plan.extras)
    upload = faults.corrupt(fault, upload, start, derive_seed(exp.cfg.seed, FAULTS, rnd, c))
    contribution = Contribution(c, float(data.num_examples), upload)
    return ClientOutcome(contribution, local, result.loss, download.nbytes, result.seconds, eval_seconds, client_state)
