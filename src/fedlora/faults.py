"""Simulated client faults (``faults.clients``), for tests and robustness research.

A fault belongs to a client and is applied in that client's round on every engine (``fedlora.client``), to the
upload the method produced, every round the client is sampled. Every random choice is seeded by (``seed``, round,
client), so a faulty run is as reproducible as any other:

- ``nan`` / ``inf``: one seeded entry of every floating-point tensor of the upload becomes NaN / +Inf;
- ``scale:F``: the update is multiplied by F: each uploaded tensor becomes ``start + F·(upload − start)``, where
  ``start`` is what the client started training from (the plan's factors and extras, the leading block for a
  lower-rank upload; zero for a tensor the plan does not give, e.g. a sparse delta);
- ``random``: the update is replaced by Gaussian noise of the same shapes and the same L2 norm (over all of the
  upload's floating-point tensors);
- ``shape``: the first floating-point tensor (by name) loses its last column (last entry when 1-D);
- ``raise``: the client's round raises before training (the engine records the client as failed);
- ``hang``: the client's round sleeps ``federation.round_timeout`` + ``HANG_MARGIN`` seconds before training, so
  the engine stops waiting for it (a Flower node, or an in-process worker that is then replaced).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
from torch import Tensor

from fedlora.payload import leading_block
from fedlora.types import Payload

KINDS = ("nan", "inf", "random", "shape", "raise", "hang")
"""Faults without a parameter; ``scale:F`` takes a finite float F."""

HANG_MARGIN = 15.0
"""Seconds past ``federation.round_timeout`` a ``hang`` fault sleeps."""


class InjectedFault(RuntimeError):
    """Raised by a ``raise`` fault."""


def problem(spec: object) -> str | None:
    """What is wrong with a fault spec, as the text after "expected" in a config error; None when it is valid."""
    expected = 'one of "nan", "inf", "random", "shape", "raise", "hang" or "scale:F" with a finite float F'
    if not isinstance(spec, str):
        return expected
    if spec in KINDS:
        return None
    kind, _, factor = spec.partition(":")
    if kind != "scale":
        return expected
    try:
        value = float(factor)
    except ValueError:
        return expected
    return None if math.isfinite(value) else expected


def before_training(spec: str | None, client: int, rnd: int, round_timeout: float) -> None:
    """The faults that act before training: ``raise`` raises, ``hang`` sleeps past the round timeout."""
    if spec == "raise":
        raise InjectedFault(f"client {client}, round {rnd}: injected failure (faults.clients = 'raise')")
    if spec == "hang":
        time.sleep(round_timeout + HANG_MARGIN)


def corrupt(spec: str | None, upload: Payload, start: Mapping[str, Tensor], seed: int) -> Payload:
    """``upload`` with the fault ``spec`` applied (unchanged for None, ``raise`` and ``hang``). ``start``: named
    tensors the client started training from (see the module docstring); ``seed``: this client and round's."""
    if spec is None or spec in ("raise", "hang"):
        return upload
    gen = torch.Generator().manual_seed(seed)
    names = sorted(n for n, t in upload.tensors.items() if t.is_floating_point())
    tensors = dict(upload.tensors)
    if spec in ("nan", "inf"):
        for n in names:
            t = tensors[n].clone()
            if t.numel():
                t.view(-1)[int(torch.randint(t.numel(), (1,), generator=gen))] = math.nan if spec == "nan" else math.inf
            tensors[n] = t
    elif spec == "shape":
        if names:
            t = tensors[names[0]]
            tensors[names[0]] = t[..., :-1].clone() if t.dim() else t.reshape(1)
    else:
        starts = {n: _start(start, n, tensors[n]) for n in names}
        deltas = {n: tensors[n].to(torch.float64) - starts[n] for n in names}
        if spec == "random":
            noise = {n: torch.randn(d.shape, generator=gen, dtype=torch.float64) for n, d in deltas.items()}
            ratio = _norm(deltas) / max(_norm(noise), 1e-300)
            deltas = {n: z * ratio for n, z in noise.items()}
        else:
            factor = float(spec.partition(":")[2])
            deltas = {n: d * factor for n, d in deltas.items()}
        tensors |= {n: (starts[n] + deltas[n]).to(tensors[n].dtype) for n in names}
    return Payload(tensors, dict(upload.meta))


def _start(start: Mapping[str, Tensor], name: str, like: Tensor) -> Tensor:
    ref = leading_block(start, name, tuple(like.shape))
    return torch.zeros(like.shape, dtype=torch.float64) if ref is None else ref.to(torch.float64)


def _norm(tensors: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in tensors.values()))
