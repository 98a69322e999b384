"""The task registry: ``get(name)`` for ``model.task``, ``for_config(cfg)``, ``available()``.

Each task module registers one task object under its key (as the methods do); unknown names fail with the list
of valid names. A task that also takes a multi-task federation (``data.tasks``) names the module of its multi-task
form in ``_MULTI``; ``for_config`` builds that form for the config's tasks.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedlora.tasks.base import Encoded, Examples, Sums, Task, TaskData, add_sums

__all__ = [
    "Encoded",
    "Examples",
    "Sums",
    "Task",
    "TaskData",
    "add_sums",
    "available",
    "for_config",
    "get",
    "register",
]

# key -> module that defines it (imported lazily, once)
_MODULES = {"seq_cls": "seq_cls", "causal_lm": "causal_lm"}
# key -> (module, class) of its multi-task form (data.tasks)
_MULTI = {"seq_cls": ("multi_seq_cls", "MultiTaskClassification")}

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


def for_config(cfg: Any) -> Task:
    """The task of ``cfg``: ``get(cfg.model.task)``, or its multi-task form when ``cfg.data.tasks`` is set."""
    if cfg.data.tasks is None:
        return get(cfg.model.task)
    if cfg.model.task not in _MULTI:
        raise ValueError(f"data.tasks is set, but model.task = {cfg.model.task!r} takes one dataset (data.dataset)")
    from fedlora import multitask

    module, cls = _MULTI[cfg.model.task]
    return getattr(importlib.import_module(f"fedlora.tasks.{module}"), cls)(multitask.task_names(cfg.data.tasks))
