"""The in-process engine: one process, one shared model whose adapter is swapped per client.

Each round: sample clients (seeded by the round), and for each: ``broadcast`` → ``prepare`` → train → evaluate
locally → ``upload``; then ``aggregate`` once, load the exported global model, and evaluate it on the global
test set and on every participating client's own test split. Every random choice derives from
(``seed``, round, client), so a run resumed from its last checkpoint ends with the same results as one that was
never interrupted. The Flower engines reuse ``Experiment`` and these per-client functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora import config as cfgmod
from fedlora import data as datamod
from fedlora import methods, peft_io
from fedlora.methods.base import ClientInfo, GlobalModel, Method, ModelInfo
from fedlora.training import Encoded, TrainSettings, accuracy_loss, evaluate, train_client
from fedlora.types import AggregationReport, Contribution, ModuleError, Payload
from fedlora.workers import EvalTask, TrainTask, WorkerPool

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


SAMPLING, CLIENT, EVAL_SAMPLE = 0, 1, 2  # independent random streams


def derive_seed(seed: int, stream: int, *keys: int) -> int:
    """A 31-bit seed from (seed, stream, keys...): independent streams for sampling and per (round, client)."""
    return int(np.random.SeedSequence([seed, stream, *keys]).generate_state(1)[0] >> 1)


@dataclass
class ClientData:
    """A client's tokenised train and test splits (the test split subsampled per ``eval.max_examples``), its
    number of training examples (its aggregation weight) and the majority-class share of its test split."""

    train: Encoded
    test: Encoded
    num_examples: int
    majority_share: float


@dataclass
class Experiment:
    """Everything a run needs, built and validated before any training starts."""

    cfg: cfgmod.ExperimentConfig
    method: Method
    model: torch.nn.Module
    info: ModelInfo
    clients: list[ClientData]
    test: Encoded
    ranks: list[int]
    label_names: list[str]
    majority_share: float
    """Accuracy of always predicting the most frequent label of the global test set: the baseline."""

    def client_info(self, c: int) -> ClientInfo:
        return ClientInfo(c, self.ranks[c])


def train_settings(cfg: cfgmod.ExperimentConfig) -> TrainSettings:
    t = cfg.train
    precision = cfg.model.precision
    return TrainSettings(t.lr, t.weight_decay, t.max_grad_norm, t.batch_size, t.local_steps, t.local_epochs, precision)


def setup(cfg: cfgmod.ExperimentConfig, clients: Collection[int] | None = None) -> Experiment:
    """Load data and model, partition, tokenise, build the method: every bad input fails here.

    ``clients``: tokenise only these clients' splits (a Flower node loads only its own partition, the Flower
    server none); the others keep their example count and empty data. None: every client.
    """
    if cfg.model.task != "seq_cls":
        raise ValueError(
            f"model.task = {cfg.model.task!r}: federated training and evaluation support 'seq_cls' so far "
            "(causal LM models load, see fedlora.peft_io.load_base_model, but have no training loop yet)"
        )
    torch.manual_seed(cfg.seed)
    method = methods.build(cfg.federation.method, cfg.method)
    ds = datamod.load_dataset(cfg.data.dataset, cfg.data.text_column, cfg.data.label_column)
    d = cfg.data
    fed = datamod.federate(
        ds,
        num_clients=d.num_clients,
        partition=d.partition,
        alpha=d.alpha,
        labels_per_client=d.labels_per_client,
        min_partition_size=d.min_partition_size,
        test_fraction=d.test_fraction,
        local_test_fraction=d.local_test_fraction,
        seed=cfg.seed,
    )
    lora = cfg.model.lora
    ranks = list(lora.ranks) if lora.ranks is not None else [lora.r] * d.num_clients
    tokenizer = peft_io.load_tokenizer(cfg.model.name)
    base = peft_io.load_base_model(cfg.model.name, cfg.model.task, num_labels=len(fed.label_names))
    targets = list(lora.target_modules) or peft_io.default_target_modules(base)
    model = peft_io.make_peft_model(
        base,
        r=max(ranks),
        alpha=lora.alpha,
        dropout=lora.dropout,
        rslora=lora.rslora,
        target_modules=targets,
        variant=lora.variant,
        task=cfg.model.task,
    )
    _, extras = peft_io.read_adapter(model)
    info = ModelInfo(peft_io.module_specs(model), max(ranks), extras)
    if methods.capabilities(cfg.federation.method).needs_base_weights:
        scales = {m: peft_io.lora_scale(model, m) for m in info.specs}
        info = replace(info, base_weights=peft_io.base_weights(model), scales=scales)

    def enc(part: datamod.TextDataset) -> Encoded:
        return datamod.tokenize(part, tokenizer, d.max_length)

    keep = set(range(d.num_clients)) if clients is None else set(clients)
    parts = []
    for c, (tr, te) in enumerate(fed.clients):
        te = eval_subsample(te, cfg.eval.max_examples, derive_seed(cfg.seed, EVAL_SAMPLE, c))
        data = (enc(tr), by_length(enc(te))) if c in keep else ({}, {})
        parts.append(ClientData(*data, len(tr.labels), majority_share(te)))
    test = by_length(enc(fed.test))
    return Experiment(cfg, method, model, info, parts, test, ranks, list(fed.label_names), majority_share(fed.test))


def majority_share(ds: datamod.TextDataset) -> float:
    """The share of the most frequent label: the accuracy of always predicting it (NaN for no examples)."""
    return max(ds.label_counts()) / len(ds) if len(ds) else float("nan")


def eval_subsample(ds: datamod.TextDataset, max_examples: int | None, seed: int) -> datamod.TextDataset:
    """At most ``max_examples`` examples of ``ds``, drawn without replacement by ``seed`` (all when unset)."""
    if max_examples is None or len(ds) <= max_examples:
        return ds
    rng = np.random.default_rng(seed)
    return ds.subset(sorted(int(i) for i in rng.choice(len(ds), size=max_examples, replace=False)))


def by_length(data: Encoded) -> Encoded:
    """The examples longest first, so that evaluation batches (and the evaluation tasks of the worker pool, which
    are slices) hold sequences of similar length and carry little padding. Evaluation sums do not depend on the
    order."""
    if not data or not len(data["attention_mask"]):
        return data
    order = torch.argsort(data["attention_mask"].sum(1), descending=True, stable=True)
    return {k: v[order] for k, v in data.items()}


def is_evaluated(cfg: cfgmod.ExperimentConfig, rnd: int) -> bool:
    """Whether round ``rnd`` evaluates (every ``eval.every`` rounds, and always the last round)."""
    return rnd % cfg.eval.every == 0 or rnd == cfg.federation.rounds


def sample_clients(exp: Experiment, rnd: int) -> list[int]:
    """``federation.clients_per_round`` clients drawn uniformly without replacement, seeded by the round."""
    n = exp.cfg.data.num_clients
    k = exp.cfg.federation.clients_per_round or n
    if k == n:
        return list(range(n))
    # numpy: torch.randperm's first elements correlate across seeds for small n, which would bias the sample
    rng = np.random.default_rng(derive_seed(exp.cfg.seed, SAMPLING, rnd))
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


@dataclass(frozen=True)
class ClientOutcome:
    """One client's round: its upload, its local accuracy with its own trained adapter (None in a round that does
    not evaluate), timings."""

    contribution: Contribution
    local_accuracy: float | None
    train_loss: float
    bytes_down: int
    train_seconds: float
    eval_seconds: float
    client_state: Any


def train_one(exp: Experiment, download: Payload, client_state: Any, c: int, rnd: int) -> ClientOutcome:
    """prepare → train → local evaluation → upload, for client ``c`` in round ``rnd`` given its download."""
    info = exp.client_info(c)
    plan, client_state = exp.method.prepare(client_state, download, info, rnd)
    data = exp.clients[c]
    seed = derive_seed(exp.cfg.seed, CLIENT, rnd, c)
    result = train_client(exp.model, plan, data.train, train_settings(exp.cfg), seed)
    started = time.perf_counter()
    local_accuracy = evaluate(exp.model, data.test, exp.cfg.model.precision)[0] if is_evaluated(exp.cfg, rnd) else None
    eval_seconds = time.perf_counter() - started
    upload, client_state = exp.method.upload(client_state, result.adapter, result.extras, info, rnd)
    contribution = Contribution(c, float(data.num_examples), upload)
    return ClientOutcome(
        contribution, local_accuracy, result.loss, download.nbytes, result.seconds, eval_seconds, client_state
    )


EVAL_CHUNK = 256
"""Examples of the global test set per evaluation task on the worker pool (tasks go to whichever worker is
free, largest first, so the workers finish together)."""


def eval_set(exp: Experiment, target: tuple[Any, ...]) -> Encoded:
    """("test", start, stop): a slice of the global test set; ("client", c): client c's own test split."""
    if target[0] == "test":
        return {k: v[target[1] : target[2]] for k, v in exp.test.items()}
    return exp.clients[target[1]].test


