"""Aggregate PEFT adapter directories trained at different sites (``fedlora aggregate``).

Reads every ``ADAPTER_DIR`` (adapter_config.json + adapter_model.safetensors), runs one round of the chosen
method's server step on them, and writes

    OUT/adapter_config.json, OUT/adapter_model.safetensors   a PEFT adapter (PeftModel.from_pretrained loads it)
    OUT/base_edits.safetensors                                 only for methods that edit the base weights
    OUT/aggregation.json                                       the method, weights and the measured errors

The base-edit format (``fedlora.peft_io.write_base_edits``): per module ``<module>.left`` (d×R) and
``<module>.right`` (R×k) and/or ``<module>.dense`` (d×k), in (out, in) orientation, so that
W_new = W0 + left @ right + dense (transposed once more for GPT-2 Conv1D weights, which are stored (in, out)).
Inputs are validated before any math runs (every tensor finite and floating-point, no directory twice, one base
model); outputs may not overwrite an input, the base model or anything that exists. Everything is written to
temporary directories that are renamed into place only when all of it (the merge included) succeeded.

Inputs that carry base edits (the adapter of a FedEx-LoRA or FLoRA run, trained on W0 + edits): when every input
carries the same edits, the sites share those base weights, the adapters are aggregated on top of them and OUT's
base edits are the inputs' followed by the method's own; when only some carry edits, or the edits differ, the sites
were trained on different base weights and the inputs are refused (aggregating only their factors would drop the
difference).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedlora import adapter_card, methods, peft_io
from fedlora.methods.base import GlobalModel, ModelInfo, ModuleSpec
from fedlora.payload import pack_adapter, pack_extras
from fedlora.types import AggregationReport, BaseEdit, Contribution, Payload
from fedlora.validation import normalize_weights


@dataclass(frozen=True)
class AggregateResult:
    out: Path
    merged_out: Path | None
    report: AggregationReport
    weights: list[float]
    wrote_base_edits: bool


def _read_all(dirs: Sequence[Path], read: Callable[[Path], Any] = peft_io.read_adapter_dir) -> list[Any]:
    """``read`` of every directory (by default the adapter), an error naming the adapter by number and path."""
    files = []
    for i, d in enumerate(dirs):
        try:
            files.append(read(d))
        except (OSError, ValueError) as e:
            raise ValueError(f"adapter {i} ({d}): {e}") from e
    return files


def _overlap(a: Path, b: Path) -> bool:
    """The same directory, or one inside the other (after resolving symlinks)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_inputs(dirs: Sequence[Path]) -> None:
    """At least one adapter directory, none given twice (a duplicate would count its site twice), none with a
    mixture of experts beside its adapter (aggregating the adapter alone would drop the experts)."""
    if not dirs:
        raise ValueError("no adapter directories given: the client list is empty")
    for i, d in enumerate(dirs):
        if (d / peft_io.MIXTURE_FILE).exists():
            raise ValueError(
                f"adapter {i} ({d}) holds {peft_io.MIXTURE_FILE}, experts and their routing beside the adapter "
                "(FL-TAC, FedLEASE); aggregating the adapter alone would drop them"
            )
        for j in range(i):
            if d.resolve() == dirs[j].resolve():
                raise ValueError(f"adapter {i} ({d}) is the same directory as adapter {j} ({dirs[j]}); give each once")


def check_outputs(outputs: Mapping[str, Path], inputs: Sequence[Path], base_model: str | None) -> None:
    """Every output is a new or empty directory that neither is nor contains nor lies inside an input adapter
    directory, the base-model directory or another output."""
    protected = {f"input adapter {i} ({d})": d for i, d in enumerate(inputs)}
    if base_model is not None and Path(peft_io.resolve_model_name(base_model)).exists():
        protected[f"the --base-model directory ({base_model})"] = Path(peft_io.resolve_model_name(base_model))
    for option, path in outputs.items():
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{option} {path}: exists and is not an empty directory; nothing was written")
        for what, other in protected.items():
            if _overlap(path, other):
                raise ValueError(f"{option} {path} would overwrite {what}: choose a new directory")
        protected[f"{option} ({path})"] = path


