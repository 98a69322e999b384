"""``federation.engine = "flower-simulation"``: :mod:`fedlora.engines.flower.server_app`'s loop and
:mod:`fedlora.engines.flower.client_app` on ``flwr.simulation.run_simulation`` (Ray; one simulated SuperNode per
client, ``client_resources`` one CPU each, at most min(2, CPU cores) clients at a time).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedlora import config as cfgmod
from fedlora.engines.flower.environment import FLOWER_ENV


def run_simulation(
    cfg: cfgmod.ExperimentConfig, run_dir: Path, resume: bool = False, progress: Any | None = None
) -> dict[str, Any]:
    """``cfg`` on Flower's simulation runtime; returns the summary (an error in the ServerApp is re-raised)."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation as flwr_run_simulation

    from fedlora.engines.flower.client_app import app as client_app
    from fedlora.engines.flower.server_app import serve

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
