"""Which round's global model a run saves (``output.keep``): the last round's, or the best round's by the task's
primary metric on the validation split carved from the training data (``val_<metric>`` in metrics.jsonl), never
the test set. The best round is the first round that reaches the best value among the rounds that evaluated it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.methods.base import GlobalModel
from fedlora.types import LowRank


@dataclass(frozen=True)
class Best:
    """The best round so far and its global model (adapter and extras copied; base edits are an append-only log)."""

    round: int
    model: GlobalModel


def best_record(records: Sequence[Mapping[str, Any]], key: str, higher_is_better: bool) -> Mapping[str, Any] | None:
    """The first record with the best finite ``key`` (None when no record has one)."""
    scored = [r for r in records if isinstance(r.get(key), float | int) and math.isfinite(r[key])]
    if not scored:
        return None
    return (max if higher_is_better else min)(scored, key=lambda r: r[key])


def update(
    best: Best | None,
    records: Sequence[Mapping[str, Any]],
    model: GlobalModel,
    primary: str,
    higher_is_better: bool,
) -> Best | None:
    """After a round (its record last in ``records``): ``model`` becomes the best when that round is the best
    record by ``val_<primary>``."""
    top = best_record(records, f"val_{primary}", higher_is_better)
    if top is None or top["round"] != records[-1]["round"]:
        return best
    return Best(int(top["round"]), _copied(model))


def _copied(model: GlobalModel) -> GlobalModel:
    adapter = model.adapter
    if adapter is not None:
        adapter = {m: LowRank(lr.B.clone(), lr.A.clone()) for m, lr in adapter.items()}
    return GlobalModel(adapter, {n: t.clone() for n, t in model.extras.items()}, tuple(model.base_edits))
