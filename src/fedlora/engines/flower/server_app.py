"""The fedlora ServerApp: a plain main loop over Flower's Grid / Message API around the shared server round.

Each round samples clients and computes their downloads (``fedlora.server``), runs their client rounds on the
nodes, then closes the round with ``fedlora.server.close_round`` (the ``federation.min_clients`` check,
``method.aggregate``, the evaluation, the metrics record), exactly as the in-process engine does:

- train: one ``train`` message per sampled client, built from ``method.broadcast(state, ClientInfo(c, rank),
  rnd)`` (per-client downloads, e.g. FlexLoRA's truncation); replies become ``ClientOutcome`` s. A client whose
  reply is an error, or that does not answer within ``federation.round_timeout``, is left out of the round.
- evaluate (in a round that evaluates): the global model on the server's held-out test set, and one ``evaluate``
  message per participating client for the global model's metrics on its own test split. A node that trained but
  does not answer it (it went down in between) is recorded under ``flower_failed_evaluation`` and left out of that
  round's global-on-local metrics; the round goes on.

Beside the payload accounting (``bytes_up`` / ``bytes_down``), each metrics line records the bytes of the actual
Flower train messages and replies of the clients that answered (see ``FlowerRound.metrics``): full encoding
(``flower_bytes_down`` / ``flower_bytes_up``), distinct objects (``*_unique``), their count (``flower_messages``)
and the mean per-message overhead each way (``flower_overhead_down`` / ``flower_overhead_up``: the message
without its payload tensors, which includes the experiment config every message carries).

The method's client state lives on the nodes (``context.state``); the server's ``RunState.clients`` holds None
per client, or, for a method with an evaluation-only global model (``evaluation_model``, FedSA-LoRA), the state
rebuilt from the node's ``evaluation_report`` (``method.from_evaluation_report``). Those report bytes are counted
apart (``flower_bytes_report``), not as uplink: they are never aggregated nor sent to a client.

In deployment the ServerApp reads the experiment from Flower's run config (``flwr run --run-config``,
:func:`fedlora.engines.flower.records.run_config`); in simulation
:func:`fedlora.engines.flower.simulation.run_simulation` passes the config, run directory and progress callbacks
directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora import config as cfgmod
from fedlora import rundir, server, tracking
from fedlora.client import ClientOutcome
from fedlora.engines.flower import records
from fedlora.engines.flower.client_app import CONFIG, TASK
from fedlora.evaluation import Evaluation, load_global, metrics, validation_metrics
from fedlora.experiment import Experiment, build
from fedlora.methods.base import GlobalModel
from fedlora.types import Contribution, Payload, RunState

NODE_START_TIMEOUT = 180.0
"""At least this long (or ``federation.round_timeout`` if longer) the server waits at start-up for every node to
connect and answer the partition query: starting a node's runtime (a Ray actor, a ``flwr-clientapp`` process)
can take longer than a short round timeout allows."""


class Nodes:
    """The node ids of the federation's clients: waits for ``data.num_clients`` nodes, asks each its partition."""

    def __init__(self, grid: Grid, cfg: cfgmod.ExperimentConfig) -> None:
        n, timeout = cfg.data.num_clients, max(cfg.federation.round_timeout, NODE_START_TIMEOUT)
        deadline = time.monotonic() + timeout
        ids = list(grid.get_node_ids())
        while len(ids) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(ids)} Flower nodes connected within {timeout} s (the start-up wait: the larger of "
                    f"federation.round_timeout and {NODE_START_TIMEOUT} s), expected data.num_clients = {n} "
                    "(one SuperNode per client)"
                )
            time.sleep(0.5)
            ids = list(grid.get_node_ids())
        queries = [Message(RecordDict(), dst_node_id=node, message_type="query", group_id="0") for node in ids]
        replies = list(grid.send_and_receive(queries, timeout=timeout))
        self.node_of: dict[int, int] = {}
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed the query: {reply.error.reason}")
            c = int(reply.content.metric_records["node"]["partition-id"])
            if c in self.node_of or not 0 <= c < n:
                raise RuntimeError(
                    f"node {reply.metadata.src_node_id} has partition-id {c}: expected a distinct id in [0, {n})"
                )
            self.node_of[c] = reply.metadata.src_node_id
        missing = sorted(set(range(n)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"no Flower node answered for clients {missing} within {timeout} s")


class FlowerRound:
    """One round's client rounds and evaluation on the nodes, and the Flower bytes it measured."""

    def __init__(self, grid: Grid, nodes: Nodes, rnd: int, progress: Any | None = None) -> None:
        self.grid, self.nodes, self.rnd, self.progress = grid, nodes, rnd, progress
        self.bytes = {f"{way}{part}": 0 for way in ("down", "up") for part in ("", "_unique", "_overhead", "_payload")}
        self.bytes["messages"] = self.bytes["report"] = 0
        self.base_version: dict[int, int] = {}
        self.failed_evaluation: dict[int, str] = {}

    def _message(self, exp: Experiment, kind: str, c: int, rnd: int, payload: Payload, **task: Any) -> Message:
        content = RecordDict(
            {
                **records.payload_records(payload),
                CONFIG: ConfigRecord(records.run_config(exp.cfg)),
                TASK: ConfigRecord({"client": c, "round": rnd, **task}),
            }
        )
        return Message(content, dst_node_id=self.nodes.node_of[c], message_type=kind, group_id=str(rnd))

    def _exchange(self, exp: Experiment, messages: dict[int, Message]) -> dict[int, Message | str]:
        """Send, wait up to federation.round_timeout; per client its reply or the reason it has none."""
        timeout = exp.cfg.federation.round_timeout
        replies = self.grid.send_and_receive(list(messages.values()), timeout=timeout)
        out: dict[int, Message | str] = {c: f"no reply within federation.round_timeout = {timeout} s" for c in messages}
        sent = {m.metadata.message_id: c for c, m in messages.items()}  # ids Flower assigned when pushing
        for reply in replies:
            # by the message it answers: the SuperLink itself answers for a node it marked offline
            c = sent[reply.metadata.reply_to_message_id]
            out[c] = f"error: {reply.error.reason}" if reply.has_error() else reply
        return out

    def train(self, exp: Experiment, state: RunState) -> tuple[list[ClientOutcome], dict[int, str]]:
        """Every sampled client's outcome from its node (in client order), and the failures."""
        rnd = self.rnd
        sampled = server.sample_clients(exp, rnd)
        downloads = server.downloads(exp, state, sampled, rnd)
        messages = {c: self._message(exp, "train", c, rnd, downloads[c]) for c in sampled}
        outcomes, failed = [], {}
        for c, reply in sorted(self._exchange(exp, messages).items()):
            if self.progress is not None:
                self.progress.client_done(c)
            if isinstance(reply, str):
                failed[c] = reply
                continue
            m = reply.content.metric_records["metrics"]
            upload = records.record_payload(reply.content)
            report = records.record_report(reply.content)
            report_bytes = records.message_nbytes(records.report_record(report)) if report is not None else 0
            self.bytes["report"] += report_bytes
            self.base_version[c] = int(m["base-version"])
            local = {k: float(m[f"local-{k}"]) for k in exp.metrics if f"local-{k}" in m} or None
            outcomes.append(
                ClientOutcome(
                    Contribution(c, float(m["num-examples"]), upload),
                    local,
                    float(m["train-loss"]),
                    downloads[c].nbytes,
                    float(m["train-seconds"]),
                    float(m["eval-seconds"]),
                    None if report is None else exp.method.from_evaluation_report(report),  # type: ignore[attr-defined]
                )
            )
            for way, msg, payload, extra in (
                ("down", messages[c], downloads[c], 0),
                ("up", reply, upload, report_bytes),
            ):
                self.bytes[way] += records.message_nbytes(msg) - extra
                self.bytes[f"{way}_unique"] += records.message_nbytes(msg, unique=True) - extra
                self.bytes[f"{way}_overhead"] += records.message_overhead(msg) - extra
                self.bytes[f"{way}_payload"] += payload.nbytes
            self.bytes["messages"] += 1
        return outcomes, failed

    def evaluate(self, exp: Experiment, model: GlobalModel, clients: Sequence[int], full: bool) -> Evaluation:
        """``model`` on the server's held-out test set and validation split and, through the nodes, on each
        client's own split."""
        load_global(exp, model)
        test, validation = metrics(exp, exp.test, full), validation_metrics(exp, full)
        messages = {}
        for c in clients:
            tensors = dict(records.pack_global(model, self.base_version.get(c, 0)))
            payload = Payload(tensors, {"fresh_init": model.adapter is None})
            messages[c] = self._message(exp, "evaluate", c, self.rnd, payload, full=full)
        on_local = {}
        for c, reply in self._exchange(exp, messages).items():
            if isinstance(reply, str):  # e.g. the node went down after training: recorded, the round goes on
                self.failed_evaluation[c] = reply
                continue
            values = reply.content.metric_records["metrics"]
            on_local[c] = {k: float(values[k]) for k in exp.metrics if k in values}
        return Evaluation(test, on_local, validation)

    def metrics(self) -> dict[str, Any]:
        """Flower message bytes of the train exchange (clients that answered), each way: full encoding
        (``flower_bytes_*``, comparable to ``bytes_*``), distinct objects as Flower's object store transfers them
        (``flower_bytes_*_unique``), and the mean per-message overhead beyond the payload tensors
        (``flower_overhead_*``). flower_bytes ≈ bytes + messages · overhead, plus a few hundred bytes of framing
        per tensor (name, dtype, shape, the .npy header)."""
        b, n = self.bytes, max(self.bytes["messages"], 1)
        return {
            "flower_bytes_down": b["down"],
            "flower_bytes_up": b["up"],
            "flower_bytes_down_unique": b["down_unique"],
            "flower_bytes_up_unique": b["up_unique"],
            "flower_messages": b["messages"],
            "flower_overhead_down": b["down_overhead"] / n,
            "flower_overhead_up": b["up_overhead"] / n,
            "flower_bytes_report": b["report"],
            "flower_failed_evaluation": {str(c): reason for c, reason in sorted(self.failed_evaluation.items())},
        }


def serve(
    grid: Grid, cfg: cfgmod.ExperimentConfig, run_dir: Path, resume: bool = False, progress: Any | None = None
) -> dict[str, Any]:
    """The whole run on a Flower grid; writes the run directory as every engine does and returns the summary."""
    if not resume:
        rundir.check_fresh_dir(run_dir)
    exp = build(cfg, clients=())
    state = rundir.start(exp, run_dir, resume)
    nodes = Nodes(grid, cfg)
    with tracking.open(cfg, run_dir, resume) as trackers:
        for rnd in range(state.next_round, cfg.federation.rounds + 1):
            if progress is not None:
                progress.round_started(rnd, len(server.sample_clients(exp, rnd)))
            flower_round = FlowerRound(grid, nodes, rnd, progress)
            started = time.perf_counter()
            outcomes, failed = flower_round.train(exp, state)
            server.close_round(exp, state, rnd, outcomes, failed, flower_round.evaluate, started, parallel=True)
            state.records[-1] |= flower_round.metrics()
            rundir.record_round(run_dir, state, trackers)
            if progress is not None:
                progress.round_done(rnd, state.records[-1])
        return rundir.finish(exp, run_dir, state, trackers)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run`` (deployment, or a local simulation connection): the experiment comes from the run
    config (:func:`fedlora.engines.flower.records.from_run_config`); an absolute ``output.dir`` is required."""
    cfg = records.from_run_config(dict(context.run_config))
    if cfg.output.dir is None or not Path(cfg.output.dir).is_absolute():
        raise ValueError(
            f"output.dir = {cfg.output.dir!r}: the Flower ServerApp needs an absolute run directory, e.g. "
            """flwr run . <connection> --run-config "overrides='output.dir=\"/abs/run\"'" """.strip()
        )
    serve(grid, cfg, Path(cfg.output.dir))
