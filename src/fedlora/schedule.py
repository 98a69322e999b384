"""The learning rate of each round (``train.lr_schedule``): a pure function of the round, so every engine, every
worker and a resumed run give a round the same rate. The rate is constant within a round (each client's AdamW
starts afresh every round); metrics.jsonl records it as ``lr``.

- ``constant``: ``train.lr`` every round.
- ``cosine``: round t of T gets lr_min + ½(lr − lr_min)(1 + cos(π t / T)), the per-round cosine of Flower's
  FlowerTune templates: the first round is just below ``lr`` and the last round trains at ``train.lr_min``.
- ``linear_warmup``: rounds t ≤ W (``train.warmup_rounds``) get lr · t / (W + 1), later rounds ``lr``; W rounds
  train below ``lr`` and none at zero.
"""

from __future__ import annotations

import math
from typing import Any


def lr_at(train: Any, rnd: int, rounds: int) -> float:
    """The learning rate of round ``rnd`` (from 1) of ``rounds`` under the ``train.*`` config ``train``."""
    if not 1 <= rnd <= rounds:
        raise ValueError(f"round {rnd} is outside 1..{rounds} (federation.rounds)")
    if train.lr_schedule == "constant":
        return train.lr
    if train.lr_schedule == "cosine":
        return train.lr_min + 0.5 * (train.lr - train.lr_min) * (1.0 + math.cos(math.pi * rnd / rounds))
    if train.lr_schedule == "linear_warmup":
        return train.lr * min(1.0, rnd / (train.warmup_rounds + 1))
    raise ValueError(f"train.lr_schedule = {train.lr_schedule!r}: expected 'constant', 'cosine' or 'linear_warmup'")
