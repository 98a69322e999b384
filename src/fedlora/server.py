"""The server's round, the same on every engine: sample clients, compute their downloads, and once their outcomes
are in, aggregate, measure, evaluate and record.

An engine runs a round as::

    sampled = sample_clients(exp, rnd)
    states, downloads = client_states(exp, state, sampled), downloads(exp, state, sampled, rnd)
    ... each sampled client's round, wherever the engine runs it (fedlora.client.client_round) ...
    close_round(exp, state, rnd, outcomes, failures, evaluate, started, parallel)

``close_round`` screens the uploads (``federation.screen``, ``fedlora.screening``), checks
``federation.min_clients`` against the clients kept, keeps their new client states, clips and noises their uploads
under central DP (``privacy.mechanism``, ``fedlora.privacy``), calls ``method.aggregate`` with weights normalised
over the clients kept, evaluates the global model through the engine's ``evaluate`` in a round that evaluates,
and appends the round's metrics record to the run state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from fedlora import keep, privacy, schedule, screening
from fedlora.client import ClientOutcome
from fedlora.evaluation import Evaluation, global_model, scope
from fedlora.experiment import PRIVACY, SAMPLING, Experiment, derive_seed
from fedlora.methods.base import GlobalModel
from fedlora.payload import reference_tensors
from fedlora.types import AggregationReport, Contribution, Payload, RunState

Evaluate = Callable[[Experiment, GlobalModel, Sequence[int], bool], Evaluation]
"""(exp, the global model, the clients whose splits to evaluate it on, full) -> its evaluation, the engine's way
(``full``: every metric of the task, else its every-round metrics; see ``fedlora.evaluation.scope``)."""


def sample_clients(exp: Experiment, rnd: int) -> list[int]:
    """``federation.clients_per_round`` clients drawn uniformly without replacement, seeded by the round."""
    n = exp.cfg.data.num_clients
    k = exp.cfg.federation.clients_per_round or n
    if k == n:
        return list(range(n))
    # numpy: torch.randperm's first elements correlate across seeds for small n, which would bias the sample
    rng = np.random.default_rng(derive_seed(exp.cfg.seed, SAMPLING, rnd))
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


def client_states(exp: Experiment, state: RunState, clients: Sequence[int]) -> dict[int, Any]:
    """Each client's method state as the server holds it (a fresh one for a client's first round)."""
    return {c: state.clients.get(c, exp.method.init_client(exp.client_info(c))) for c in clients}


def downloads(exp: Experiment, state: RunState, clients: Sequence[int], rnd: int) -> dict[int, Payload]:
    """What each client downloads this round (``method.broadcast``; may differ per client)."""
    return {c: exp.method.broadcast(state.server, exp.client_info(c), rnd) for c in clients}


def normalized(contributions: Sequence[Contribution]) -> list[Contribution]:
    """Weights by example count, normalised over the clients that answered."""
    total = sum(c.weight for c in contributions)
    return [Contribution(c.client, c.weight / total, c.payload) for c in contributions]


def close_round(
    exp: Experiment,
    state: RunState,
    rnd: int,
    outcomes: Sequence[ClientOutcome],
    failed: Mapping[int, str],
    evaluate: Evaluate,
    started: float,
    parallel: bool,
) -> None:
    """Screen, aggregate the round's outcomes, evaluate (in a round that evaluates) and record, in place on
    ``state``.

    ``started``: ``time.perf_counter()`` when the clients started; ``parallel``: whether they trained in parallel
    (then the round's wall time is split between training and local evaluation in proportion to their CPU time).
    Fewer clients kept than ``federation.min_clients`` fail the round with every failure and refusal listed.
    """
    t_agg = time.perf_counter()
    start = exp.method.export(state.server)
    reference = reference_tensors(start.adapter, start.extras, start.cores)
    fed = exp.cfg.federation
    answered = [o.contribution for o in outcomes]
    kept, excluded, norms = screening.screen(answered, exp.info, exp.ranks, reference, fed.screen, fed.screen_z)
    if len(kept) < fed.min_clients:
        raise RuntimeError(
            f"round {rnd}: {len(kept)} clients answered and passed screening, fewer than federation.min_clients = "
            f"{fed.min_clients}; failures: {dict(failed)}; refused by screening: {excluded}"
        )
    outcomes = [o for o in outcomes if o.contribution.client not in excluded]
    for o in outcomes:
        state.clients[o.contribution.client] = o.client_state
    contributions, extra = normalized(kept), {"excluded_clients": excluded}
    if fed.screen == "norm":
        extra["update_norms"] = {str(c): v for c, v in norms.items()}
    if exp.cfg.privacy.mechanism == "central_dp":
        contributions, extra = _privatized(exp, contributions, reference, rnd, extra)
    state.server, report = exp.method.aggregate(state.server, contributions, rnd)
    model, errors = global_model(exp, state)
    report = replace(report, modules=errors) if errors else report
    report = replace(report, diagnostics={**report.diagnostics, **model.diagnostics}) if model.diagnostics else report
    t_eval = time.perf_counter()
    clients = [o.contribution.client for o in outcomes]
    full = scope(exp, rnd)
    evaluation = evaluate(exp, model, clients, full) if full is not None else None
    done = time.perf_counter()
    train = sum(o.train_seconds for o in outcomes)
    local_eval = sum(o.eval_seconds for o in outcomes)
    client_wall = t_agg - started
    share = client_wall / max(train + local_eval, 1e-12) if parallel else 1.0  # wall time, not CPU time
    seconds = {
        "train": train * share,
        "aggregate": t_eval - t_agg,
        "eval": done - t_eval + local_eval * share,
        "other": client_wall - (train + local_eval) * share,
    }
    record = round_record(exp, rnd, outcomes, failed, report, evaluation, full is True, seconds)
    state.records.append(record | extra | _faults(exp, [o.contribution.client for o in outcomes], failed, excluded))
    if exp.cfg.output.keep == "best":
        state.best = keep.update(state.best, state.records, model, exp.metrics[0], exp.task.higher_is_better)
    state.next_round = rnd + 1


def _privatized(
    exp: Experiment, contributions: list[Contribution], reference: Mapping[str, Any], rnd: int, extra: dict[str, Any]
) -> tuple[list[Contribution], dict[str, Any]]:
    """Central DP on the round's contributions, and the record's privacy keys (ε spent after this round)."""
    p, cfg = exp.cfg.privacy, exp.cfg
    done = privacy.privatize(
        contributions, reference, p.clip_norm, p.noise_multiplier, derive_seed(cfg.seed, PRIVACY, rnd)
    )
    rate = (cfg.federation.clients_per_round or cfg.data.num_clients) / cfg.data.num_clients
    return done.contributions, extra | {
        "epsilon": privacy.epsilon(p.noise_multiplier, rate, rnd, p.delta),
        "dp_noise_std": done.noise_std,
        "dp_update_norms": {str(c): v for c, v in done.norms.items()},
        "dp_clipped": sorted(c for c, v in done.norms.items() if v > p.clip_norm),
    }


def _faults(exp: Experiment, kept: Sequence[int], failed: Mapping[int, str], excluded: Mapping[int, str]) -> dict:
    """The simulated faults of the round's sampled clients (``faults.clients``), when any is configured."""
    if not exp.cfg.faults.clients:
        return {}
    sampled = set(kept) | set(failed) | set(excluded)
    return {"faults": {c: f for c, f in exp.cfg.faults.clients.items() if int(c) in sampled}}


def evaluation_keys(exp: Experiment) -> tuple[str, ...]:
    """The keys of a metrics record that come from evaluation (null where a round did not evaluate them)."""
    p, metrics = exp.metrics[0], exp.metrics
    keys = tuple(f"global_{m}" for m in metrics) + tuple(f"local_{m}" for m in metrics)
    keys += tuple(f"val_{m}" for m in metrics) if exp.validation is not None else ()
    return (*keys, f"global_{p}_on_local", "local_global_gap", f"clients_local_{p}", f"clients_global_{p}")


def round_record(
    exp: Experiment,
    rnd: int,
    outcomes: Sequence[ClientOutcome],
    failed: Mapping[int, str],
    report: AggregationReport,
    evaluation: Evaluation | None,
    full: bool,
    seconds: Mapping[str, float],
) -> dict[str, Any]:
    """One line of metrics.jsonl.

    ``evaluated``: whether the round evaluated fully (``eval.every``, and the last round). Evaluation keys, for each
    metric m of the task (the first is primary, p), null where the round did not evaluate m: ``global_<m>`` (the
    global model on the held-out test set), ``val_<m>`` (on the validation split, when the run has one),
    ``local_<m>`` (the mean over the round's clients of their own adapter
    on their own split), ``global_<p>_on_local`` (the global model on the same clients' splits),
    ``local_global_gap`` (how much better the clients' own adapters do than the global model on the same splits,
    in the primary metric: local − global when higher is better, global − local when lower is better) and the
    per-client lists. A client missing from the global-on-local results (its evaluation failed on a Flower node)
    is null in ``clients_global_<p>`` and left out of the gap. Baselines beside them when the task has one
    (classification: ``majority_share`` of the global test set, ``local_majority_share`` the mean over the
    round's clients of their own split's). ``lr``: the round's learning rate (``train.lr_schedule``).
    """
    clients = [o.contribution.client for o in outcomes]
    record: dict[str, Any] = {"round": rnd, "evaluated": full}
    record |= _evaluation_values(exp, outcomes, evaluation)
    if exp.task.baseline_name is not None:
        record[exp.task.baseline_name] = exp.baseline
        local = [exp.clients[c].baseline for c in clients]
        record[f"local_{exp.task.baseline_name}"] = float(np.mean([b for b in local if b is not None]))
    return record | {
        "divergence": report.divergence,
        "divergence_abs": report.error,
        "eckart_young": report.eckart_young,
        "fedit_divergence": report.fedit,
        "divergence_per_module": {m: e.divergence for m, e in report.modules.items()},
        "client_balance": list(report.client_balance),
        "diagnostics": report.diagnostics,
        "bytes_up": sum(report.bytes_up.values()),
        "bytes_down": sum(o.bytes_down for o in outcomes),
        "train_loss": float(np.mean([o.train_loss for o in outcomes])),
        "lr": schedule.lr_at(exp.cfg.train, rnd, exp.cfg.federation.rounds),
        "clients": clients,
        "failed_clients": dict(failed),
        "seconds": sum(seconds.values()),
        "seconds_train": seconds["train"],
        "seconds_aggregate": seconds["aggregate"],
        "seconds_eval": seconds["eval"],
        "seconds_other": seconds["other"],
    }


def _evaluation_values(
    exp: Experiment, outcomes: Sequence[ClientOutcome], evaluation: Evaluation | None
) -> dict[str, Any]:
    values: dict[str, Any] = dict.fromkeys(evaluation_keys(exp))
    if evaluation is None:
        return values
    p = exp.metrics[0]
    local = [dict(o.local or {}) for o in outcomes]
    glob = [dict(evaluation.clients.get(o.contribution.client) or {}) for o in outcomes]
    values |= {f"global_{m}": v for m, v in evaluation.test.items()}
    values |= {f"val_{m}": v for m, v in (evaluation.validation or {}).items()}
    values |= {f"local_{m}": _mean([lo.get(m) for lo in local]) for m in exp.metrics if any(m in lo for lo in local)}
    if not any(p in lo for lo in local):  # the primary metric was not evaluated this round
        return values
    pairs = [(lo[p], gl[p]) for lo, gl in zip(local, glob, strict=True) if p in lo and p in gl]
    on_local = _mean([gl for _, gl in pairs])
    sign = 1.0 if exp.task.higher_is_better else -1.0
    return values | {
        f"global_{p}_on_local": on_local,
        "local_global_gap": sign * (_mean([lo for lo, _ in pairs]) - on_local),
        f"clients_local_{p}": [lo.get(p) for lo in local],
        f"clients_global_{p}": [gl.get(p) for gl in glob],
    }


def _mean(values: Sequence[float | None]) -> float:
    """The mean of the values present (NaN when none is)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else float("nan")
