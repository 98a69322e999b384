"""The engines, peers behind one entry point: ``run(cfg)`` picks the one ``federation.engine`` names.

Each engine is a thin loop over the shared steps (``fedlora.experiment``, ``fedlora.client``, ``fedlora.server``,
``fedlora.evaluation``, ``fedlora.rundir``) and writes the same run directory. Engines never import each other;
this table names them as modules, imported only when chosen (Flower is imported only for a Flower engine).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from fedlora import config as cfgmod

ENGINES = {
    "inprocess": "fedlora.engines.inprocess",
    "flower-simulation": "fedlora.engines.flower",
    "flower-deployment": "fedlora.engines.flower",
}
"""``federation.engine`` -> the module whose ``run(cfg, run_dir, resume, progress)`` runs it."""


def run(
    cfg: cfgmod.ExperimentConfig, run_dir: Path | None = None, resume: bool = False, progress: Any | None = None
) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) ``cfg`` on its engine; returns the run directory and the summary.

    ``progress`` (optional) receives ``round_started(rnd, n_clients)``, ``client_done(client)`` and
    ``round_done(rnd, record)``.
    """
    if cfg.federation.engine not in ENGINES:
        raise ValueError(f"federation.engine = {cfg.federation.engine!r}: expected one of {', '.join(ENGINES)}")
    engine = importlib.import_module(ENGINES[cfg.federation.engine])
    return engine.run(cfg, run_dir, resume, progress)
