"""The wire format of payloads: canonical adapters, fully trained tensors and base edits as named tensors.

One naming scheme for every method and every transport (in-process, Flower ArrayRecords, checkpoints):

    lora.<module>.A / lora.<module>.B          canonical factors (B carries the LoRA scale)
    extra.<name>                                fully trained tensors (the classifier head)
    base.<version>.<module>.left / .right       a factored base edit
    base.<version>.<module>.dense               a dense base edit
    lora.<module>.A.values / .A.indices         a sparse factor (same for B): values at the dtype of the factor,
                                                indices int32 (``INDEX_DTYPE``)

Sparse factors (FLASC, FSLoRA): 1-D ``values`` pair with flat row-major indices into the factor (A is (r, k),
B is (d, r)); 2-D ``values`` pair with indices along the rank axis (the rows of A, the columns of B), i.e. whole
rank components. Indices are int32, 4 bytes each, counted in ``Payload.nbytes`` like every tensor: every LoRA
factor has far fewer than 2^31 entries (``pack_sparse`` refuses larger index values), and int64 would double the
index bytes for nothing. The receiver knows the dense shapes from its model (the server from ``ModelInfo``, a
client from its download's ``meta``); shapes are never sent as tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedlora.types import Adapter, BaseEdit, LowRank

INDEX_DTYPE = torch.int32
"""The dtype of sparse indices on the wire (4 bytes each)."""


def pack_adapter(adapter: Adapter, factors: str = "AB") -> dict[str, Tensor]:
    """Named tensors of an adapter; ``factors`` selects which of A and B travel."""
    out: dict[str, Tensor] = {}
    for module, lr in adapter.items():
        if "A" in factors:
            out[f"lora.{module}.A"] = lr.A
        if "B" in factors:
            out[f"lora.{module}.B"] = lr.B
    return out


def unpack_factors(tensors: Mapping[str, Tensor], factor: str) -> dict[str, Tensor]:
    """Module -> tensor for one factor ("A" or "B")."""
    suffix = f".{factor}"
    return {
        name[len("lora.") : -len(suffix)]: t
        for name, t in tensors.items()
        if name.startswith("lora.") and name.endswith(suffix)
    }


def unpack_adapter(tensors: Mapping[str, Tensor], who: str = "payload") -> dict[str, LowRank]:
    """Canonical adapter from named tensors; every module must carry both A and B."""
    As, Bs = unpack_factors(tensors, "A"), unpack_factors(tensors, "B")
    if set(As) != set(Bs):
        missing = sorted(set(As) ^ set(Bs))
        raise ValueError(f"{who}: modules {missing} carry only one of the LoRA factors A and B")
    return {m: LowRank(Bs[m], As[m]) for m in sorted(As)}


def pack_extras(extras: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"extra.{name}": t for name, t in extras.items()}


def unpack_extras(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name[len("extra.") :]: t for name, t in tensors.items() if name.startswith("extra.")}


def pack_base_edits(edits: tuple[BaseEdit, ...]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for edit in edits:
        for module, lr in edit.factored.items():
            out[f"base.{edit.version}.{module}.left"] = lr.B
            out[f"base.{edit.version}.{module}.right"] = lr.A
        for module, delta in edit.dense.items():
            out[f"base.{edit.version}.{module}.dense"] = delta
    return out


def unpack_base_edits(tensors: Mapping[str, Tensor]) -> tuple[BaseEdit, ...]:
    """Base edits in version order; a malformed name, an unpaired left/right or mismatched factor shapes are a
    ValueError naming the tensor."""
    by_version: dict[int, tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]] = {}
    for name, t in tensors.items():
        if not name.startswith("base."):
            continue
        version, _, rest = name[len("base.") :].partition(".")
        module, _, kind = rest.rpartition(".")
        if not version.isdigit() or not module or kind not in ("left", "right", "dense"):
            raise ValueError(f"{name!r}: expected base.<version>.<module>.left|right|dense")
        left, right, dense = by_version.setdefault(int(version), ({}, {}, {}))
        {"left": left, "right": right, "dense": dense}[kind][module] = t
    edits = []
    for v, (left, right, dense) in sorted(by_version.items()):
        if set(left) != set(right):
            raise ValueError(f"base.{v}.{sorted(set(left) ^ set(right))[0]}: a factored edit needs left and right")
        try:
            edits.append(BaseEdit(v, {m: LowRank(left[m], right[m]) for m in left}, dict(dense)))
        except ValueError as e:
            raise ValueError(f"base.{v}: {e}") from None
    return tuple(edits)


def pack_sparse(name: str, values: Tensor, indices: Tensor) -> dict[str, Tensor]:
    """``<name>.values`` and ``<name>.indices`` (int32); ``name`` is e.g. ``lora.<module>.A``."""
    if indices.numel() and int(indices.max()) > torch.iinfo(INDEX_DTYPE).max:
        raise ValueError(f"{name}: index {int(indices.max())} does not fit the wire's {INDEX_DTYPE}")
    return {f"{name}.values": values, f"{name}.indices": indices.to(INDEX_DTYPE)}


def unpack_sparse(tensors: Mapping[str, Tensor], who: str = "payload") -> dict[str, tuple[Tensor, Tensor]]:
    """``name`` -> (values, indices as int64) for every sparse tensor; each needs both parts."""
    values = {n[: -len(".values")]: t for n, t in tensors.items() if n.endswith(".values")}
    indices = {n[: -len(".indices")]: t for n, t in tensors.items() if n.endswith(".indices")}
    if set(values) != set(indices):
        raise ValueError(f"{who}: sparse tensors {sorted(set(values) ^ set(indices))} lack values or indices")
    return {n: (values[n], indices[n].to(torch.int64)) for n in sorted(values)}


def reference_tensors(
    adapter: Adapter | None, extras: Mapping[str, Tensor], cores: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Named tensors of a starting point (a global model, a client's plan): what an upload is compared with. The r×r
    cores of a tri-factor method (``GlobalModel.cores``, ``TrainPlan.cores``) are named as uploaded cores are,
    ``lora.<module>.C``, so that an uploaded core is compared with the one it started from."""
    named_cores = {f"lora.{m}.C": t for m, t in sorted((cores or {}).items())}
    return (pack_adapter(adapter) if adapter is not None else {}) | pack_extras(extras) | named_cores


def leading_block(tensors: Mapping[str, Tensor], name: str, shape: tuple[int, ...]) -> Tensor | None:
    """The leading block of ``shape`` of ``tensors[name]`` (a lower-rank upload is compared with the first rank
    components of its reference), or None when there is no such tensor or it is smaller than ``shape``."""
    t = tensors.get(name)
    if t is None or t.dim() != len(shape) or any(s > n for s, n in zip(shape, t.shape, strict=True)):
        return None
    return t[tuple(slice(0, s) for s in shape)]
