"""Centralised reference for the evidence protocol: what the same model, optimiser and step budget reach without
federation, on one client holding all the training data.

    .venv/bin/python scripts/centralised_reference.py [CONFIG.toml] [key=value ...] [--steps 100] [--every 10]

The config is the experiment's (e.g. configs/evidence/rotten-tomatoes-alpha0.5.toml), with ``data.num_clients = 1``
forced, so the model, LoRA, learning rate, batch size, precision and the global test split are the same. Two
schedules, both ``--steps`` AdamW steps in total, evaluated on the global test set every ``--every`` steps:

* continuous: one AdamW state for all steps (the centralised upper reference);
* restarted: a fresh AdamW every ``train.local_steps`` steps through fedlora's client loop, as a client restarts
  its optimiser each round (one client, so no aggregation: what federation costs beyond the restarts is the gap
  between this and the federated run).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from fedlora import config, runner, training
from fedlora.types import TrainPlan


def continuous(exp: runner.Experiment, steps: int, every: int) -> None:
    settings = runner.train_settings(exp.cfg)
    training.apply_plan(exp.model, TrainPlan(rank=exp.info.rank, adapter=None, extras=exp.info.extras), exp.cfg.seed)
    params = [p for p in exp.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    stream = training.batches(exp.clients[0].train, settings.batch_size, torch.Generator().manual_seed(exp.cfg.seed))
    torch.manual_seed(exp.cfg.seed)
    for step in range(1, steps + 1):
        exp.model.train()
        with training.autocast(settings.precision):
            loss = exp.model(**next(stream)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        if step % every == 0:
            report("continuous", step, exp)


def restarted(exp: runner.Experiment, steps: int, every: int) -> None:
    settings = runner.train_settings(exp.cfg)
    assert settings.local_steps is not None, "restarted schedule needs train.local_steps"
    adapter, extras = None, exp.info.extras
    for rnd in range(steps // settings.local_steps):
        plan = TrainPlan(rank=exp.info.rank, adapter=adapter, extras=extras)
        result = training.train_client(exp.model, plan, exp.clients[0].train, settings, exp.cfg.seed + rnd)
        adapter, extras = result.adapter, result.extras
        done = (rnd + 1) * settings.local_steps
        if done % every == 0:
            report("restarted", done, exp)


def report(schedule: str, step: int, exp: runner.Experiment) -> None:
    accuracy, loss = training.evaluate(exp.model, exp.test, exp.cfg.model.precision)
    print(f"{schedule:>10} step {step:4d}: global accuracy {accuracy:.4f}, global loss {loss:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=None)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    if args.config is not None and "=" in args.config and not args.config.endswith(".toml"):
        args.overrides, args.config = [args.config, *args.overrides], None  # overrides only
    torch.set_num_threads(1)
    forced = ["data.num_clients=1", "data.partition=iid", "federation.workers=0"]
    cfg = config.load_config(args.config, [*args.overrides, *forced])
    exp = runner.setup(cfg)
    majority = float(torch.bincount(exp.test["labels"]).max()) / len(exp.test["labels"])
    print(f"global test set: {len(exp.test['labels'])} examples, majority class share {majority:.4f}")
    continuous(exp, args.steps, args.every)
    restarted(exp, args.steps, args.every)


if __name__ == "__main__":
    main()
