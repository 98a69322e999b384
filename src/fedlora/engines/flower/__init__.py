"""The Flower engines (the only package that imports ``flwr``), behind ``federation.engine``:

- ``flower-simulation``: :func:`fedlora.engines.flower.simulation.run_simulation`, Flower's simulation runtime
  (Ray; one simulated SuperNode per client);
- ``flower-deployment``: :func:`fedlora.engines.flower.deployment.run_deployment`, a real deployment (a SuperLink
  and one SuperNode per client) on this machine's loopback interface.

Both run :mod:`fedlora.engines.flower.server_app`'s main loop (the shared server round over the Grid / Message
API) and :mod:`fedlora.engines.flower.client_app` (the shared client round on each node), with
:mod:`fedlora.engines.flower.records` converting payloads and the config to Flower records. The run directory is
the one every engine writes (``fedlora.rundir``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora import config as cfgmod
from fedlora import methods, rundir
from fedlora.engines.flower.environment import require_flower


def run(
    cfg: cfgmod.ExperimentConfig, run_dir: Path | None = None, resume: bool = False, progress: Any | None = None
) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) ``cfg`` on the Flower engine it names; returns the run directory and the summary."""
    require_flower()
    method = methods.build(cfg.federation.method, cfg.method)
    if hasattr(method, "evaluation_model") and not hasattr(method, "evaluation_report"):
        raise ValueError(
            f"federation.method = {cfg.federation.method!r} evaluates its global model from what stays on the "
            f"clients (fedlora.evaluation.global_model) but defines no evaluation_report for the nodes to send it on "
            f"federation.engine = {cfg.federation.engine!r}: use federation.engine = 'inprocess'"
        )
    run_dir = (run_dir or rundir.default_run_dir(cfg)).resolve()
    if not resume:
        rundir.check_fresh_dir(run_dir)
    if cfg.federation.engine == "flower-simulation":
        from fedlora.engines.flower.simulation import run_simulation

        return run_dir, run_simulation(cfg, run_dir, resume, progress)
    if cfg.federation.engine == "flower-deployment":
        from fedlora.engines.flower.deployment import run_deployment

        return run_dir, run_deployment(cfg, run_dir, resume)
    raise ValueError(f"federation.engine = {cfg.federation.engine!r}: not a Flower engine")
