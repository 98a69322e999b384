"""fedlora: federated fine-tuning of foundation models with LoRA.

The Python API (``fedlora.api``), loaded on first use so that ``import fedlora`` stays light:

- ``fedlora.load_config(config=None, **overrides) -> ExperimentConfig``
- ``fedlora.run(config=None, *, resume=None, **overrides) -> RunResult``
- ``fedlora.compare(config, methods, *, out=None, resume=False, **overrides) -> {method: RunResult}``
- ``fedlora.aggregate(adapter_dirs, method, out, ...) -> AggregateResult``
- ``fedlora.evaluate(run_or_adapter, data=None, *, device=None) -> EvalResult``
- ``fedlora.predict(adapter, texts, *, device=None) -> [{"label": ..., "probabilities": {...}}, ...]``

``fedlora.RunResult`` holds a finished run's directory, config, summary and per-round records.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("fedlora")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["RunResult", "__version__", "aggregate", "compare", "evaluate", "load_config", "predict", "run"]

_API = {"RunResult", "aggregate", "compare", "evaluate", "load_config", "predict", "run"}


def __getattr__(name: str) -> Any:
    """The API's names, imported from ``fedlora.api`` when first used."""
    if name in _API:
        from fedlora import api

        return getattr(api, name)
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
