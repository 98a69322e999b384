"""The task registry: ``get(name)`` for ``model.task``, ``available()``.

Each task module registers one task object under its key (as the methods do); unknown names fail with the list
of valid names.
"""

from __future__ import annotations

import importlib

from fedlora.tasks.base import Encoded, Examples, Sums, Task, TaskData, add_sums

__all__ = ["Encoded", "Examples", "Sums", "Task", "TaskData", "add_sums", "available", "get", "register"]

# key -> module that defines it (imported lazily, once)
_MODULES = {"seq_cls": "seq_cls", "causal_lm": "causal_lm"}

_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Register ``task`` under ``task.name``; duplicate names are refused."""
    if task.name in _REGISTRY:
        raise ValueError(f"task {task.name!r} is already registered")
    _REGISTRY[task.name] = task
    return task


def available() -> list[str]:
    """Registered task keys."""
    return list(_MODULES)


def get(name: str) -> Task:
    """The task registered under ``name`` (``model.task``)."""
    if name not in _MODULES:
        raise ValueError(f"model.task = {name!r}: unknown task; the tasks are {', '.join(map(repr, _MODULES))}")
    if name not in _REGISTRY:
        importlib.import_module(f"fedlora.tasks.{_MODULES[name]}")
    return _REGISTRY[name]
