"""Centralised reference for the evidence protocol: what the same model, optimiser and step budget reach without
federation, on one client holding all the training data.

    .venv/bin/python scripts/centralised_reference.py [CONFIG.toml] [key=value ...] [--steps 100] [--every 10]
        [--schedules continuous,restarted]

The config is the experiment's (e.g. configs/evidence/rotten-tomatoes-alpha0.5.toml), with ``data.num_clients = 1``
forced, so the model, LoRA, learning rate, batch size, precision and the global test split are the same. Two
schedules, both ``--steps`` AdamW steps in total, evaluated on the global test set every ``--every`` steps:

* continuous: one AdamW state for all steps (the centralised upper reference);
* restarted: a fresh AdamW every ``train.local_steps`` steps through fedlora's client loop, as a client restarts
  its optimiser each round (one client, so no aggregation: what federation costs beyond the restarts is the gap
  between this and the federated run).

The untrained model is evaluated first (step 0: the round-0 reference of every federated run on the same config).
A task whose costly metrics are not measured every round (a causal LM's generation metrics) reports its every-round
metrics (the NLL) at the intermediate steps and every metric at step 0 and the last step. ``--steps 0`` only
evaluates the untrained model.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from fedlora import config, evaluation, peft_io, training
from fedlora.experiment import Experiment, build, train_settings
from fedlora.types import TrainPlan


def continuous(exp: Experiment, steps: int, every: int) -> None:
    settings = train_settings(exp.cfg)
    plan = TrainPlan(rank=exp.info.rank, adapter=None, extras=exp.info.extras)
    params = peft_io.load_plan(exp.model, plan, exp.cfg.seed).parameters
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    stream = training.batches(exp.clients[0].train, settings.batch_size, torch.Generator().manual_seed(exp.cfg.seed))
    torch.manual_seed(exp.cfg.seed)
    for step in range(1, steps + 1):
        exp.model.train()
        with training.autocast(settings.precision):
            loss = exp.task.loss(exp.model, next(stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        if step % every == 0 or step == steps:
            report("continuous", step, exp, full=step == steps)


def restarted(exp: Experiment, steps: int, every: int) -> None:
    settings = train_settings(exp.cfg)
    assert settings.local_steps is not None, "restarted schedule needs train.local_steps"
    adapter, extras = None, exp.info.extras
    for rnd in range(steps // settings.local_steps):
        plan = TrainPlan(rank=exp.info.rank, adapter=adapter, extras=extras)
        seed = exp.cfg.seed + rnd
        result = training.train_client(exp.model, exp.task.loss, plan, exp.clients[0].train, settings, seed)
        adapter, extras = result.adapter, result.extras
        done = (rnd + 1) * settings.local_steps
        if done % every == 0 or done == steps:
            report("restarted", done, exp, full=done == steps)


def report(schedule: str, step: int, exp: Experiment, full: bool = False) -> None:
    values = evaluation.metrics(exp, exp.test, full or not exp.task.every_round)
    shown = ", ".join(f"global {k} {v:.4f}" for k, v in values.items())
    print(f"{schedule:>10} step {step:4d}: {shown}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=None)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--schedules", default="continuous,restarted", help="comma-separated: continuous, restarted")
    args = ap.parse_args()
    if args.config is not None and "=" in args.config and not args.config.endswith(".toml"):
        args.overrides, args.config = [args.config, *args.overrides], None  # overrides only
    torch.set_num_threads(1)
    forced = ["data.num_clients=1", "federation.clients_per_round=1", "data.partition=iid", "federation.workers=0"]
    cfg = config.load_config(args.config, [*args.overrides, *forced])
    exp = build(cfg)
    print(f"global test set: {len(exp.test['input_ids'])} examples, baseline ({exp.task.baseline_name}) {exp.baseline}")
    report("untrained", 0, exp, full=True)
    schedules = {"continuous": continuous, "restarted": restarted}
    for name in args.schedules.split(",") if args.steps else ():
        schedules[name.strip()](exp, args.steps, args.every)


if __name__ == "__main__":
    main()
