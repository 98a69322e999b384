"""Client-level differential privacy, central (DP-FedAvg style: a trusted server clips and adds the noise).

``privacy.mechanism = "central_dp"``, for methods whose server step is a weighted sum of the uploads (their
``Capabilities.secure_aggregation``; config validation refuses the others, unequal ranks, and FedLoRU's
client-side resets):

1. each client's update Δ_u = upload_u − g, with g the global model the round started from (what every client
   downloaded or already held; the leading rank block for a lower-rank upload), is clipped in L2 over all its
   uploaded floating-point tensors: Δ_u ← Δ_u · min(1, C / ‖Δ_u‖), C = ``privacy.clip_norm``;
2. one draw ξ ~ N(0, σ² I), σ = z · C · max_u w_u (z = ``privacy.noise_multiplier``, w the round's normalised
   weights), is added to every clipped upload g + Δ_u. Because the method's server step is Σ_u w_u upload_u with
   Σ_u w_u = 1, it then computes exactly g + Σ_u w_u Δ_u + ξ: the Gaussian mechanism on the weighted sum, whose
   sensitivity to one client's clipped update (weights fixed) is C · max_u w_u. Everything the method derives
   from that sum (base merges, residual edits, the metrics) is post-processing.
3. the privacy spent after t rounds, ε at δ = ``privacy.delta``, comes from Google's ``dp-accounting`` RDP
   accountant: t compositions of the Gaussian mechanism with noise multiplier z, Poisson-subsampled at
   q = clients per round / clients when not every client takes part. fedlora samples a fixed number of clients
   without replacement; the Poisson analysis is the usual stand-in for it (as in DP-FedAvg).

The noise is drawn from a generator seeded by (``seed``, round), so runs are reproducible and a resumed run ends
as an uninterrupted one. That makes this a faithful simulation of the mechanism for research, not a hardened
deployment: whoever knows the seed can remove the noise, and the sampling is ordinary floating point.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.payload import leading_block
from fedlora.types import Contribution, Payload


@dataclass(frozen=True)
class Privatized:
    """A round under central DP: the clipped and noised contributions, each client's update norm before clipping,
    and the noise's standard deviation."""

    contributions: list[Contribution]
    norms: dict[int, float]
    noise_std: float


def support(method: str) -> str:
    """Whether ``method`` runs under central DP: "no", "yes", or "yes, with" the settings it needs."""
    from fedlora import methods

    caps = methods.capabilities(method)
    if not caps.secure_aggregation:
        return "no"
    needs = ["equal ranks"] if caps.heterogeneous_ranks != "no" else []
    if any(f.name == "reset" for f in dataclasses.fields(methods.params_class(method))):
        needs.append('method.reset = "server"')
    return "yes, with " + " and ".join(needs) if needs else "yes"


def privatize(
    contributions: Sequence[Contribution],
    reference: Mapping[str, Tensor],
    clip_norm: float,
    noise_multiplier: float,
    seed: int,
) -> Privatized:
    """Clip each contribution's update to ``clip_norm`` and add one shared Gaussian draw to every upload (see the
    module docstring). ``contributions`` carry normalised weights; nothing passed in is modified."""
    names = _floating_names(contributions)
    noise_std = noise_multiplier * clip_norm * max(c.weight for c in contributions)
    shapes = {n: tuple(contributions[0].payload.tensors[n].shape) for n in names}
    gen = torch.Generator().manual_seed(seed)
    noise = {n: torch.randn(shapes[n], generator=gen, dtype=torch.float64) * noise_std for n in names}
    out, norms = [], {}
    for c in contributions:
        start = {n: _start(reference, n, shapes[n], c.client) for n in names}
        delta = {n: c.payload.tensors[n].to(torch.float64) - start[n] for n in names}
        norms[c.client] = math.sqrt(sum(float(torch.linalg.vector_norm(d)) ** 2 for d in delta.values()))
        factor = min(1.0, clip_norm / norms[c.client]) if norms[c.client] > 0 else 1.0
        tensors = dict(c.payload.tensors)
        for n in names:
            tensors[n] = (start[n] + factor * delta[n] + noise[n]).to(c.payload.tensors[n].dtype)
        out.append(Contribution(c.client, c.weight, Payload(tensors, dict(c.payload.meta))))
    return Privatized(out, norms, noise_std)


def _floating_names(contributions: Sequence[Contribution]) -> list[str]:
    """The floating-point tensor names, which every contribution must carry with the same shapes."""
    first = contributions[0]
    names = sorted(n for n, t in first.payload.tensors.items() if t.is_floating_point())
    for c in contributions[1:]:
        mine = sorted(n for n, t in c.payload.tensors.items() if t.is_floating_point())
        if mine != names or any(c.payload.tensors[n].shape != first.payload.tensors[n].shape for n in names):
            raise ValueError(
                f"privacy.mechanism = 'central_dp': client {c.client}'s upload differs in names or shapes from client "
                f"{first.client}'s; central DP needs equal-shaped uploads"
            )
    return names


def _start(reference: Mapping[str, Tensor], name: str, shape: tuple[int, ...], client: int) -> Tensor:
    ref = leading_block(reference, name, shape)
    if ref is None:
        raise ValueError(
            f"privacy.mechanism = 'central_dp': client {client} uploaded {name!r} {shape}, which the global model "
            "the round started from has no counterpart for, so its update cannot be clipped"
        )
    return ref.to(torch.float64)


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` Gaussian mechanisms of ``noise_multiplier`` (Poisson-subsampled at
    ``sample_rate`` when it is below 1), from dp-accounting's RDP accountant; ∞ without noise."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    try:
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant
    except ImportError:
        raise RuntimeError(
            "privacy.mechanism = 'central_dp' needs the dp-accounting package: pip install 'fedlora[privacy]'"
        ) from None
    event: object = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))
