"""fedlora: federated fine-tuning of foundation models with LoRA."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedlora")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
