"""``data.partition_by = "cluster:K"``: groups for data without a label, from the meaning of the prompts.

Each prompt (its turns' contents, the system turn left out) is embedded with the packaged all-MiniLM-L6-v2 (mean
pooling over the attention mask, 128 tokens, L2-normalised, as sentence-transformers does for this model); SciPy's
k-means (ten k-means++ starts seeded by the run's seed, the tightest kept) puts the embeddings into K clusters,
and the partition then treats the clusters as labels (e.g. Dirichlet over clusters). Clusters are numbered by
decreasing size, so the numbering does not depend on the initialisation order. The assignment of one (prompts, K,
seed) is cached (``fedlora.cache``), since every worker process builds the same partition.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from fedlora.cache import build_once, cache_dir
from fedlora.instructions import Instructions

MAX_TOKENS = 128
BATCH = 64
RESTARTS = 10
"""k-means starts; the best is kept (k-means finds local optima; one start is often one of them)."""


def prompt_texts(ds: Instructions) -> list[str]:
    """What is embedded of each prompt: its non-system turns' contents, joined by blank lines."""
    return ["\n\n".join(c for r, c in turns if r != "system") for turns in ds.prompts]


@torch.inference_mode()
def embed(texts: list[str]) -> np.ndarray:
    """Mean-pooled, L2-normalised MiniLM embeddings (N, 384), float32."""
    from transformers import AutoModel, AutoTokenizer

    from fedlora import peft_io

    path = peft_io.resolve_model_name(peft_io.MINILM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for start in range(0, len(texts), BATCH):
        batch = tokenizer(
            texts[start : start + BATCH], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out).numpy() if out else np.zeros((0, 384), dtype=np.float32)


def kmeans(points: np.ndarray, k: int, seed: int, restarts: int = RESTARTS) -> list[int]:
    """Seeded k-means (SciPy ``kmeans2`` from ``restarts`` k-means++ starts, the lowest within-cluster sum of
    squares kept); clusters numbered by decreasing size."""
    from scipy.cluster.vq import kmeans2

    if len(points) < k:
        raise ValueError(f"data.partition_by = 'cluster:{k}': {len(points)} prompts cannot form {k} clusters")
    x = points.astype(np.float64)
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(restarts):
        centroids, labels = kmeans2(x, k, iter=50, minit="++", seed=rng)
        cost = float(((x - centroids[labels]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = labels, cost
    assert best is not None
    sizes = np.bincount(best, minlength=k)
    rank = {int(c): i for i, c in enumerate(sorted(range(k), key=lambda c: (-sizes[c], c)))}
    return [rank[int(c)] for c in best]


def prompt_clusters(ds: Instructions, k: int, seed: int) -> list[int]:
    """The cluster of every prompt (module docstring), cached per (prompts, K, seed)."""
    texts = prompt_texts(ds)
    key = hashlib.sha256(json.dumps([texts, k, seed, MAX_TOKENS]).encode()).hexdigest()[:20]
    target = cache_dir() / "clusters" / f"{key}.json"

    def build(path: Path) -> None:
        path.write_text(json.dumps(kmeans(embed(texts), k, seed)))

    labels = json.loads(build_once(target, build).read_text())
    if len(labels) != len(texts):
        raise ValueError(f"{target}: {len(labels)} cluster labels for {len(texts)} prompts; delete the file")
    return labels
