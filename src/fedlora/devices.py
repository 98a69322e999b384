"""Where the model computes: ``model.device`` resolved to a torch device.

``auto`` is a CUDA GPU when torch sees one (``cuda``, i.e. the current CUDA device), else the CPU; ``mps`` (Apple
GPUs) is used only when asked. The model, every batch and the autocast context follow the device; everything a
method sees stays on the CPU (``fedlora.peft_io`` returns CPU copies), so aggregation is the same on every device.

This module is thin on purpose: only the CPU paths have been run here (no GPU was available); the CUDA and MPS
branches are the torch calls below and nothing else.
"""

from __future__ import annotations

import re

import torch

_NAME = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def is_device_name(name: str) -> bool:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    return _NAME.fullmatch(name) is not None


def resolve(name: str) -> torch.device:
    """The torch device ``model.device = name`` means on this machine; an unavailable device is an error that
    says what torch sees and what to set instead."""
    if not is_device_name(name):
        raise ValueError(f'model.device = "{name}": expected "auto", "cpu", "cuda", "cuda:N" or "mps"')
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            seen = f"{count} CUDA device(s)" if count else "no CUDA device (a CPU-only torch build, or no driver)"
            raise ValueError(f'model.device = "{name}": torch sees {seen}; set model.device=auto or cpu')
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError('model.device = "mps": torch sees no MPS device; set model.device=auto or cpu')
    return torch.device(name)


def accelerator_bf16(name: str) -> bool | None:
    """Whether ``model.precision = "auto"`` should compute in bfloat16 on the accelerator ``name`` resolves to
    (CUDA: where the GPU supports it; MPS: no), or None when the model computes on the CPU (the CPU decides)."""
    if not is_device_name(name):
        return None  # the config reports the bad name
    device = resolve(name) if name in ("auto", "cpu") else torch.device(name)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False if device.type == "mps" else None


def of(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters are on (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def shares_one_model(name: str) -> bool:
    """Whether the in-process engine's clients should share the one model in the main process rather than train
    in worker processes: on a GPU, n workers would hold n copies of the model in its memory."""
    return resolve(name).type != "cpu"
