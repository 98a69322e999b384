"""Causal-LM benchmarks (not tests), each measured against a baseline run in the same process, in the same run.

    .venv/bin/python benchmarks/causal_lm.py train    [--model fedlora:smollm2-135m] [--steps 6] [--batch 8]
    .venv/bin/python benchmarks/causal_lm.py generate [--model ...] [--batch 16] [--new-tokens 24]
    .venv/bin/python benchmarks/causal_lm.py round    [--model ...] [--clients 10] [--workers 2] [--steps 5]
                                                      [--checkpointing off|on|both]

- ``train``: training tokens per second of ``fedlora.training.train_client`` with the causal-LM task's loss (the
  output layer only at response positions) against a bare PyTorch loop on the same PEFT model, the same batches,
  AdamW and clipping with the same loss (target: ratio ≥ 0.95), and against the bare loop with the usual
  full-vocabulary loss (``model(**batch).loss``: logits for every position), which gives the gain of response-only
  logits; plus the memory one step keeps for its backward pass, with response-only and full logits, and with
  ``train.gradient_checkpointing``.
- ``generate``: ``fedlora.generation.generate`` on ``--batch`` arithmetic prompts at once (left padding, KV cache)
  against one prompt at a time through the same function, same greedy outputs checked (target: ≥ 3× at batch 16).
- ``round``: one in-process round of ``--clients`` SmolLM2 clients on ``--workers`` worker processes with the
  arithmetic evidence cell's settings; peak RSS of the main process and of each worker, sampled from /proc
  (target: the sum within 8 GB), and the round's wall-time split (training, aggregation, evaluation, other);
  ``--checkpointing both`` (the default) runs the round without and then with ``train.gradient_checkpointing``
  and prints the ratios of their peaks and training times.

Tokens are the non-padding tokens of the batches (prompt and response) per second of wall time.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from fedlora import config, generation, peft_io, training
from fedlora.experiment import Experiment, build, train_settings
from fedlora.types import TrainPlan

CELL = Path(__file__).resolve().parents[1] / "configs" / "evidence-v2" / "causal" / "arithmetic.toml"


def experiment(model: str, batch: int, extra: list[str]) -> Experiment:
    overrides = [f"model.name={model}", f"train.batch_size={batch}", "data.arithmetic_per_module=200", *extra]
    return build(config.load_config(CELL, overrides))


# --------------------------------------------------------------------------------------------- training


def step_loss(exp: Experiment, batch: dict[str, torch.Tensor], full_logits: bool) -> torch.Tensor:
    """The task's response-only loss, or the full-vocabulary loss of ``model(**batch)`` (logits at every position)."""
    if full_logits:
        return exp.model(**{k: batch[k] for k in training.TOKEN_KEYS}).loss
    return exp.task.loss(exp.model, batch)


