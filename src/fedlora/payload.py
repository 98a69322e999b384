"""The wire format of payloads: canonical adapters, fully trained tensors and base edits as named tensors.

One naming scheme for every method and every transport (in-process, Flower ArrayRecords, checkpoints):

    lora.<module>.A / lora.<module>.B          canonical factors (B carries the LoRA scale)
    extra.<name>                                fully trained tensors (the classifier head)
    base.<version>.<module>.left / .right       a factored base edit
    base.<version>.<module>.dense               a dense base edit
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fedlora.types import Adapter, BaseEdit, LowRank


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
    """Base edits in version order."""
    by_version: dict[int, tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]] = {}
    for name, t in tensors.items():
        if not name.startswith("base."):
            continue
        _, version, rest = name.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        left, right, dense = by_version.setdefault(int(version), ({}, {}, {}))
        {"left": left, "right": right, "dense": dense}[kind][module] = t
    return tuple(
        BaseEdit(v, {m: LowRank(left[m], right[m]) for m in left}, dict(dense))
        for v, (left, right, dense) in sorted(by_version.items())
    )
