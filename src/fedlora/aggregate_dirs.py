"""Aggregate PEFT adapter directories trained at different sites (``fedlora aggregate``).

Reads every ``ADAPTER_DIR`` (adapter_config.json + adapter_model.safetensors), runs one round of the chosen
method's server step on them, and writes

    OUT/adapter_config.json, OUT/adapter_model.safetensors   a PEFT adapter (PeftModel.from_pretrained loads it)
    OUT/base_edits.safetensors                                 only for methods that edit the base weights
    OUT/aggregation.json                                       the method, weights and the measured errors

The base-edit format (``fedlora.peft_io.write_base_edits``): per module ``<module>.left`` (d×R) and
``<module>.right`` (R×k) and/or ``<module>.dense`` (d×k), in (out, in) orientation, so that
W_new = W0 + left @ right + dense (transposed once more for GPT-2 Conv1D weights, which are stored (in, out)).
Everything is written to a temporary directory that is renamed to OUT only when all of it succeeded.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora import methods, peft_io
from fedlora.methods.base import ModelInfo, ModuleSpec
from fedlora.payload import pack_adapter, pack_extras
from fedlora.types import AggregationReport, Contribution, Payload
from fedlora.validation import normalize_weights


@dataclass(frozen=True)
class AggregateResult:
    out: Path
    report: AggregationReport
    weights: list[float]
    wrote_base_edits: bool


def _read_all(dirs: Sequence[Path]) -> list[peft_io.AdapterFile]:
    files = []
    for i, d in enumerate(dirs):
        try:
            files.append(peft_io.read_adapter_dir(d))
        except (OSError, ValueError) as e:
            raise ValueError(f"adapter {i} ({d}): {e}") from e
    return files


def aggregate_dirs(
    method_name: str,
    dirs: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> AggregateResult:
    """One server step of ``method_name`` over PEFT adapter directories; writes OUT atomically."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: the directory exists and is not empty")
    method = methods.build(method_name, params)
    paths = [Path(d) for d in dirs]
    if not paths:
        raise ValueError("no adapter directories given: the client list is empty")
    files = _read_all(paths)
    w = normalize_weights(weights, len(files), "--weights")
    ranks = [max(lr.rank for lr in f.adapter.values()) for f in files]
    first = files[0].adapter
    specs = {m: ModuleSpec(*lr.shape) for m, lr in first.items()}
    state = method.init_server(ModelInfo(specs, max(ranks)), seed)
    contributions = [
        Contribution(i, float(wi), Payload(pack_adapter(f.adapter) | pack_extras(f.extras)))
        for i, (wi, f) in enumerate(zip(w, files, strict=True))
    ]
    state, report = method.aggregate(state, contributions, rnd=1)
    exported = method.export(state)
    adapter = exported.adapter
    if adapter is None:  # the update went entirely into the base (FLoRA): a zero adapter on top
        adapter = {m: lr.scaled(0.0) for m, lr in first.items()}
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staging = Path(tmp) / "out"
        peft_io.write_adapter_dir(staging, adapter, exported.extras, files[0].config)
        if exported.base_edits:
            peft_io.write_base_edits(staging / "base_edits.safetensors", exported.base_edits)
        summary = {
            "method": method_name,
            "inputs": [str(p) for p in paths],
            "weights": w.tolist(),
            "divergence": report.divergence,
            "eckart_young": report.eckart_young,
            "fedit_divergence": report.fedit,
            "modules": {m: vars(e) for m, e in report.modules.items()},
            "bytes_up": report.bytes_up,
            "bytes_down": report.bytes_down,
        }
        (staging / "aggregation.json").write_text(json.dumps(summary, indent=2))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.move(str(staging), str(out))
    return AggregateResult(out, report, w.tolist(), bool(exported.base_edits))


def num_labels_of(adapter_dir: str | Path) -> int:
    """Rows of the saved classification head (``classifier``/``score`` weight), 2 when there is none."""
    extras = peft_io.read_adapter_dir(adapter_dir).extras
    for name, t in extras.items():
        if name.endswith(("classifier.weight", "score.weight", "out_proj.weight")) and t.ndim == 2:
            return int(t.shape[0])
    return 2
