"""fedlora on Flower 1.41: the only package that imports ``flwr``.

- :mod:`fedlora.flower.client_app` (``app``): a ClientApp; one node = one client, its own partition only.
- :mod:`fedlora.flower.server_app` (``app``, ``serve``): a ServerApp main loop over the Grid / Message API that
  runs the in-process round logic (``runner.run_round`` with the same Method objects) with training and
  evaluation on the nodes.
- :mod:`fedlora.flower.records`: payloads as ArrayRecord / ConfigRecord, the config as Flower's run config,
  message sizes.
- :func:`run`: ``federation.engine = "flower-simulation"`` or ``"flower-deployment"``.
"""

from fedlora.flower.engine import run

__all__ = ["run"]
