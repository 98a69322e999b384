"""The method registry: ``build(name, params)``, ``available()``, ``params_class(name)``.

Each method file registers one factory under its key. Unknown names fail with the list of valid names and a
suggestion; unknown or out-of-range hyperparameters fail with the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from collections.abc import Callable, Mapping
from typing import Any

from fedlora.methods.base import Capabilities, ClientInfo, FactorMethod, GlobalModel, Method, ModelInfo, ModuleSpec

__all__ = [
    "Capabilities",
    "ClientInfo",
    "FactorMethod",
    "GlobalModel",
    "Method",
    "ModelInfo",
    "ModuleSpec",
    "available",
    "build",
    "capabilities",
    "params_class",
    "register",
]

# key -> module that defines it (imported lazily, once, by _load)
_MODULES = {
    "fedit": "fedit",
    "flora_na": "flora_na",
    "flora": "flora",
    "fedex_lora": "fedex_lora",
    "flexlora": "flexlora",
    "hetlora": "hetlora",
    "ffa_lora": "ffa_lora",
    "fedsa_lora": "fedsa_lora",
    "rolora": "rolora",
    "lora_fair": "lora_fair",
    "frlora": "frlora",
    "fedloru": "fedloru",
    "pfedloru": "fedloru",
    "mfedloru": "fedloru",
    "fslora": "fslora",
    "flasc": "flasc",
    "fedrot_lora": "fedrot_lora",
    "fedsvd": "fedsvd",
    "ce_lora": "ce_lora",
    "fl_tac": "fl_tac",
    "fedlease": "fedlease",
    "fed_sb": "fed_sb",
}


@dataclasses.dataclass(frozen=True)
class _Entry:
    params: type
    capabilities: Capabilities
    factory: Callable[[Any], Method]


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, params: type, capabilities: Capabilities) -> Callable[[Callable[[Any], Method]], Any]:
    """Decorator: register ``factory(params) -> Method`` under ``name``; duplicate names are refused."""

    def deco(factory: Callable[[Any], Method]) -> Callable[[Any], Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = _Entry(params, capabilities, factory)
        return factory

    return deco


def _load() -> None:
    for module in dict.fromkeys(_MODULES.values()):
        importlib.import_module(f"fedlora.methods.{module}")


def available() -> list[str]:
    """Registered method keys, in registry order."""
    _load()
    return [k for k in _MODULES if k in _REGISTRY]


def _entry(name: str) -> _Entry:
    _load()
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"unknown method {name!r}: valid methods are {', '.join(available())}{suggestion}")
    return _REGISTRY[name]


def params_class(name: str) -> type:
    """The frozen dataclass of the method's hyperparameters (its fields are the valid ``method.*`` keys)."""
    return _entry(name).params


def capabilities(name: str) -> Capabilities:
    return _entry(name).capabilities


def make_params(name: str, values: Mapping[str, Any] | None = None) -> Any:
    """Validated hyperparameters of ``name`` from ``method.*`` values; unknown keys are errors."""
    cls = params_class(name)
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in values or {}:
        if key not in valid:
            hint = difflib.get_close_matches(key, valid, n=1)
            suggestion = f"; did you mean 'method.{hint[0]}'?" if hint else ""
            listed = ", ".join(f"method.{v}" for v in valid) or "none"
            raise ValueError(f"unknown key 'method.{key}' for method {name!r}: valid keys are {listed}{suggestion}")
    typed = {
        key: _typed(name, key, value, hints[key])
        for hints in [typing.get_type_hints(cls)]
        for key, value in (values or {}).items()
    }
    return cls(**typed)


def _typed(method: str, key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the field's annotation (bool, int, float, str or a Literal); ints widen to float."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        ok, expected = value in typing.get_args(hint), "one of " + ", ".join(map(repr, typing.get_args(hint)))
    elif hint is bool:
        ok, expected = isinstance(value, bool), "true or false"
    elif hint is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif hint is float:
        ok, expected = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif hint is str:
        ok, expected = isinstance(value, str), "a string"
    else:
        ok, expected = True, ""
    if not ok:
        raise ValueError(f"method.{key} = {value!r} for method {method!r}: expected {expected}")
    return value


def build(name: str, params: Mapping[str, Any] | None = None) -> Method:
    """The method registered under ``name`` with validated hyperparameters."""
    return _entry(name).factory(make_params(name, params))
