"""The Flower engines behind ``federation.engine``: Flower's simulation runtime, and a real deployment.

``flower-simulation`` runs :mod:`fedlora.flower.server_app`'s loop and :mod:`fedlora.flower.client_app` on
``flwr.simulation.run_simulation`` (Ray; one simulated SuperNode per client, ``client_resources`` one CPU each,
at most min(2, CPU cores) clients at a time). The run directory is the in-process runner's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedlora import config as cfgmod
from fedlora import methods, runner

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


def run(
    cfg: cfgmod.ExperimentConfig, run_dir: Path | None = None, resume: bool = False, progress: Any | None = None
) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) ``cfg`` on the Flower engine it names; the same run directory as ``runner.run``."""
    require_flower()
    method = methods.build(cfg.federation.method, cfg.method)
    if hasattr(method, "evaluation_model") and not hasattr(method, "evaluation_report"):
        raise ValueError(
            f"federation.method = {cfg.federation.method!r} evaluates its global model from what stays on the "
            f"clients (runner.global_model) but defines no evaluation_report for the nodes to send it on "
            f"federation.engine = {cfg.federation.engine!r}: use federation.engine = 'inprocess'"
        )
    run_dir = (run_dir or runner.default_run_dir(cfg)).resolve()
    if not resume:
        runner.check_fresh_dir(run_dir)
    if cfg.federation.engine == "flower-simulation":
        return run_dir, run_simulation(cfg, run_dir, resume, progress)
    if cfg.federation.engine == "flower-deployment":
        from fedlora.flower import deployment

        return run_dir, deployment.run_deployment(cfg, run_dir, resume)
    raise ValueError(f"federation.engine = {cfg.federation.engine!r}: not a Flower engine")


def run_simulation(
    cfg: cfgmod.ExperimentConfig, run_dir: Path, resume: bool = False, progress: Any | None = None
) -> dict[str, Any]:
    """``cfg`` on Flower's simulation runtime; returns the summary (an error in the ServerApp is re-raised)."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedlora.flower.client_app import app as client_app
    from fedlora.flower.server_app import serve

    result: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        result["summary"] = serve(grid, cfg, run_dir, resume, progress)

    n = cfg.data.num_clients
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, min(2, os.cpu_count() or 1, n)), "num_gpus": 0, "include_dashboard": False},
    }
    flwr_run_simulation(server_app, client_app, num_supernodes=n, backend_config=backend_config)  # type: ignore[arg-type]
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended before the ServerApp finished (see Flower's log above)")
    return result["summary"]
