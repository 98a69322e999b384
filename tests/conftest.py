"""Shared test setup: offline hub, one torch thread, and helpers that build client updates from raw LoRA factors."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)


@dataclass(frozen=True)
class RawClient:
    """One client's adapter as PEFT holds it: per module B (d, r), A (r, k), with the LoRA scale s kept apart."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    alpha: float
    rank: int
    rslora: bool

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self, module: str) -> torch.Tensor:
        """ΔW = s·B·A in float64: the dense definition every aggregation is checked against."""
        B, A = self.factors[module]
        return self.scale * B.double() @ A.double()

    def canonical(self):
        from fedlora.types import LowRank

        return {m: LowRank(self.scale * B, A) for m, (B, A) in self.factors.items()}


def make_clients(
    shapes: dict[str, tuple[int, int]],
    ranks: Sequence[int],
    alpha: float,
    rslora: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[RawClient]:
    """Random clients; B is not zero (trained), modules non-square as the shapes say."""
    gen = torch.Generator().manual_seed(seed)
    clients = []
    for r in ranks:
        factors = {
            m: (
                torch.randn(d, r, generator=gen, dtype=dtype),
                torch.randn(r, k, generator=gen, dtype=dtype) / math.sqrt(k),
            )
            for m, (d, k) in shapes.items()
        }
        clients.append(RawClient(factors, alpha, r, rslora))
    return clients


def ideal(clients: Sequence[RawClient], weights: torch.Tensor, module: str) -> torch.Tensor:
    """Σ_u w_u s_u B_u A_u, dense, float64."""
    return sum(float(w) * c.delta(module) for w, c in zip(weights, clients, strict=True))


@pytest.fixture(scope="session")
def rt_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded 240-example sample of the real packaged Rotten Tomatoes data as a local CSV (string labels), so
    integration runs on the real MiniLM evaluate in seconds."""
    import pandas as pd

    from fedlora.data import load_dataset

    ds = load_dataset("fedlora:rotten-tomatoes")
    idx = torch.randperm(len(ds.labels), generator=torch.Generator().manual_seed(0))[:240].tolist()
    path = tmp_path_factory.mktemp("data") / "rt_sample.csv"
    frame = pd.DataFrame({"text": [ds.texts[i] for i in idx], "label": [ds.label_names[ds.labels[i]] for i in idx]})
    frame.to_csv(path, index=False)
    return path
