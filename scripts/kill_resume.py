"""Kill-and-resume trials: a run killed with SIGKILL and resumed (``fedlora run --resume``) must end with exactly
the metrics and adapter of an uninterrupted run.

Each trial kills one run once, either inside a staged write (``FEDLORA_TEST_KILL=<file>:<n>``: the staged file is
cut to half, then SIGKILL before its rename) or after a seeded random delay, then resumes it until it finishes
(or starts it afresh when it was killed before ``config.toml`` existed). Prints one line per trial and exits
non-zero unless every trial ends equal to the uninterrupted run.

    python scripts/kill_resume.py --trials 12 --out /tmp/kills data.dataset=... federation.rounds=3 ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

HOOKS = ["checkpoint.pt:2", "adapter:1", "metrics.jsonl:1", "summary.json:1", "config.toml:1", "checkpoint.pt:1"]
"""Staged writes killed in turn (file:n = its n-th write in the process)."""

COMMAND = [sys.executable, "-m", "fedlora.cli", "run"]


def _env(kill: str | None = None) -> dict[str, str]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FEDLORA_TEST_KILL", None)
    return env | ({"FEDLORA_TEST_KILL": kill} if kill else {})


def _start(run_dir: Path, overrides: list[str], kill: str | None = None) -> subprocess.Popen[bytes]:
    """Resume ``run_dir`` when it has a config.toml, else start it afresh."""
    if (run_dir / "config.toml").exists():
        argv = [*COMMAND, "--resume", str(run_dir)]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        argv = [*COMMAND, *overrides, f"output.dir={run_dir}"]
    return subprocess.Popen(argv, env=_env(kill), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def trial(run_dir: Path, overrides: list[str], kill: str | float, timeout: float) -> tuple[int, bool]:
    """Kill once (a hook name, or a delay in seconds), then resume until done; returns (processes started, killed)."""
    proc = _start(run_dir, overrides, kill if isinstance(kill, str) else None)
    if isinstance(kill, float):
        try:
            proc.wait(kill)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    code, started = proc.wait(timeout), 1
    killed = code == -signal.SIGKILL
    while code != 0:
        if started > 5:
            raise RuntimeError(f"{run_dir}: not finished after {started} processes (last exit code {code})")
        code = _start(run_dir, overrides).wait(timeout)
        started += 1
    return started, killed


def outputs(run_dir: Path) -> tuple[list[dict], dict]:
    """metrics.jsonl without wall times, and the adapter's tensors."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        records.append({k: v for k, v in json.loads(line).items() if not k.startswith("seconds")})
    tensors = {}
    for f in sorted((run_dir / "adapter").glob("*.safetensors")):
        tensors |= {f"{f.name}/{k}": v for k, v in load_file(f).items()}
    return records, tensors


def same(a: tuple[list[dict], dict], b: tuple[list[dict], dict]) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(bool((a[1][k] == b[1][k]).all()) for k in a[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=len(HOOKS) + 6)
    parser.add_argument("--hooks", type=int, default=len(HOOKS), help="how many trials kill inside a write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    reference_dir = args.out / "reference"
    shutil.rmtree(reference_dir, ignore_errors=True)
    began = time.monotonic()
    trial(reference_dir, args.overrides, "", args.timeout)
    wall = time.monotonic() - began
    reference = outputs(reference_dir)
    print(f"uninterrupted run: {wall:.1f} s, {len(reference[0])} rounds, {len(reference[1])} adapter tensors")
    rng = random.Random(args.seed)
    equal = 0
    for i in range(args.trials):
        kill: str | float = HOOKS[i % len(HOOKS)] if i < args.hooks else round(rng.uniform(1.0, wall), 1)
        run_dir = args.out / f"trial-{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        started, killed = trial(run_dir, args.overrides, kill, args.timeout)
        ok = same(outputs(run_dir), reference)
        equal += ok
        how = f"inside the write of {kill}" if isinstance(kill, str) else f"after {kill} s"
        print(
            f"trial {i}: killed {how} ({'killed' if killed else 'finished first'}), {started} processes, "
            f"{'equal' if ok else 'DIFFERENT'}"
        )
    print(f"{equal} of {args.trials} trials equal to the uninterrupted run")
    return 0 if equal == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