def check_same_base(files: Sequence[peft_io.AdapterFile], dirs: Sequence[Path], allow_mixed: bool) -> None:
    """The adapters name one ``base_model_name_or_path`` (those that name one), unless mixing is allowed."""
    named = {i: f.config.get("base_model_name_or_path") for i, f in enumerate(files)}
    named = {i: b for i, b in named.items() if b}
    if len(set(named.values())) > 1 and not allow_mixed:
        listing = ", ".join(f"adapter {i} ({dirs[i]}): {b!r}" for i, b in named.items())
        raise ValueError(
            f"the adapters were trained on different base models ({listing}); pass --allow-mixed-base if they are "
            "the same model under different names"
        )


def aggregate_dirs(
    method_name: str,
    dirs: Sequence[str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    *,
    base_model: str | None = None,
    merged_out: str | Path | None = None,
    allow_mixed_base: bool = False,
) -> AggregateResult:
    """One server step of ``method_name`` over PEFT adapter directories; writes OUT (and, with ``base_model``,
    the merged model to ``merged_out``) by staging everything next to its target and renaming it into place only
    when all of it succeeded, so a failure leaves nothing behind."""
    if (merged_out is None) != (base_model is None):
        raise ValueError("--merged-out and --base-model go together")
    paths = [Path(d) for d in dirs]
    outputs = {"--out": Path(out)} | ({"--merged-out": Path(merged_out)} if merged_out is not None else {})
    check_inputs(paths)
    check_outputs(outputs, paths, base_model)
    method = methods.build(method_name, params)
    files = _read_all(paths)
    check_same_base(files, paths, allow_mixed_base)
    inherited = shared_base_edits(paths)
    description = adapter_card.shared_description(paths)
    w = normalize_weights(weights, len(files), "--weights")
    report, exported = _server_step(method, files, w, seed)
    exported = replace(exported, base_edits=on_top_of(inherited, exported.base_edits))
    with contextlib.ExitStack() as stack:
        staged = {option: _staging(stack, path) for option, path in outputs.items()}
        _write_out(staged["--out"], exported, files[0].config, _summary(method_name, paths, w, report))
        if description is not None:
            adapter_card.describe_aggregate(staged["--out"], description, method_name, paths)
        if base_model is not None:
            edits = staged["--out"] / peft_io.BASE_EDITS_FILE if exported.base_edits else None
            try:
                peft_io.merge_to_base(base_model, staged["--out"], edits, staged["--merged-out"])
            except (ValueError, TypeError, RuntimeError, OSError) as e:
                raise ValueError(f"--merged-out with --base-model {base_model}: {e}") from e
        _publish(staged, outputs)
    return AggregateResult(outputs["--out"], outputs.get("--merged-out"), report, w.tolist(), bool(exported.base_edits))


def shared_base_edits(dirs: Sequence[Path]) -> BaseEdit | None:
    """The base edits every input adapter was trained on (None when none carries any); refuses inputs whose base
    weights differ: some with ``base_edits.safetensors`` and some without, or different edits."""
    files = [d / peft_io.BASE_EDITS_FILE for d in dirs]
    present = [i for i, f in enumerate(files) if f.is_file()]
    if not present:
        return None
    if len(present) < len(dirs):
        absent = next(i for i, f in enumerate(files) if not f.is_file())
        raise ValueError(
            f"adapter {present[0]} ({dirs[present[0]]}) carries {peft_io.BASE_EDITS_FILE} (its base weights were "
            f"edited by a base-editing method) but adapter {absent} ({dirs[absent]}) has none: the sites trained on "
            "different base weights, so aggregating their factors would drop the difference; aggregate adapters "
            "of one base"
        )
    edits = _read_all(dirs, lambda d: peft_io.read_base_edits(d / peft_io.BASE_EDITS_FILE))
    for i, e in enumerate(edits[1:], start=1):
        if differing := _differing_module(edits[0], e):
            raise ValueError(
                f"adapter {i} ({dirs[i]}): {peft_io.BASE_EDITS_FILE} differs from adapter 0's ({dirs[0]}) in module "
                f"{differing!r}: the sites trained on different base weights; aggregate adapters of one base"
            )
    return edits[0]


def _differing_module(a: BaseEdit, b: BaseEdit) -> str | None:
    """The first module whose stored edit tensors differ between ``a`` and ``b`` (None: the same edits)."""
    for m in sorted(a.modules() | b.modules()):
        fa, fb = a.factored.get(m), b.factored.get(m)
        same_factored = (fa is None) == (fb is None) and (fa is None or (_equal(fa.B, fb.B) and _equal(fa.A, fb.A)))
        da, db = a.dense.get(m), b.dense.get(m)
        if not same_factored or (da is None) != (db is None) or (da is not None and not _equal(da, db)):
            return m
    return None


def _equal(x: Any, y: Any) -> bool:
    return x.shape == y.shape and bool((x == y).all())


def on_top_of(inherited: BaseEdit | None, new: Sequence[BaseEdit]) -> tuple[BaseEdit, ...]:
    """The inputs' base edits followed by the method's, renumbered after them (versions stay increasing)."""
    if inherited is None:
        return tuple(new)
    return (inherited, *(replace(e, version=inherited.version + e.version) for e in new))


def _server_step(
    method: Any, files: Sequence[peft_io.AdapterFile], w: Any, seed: int
) -> tuple[AggregationReport, GlobalModel]:
    """Round 1 of the method on the sites' adapters; a zero adapter when the update went into the base (FLoRA)."""
    first = files[0].adapter
    ranks = [max(lr.rank for lr in f.adapter.values()) for f in files]
    specs = {m: ModuleSpec(*lr.shape) for m, lr in first.items()}
    state = method.init_server(ModelInfo(specs, max(ranks)), seed)
    contributions = [
        Contribution(i, float(wi), Payload(pack_adapter(f.adapter) | pack_extras(f.extras)))
        for i, (wi, f) in enumerate(zip(w, files, strict=True))
    ]
    state, report = method.aggregate(state, contributions, rnd=1)
    exported = method.export(state)
    if exported.adapter is None:
        exported = replace(exported, adapter={m: lr.scaled(0.0) for m, lr in first.items()})
    return report, exported


def _summary(method_name: str, paths: Sequence[Path], w: Any, report: AggregationReport) -> dict[str, Any]:
    return {
        "method": method_name,
        "inputs": [str(p) for p in paths],
        "weights": w.tolist(),
        "divergence": report.divergence,
        "error": report.error,
        "eckart_young": report.eckart_young,
        "fedit_divergence": report.fedit,
        "modules": {m: vars(e) for m, e in report.modules.items()},
        "bytes_up": report.bytes_up,
        "bytes_down": report.bytes_down,
    }


def _write_out(directory: Path, exported: GlobalModel, config: Mapping[str, Any], summary: dict[str, Any]) -> None:
    assert exported.adapter is not None
    peft_io.write_adapter_dir(directory, exported.adapter, exported.extras, config)
    if exported.base_edits:
        peft_io.write_base_edits(directory / peft_io.BASE_EDITS_FILE, exported.base_edits)
    (directory / "aggregation.json").write_text(json.dumps(summary, indent=2))


def _staging(stack: contextlib.ExitStack, target: Path) -> Path:
    """A fresh directory on the target's filesystem (next to it), removed when ``stack`` closes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(stack.enter_context(tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}."))) / "o"


def _publish(staged: Mapping[str, Path], targets: Mapping[str, Path]) -> None:
    """Rename every staged directory onto its target (a missing or empty directory); if one rename fails, the
    targets already renamed are removed again."""
    done: list[Path] = []
    try:
        for option, target in targets.items():
            os.replace(staged[option], target)
            done.append(target)
    except OSError:
        for target in done:
            shutil.rmtree(target, ignore_errors=True)
        raise
