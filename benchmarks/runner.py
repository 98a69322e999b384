"""Round-time benchmark of the in-process engine (not a test).

    .venv/bin/python benchmarks/runner.py [--clients 4] [--rounds 2] [--steps 10] [--workers 0 2]
                                          [--precision fp32 bf16]
    .venv/bin/python benchmarks/runner.py --clients 10 --rounds 4 --workers 2 --precision fp32 \
                                          --eval every=1 every=2,max_examples=50      # evaluation settings

Prints, per precision and worker setting, each round's wall time split into training, aggregation, evaluation
and everything else (target: everything else + aggregation ≤ 5% of a round), the mean round time of each
setting as a ratio to float32 with the same workers, and compares the training throughput of
``fedlora.training.train_client`` with a bare PyTorch loop (same PEFT model, same batches, AdamW, clipping, same
autocast) run in the same process, in the same run.

With ``--eval``, runs the same rounds under each evaluation setting (``eval.*`` keys, comma-separated; the first is
the baseline) and prints each setting's mean round time as a ratio to the baseline's, and whether the rounds both
settings evaluated report the same metrics (they must, where neither subsamples).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from fedlora import config, peft_io, training
from fedlora.engines import inprocess
from fedlora.experiment import Experiment, build, train_settings
from fedlora.types import RunState, TrainPlan


def bare_loop(
    model: torch.nn.Module, data: training.Encoded, steps: int, batch_size: int, seed: int, precision: str
) -> float:
    """The same work without fedlora: AdamW over the trainable parameters, clipping, the same batch stream."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    stream = training.batches(data, batch_size, torch.Generator().manual_seed(seed))
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**next(stream)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return time.perf_counter() - start


def throughput(exp: Experiment, steps: int, repeats: int) -> None:
    data = exp.clients[0].train
    settings = train_settings(exp.cfg)
    plan = TrainPlan(rank=exp.info.rank, adapter=None, extras=exp.info.extras)
    ours, bare = [], []
    for i in range(repeats):
        t = training.train_client(exp.model, exp.task.loss, plan, data, settings, seed=i).seconds
        ours.append(t)
        peft_io.load_plan(exp.model, plan, seed=i)
        bare.append(bare_loop(exp.model, data, steps, settings.batch_size, i, settings.precision))
    o, b = sorted(ours)[len(ours) // 2], sorted(bare)[len(bare) // 2]
    print(
        f"{settings.precision} training throughput, {steps} steps (median of {repeats}): "
        f"fedlora {steps / o:.2f} steps/s, "
        f"bare PyTorch {steps / b:.2f} steps/s, ratio fedlora/bare time = {o / b:.3f}"
    )


def rounds(cfg: config.ExperimentConfig, n_rounds: int) -> tuple[float, list[dict]]:
    """Run ``n_rounds`` rounds, print each one's split; return the mean round time in seconds and the records."""
    workers, precision, seconds = inprocess.num_workers(cfg), cfg.model.precision, []
    exp = build(cfg)
    state = RunState(1, exp.method.init_server(exp.info, cfg.seed), {})
    with inprocess._pool(cfg) as pool:
        for rnd in range(1, n_rounds + 1):
            inprocess.run_round(exp, state, rnd, pool=pool)
            r = state.records[-1]
            overhead = r["seconds_other"] + r["seconds_aggregate"]
            seconds.append(r["seconds"])
            print(
                f"{precision} workers={workers} round {rnd}: {r['seconds']:.1f} s = train {r['seconds_train']:.1f} + "
                f"eval {r['seconds_eval']:.1f} + aggregate {r['seconds_aggregate']:.3f} + other "
                f"{r['seconds_other']:.3f}; neither training nor evaluation: {100 * overhead / r['seconds']:.2f}% "
                f"({'PASS' if overhead <= 0.05 * r['seconds'] else 'FAIL'} ≤ 5%); load {os.getloadavg()[0]:.1f}"
            )
    return sum(seconds) / len(seconds), state.records


def compare_eval(base: list[str], settings: list[str], n_rounds: int) -> None:
    """The same rounds under each ``eval.*`` setting; ratios to the first, and the evaluated rounds' metrics."""
    runs = {}
    for setting in settings:
        overrides = [f"eval.{kv}" for kv in setting.split(",") if kv]
        cfg = config.load_config(None, [*base, *overrides, f"federation.rounds={n_rounds}"])
        print(f"-- eval: {setting}")
        runs[setting] = rounds(cfg, n_rounds)
    (first, (baseline, reference)), *others = runs.items()
    for setting, (mean, records) in others:
        same = [
            r["round"]
            for r, ref in zip(records, reference, strict=True)
            if r["evaluated"] and all(r[k] == ref[k] for k in ("global_accuracy", "global_loss", "local_accuracy"))
        ]
        evaluated = [r["round"] for r in records if r["evaluated"]]
        print(
            f"eval {setting}: mean round {mean:.1f} s against {baseline:.1f} s with eval {first}: "
            f"{mean / baseline:.2f}x; evaluated rounds {evaluated}, of which report exactly the baseline's "
            f"metrics: {same}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--method", default="flora_na")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--eval", nargs="+", help="evaluation settings to compare, e.g. every=1 every=2,max_examples=50")
    args = ap.parse_args()
    base = [
        f"data.num_clients={args.clients}",
        f"train.local_steps={args.steps}",
        f"federation.method={args.method}",
    ]
    if args.eval:
        with_setup = [*base, f"model.precision={args.precision[0]}", f"federation.workers={args.workers[0]}"]
        compare_eval(with_setup, args.eval, args.rounds)
        return
    mean: dict[tuple[str, int], float] = {}
    for precision in args.precision:
        with_precision = [*base, f"model.precision={precision}"]
        exp = build(config.load_config(None, [*with_precision, "federation.workers=0"]))
        peft_io.set_trainable(exp.model, frozenset({"A", "B"}))
        throughput(exp, args.steps, args.repeats)
        del exp
        for w in args.workers:
            cfg = config.load_config(None, [*with_precision, f"federation.workers={w}"])
            mean[precision, w] = rounds(cfg, args.rounds)[0]
    for (precision, w), seconds in mean.items():
        if precision != "fp32" and ("fp32", w) in mean:
            fp32 = mean["fp32", w]
            print(f"workers={w}: round {seconds:.1f} s in {precision}, {fp32:.1f} s in fp32: {fp32 / seconds:.2f}x")


if __name__ == "__main__":
    main()