def global_model(exp: Experiment, state: RunState) -> tuple[GlobalModel, Mapping[str, ModuleError] | None]:
    """The model evaluated and saved as the global one: ``method.export(server state)``, unless the method
    defines the optional ``evaluation_model(server_state, client_states) -> (GlobalModel, {module: ModuleError})``.

    That hook is for personalised methods whose global model needs what stays on the clients (FedSA-LoRA: Ā with
    the weighted mean of the clients' own B and heads), computed for evaluation only and never sent; its errors
    replace the aggregation report's (the server alone cannot measure them). In process the client states are at
    hand; on Flower they will come from the nodes' reported state.
    """
    hook = getattr(exp.method, "evaluation_model", None)
    if hook is None:
        return exp.method.export(state.server), None
    return hook(state.server, state.clients)


def load_global(exp: Experiment, model: GlobalModel) -> None:
    """Put the exported global model into the shared model: base edits, adapter at the broadcast rank, head."""
    peft_io.apply_base_edits(exp.model, model.base_edits)
    peft_io.write_adapter(exp.model, model.adapter, model.extras, rank=exp.info.rank, seed=exp.cfg.seed)


def normalized(contributions: Sequence[Contribution]) -> list[Contribution]:
    """Weights by example count, normalised over the clients that answered."""
    total = sum(c.weight for c in contributions)
    return [Contribution(c.client, c.weight / total, c.payload) for c in contributions]


