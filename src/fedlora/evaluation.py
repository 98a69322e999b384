"""Evaluation shared by every engine: which rounds evaluate, the evaluation sets, loading a global model, and the
evaluation of a model on sets in this process.

Per evaluated round: the global model on the held-out test set, on the validation split when there is one
(``data.val_fraction``, ``output.keep = "best"``) and on each participating client's test split (the local-global
gap), and each client's own adapter on its own split (in its client round). Sets are addressed by *targets*, so
that an engine can spread them over processes and add the sums back up: ``("test", start, stop)`` a slice of the
global test set (longest examples first), ``("val", start, stop)`` a slice of the validation split,
``("client", c)`` client c's test split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedlora import config as cfgmod
from fedlora import peft_io
from fedlora.experiment import Experiment
from fedlora.methods.base import GlobalModel
from fedlora.tasks import Encoded, Sums, add_sums
from fedlora.types import ModuleError, RunState

EVAL_CHUNK = 256
"""Examples of the global test set per evaluation target, so that a worker pool can share the set out."""

Target = tuple[Any, ...]


@dataclass(frozen=True)
class Evaluation:
    """The global model's finished metrics on the held-out test set, on each evaluated client's split, and on the
    validation split (None without one)."""

    test: Mapping[str, float]
    clients: Mapping[int, Mapping[str, float]]
    validation: Mapping[str, float] | None = None


def is_evaluated(cfg: cfgmod.ExperimentConfig, rnd: int) -> bool:
    """Whether round ``rnd`` evaluates fully (every ``eval.every`` rounds, and always the last round)."""
    return rnd % cfg.eval.every == 0 or rnd == cfg.federation.rounds


def scope(exp: Experiment, rnd: int) -> bool | None:
    """What round ``rnd`` evaluates: True, every metric of the task (a full evaluation); False, only the task's
    ``every_round`` metrics; None, nothing (a task without every-round metrics, between full evaluations)."""
    if is_evaluated(exp.cfg, rnd):
        return True
    return False if exp.task.every_round else None


def global_model(exp: Experiment, state: RunState) -> tuple[GlobalModel, Mapping[str, ModuleError] | None]:
    """The model evaluated and saved as the global one: ``method.export(server state)``, unless the method
    defines the optional ``evaluation_model(server_state, client_states) -> (GlobalModel, {module: ModuleError})``.

    That hook is for personalised methods whose global model needs what stays on the clients (FedSA-LoRA: Ā with
    the weighted mean of the clients' own B and heads), computed for evaluation only and never sent; its errors
    replace the aggregation report's (the server alone cannot measure them). In process the client states are at
    hand; on Flower they come from the nodes' evaluation reports.
    """
    hook = getattr(exp.method, "evaluation_model", None)
    if hook is None:
        return exp.method.export(state.server), None
    return hook(state.server, state.clients)


def load_global(exp: Experiment, model: GlobalModel) -> None:
    """Put a global model into the shared model: base edits, adapter at the broadcast rank, head.

    A global adapter below the broadcast rank (zero-padding methods with heterogeneous ranks, in a round that none
    of the largest-rank clients answered) is zero-padded to it, which changes no ΔW."""
    adapter = model.adapter
    if adapter is not None:
        adapter = {m: lr.pad(exp.info.rank) if lr.rank < exp.info.rank else lr for m, lr in adapter.items()}
    peft_io.apply_base_edits(exp.model, model.base_edits)
    peft_io.write_adapter(exp.model, adapter, model.extras, rank=exp.info.rank, seed=exp.cfg.seed)


def sums(exp: Experiment, data: Encoded, full: bool = True) -> Sums:
    """The task's evaluation sums of the model as it stands on ``data`` (``full``: every metric, else the
    every-round ones)."""
    return exp.task.evaluate(exp.model, data, exp.tokenizer, exp.cfg, full)


def metrics(exp: Experiment, data: Encoded, full: bool = True) -> dict[str, float]:
    """The task's finished metrics of the model as it stands on ``data``."""
    return exp.task.finish(sums(exp, data, full))


def targets(exp: Experiment, clients: Sequence[int]) -> list[Target]:
    """The global test set and the validation split in ``EVAL_CHUNK`` slices and each client's split, largest
    first (so that workers taking them in turn finish together)."""
    out: list[Target] = []
    for kind, data in global_sets(exp).items():
        n = int(data["input_ids"].shape[0])
        out += [(kind, i, min(i + EVAL_CHUNK, n)) for i in range(0, n, EVAL_CHUNK)]
    out += [("client", c) for c in clients]
    return sorted(out, key=lambda t: -int(target_set(exp, t)["attention_mask"].sum()))


def global_sets(exp: Experiment) -> dict[str, Encoded]:
    """The sets only the global model is evaluated on: ``test``, and ``val`` when the run has a validation split."""
    return {"test": exp.test} | ({"val": exp.validation} if exp.validation is not None else {})


def target_set(exp: Experiment, target: Target) -> Encoded:
    if target[0] == "client":
        return exp.clients[target[1]].test
    return {k: v[target[1] : target[2]] for k, v in global_sets(exp)[target[0]].items()}


def collect(exp: Experiment, results: Mapping[Target, Sums], clients: Sequence[int]) -> Evaluation:
    """The evaluation from every target's sums."""
    test, val = (exp.task.finish(add_sums([s for t, s in results.items() if t[0] == k])) for k in ("test", "val"))
    clients_metrics = {c: exp.task.finish(results[("client", c)]) for c in clients}
    return Evaluation(test, clients_metrics, val if exp.validation is not None else None)


def validation_metrics(exp: Experiment, full: bool = True) -> dict[str, float] | None:
    """The model as it stands on the validation split (None without one)."""
    return metrics(exp, exp.validation, full) if exp.validation is not None else None


def evaluate_here(exp: Experiment, model: GlobalModel, clients: Sequence[int], full: bool = True) -> Evaluation:
    """``model`` on the global test set, the validation split and each client's split, in this process."""
    load_global(exp, model)
    on_clients = {c: metrics(exp, exp.clients[c].test, full) for c in clients}
    return Evaluation(metrics(exp, exp.test, full), on_clients, validation_metrics(exp, full))
