"""The fedlora ClientApp: one Flower node is one client (partition ``partition-id`` of the node config).

Message types (``group_id`` is the round):

- ``query``: reply with the node's ``partition-id`` (the server maps node ids to clients with it; no model is
  built for it).
- ``train``: the client's download (records ``arrays`` + ``meta``, see :mod:`fedlora.engines.flower.records`) →
  ``fedlora.client.client_round`` (the method's ``prepare`` → the shared training loop → local evaluation →
  ``upload``) → reply with the upload and the metrics (``num-examples``, ``local-<metric>`` of the task in a round
  that evaluates, ``train-loss``, timings, ``base-version``), plus the method's ``evaluation_report`` of the new
  client state when it has one (record ``fedlora.report``: what the server needs for ``evaluation_model``, e.g.
  FedSA-LoRA's own B).
- ``evaluate``: the exported global model (adapter, head, the base edits the node has not applied) → the task's
  metrics of the global model on the node's own test split, as every engine measures them
  (``fedlora.evaluation``).

Every message also carries the experiment config (record ``fedlora.config``, Flower's run config form) and a
``fedlora.task`` record naming the client. The node builds its ``Experiment`` once per process, config and client
(tokenising only its own partition, one torch thread) and keeps across messages, in ``context.state``:

- ``fedlora.client_state``: the method's client state, pickled (``ConfigRecord`` bytes). Methods whose client
  state is None store None; the server keeps no client state.
- ``fedlora.base_edits``: every base edit the node received (payload names ``base.<v>.<m>.*``), replayed into a
  freshly built model (in deployment each message may run in a new process); replaying is idempotent by version.

Simulated faults (``faults.clients``) act inside ``client_round``, as on every engine: a ``raise`` fault makes the
``train`` reply an error, a ``hang`` fault answers only after ``federation.round_timeout``.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.engines.flower import records

CONFIG, TASK = "fedlora.config", "fedlora.task"
CLIENT_STATE, BASE_EDITS = "fedlora.client_state", "fedlora.base_edits"

app = ClientApp()

MAX_EXPERIMENTS = 4
"""Experiments (model + one partition) a process keeps; an evicted node's model is rebuilt from its state."""
_EXPERIMENTS: dict[tuple[tuple[tuple[str, Any], ...], int], Any] = {}


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError(
            f"node config {dict(context.node_config)} has no 'partition-id': start each SuperNode with "
            "--node-config 'partition-id=<client> num-partitions=<data.num_clients>'"
        )
    return int(context.node_config["partition-id"])


def _experiment(msg: Message, context: Context) -> tuple[Any, int, int]:
    """(the node's cached Experiment, its client id, the round) after checking the message names this node."""
    import torch

    from fedlora.experiment import build

    task = msg.content.config_records[TASK]
    c, rnd = int(task["client"]), int(task["round"])
    if c != partition_id(context):
        raise ValueError(f"message for client {c} reached the node of partition-id {partition_id(context)}")
    flat = dict(msg.content.config_records[CONFIG])
    key = (tuple(sorted(flat.items(), key=lambda kv: kv[0])), c)
    if key not in _EXPERIMENTS:
        torch.set_num_threads(1)
        while len(_EXPERIMENTS) >= MAX_EXPERIMENTS:  # a simulation actor serves several nodes in turn
            del _EXPERIMENTS[next(iter(_EXPERIMENTS))]
        _EXPERIMENTS[key] = build(records.from_run_config(flat), clients=(c,))
    exp = _EXPERIMENTS[key]
    _sync_base_edits(exp, context, {})
    return exp, c, rnd


def _sync_base_edits(exp: Any, context: Context, new: dict[str, Any]) -> None:
    """Replay the node's stored base edits (idempotent) and store ``new`` ones (payload names) beside them."""
    from fedlora import peft_io
    from fedlora.payload import unpack_base_edits

    stored = context.state.array_records.get(BASE_EDITS)
    tensors = dict(stored.to_torch_state_dict()) if stored is not None and len(stored) else {}
    if new:
        tensors |= {k: v for k, v in new.items() if k.startswith("base.")}
        context.state[BASE_EDITS] = ArrayRecord(torch_state_dict={k: v.contiguous() for k, v in tensors.items()})
    peft_io.apply_base_edits(exp.model, unpack_base_edits(tensors))


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"node": MetricRecord({"partition-id": partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedlora import peft_io
    from fedlora.client import client_round

    exp, c, rnd = _experiment(msg, context)
    download = records.record_payload(msg.content)
    stored = context.state.config_records.get(CLIENT_STATE)
    client_state = pickle.loads(stored["state"]) if stored is not None else exp.method.init_client(exp.client_info(c))
    outcome = client_round(exp, download, client_state, c, rnd)
    context.state[CLIENT_STATE] = ConfigRecord({"state": pickle.dumps(outcome.client_state)})
    _sync_base_edits(exp, context, dict(download.tensors))
    values = {
        "num-examples": int(outcome.contribution.weight),
        "train-loss": outcome.train_loss,
        "train-seconds": outcome.train_seconds,
        "eval-seconds": outcome.eval_seconds,
        "base-version": peft_io.base_version(exp.model),
    }
    if outcome.local is not None:  # absent in a round that does not evaluate (eval.every)
        values |= {f"local-{k}": v for k, v in outcome.local.items()}
    metrics = MetricRecord(values)
    content = RecordDict({**records.payload_records(outcome.contribution.payload), "metrics": metrics})
    report = getattr(exp.method, "evaluation_report", None)  # e.g. FedSA-LoRA's own B and head, for evaluation
    if report is not None:
        content[records.REPORT] = records.report_record(report(outcome.client_state))
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedlora.evaluation import load_global, metrics
    from fedlora.methods.base import GlobalModel
    from fedlora.payload import unpack_adapter, unpack_base_edits, unpack_extras

    exp, c, _ = _experiment(msg, context)
    full = bool(msg.content.config_records[TASK]["full"])
    model = records.record_payload(msg.content)
    _sync_base_edits(exp, context, dict(model.tensors))
    stored = context.state.array_records.get(BASE_EDITS)
    edits = unpack_base_edits(dict(stored.to_torch_state_dict())) if stored is not None and len(stored) else ()
    adapter = None if model.meta.get("fresh_init") else unpack_adapter(model.tensors, "global model")
    started = time.perf_counter()
    load_global(exp, GlobalModel(adapter, unpack_extras(model.tensors), edits))
    values = metrics(exp, exp.clients[c].test, full) | {"eval-seconds": time.perf_counter() - started}
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)
