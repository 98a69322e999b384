"""Screening of client uploads before aggregation (``federation.screen``): a refused client is left out of the
round, and the others are aggregated with their weights renormalised.

``finite`` (the default) refuses an upload that does not have the form the model allows: a name outside the
payload scheme or naming a module the model does not adapt, a set of names that differs from what most of the
round's clients sent, a wrong dtype, a wrong shape (a factor that does not fit its module, A and B of different
ranks, a rank above the client's, a head of another shape, sparse indices out of range) or a NaN/Inf value.
``norm`` also refuses updates whose norm is a robust outlier among the round's clients: with x_u the L2 norm of
client u's update relative to the global model the round started from, |x_u − median| / (1.4826·MAD) >
``federation.screen_z`` (MAD = the median of |x − median|; when it is 0, any x ≠ median is refused). The norm is
measured from the factors without forming a d×k matrix: per adapted module ‖B̃_u A_u − B̃_g A_g‖_F (a factor the
client does not upload is the global one), in quadrature with the other uploaded tensors' changes (head, sparse
values). Robust z-scores need three clients or more: with two, |x − median| = MAD for both.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fedlora.linalg import factored_norm
from fedlora.methods.base import ModelInfo
from fedlora.payload import INDEX_DTYPE, leading_block
from fedlora.peft_io import CORE_SUFFIX
from fedlora.types import Contribution, LowRank

GROUPS = ("slot", "expert", "cluster")
"""Prefixes of an upload of several adapters: ``slot.<j>.lora.<module>.A`` (FL-TAC: one per local task)."""

MAD_TO_SIGMA = 1.4826
"""1 / Φ⁻¹(3/4): the MAD of a normal distribution times this is its standard deviation."""


def screen(
    contributions: Sequence[Contribution],
    info: ModelInfo,
    ranks: Sequence[int],
    reference: Mapping[str, Tensor],
    mode: str = "finite",
    z: float = 3.5,
) -> tuple[list[Contribution], dict[int, str], dict[int, float]]:
    """(the contributions kept, {client: reason} for those refused, {client: update norm} under ``norm``).

    ``ranks``: every client's configured rank (by client id); ``reference``: the named tensors of the global model
    the round started from (what update norms are measured against)."""
    refused = {c.client: p for c in contributions if (p := form_problem(c.payload.tensors, info, ranks[c.client]))}
    refused |= _odd_names([c for c in contributions if c.client not in refused])
    kept = [c for c in contributions if c.client not in refused]
    norms: dict[int, float] = {}
    if mode == "norm":
        norms = {c.client: update_norm(c.payload.tensors, reference) for c in kept}
        for client, score in robust_z(norms).items():
            if score > z:
                refused[client] = (
                    f"update norm {norms[client]:.4g} is an outlier: robust z = {score:.3g} > federation.screen_z = {z}"
                )
        kept = [c for c in kept if c.client not in refused]
    return kept, dict(sorted(refused.items())), norms


def form_problem(tensors: Mapping[str, Tensor], info: ModelInfo, rank: int) -> str | None:
    """Why an upload does not have a form the model allows (names, dtypes, shapes, ranks, finiteness), or None.

    An upload of several adapters (one per local task or expert) names each one's tensors under a prefix
    ``<group>.<index>.`` (``slot.0.lora.<module>.A``); each group is checked as an upload of its own."""
    for group in _groups(tensors).values():
        for name in sorted(group):
            problem = _tensor_problem(name, group[name], group, info, rank)
            if problem is not None:
                return problem
    for name, t in sorted(tensors.items()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"{name}: {int((~torch.isfinite(t)).sum())} NaN/Inf values"
    return None


def _groups(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The upload's tensors by ``<group>.<index>.`` prefix ("" for unprefixed names), names without it."""
    groups: dict[str, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        head, _, rest = name.partition(".")
        index, _, tail = rest.partition(".")
        prefix, short = (f"{head}.{index}.", tail) if index.isdigit() and head in GROUPS else ("", name)
        groups.setdefault(prefix, {})[short] = t
    return groups


def _tensor_problem(name: str, t: Tensor, tensors: Mapping[str, Tensor], info: ModelInfo, rank: int) -> str | None:
    if name.startswith("extra."):
        return _extra_problem(name, t, info, rank)
    if name.startswith("stats."):  # a client's data statistics (CE-LoRA's feature mean and variance)
        return None if t.dtype == torch.float32 else f"{name}: dtype {t.dtype}, expected torch.float32"
    if name.startswith("router."):  # a mixture's router over S slots (FedLEASE), (S, k)
        return _router_problem(name, t, info)
    if not name.startswith("lora."):
        return (
            f"unexpected tensor {name!r}: a client uploads lora.<module>.A|B|C[.values|.indices], extra.<name>, "
            "router.<module> and stats.<name>"
        )
    base, part = name, ""
    if name.endswith((".values", ".indices")):
        base, part = name.rsplit(".", 1)
    module, factor = base[len("lora.") :].rpartition(".")[::2]
    spec = info.specs.get(module)
    if spec is None or factor not in ("A", "B", "C"):
        return f"unexpected tensor {name!r}: the model adapts no module {module!r} with a factor {factor!r}"
    if factor == "C":
        return _core_problem(name, t, rank)
    if part == "indices":
        return _indices_problem(name, t, tensors.get(f"{base}.values"), spec.d if factor == "B" else spec.k, rank)
    if t.dtype != torch.float32:
        return f"{name}: dtype {t.dtype}, expected torch.float32"
    if part == "values":
        return _values_problem(name, t, factor, spec.d, spec.k)
    shape, expected = tuple(t.shape), f"(r, {spec.k})" if factor == "A" else f"({spec.d}, r)"
    r = (shape[0] if factor == "A" else shape[-1]) if len(shape) == 2 else 0
    fits = len(shape) == 2 and (shape[1] == spec.k if factor == "A" else shape[0] == spec.d)
    if not fits or not 1 <= r <= rank:
        return f"{name}: shape {shape}, expected {expected} with 1 ≤ r ≤ {rank} (the client's rank)"
    other = tensors.get(f"lora.{module}.{'B' if factor == 'A' else 'A'}")
    if factor == "A" and other is not None and other.dim() == 2 and other.shape[-1] != r:
        return f"lora.{module}: A has rank {r}, B has rank {other.shape[-1]}"
    return None


def _extra_problem(name: str, t: Tensor, info: ModelInfo, rank: int) -> str | None:
    extra = name[len("extra.") :]
    like = info.extras.get(extra)
    if like is None and extra.endswith(CORE_SUFFIX) and extra[: -len(CORE_SUFFIX)] in info.specs:
        return _core_problem(name, t, rank)
    if like is None:
        return f"unexpected tensor {name!r}: the model has no fully trained tensor {extra!r}"
    if t.shape != like.shape or t.dtype != like.dtype:
        return f"{name}: shape {tuple(t.shape)}, dtype {t.dtype}, expected {tuple(like.shape)}, {like.dtype}"
    return None


def _router_problem(name: str, t: Tensor, info: ModelInfo) -> str | None:
    spec = info.specs.get(name[len("router.") :])
    if spec is None:
        return f"unexpected tensor {name!r}: the model adapts no module {name[len('router.') :]!r}"
    ok = t.dim() == 2 and t.shape[1] == spec.k and t.dtype == torch.float32
    return None if ok else f"{name}: shape {tuple(t.shape)}, dtype {t.dtype}, expected (S, {spec.k}) float32"


def _core_problem(name: str, t: Tensor, rank: int) -> str | None:
    """A tri-factor core C (r × r) between B and A."""
    ok = t.dim() == 2 and t.shape[0] == t.shape[1] and 1 <= t.shape[0] <= rank and t.dtype == torch.float32
    return None if ok else f"{name}: shape {tuple(t.shape)}, dtype {t.dtype}, expected (r, r) float32, r ≤ {rank}"


def _indices_problem(name: str, t: Tensor, values: Tensor | None, side: int, rank: int) -> str | None:
    if values is None:
        return f"{name}: sparse indices without their .values"
    if t.dtype != INDEX_DTYPE or t.dim() != 1:
        return f"{name}: dtype {t.dtype}, {t.dim()}-D, expected 1-D {INDEX_DTYPE}"
    n = values.shape[0] if values.dim() == 1 else values.shape[0 if name.split(".")[-2] == "A" else -1]
    limit = rank * side if values.dim() == 1 else rank
    if t.numel() != n:
        return f"{name}: {t.numel()} indices for {n} values"
    if t.numel() and not (int(t.min()) >= 0 and int(t.max()) < limit):
        return f"{name}: indices in [{int(t.min())}, {int(t.max())}], expected in [0, {limit})"
    return None


def _values_problem(name: str, t: Tensor, factor: str, d: int, k: int) -> str | None:
    if t.dim() == 1:
        return None
    fits = t.dim() == 2 and (t.shape[1] == k if factor == "A" else t.shape[0] == d)
    expected = f"(n, {k})" if factor == "A" else f"({d}, n)"
    return None if fits else f"{name}: shape {tuple(t.shape)}, expected 1-D (flat entries) or {expected}"


def _odd_names(contributions: Sequence[Contribution]) -> dict[int, str]:
    """Clients whose set of tensor names differs from the one most of the round's clients sent (none when no
    set has a strict majority); names are compared without their group prefix, since clients may upload different
    numbers of adapters (one per local task)."""
    sets = {c.client: frozenset(n for g in _groups(c.payload.tensors).values() for n in g) for c in contributions}
    if not sets:
        return {}
    common, count = Counter(sets.values()).most_common(1)[0]
    if 2 * count <= len(sets):
        return {}
    return {
        client: f"tensor names differ from the round's other clients: missing {sorted(common - names)[:3]}, "
        f"unexpected {sorted(names - common)[:3]}"
        for client, names in sets.items()
        if names != common
    }


def update_norm(tensors: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """The L2 norm of an upload's change from ``reference`` (see the module docstring), from factors."""
    total, paired = 0.0, set()
    for name in sorted(tensors):
        if not (name.startswith("lora.") and name.endswith((".A", ".B"))):
            continue
        module = name[len("lora.") : -2]
        if module in paired:
            continue
        paired.add(module)
        total += _module_change(module, tensors, reference) ** 2
    for name, t in tensors.items():
        if t.is_floating_point() and not (name.startswith("lora.") and name.endswith((".A", ".B"))):
            ref = leading_block(reference, name, tuple(t.shape))
            change = t.to(torch.float64) - (0.0 if ref is None else ref.to(torch.float64))
            total += float(torch.linalg.vector_norm(change)) ** 2
    return math.sqrt(total)


def _module_change(module: str, tensors: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """‖B̃A − B̃_g A_g‖_F for one module, where a factor not uploaded is the global one (its leading rank block)."""
    A, B = tensors.get(f"lora.{module}.A"), tensors.get(f"lora.{module}.B")
    ref_A, ref_B = reference.get(f"lora.{module}.A"), reference.get(f"lora.{module}.B")
    r = A.shape[0] if A is not None else B.shape[-1]  # type: ignore[union-attr]
    if A is None and ref_A is not None:
        A = ref_A[:r]
    if B is None and ref_B is not None:
        B = ref_B[:, :r]
    if A is None or B is None:  # one factor and no global one to pair it with: the factor's own change
        t, ref = (B, ref_B) if A is None else (A, ref_A)
        assert t is not None
        start = leading_block({"t": ref}, "t", tuple(t.shape)) if ref is not None else None
        return float(torch.linalg.vector_norm(t.to(torch.float64) - (0.0 if start is None else start.double())))
    parts = [LowRank(B, A)]
    if ref_A is not None and ref_B is not None:
        parts.append(LowRank(-ref_B, ref_A))
    return factored_norm(parts)


def robust_z(values: Mapping[int, float]) -> dict[int, float]:
    """|x − median| / (1.4826·MAD) per key; with MAD = 0, 0 for x = median and ∞ otherwise."""
    if not values:
        return {}
    xs = np.array(list(values.values()), dtype=np.float64)
    dev = np.abs(xs - np.median(xs))
    mad = float(np.median(dev))
    scores = [d / (MAD_TO_SIGMA * mad) if mad > 0 else (0.0 if d == 0 else math.inf) for d in dev.tolist()]
    return dict(zip(values, scores, strict=True))