@dataclass
class RunState:
    """What a checkpoint holds: the next round, the method's server and client states, the metrics so far."""

    next_round: int
    server: Any
    clients: dict[int, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def round_record(
    exp: Experiment,
    rnd: int,
    outcomes: Sequence[ClientOutcome],
    failed: Mapping[int, str],
    report: AggregationReport,
    evaluation: tuple[tuple[float, float], Mapping[int, float]] | None,
    seconds: Mapping[str, float],
) -> dict[str, Any]:
    """One line of metrics.jsonl. ``evaluation`` is None in a round that does not evaluate (``eval.every``): its
    evaluation keys are then null. A client missing from the global-on-local accuracies (its evaluation failed on a
    Flower node) has ``null`` in ``clients_global_accuracy`` and is left out of the local-global gap.

    Baselines beside the accuracies: ``majority_share`` (always predicting the global test set's most frequent
    label) and ``local_majority_share`` (the mean over this round's clients of that share on their own test split,
    the baseline of ``local_accuracy``)."""
    clients = [o.contribution.client for o in outcomes]
    record: dict[str, Any] = {"round": rnd, "evaluated": evaluation is not None, "majority_share": exp.majority_share}
    record |= _evaluation_keys(outcomes, evaluation)
    record["local_majority_share"] = float(np.mean([exp.clients[c].majority_share for c in clients]))
    return record | {
        "divergence": report.divergence,
        "eckart_young": report.eckart_young,
        "fedit_divergence": report.fedit,
        "divergence_per_module": {m: e.divergence for m, e in report.modules.items()},
        "client_balance": list(report.client_balance),
        "diagnostics": report.diagnostics,
        "bytes_up": sum(report.bytes_up.values()),
        "bytes_down": sum(o.bytes_down for o in outcomes),
        "train_loss": float(np.mean([o.train_loss for o in outcomes])),
        "clients": clients,
        "failed_clients": dict(failed),
        "seconds": sum(seconds.values()),
        "seconds_train": seconds["train"],
        "seconds_aggregate": seconds["aggregate"],
        "seconds_eval": seconds["eval"],
        "seconds_other": seconds["other"],
    }


EVALUATION_KEYS = (
    "global_accuracy",
    "global_loss",
    "local_accuracy",
    "global_accuracy_on_local",
    "local_global_gap",
    "clients_local_accuracy",
    "clients_global_accuracy",
)
"""The keys of a metrics record that come from evaluation (null in a round that does not evaluate)."""


def _evaluation_keys(
    outcomes: Sequence[ClientOutcome], evaluation: tuple[tuple[float, float], Mapping[int, float]] | None
) -> dict[str, Any]:
    if evaluation is None:
        return dict.fromkeys(EVALUATION_KEYS)
    (accuracy, loss), global_on_local = evaluation
    local = [o.local_accuracy for o in outcomes]
    glob = [global_on_local.get(o.contribution.client) for o in outcomes]
    both = [(lo, gl) for lo, gl in zip(local, glob, strict=True) if gl is not None and lo is not None]
    on_local = float(np.mean([gl for _, gl in both])) if both else float("nan")
    return {
        "global_accuracy": accuracy,
        "global_loss": loss,
        "local_accuracy": float(np.mean(local)),
        "global_accuracy_on_local": on_local,
        "local_global_gap": float(np.mean([lo for lo, _ in both]) - on_local) if both else float("nan"),
        "clients_local_accuracy": local,
        "clients_global_accuracy": glob,
    }


def _train_clients(
    exp: Experiment, state: RunState, rnd: int, pool: WorkerPool | None, on_client: Callable[[int], None] | None
) -> tuple[list[ClientOutcome], dict[int, str]]:
    """Every sampled client's outcome (in client order) and the failures, in the main process or on the pool."""
    sampled = sample_clients(exp, rnd)
    states = {c: state.clients.get(c, exp.method.init_client(exp.client_info(c))) for c in sampled}
    downloads = {c: exp.method.broadcast(state.server, exp.client_info(c), rnd) for c in sampled}
    results: dict[int, tuple[str, Any]] = {}
    if pool is None:
        for c in sampled:
            try:  # one bad client never loses the others' work
                results[c] = ("ok", train_one(exp, downloads[c], states[c], c, rnd))
            except Exception as e:
                results[c] = ("error", f"{type(e).__name__}: {e}")
            if on_client is not None:
                on_client(c)
    else:
        edits = exp.method.export(state.server).base_edits
        tasks = [TrainTask(c, rnd, downloads[c], states[c]) for c in sampled]
        results = dict(zip(sampled, pool.map(tasks, edits), strict=True))
        if on_client is not None:
            for c in sampled:
                on_client(c)
    outcomes = [v for c, (status, v) in sorted(results.items()) if status == "ok"]
    failed = {c: v for c, (status, v) in sorted(results.items()) if status != "ok"}
    return outcomes, failed


def _evaluate_global(
    exp: Experiment, state: RunState, clients: Sequence[int], pool: WorkerPool | None
) -> tuple[tuple[float, float], dict[int, float]]:
    """The global model on the held-out test set and on each given client's own test split."""
    exported = global_model(exp, state)[0]
    if pool is None:
        load_global(exp, exported)
        precision = exp.cfg.model.precision
        test = evaluate(exp.model, exp.test, precision)
        return test, {c: evaluate(exp.model, exp.clients[c].test, precision)[0] for c in clients}
    n = int(exp.test["labels"].shape[0])
    chunks = [("test", i, min(i + EVAL_CHUNK, n)) for i in range(0, n, EVAL_CHUNK)]
    targets = [*chunks, *[("client", c) for c in clients]]
    targets.sort(key=lambda t: -int(eval_set(exp, t)["attention_mask"].sum()))  # largest first: balanced workers
    tasks = [EvalTask(exported.adapter, exported.extras, (t,)) for t in targets]
    sums: dict[tuple[Any, ...], tuple[int, float, int]] = {}
    for status, value in pool.map(tasks, exported.base_edits):
        if status != "ok":
            raise RuntimeError(f"evaluation failed in a worker process: {value}")
        sums |= value
    test = tuple(map(sum, zip(*(sums[t] for t in chunks), strict=True)))
    return accuracy_loss(test), {c: accuracy_loss(sums[("client", c)])[0] for c in clients}  # type: ignore[arg-type]


Trainer = Callable[[Experiment, RunState, int], tuple[list[ClientOutcome], dict[int, str]]]
"""(exp, state, rnd) -> every sampled client's outcome in client order, and the failures (client -> reason)."""
Evaluator = Callable[[Experiment, RunState, Sequence[int]], tuple[tuple[float, float], dict[int, float]]]
"""(exp, state, clients) -> (global accuracy, loss) on the test set, and each client's accuracy on its split."""


def run_round(
    exp: Experiment,
    state: RunState,
    rnd: int,
    on_client: Callable[[int], None] | None = None,
    pool: WorkerPool | None = None,
    trainer: Trainer | None = None,
    evaluator: Evaluator | None = None,
) -> None:
    """One round, in place on ``state``. A client that raises is left out; fewer than min_clients fails.

    ``trainer`` / ``evaluator`` replace the local client training and global evaluation (the Flower engines
    train and evaluate on their nodes); the aggregation, checks and the metrics record stay here.
    """
    started = time.perf_counter()
    if trainer is not None:
        outcomes, failed = trainer(exp, state, rnd)
    else:
        outcomes, failed = _train_clients(exp, state, rnd, pool, on_client)
    if len(outcomes) < exp.cfg.federation.min_clients:
        raise RuntimeError(
            f"round {rnd}: {len(outcomes)} clients answered, fewer than federation.min_clients = "
            f"{exp.cfg.federation.min_clients}; failures: {failed}"
        )
    for o in outcomes:
        state.clients[o.contribution.client] = o.client_state
    t_agg = time.perf_counter()
    state.server, report = exp.method.aggregate(state.server, normalized([o.contribution for o in outcomes]), rnd)
    errors = global_model(exp, state)[1]
    report = replace(report, modules=errors) if errors else report
    t_eval = time.perf_counter()
    evaluated = [o.contribution.client for o in outcomes]
    evaluation = None
    if is_evaluated(exp.cfg, rnd):
        evaluation = (evaluator or partial(_evaluate_global, pool=pool))(exp, state, evaluated)
    done = time.perf_counter()
    train = sum(o.train_seconds for o in outcomes)
    local_eval = sum(o.eval_seconds for o in outcomes)
    client_wall = t_agg - started
    parallel = pool is not None or trainer is not None
    share = client_wall / max(train + local_eval, 1e-12) if parallel else 1.0  # wall time, not CPU time
    seconds = {
        "train": train * share,
        "aggregate": t_eval - t_agg,
        "eval": done - t_eval + local_eval * share,
        "other": client_wall - (train + local_eval) * share,
    }
    state.records.append(round_record(exp, rnd, outcomes, failed, report, evaluation, seconds))
    state.next_round = rnd + 1


# ---- run directories and checkpoints -------------------------------------------------------------------------


def default_run_dir(cfg: cfgmod.ExperimentConfig) -> Path:
    return Path(cfg.output.dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}-{cfg.federation.method}")


def check_fresh_dir(run_dir: Path) -> None:
    if (run_dir / CHECKPOINT).exists() or (run_dir / METRICS).exists():
        raise FileExistsError(
            f"output.dir = {str(run_dir)!r} already holds a run; choose another output.dir or continue it with "
            f"`fedlora run --resume {run_dir}`"
        )


def save_checkpoint(run_dir: Path, state: RunState) -> None:
    """Atomically: write a temporary file, then rename over the checkpoint and rewrite metrics.jsonl."""
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)
    lines = "".join(json.dumps(r) + "\n" for r in state.records)
    tmp_metrics = run_dir / (METRICS + ".tmp")
    tmp_metrics.write_text(lines)
    os.replace(tmp_metrics, run_dir / METRICS)


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
    """Final global adapter as a PEFT directory (+ base edits + head), and summary.json."""
    load_global(exp, global_model(exp, state)[0])
    peft_io.save_model_adapter(exp.model, run_dir / "adapter")
    edits = exp.method.export(state.server).base_edits
    if edits:
        peft_io.write_base_edits(run_dir / "adapter" / "base_edits.safetensors", edits)
    summary = summarize(state.records, exp.cfg)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize(records: Sequence[Mapping[str, Any]], cfg: cfgmod.ExperimentConfig) -> dict[str, Any]:
    """The protocol's reported numbers from the per-round records; evaluation numbers over the evaluated rounds
    (the last round always is one), with the majority-class baselines beside the accuracies."""
    if not records:
        return {"method": cfg.federation.method, "rounds": 0}
    last = records[-1]
    evaluated = [r for r in records if r.get("evaluated", True)]
    return {
        "method": cfg.federation.method,
        "rounds": len(records),
        "evaluated_rounds": [r["round"] for r in evaluated],
        "majority_share": last.get("majority_share"),
        "final_global_accuracy": last["global_accuracy"],
        "best_global_accuracy": max(r["global_accuracy"] for r in evaluated),
        "best_round": max(evaluated, key=lambda r: r["global_accuracy"])["round"],
        "final_global_loss": last["global_loss"],
        "mean_local_accuracy": float(np.mean([r["local_accuracy"] for r in evaluated])),
        "final_local_accuracy": last["local_accuracy"],
        "local_majority_share": last.get("local_majority_share"),
        "final_local_global_gap": last["local_global_gap"],
        "mean_divergence": float(np.mean([r["divergence"] for r in records])),
        "final_divergence": last["divergence"],
        "total_bytes_up": int(sum(r["bytes_up"] for r in records)),
        "total_bytes_down": int(sum(r["bytes_down"] for r in records)),
        "wall_seconds": float(sum(r["seconds"] for r in records)),
        "missing_clients": missing_clients(records),
    }


