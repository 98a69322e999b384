"""The Flower edge of the wire format: payloads as records, the config as Flower's run config, message sizes.

A ``Payload``'s tensors travel as one ``ArrayRecord`` under their flat payload names (``lora.<m>.A``,
``extra.<n>``, ``base.<v>.<m>.left`` ...) and its small scalars as a ``ConfigRecord``. The experiment config
travels as Flower's run config: the flat dotted keys of :func:`fedlora.config.to_flat`, where a list value
(Flower's run config holds scalars only) is written as its JSON text, e.g. ``"[4, 8]"`` (also a TOML literal).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedlora import config as cfgmod
from fedlora.methods.base import GlobalModel
from fedlora.payload import pack_adapter, pack_base_edits, pack_extras
from fedlora.types import Payload

ARRAYS, META, REPORT = "arrays", "meta", "fedlora.report"


def run_config(cfg: cfgmod.ExperimentConfig) -> dict[str, bool | int | float | str]:
    """``cfg`` as Flower's run config: :func:`fedlora.config.to_flat`, list values as JSON text."""
    return {k: (json.dumps(list(v)) if isinstance(v, list | tuple) else v) for k, v in cfgmod.to_flat(cfg).items()}


APP_KEYS = ("config-file", "overrides")
"""The run config keys of fedlora's own Flower app (``[tool.flwr.app.config]`` of the repository's pyproject.toml,
for ``flwr run .``): a fedlora TOML file and ``key=value`` overrides, exactly as ``fedlora run CONFIG k=v ...``
takes them, so no config default is repeated in pyproject.toml."""


def from_run_config(flat: Mapping[str, Any]) -> cfgmod.ExperimentConfig:
    """The experiment a Flower run config describes: the flat config keys of :func:`run_config` (what fedlora
    generates and sends), or ``config-file`` / ``overrides`` (``flwr run . --run-config "overrides='k=v ...'"``).
    Keys that are neither are an error naming the valid keys."""
    rest = {k: v for k, v in flat.items() if k not in APP_KEYS}
    path, extra = str(flat.get("config-file", "")), shlex.split(str(flat.get("overrides", "")))
    if path or extra:
        if rest:
            raise ValueError(
                f"run config mixes {sorted(APP_KEYS)} with flat config keys {sorted(rest)[:3]}: pass the experiment "
                "either as config-file/overrides or as flat keys"
            )
        return cfgmod.load_config(path or None, extra)
    values = {k: (json.loads(v) if isinstance(v, str) and v.startswith("[") else v) for k, v in rest.items()}
    return cfgmod.from_flat(values)


def payload_records(payload: Payload) -> dict[str, ArrayRecord | ConfigRecord]:
    """The records of one payload: tensors (ArrayRecord under their payload names) and meta (ConfigRecord)."""
    tensors = {name: t.detach().contiguous() for name, t in payload.tensors.items()}
    return {
        ARRAYS: ArrayRecord(torch_state_dict=tensors) if tensors else ArrayRecord(),
        META: ConfigRecord(dict(payload.meta)),
    }


def record_payload(content: RecordDict) -> Payload:
    """The payload a message carries (see :func:`payload_records`)."""
    arrays = content.array_records.get(ARRAYS)
    tensors: dict[str, torch.Tensor] = dict(arrays.to_torch_state_dict()) if arrays is not None and len(arrays) else {}
    meta = content.config_records.get(META)
    return Payload(tensors, dict(meta) if meta is not None else {})


def report_record(report: Payload) -> ArrayRecord:
    """A node's evaluation report (``method.evaluation_report``) as the ``fedlora.report`` record of its reply."""
    return ArrayRecord(torch_state_dict={name: t.detach().contiguous() for name, t in report.tensors.items()})


def record_report(content: RecordDict) -> Payload | None:
    """The evaluation report a reply carries, or None."""
    arrays = content.array_records.get(REPORT)
    return None if arrays is None else Payload(dict(arrays.to_torch_state_dict()))


def message_nbytes(obj: Any, unique: bool = False) -> int:
    """Bytes of a Flower message (or record) as its objects are serialised for transport: every object's header
    and body (Message, RecordDict, records, Arrays, chunks). ``unique``: each distinct object once, as Flower's
    object store transfers them (identical arrays, e.g. all-zero B factors, travel once); otherwise every object
    is counted where it occurs (the message's full encoding, comparable to the payload accounting)."""
    if unique:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())

    def size(o: Any) -> int:
        if isinstance(o, ArrayRecord):  # its children are keyed by object id, which merges identical arrays
            return len(o.deflate()) + sum(size(a) for a in o.values())
        return len(o.deflate()) + sum(size(c) for c in (o.children or {}).values())

    return size(obj)


def message_overhead(message: Message) -> int:
    """Bytes of ``message`` beyond its payload tensors: the same message with an empty ``arrays`` record
    (metadata, config, task, meta and metrics records)."""
    arrays = message.content.array_records.get(ARRAYS) if message.has_content() else None
    if arrays is None:
        return message_nbytes(message)
    return message_nbytes(message) - message_nbytes(arrays) + message_nbytes(ArrayRecord())


def pack_global(model: GlobalModel, base_version: int) -> dict[str, torch.Tensor]:
    """Named tensors of an exported global model for a node whose model holds base edits up to ``base_version``:
    the adapter (if any), the fully trained tensors, and the newer base edits."""
    tensors = pack_adapter(model.adapter) if model.adapter is not None else {}
    tensors |= pack_extras(model.extras)
    return tensors | pack_base_edits(tuple(e for e in model.base_edits if e.version > base_version))
