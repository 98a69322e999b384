"""A saved adapter that describes itself.

Beside PEFT's files (``adapter_config.json``, ``adapter_model.safetensors``) and the base edits, a run's
``adapter/`` holds

- ``fedlora.json``: what loading exactly what the run saved needs, and what a reader wants to know: the base model
  by its portable name (``fedlora:minilm``, a Hugging Face id, or the local path the config gave), the task,
  ``num_labels``, ``id2label`` / ``label2id``, the round the weights come from, the run's metrics at that round
  and the resolved config (flat dotted keys);
- ``README.md``: a model card generated from the run (method, data, rounds, metrics beside their baselines, how to
  use and reproduce it), in place of PEFT's empty template;

and ``adapter_config.json`` names the base model by the same portable name (PEFT writes the path the model was
loaded from, for a packaged model a directory inside the virtual environment).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora import config as cfgmod
from fedlora import peft_io
from fedlora.experiment import Experiment

INFO_FILE = "fedlora.json"
CARD_FILE = "README.md"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class AdapterInfo:
    """What ``fedlora.json`` says about an adapter directory (``metrics``: the run's record of the saved round)."""

    directory: Path
    config: cfgmod.ExperimentConfig
    num_labels: int | None
    task_info: Mapping[str, Any]
    round: int | None
    base_edits: Path | None
    metrics: Mapping[str, Any]


def describe(
    directory: Path, exp: Experiment, records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
) -> None:
    """Write ``fedlora.json`` and the model card into the saved adapter ``directory``, and name the base model
    portably in ``adapter_config.json``. ``summary``: the run's summary (its ``saved_round`` is the round saved)."""
    cfg = exp.cfg
    peft_io.set_base_model_name(directory, cfg.model.name)
    record = next((r for r in records if r["round"] == summary["saved_round"]), records[-1])
    info = _info(
        exp, record, (directory / peft_io.BASE_EDITS_FILE).exists(), (directory / peft_io.MIXTURE_FILE).exists()
    )
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (directory / CARD_FILE).write_text(model_card(info, summary))


def _info(exp: Experiment, record: Mapping[str, Any], has_edits: bool, has_mixture: bool) -> dict[str, Any]:
    from fedlora import __version__

    cfg, labels = exp.cfg, exp.task_info.get("label_names")
    out: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "fedlora_version": __version__,
        "base_model": cfg.model.name,
        "task": cfg.model.task,
        "num_labels": exp.num_labels,
    }
    if labels is not None:
        out |= {"id2label": dict(enumerate(map(str, labels))), "label2id": {str(n): i for i, n in enumerate(labels)}}
    return out | {
        "method": cfg.federation.method,
        "round": record["round"],
        "rounds": cfg.federation.rounds,
        "keep": cfg.output.keep,
        "base_edits": peft_io.BASE_EDITS_FILE if has_edits else None,
        "mixture": peft_io.MIXTURE_FILE if has_mixture else None,
        "metrics": {k: v for k, v in record.items() if _reported(k, v)},
        "task_info": dict(exp.task_info),
        "config": cfgmod.to_flat(cfg),
    }


def _reported(key: str, value: Any) -> bool:
    """The round's numbers a reader of the card wants: the global model's, the baselines, local means, divergence."""
    wanted = key.startswith(("global_", "val_", "local_", "majority", "divergence")) or key in ("lr",)
    return wanted and isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value)


