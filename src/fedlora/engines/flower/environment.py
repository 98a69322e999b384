"""What every Flower engine needs of its environment: the variables that keep Flower offline and inside the current
virtual environment, and the oldest Flower release the engines work with."""

from __future__ import annotations

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # otherwise Flower installs its own torch
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DISABLE_USAGE_STATS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


MIN_FLOWER = (1, 41)
"""The oldest Flower release fedlora's engines are tested with (Message API: ``flwr.app``, ``flwr.serverapp.Grid``,
``flwr.clientapp.ClientApp`` with ``query`` / ``train`` / ``evaluate`` handlers, SuperNode ``--max-wait-time``)."""


def require_flower() -> None:
    """A clear error, before anything starts, when Flower is missing or older than ``MIN_FLOWER``."""
    from importlib.metadata import PackageNotFoundError, version

    wanted = ".".join(map(str, MIN_FLOWER))
    try:
        found = version("flwr")
    except PackageNotFoundError:
        raise RuntimeError(f"the Flower engines need flwr>={wanted}: install fedlora[flower]") from None
    parts = tuple(int(x) for x in found.split(".")[:2] if x.isdigit())
    if parts < MIN_FLOWER:
        raise RuntimeError(
            f"flwr {found} is installed; the Flower engines need flwr>={wanted} (the Message API of flwr.app and "
            f"flwr.serverapp.Grid): pip install 'flwr[simulation]>={wanted}' (or fedlora[flower])"
        )