def missing_clients(records: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """{client: the rounds it was sampled but left out of (it failed, timed out or its node was down)}."""
    out: dict[str, list[int]] = {}
    for r in records:
        for c in r.get("failed_clients", {}):
            out.setdefault(str(c), []).append(int(r["round"]))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def run(
    cfg: cfgmod.ExperimentConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: Any | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) an experiment; returns the run directory and the summary. ``federation.engine`` other
    than ``inprocess`` runs on Flower (``fedlora.flower``), which writes the same run directory."""
    if cfg.federation.engine != "inprocess":
        from fedlora import flower

        return flower.run(cfg, run_dir, resume, progress)
    run_dir = run_dir or default_run_dir(cfg)
    if not resume:
        check_fresh_dir(run_dir)
    exp = setup(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        state = load_checkpoint(run_dir)
        restore_model(exp, state)
    else:
        (run_dir / "config.toml").write_text(cfgmod.dump_toml(cfg))
        state = RunState(1, exp.method.init_server(exp.info, cfg.seed), {})
    with _pool(cfg) as pool:
        for rnd in range(state.next_round, cfg.federation.rounds + 1):
            on_client = progress.client_done if progress is not None else None
            if progress is not None:
                progress.round_started(rnd, len(sample_clients(exp, rnd)))
            run_round(exp, state, rnd, on_client, pool)
            save_checkpoint(run_dir, state)
            if progress is not None:
                progress.round_done(rnd, state.records[-1])
    return run_dir, save_outputs(exp, run_dir, state)


def num_workers(cfg: cfgmod.ExperimentConfig) -> int:
    """``federation.workers``, or automatically min(2, CPU cores) when more than one client trains per round."""
    if cfg.federation.workers is not None:
        return cfg.federation.workers
    per_round = cfg.federation.clients_per_round or cfg.data.num_clients
    return min(2, os.cpu_count() or 1) if per_round > 1 else 0


@contextlib.contextmanager
def _pool(cfg: cfgmod.ExperimentConfig) -> Iterator[WorkerPool | None]:
    n = num_workers(cfg)
    if n == 0:
        yield None
        return
    with WorkerPool(cfg, n) as pool:
        yield pool