def read(directory: Path) -> AdapterInfo:
    """The ``fedlora.json`` of an adapter directory; one-line errors when it is missing or unreadable."""
    file = directory / INFO_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{directory} has no {INFO_FILE}: it was not saved by `fedlora run` (an adapter from elsewhere, or from "
            "`fedlora aggregate` over adapters without one), so the base model, task and labels are unknown; "
            "evaluate it on the run that trained it, or load it with PeftModel.from_pretrained"
        )
    try:
        info = json.loads(file.read_text())
        config = cfgmod.from_flat(info["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: not a readable fedlora adapter description ({type(e).__name__}: {e})") from None
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {info.get('format_version')!r}, expected {FORMAT_VERSION}")
    edits = directory / info["base_edits"] if info.get("base_edits") else None
    if edits is not None and not edits.is_file():
        raise FileNotFoundError(f"{directory}: {INFO_FILE} names base edits {edits.name}, which are missing")
    if info.get("mixture") and not (directory / info["mixture"]).is_file():
        raise FileNotFoundError(
            f"{directory}: {INFO_FILE} names a mixture of experts {info['mixture']}, which is missing"
        )
    task_info, metrics = info.get("task_info") or {}, info.get("metrics") or {}
    return AdapterInfo(directory, config, info.get("num_labels"), task_info, info.get("round"), edits, metrics)


def model_card(info: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """The adapter's README.md: a Hugging Face model card generated from the run."""
    flat, name, method = info["config"], info["base_model"], info["method"]
    hub_id = not name.startswith("fedlora:") and not Path(name).exists() and "/" in name
    front = ["---", "library_name: peft", *([f"base_model: {name}"] if hub_id else [])]
    front += ["tags:", "- fedlora", "- federated-learning", "- lora", f"- {method}", "---", ""]
    labels = info.get("id2label")
    task = " --task NAME" if flat.get("data.tasks") else ""  # a multi-task run's task, as named in its metrics
    lines = [
        f"# {method} federated LoRA adapter for `{name}`",
        "",
        f"Trained with fedlora {info['fedlora_version']}: {flat['data.num_clients']} clients fine-tuned LoRA "
        f"adapters on their own part of {_data(flat)} and the server aggregated them with `{method}` "
        f"for {_count(info['rounds'], 'round')}. These weights are the global model of round {info['round']} "
        f'(`output.keep = "{info["keep"]}"`).',
        "",
        "## Model",
        "",
        f"- base model: `{name}`" + (" (all-MiniLM-L6-v2, packaged with fedlora)" if name == "fedlora:minilm" else ""),
        f"- task: `{info['task']}`" + (f", {len(labels)} labels: {', '.join(labels.values())}" if labels else ""),
        f"- adapter: {flat.get('model.lora.variant', 'lora')}, r = {_rank(flat)}, α = {flat.get('model.lora.alpha')}"
        + (", with base-weight edits in `base_edits.safetensors`" if info.get("base_edits") else ""),
        "",
        "## Federated training",
        "",
        f"- data: {_data(flat)}, {flat['data.num_clients']} clients, partition `{flat['data.partition']}`"
        + (f" (Dirichlet α = {flat['data.alpha']})" if flat["data.partition"] == "dirichlet" else ""),
        f"- method: `{method}`, {_count(info['rounds'], 'round')}, {_local(flat)}, batch {flat['train.batch_size']}, "
        f"lr {flat['train.lr']} ({flat['train.lr_schedule']}), seed {flat['seed']}",
        "",
        "## Results",
        "",
        *_results(info["metrics"], summary),
        "",
        "## Use it",
        "",
        "```bash",
        f'fedlora predict ADAPTER_DIR "some text"{task}      # label and probabilities (or generated text)',
        "fedlora eval ADAPTER_DIR                      # the run's held-out test set, or --data FILE" + task,
        "```",
        "",
        "```python",
        "import fedlora",
        "",
        f'fedlora.predict("ADAPTER_DIR", ["some text"]{task.replace(" --task NAME", ", task=NAME")})',
        "```",
        "",
        _peft_use(info),
        "",
        "## Reproduce",
        "",
        "```bash",
        "fedlora run config.toml    # the run directory's config.toml (the same keys are in fedlora.json)",
        "```",
        "",
    ]
    return "\n".join(front + lines)


def _data(flat: Mapping[str, Any]) -> str:
    tasks = flat.get("data.tasks")
    return " + ".join(f"`{t}`" for t in tasks) + " (one task each)" if tasks else f"`{flat['data.dataset']}`"


def _peft_use(info: Mapping[str, Any]) -> str:
    """How PEFT alone loads the adapter, and what it leaves out."""
    text = "`PeftModel.from_pretrained(base, ADAPTER_DIR)` loads it into the base model with the classification head"
    text += " (apply `base_edits.safetensors` to the base weights first)" if info.get("base_edits") else ""
    if info.get("mixture"):
        text += (
            f", but without `{info['mixture']}`: the other experts and their routing (by task or by a router), "
            "which PEFT has no layer for; `fedlora predict` and `fedlora eval` load both"
        )
    return text + "; `fedlora.json` holds the labels and the run's whole config."


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _rank(flat: Mapping[str, Any]) -> str:
    ranks = flat.get("model.lora.ranks")
    return f"{max(ranks)} (clients: {ranks})" if ranks else str(flat["model.lora.r"])


def _local(flat: Mapping[str, Any]) -> str:
    if "train.local_epochs" in flat:
        return _count(flat["train.local_epochs"], "local epoch")
    return _count(flat["train.local_steps"], "local step")


def _results(metrics: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    """One table row per reported number of the saved round, baselines beside the accuracies."""
    rows = ["| measured at the saved round | value |", "|---|---|"]
    rows += [f"| `{k}` | {v:.4g} |" for k, v in metrics.items()]
    if "majority_share" in metrics:
        rows += ["", "`majority_share` is the accuracy of always predicting the test set's most frequent label."]
    if summary.get("best_global_accuracy") is not None:
        rows += [
            f"Over the run: best global accuracy {summary['best_global_accuracy']:.4f} (round {summary['best_round']})."
        ]
    return rows


def shared_description(dirs: Sequence[Path]) -> dict[str, Any] | None:
    """For ``fedlora aggregate``: the ``fedlora.json`` the inputs share (base model, task, labels), None when some
    input has none; inputs that disagree on what their heads mean are refused, naming the two adapters and key."""
    if not all((d / INFO_FILE).is_file() for d in dirs):
        return None
    infos = []
    for i, d in enumerate(dirs):
        try:
            infos.append(json.loads((d / INFO_FILE).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"adapter {i} ({d}): {INFO_FILE} is not valid JSON ({e})") from None
    for i, info in enumerate(infos[1:], start=1):
        for key in ("base_model", "task", "num_labels", "id2label"):
            if info.get(key) != infos[0].get(key):
                raise ValueError(
                    f"adapter {i} ({dirs[i]}): {INFO_FILE} {key} = {info.get(key)!r}, but adapter 0 ({dirs[0]}) has "
                    f"{infos[0].get(key)!r}: the adapters were trained for different tasks and cannot be aggregated"
                )
    return infos[0]


def describe_aggregate(directory: Path, shared: Mapping[str, Any], method: str, inputs: Sequence[Path]) -> None:
    """``fedlora.json`` and a model card for the output of ``fedlora aggregate`` over adapters that runs saved, so
    that ``fedlora eval`` and ``fedlora predict`` use it as they use a run's (``shared``: the inputs' description,
    whose config gives the model, task and data)."""
    from fedlora import __version__

    edits = (directory / peft_io.BASE_EDITS_FILE).exists()
    info = dict(shared) | {
        "fedlora_version": __version__,
        "method": method,
        "round": None,
        "rounds": None,
        "keep": None,
        "metrics": {},
        "base_edits": peft_io.BASE_EDITS_FILE if edits else None,
        "aggregated_from": [str(p) for p in inputs],
    }
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    sites = "\n".join(f"- `{p}`" for p in inputs)
    (directory / CARD_FILE).write_text(
        f"---\nlibrary_name: peft\ntags:\n- fedlora\n- federated-learning\n- lora\n- {method}\n---\n\n"
        f"# {method} aggregate of {len(inputs)} adapters for `{info['base_model']}`\n\n"
        f"`fedlora aggregate --method {method}` over these adapters (one server step; weights and errors in "
        f"`aggregation.json`):\n\n{sites}\n\nTask `{info['task']}`"
        + (f", labels {', '.join(info['id2label'].values())}" if info.get("id2label") else "")
        + '. Use it with `fedlora predict DIR "some text"` or `fedlora eval DIR --data FILE` (`fedlora eval DIR` '
        "alone uses the first input's test set)."
        + (" Apply `base_edits.safetensors` to the base weights before loading it elsewhere." if edits else "")
        + "\n"
    )