def bare_loop(exp: Experiment, steps: int, seed: int, full_logits: bool) -> tuple[float, int]:
    """AdamW over the trainable parameters with clipping, on the same batch stream; the task's response-only loss,
    or the full-vocabulary loss of ``model(**batch)``. Returns (seconds, tokens)."""
    model, data = exp.model, exp.clients[0].train
    live = peft_io.load_plan(model, TrainPlan(rank=exp.info.rank, adapter=None), seed)
    opt = torch.optim.AdamW(live.parameters, lr=5e-4)
    stream = training.batches(data, exp.cfg.train.batch_size, torch.Generator().manual_seed(seed))
    model.train()
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(stream)
        tokens += int(batch["attention_mask"].sum())
        loss = step_loss(exp, batch, full_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(live.parameters, 1.0)
        opt.step()
    return time.perf_counter() - start, tokens


def ours(exp: Experiment, steps: int, seed: int) -> tuple[float, int]:
    data = exp.clients[0].train
    settings = train_settings(exp.cfg)
    stream = training.batches(data, settings.batch_size, torch.Generator().manual_seed(seed))
    tokens = sum(int(next(stream)["attention_mask"].sum()) for _ in range(steps))
    plan = TrainPlan(rank=exp.info.rank, adapter=None)
    settings = training.TrainSettings(settings.lr, 0.0, 1.0, settings.batch_size, steps, None, settings.precision)
    return training.train_client(exp.model, exp.task.loss, plan, data, settings, seed).seconds, tokens


def kept_for_backward(exp: Experiment, full_logits: bool, checkpointing: bool) -> float:
    """GB of tensors one training step's forward pass keeps for its backward pass (each storage once, the model's
    own weights left out), seen by autograd's saved-tensor hooks; with checkpointing, what the checkpointed layers
    keep (their inputs) instead of their activations."""
    weights = {p.untyped_storage().data_ptr() for p in exp.model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    root = exp.model.get_base_model()
    if checkpointing:
        peft_io.enable_activation_checkpointing(root)
    batch = next(training.batches(exp.clients[0].train, exp.cfg.train.batch_size, torch.Generator().manual_seed(0)))
    exp.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss(exp, batch, full_logits)
    del loss
    if checkpointing:
        root.activation_checkpointing_disable()
    return sum(kept.values()) / 1e9


def bench_train(args: argparse.Namespace) -> None:
    exp = experiment(args.model, args.batch, ["federation.workers=0"])
    print(f"model {args.model}, batch {args.batch}, {args.steps} steps per measurement, {args.repeats} repeats")
    ours(exp, 1, 99)  # warm-up
    variants = {
        "fedlora": lambda i: ours(exp, args.steps, i),
        "bare (same loss)": lambda i: bare_loop(exp, args.steps, i, full_logits=False),
        "bare (full logits)": lambda i: bare_loop(exp, args.steps, i, full_logits=True),
    }
    rows: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.repeats):  # interleaved, so that load on the machine hits every variant alike
        for name, run in variants.items():
            seconds, tokens = run(i)
            rows[name].append(tokens / seconds)
    best = {name: max(values) for name, values in rows.items()}
    for name, values in rows.items():
        print(f"  {name:>20}: {best[name]:8.1f} tokens/s (best of {len(values)}; all {[round(v) for v in values]})")
    ratio = best["fedlora"] / best["bare (same loss)"]
    print(f"  fedlora / bare (same loss)          = {ratio:.3f}   (target >= 0.95)")
    print(f"  response-only / full-logit (bare)   = {best['bare (same loss)'] / best['bare (full logits)']:.2f}x")
    for name, full, checkpointing in (
        ("response-only", False, False),
        ("full logits", True, False),
        ("response-only, gradient checkpointing", False, True),
    ):
        print(f"  kept for the backward pass of one step, {name}: {kept_for_backward(exp, full, checkpointing):.2f} GB")


# --------------------------------------------------------------------------------------------- generation


def bench_generate(args: argparse.Namespace) -> None:
    exp = experiment(args.model, 16, ["federation.workers=0"])
    data, tok = exp.test, exp.tokenizer
    ids, mask = data["prompt_ids"][: args.batch], data["prompt_mask"][: args.batch]
    kwargs = {"max_new_tokens": args.new_tokens, "precision": exp.cfg.model.precision}
    generation.generate(exp.model, tok, ids[:2], mask[:2], **kwargs)  # warm-up
    start = time.perf_counter()
    batched = generation.generate(exp.model, tok, ids, mask, batch_size=args.batch, **kwargs)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    alone = [generation.generate(exp.model, tok, ids[i : i + 1], mask[i : i + 1], **kwargs)[0] for i in range(len(ids))]
    t_alone = time.perf_counter() - start
    same = sum(a == b for a, b in zip(batched, alone, strict=True))
    print(f"model {args.model}, {len(ids)} arithmetic prompts, up to {args.new_tokens} new tokens, greedy")
    print(f"  one at a time: {t_alone:.1f} s; batch {args.batch}: {t_batched:.1f} s")
    print(f"  speed-up {t_alone / t_batched:.2f}x (target >= 3x at batch 16); identical outputs {same}/{len(ids)}")
    print(f"  e.g. {alone[0]!r}")


# --------------------------------------------------------------------------------------------- a round


def tree_rss(root: int) -> dict[int, float]:
    """RSS in GB of ``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            out[pid] = (
                int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
            )
        except OSError:
            continue
        todo += children.get(pid, [])
    return out


def bench_round(args: argparse.Namespace) -> None:
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    results = {mode: one_round(args, mode) for mode in modes}
    if len(results) == 2:
        (peak_off, train_off), (peak_on, train_on) = results[False], results[True]
        print(
            f"checkpointing / without: peak of the summed RSS {peak_on / peak_off:.2f}x, training time "
            f"{train_on / train_off:.2f}x"
        )


def one_round(args: argparse.Namespace, checkpointing: bool) -> tuple[float, float]:
    """One round; prints its time split and peak RSS, returns (peak of the summed RSS, training seconds)."""
    from fedlora import engines

    out = Path(args.out) / ("checkpointing" if checkpointing else "plain")
    overrides = [
        f"model.name={args.model}",
        f"data.num_clients={args.clients}",
        f"federation.clients_per_round={args.clients}",
        f"federation.workers={args.workers}",
        "federation.rounds=1",
        f"train.local_steps={args.steps}",
        f"output.dir={out}",
        f"train.gradient_checkpointing={str(checkpointing).lower()}",
    ]
    cfg = config.load_config(CELL, overrides)
    peak: dict[int, float] = {}
    peak_sum = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = tree_rss(os.getpid())
            peak_sum[0] = max(peak_sum[0], sum(now.values()))
            for pid, value in now.items():
                peak[pid] = max(peak.get(pid, 0.0), value)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    run_dir, _ = engines.run(cfg, out)
    done.set()
    sampler.join()
    import json

    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    print(
        f"one round: {args.clients} clients x {args.steps} steps of batch 16 on {args.workers} workers, {args.model}, "
        f"gradient checkpointing {'on' if checkpointing else 'off'}"
    )
    print(f"  wall {time.perf_counter() - started:.0f} s including set-up; the round {record['seconds']:.0f} s:")
    for part in ("train", "aggregate", "eval", "other"):
        value = record[f"seconds_{part}"]
        print(f"    {part:>9}: {value:7.1f} s ({value / record['seconds']:.1%})")
    main = peak.pop(os.getpid(), 0.0)
    workers = sorted((v for v in peak.values() if v > 0.2), reverse=True)
    print(f"  peak RSS: main {main:.2f} GB, workers {[round(w, 2) for w in workers]} GB")
    print(f"  peak of the summed RSS {peak_sum[0]:.2f} GB (target <= 8 GB)")
    return peak_sum[0], record["seconds_train"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "generate", "round"])
    ap.add_argument("--model", default="fedlora:smollm2-135m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    ap.add_argument("--out", default="runs/benchmark-causal-round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"train": bench_train, "generate": bench_generate, "round": bench_round}[args.what](args)


if __name__ == "__main__":
    main()
