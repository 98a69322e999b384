"""Causal language modelling on instructions (``model.task = "causal_lm"``): prompts and responses, the loss on the
response tokens only, judged by the answer NLL and by what the model generates.

Data (``fedlora.instructions``): packaged sets (``fedlora:arithmetic``, ``fedlora:humaneval``) and local files in
chat, prompt/response, GSM8K, MBPP or HumanEval format; a seeded global test split (stratified by group when the
data is grouped) or ``data.eval_dataset``; a partition over the clients by the groups ``data.partition_by`` names (a
column, or ``cluster:K`` clusters of the prompts' embeddings).

Text. With ``data.chat_template = "auto"`` and a tokenizer that has a chat template, the prompt is the template
applied to the prompt's turns with the generation prompt (``<|im_start|>assistant\\n``), and the response is what
the template adds for the assistant's turn (the response and its end-of-turn token). Otherwise (``"none"``) the
prompt is the turns' contents joined by blank lines plus a newline, with the tokenizer's own special tokens
(BOS), and the response is the response text plus the eos token. Prompt and response are tokenised apart and
concatenated, so generation sees exactly the tokens the model trained on.

Truncation to ``data.max_length`` keeps the response: the prompt keeps at least half the budget (or all of
itself) and loses its beginning first; a response longer than the rest loses its end.

Tensors (``encode``): ``input_ids`` / ``attention_mask`` right-padded with the pad token (the eos token when the
tokenizer has none) and ``labels`` = the ids on response tokens, −100 on the prompt and the padding; the prompt
alone, left-padded, for generation (``prompt_ids``, ``prompt_mask``); ``meta``, each example's reference, report
group and default generation metric as UTF-8 JSON bytes (zero-padded), so every split stays a mapping of tensors
that slices and reorders.

Loss and NLL: the transformer body runs on the whole sequence, the output layer only on the positions that predict
a response token (no vocabulary-sized logits for prompt tokens), cross-entropy in float32; the training loss is
the mean over the batch's response tokens. Metrics: ``loss`` (primary, lower is better, every round), the mean
NLL per response token; in full evaluations ``exact_match`` or ``pass_at_1`` (greedy generation, batched, with
``eval.max_new_tokens`` and ``eval.stop``), its standard error ``<metric>_se`` = √(p(1−p)/n), and per report
group ``<metric>/<group>`` (arithmetic: per module).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora import data as datamod
from fedlora import devices, generation, instructions, peft_io, sandbox
from fedlora.config import validation_fraction
from fedlora.data import DataError
from fedlora.instructions import Instructions, Message
from fedlora.tasks import register
from fedlora.tasks.base import Encoded, Sums, TaskData
from fedlora.training import autocast, to_device, trim

EVAL_BATCH = 16
IGNORE = -100
METRICS = ("exact_match", "pass_at_1")


class CausalLM:
    name: ClassVar[str] = "causal_lm"
    peft_task_type: ClassVar[str] = "causal_lm"
    higher_is_better: ClassVar[bool] = False  # the primary metric is the NLL
    every_round: ClassVar[tuple[str, ...]] = ("loss",)
    baseline_name: ClassVar[str | None] = None

    def metrics(self, cfg: Any, data: TaskData) -> tuple[str, ...]:
        generated = generation_metric(cfg, data)
        return ("loss",) if generated is None else ("loss", generated)

    def load(self, cfg: Any) -> TaskData:
        d = cfg.data
        if (d.text_column, d.label_column) != ("text", "label"):
            raise DataError(
                f"data.text_column = {d.text_column!r}, data.label_column = {d.label_column!r} are for "
                "classification; a causal LM reads data.prompt_column and data.response_column (or a format's own "
                "columns, docs/causal-lm.md)"
            )
        ds = _grouped(_load(cfg, d.dataset, "data.dataset"), d.partition_by, cfg.seed)
        if d.partition != "iid" and len(ds.label_names) < 2:
            raise DataError(
                f"data.partition = {d.partition!r} needs groups to skew: set data.partition_by to a column of "
                f"{d.dataset!r} (its columns: {sorted(ds.columns)}) or to 'cluster:K', or use data.partition = 'iid'"
            )
        held_out = None if d.eval_dataset is None else _load(cfg, d.eval_dataset, "data.eval_dataset")
        test_fraction = d.test_fraction if held_out is None else 0.0
        fed = datamod.federate_as_configured(
            ds, cfg, test_fraction, stratify=d.partition_by is not None, val_fraction=validation_fraction(cfg)
        )
        test = held_out if held_out is not None else fed.test
        info = {"groups": list(ds.label_names), "generation": test.generation, "train_generation": ds.generation}
        return TaskData(test, list(fed.clients), None, info, fed.validation)  # type: ignore[arg-type]

    def load_examples(self, cfg: Any, source: str, info: Mapping[str, Any]) -> Instructions:
        """Every example of ``source`` (a packaged set or an instruction file, read as ``data.dataset`` is)."""
        return _load(cfg, source, "--data")

    def predict(
        self, model: nn.Module, tokenizer: Any, texts: list[str], cfg: Any, info: Mapping[str, Any]
    ) -> list[dict]:
        """Per text (a user turn, after ``data.system_prompt``), the greedy answer as ``text``: the prompt rendered
        as in training, ``eval.max_new_tokens`` and ``eval.stop`` as in evaluation."""
        system = (("system", cfg.data.system_prompt),) if cfg.data.system_prompt is not None else ()
        prompts = [(*system, ("user", t)) for t in texts]
        examples = Instructions(prompts, [""] * len(texts), [{"kind": "none"}] * len(texts))
        return [{"text": a} for a in generated(model, self.encode(examples, tokenizer, cfg), tokenizer, cfg)]

    def base_model(self, cfg: Any, data: TaskData) -> nn.Module:
        model = peft_io.load_base_model(cfg.model.name, "causal_lm")
        check_output_layer(model)
        return model

    def encode(self, examples: Any, tokenizer: Any, cfg: Any) -> Encoded:
        return encode(examples, tokenizer, cfg.data.max_length, cfg.data.chat_template)

    def baseline(self, examples: Any) -> float | None:
        return None

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        nll, tokens = response_nll(model, batch)
        return nll / max(tokens, 1)

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, data: Encoded, tokenizer: Any, cfg: Any, full: bool = True) -> Sums:
        """NLL sums of the responses (every round), and in a full evaluation the generated answers judged."""
        model.eval()
        n = int(data["input_ids"].shape[0])
        nll, tokens = 0.0, 0
        for start in range(0, n, EVAL_BATCH):
            batch = trim({k: data[k][start : start + EVAL_BATCH] for k in ("input_ids", "attention_mask", "labels")})
            batch = to_device(batch, devices.of(model))
            with autocast(cfg.model.precision, devices.of(model)):
                part, count = response_nll(model, batch)
            nll, tokens = nll + float(part), tokens + count
        sums: Sums = {"n": float(n), "nll": nll, "tokens": float(tokens)}
        metric = _metric_of(cfg, data)
        if full and metric is not None and n:
            sums |= judged_sums(model, data, tokenizer, cfg, metric)
        return sums

    def finish(self, sums: Sums) -> dict[str, float]:
        if "n" not in sums:
            return {}
        out = {"loss": sums["nll"] / sums["tokens"] if sums["tokens"] else float("nan")}
        for metric in METRICS:
            if f"{metric}:n" in sums:
                out |= _rates(metric, sums)
        return out


# --------------------------------------------------------------------------------------------- data


def _load(cfg: Any, name: str, key: str) -> Instructions:
    d = cfg.data
    return instructions.load(
        name,
        prompt_column=d.prompt_column,
        response_column=d.response_column,
        system_prompt=d.system_prompt,
        arithmetic_modules=d.arithmetic_modules,
        arithmetic_per_module=d.arithmetic_per_module,
        seed=cfg.seed,
        key=key,
    )


def _grouped(ds: Instructions, partition_by: str | None, seed: int) -> Instructions:
    """The groups ``data.partition_by`` names: a column's values, or ``cluster:K`` clusters of the prompts."""
    if partition_by is None:
        return ds
    if partition_by.startswith("cluster:"):
        from fedlora import clustering

        clusters = clustering.prompt_clusters(ds, int(partition_by.removeprefix("cluster:")), seed)
        return ds.grouped([f"cluster{c}" for c in clusters])
    if partition_by not in ds.columns:
        raise DataError(
            f"data.partition_by = {partition_by!r}: no such column; the columns beside the prompt and response "
            f"are {sorted(ds.columns)}, or use 'cluster:K'"
        )
    return ds.grouped(ds.columns[partition_by])


def generation_metric(cfg: Any, data: TaskData) -> str | None:
    """What full evaluations measure by generation (``eval.generation``; ``auto``: what the global test set's
    format measures), checked against the data: pass@1 needs code tests, exact match needs answers."""
    info = data.info or {}
    choice, test, train = cfg.eval.generation, info.get("generation", "none"), info.get("train_generation", "none")
    chosen = test if choice == "auto" else choice
    if chosen == "none":
        return None
    code = {test == "pass_at_1", train == "pass_at_1"}
    if code != {chosen == "pass_at_1"}:
        raise DataError(
            f"eval.generation = {choice!r}: {chosen} needs the global test set and the clients' data both to be "
            f"{'code with tests' if chosen == 'pass_at_1' else 'answers'}; the global test set measures "
            f"{test} and data.dataset {train} by default"
        )
    return chosen


def _metric_of(cfg: Any, data: Encoded) -> str | None:
    """The generation metric of a split: ``eval.generation`` unless ``auto``, else what its format measures (kept in
    every example's ``meta``); None for none."""
    if not len(data["meta"]):
        return None
    chosen = cfg.eval.generation
    if chosen == "auto":
        chosen = decode_meta(data["meta"][:1])[0]["generation"]
    return None if chosen == "none" else chosen


def render(prompt: Sequence[Message], response: str, tokenizer: Any, chat_template: str) -> tuple[str, str, bool]:
    """(prompt text, response text, whether the prompt takes the tokenizer's special tokens); module docstring."""
    if chat_template == "auto" and getattr(tokenizer, "chat_template", None):
        turns = [{"role": r, "content": c} for r, c in prompt]
        head = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):
            raise DataError(
                "data.chat_template = 'auto': the tokenizer's chat template does not render the assistant's turn "
                f"as a continuation of the generation prompt ({head[-40:]!r} vs {full[len(head) - 40 : len(head)]!r});"
                " set data.chat_template = 'none'"
            )
        return head, full[len(head) :], False
    eos = tokenizer.eos_token or ""
    return "\n\n".join(c for _, c in prompt) + "\n", response + eos, True


def fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Truncate to ``max_length`` tokens keeping the response (module docstring)."""
    keep_prompt = min(len(prompt), max(max_length - len(response), max_length // 2))
    keep_response = min(len(response), max_length - keep_prompt)
    return prompt[len(prompt) - keep_prompt :], response[:keep_response]


def encode(examples: Instructions, tokenizer: Any, max_length: int, chat_template: str) -> dict[str, Tensor]:
    """The tensors of the module docstring."""
    rendered = [
        render(p, r, tokenizer, chat_template) for p, r in zip(examples.prompts, examples.responses, strict=True)
    ]
    special = rendered[0][2] if rendered else False
    prompts = tokenizer([p for p, _, _ in rendered], add_special_tokens=special)["input_ids"] if rendered else []
    responses = tokenizer([r for _, r, _ in rendered], add_special_tokens=False)["input_ids"] if rendered else []
    pairs = [fit(p, r, max_length) for p, r in zip(prompts, responses, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max((len(p) + len(r) for p, r in pairs), default=1)
    prompt_width = max((len(p) for p, _ in pairs), default=1)
    n = len(pairs)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    prompt_ids = torch.full((n, prompt_width), pad, dtype=torch.long)
    prompt_mask = torch.zeros((n, prompt_width), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        length = len(p) + len(r)
        ids[i, :length] = torch.tensor(p + r, dtype=torch.long)
        mask[i, :length] = 1
        labels[i, len(p) : length] = torch.tensor(r, dtype=torch.long)
        if p:
            prompt_ids[i, prompt_width - len(p) :] = torch.tensor(p, dtype=torch.long)
            prompt_mask[i, prompt_width - len(p) :] = 1
    metas = [
        {"ref": dict(ref), "group": group, "generation": examples.generation}
        for ref, group in zip(examples.references, examples.report, strict=True)
    ]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "meta": encode_meta(metas),
    }


def encode_meta(metas: Sequence[Mapping[str, Any]]) -> Tensor:
    """JSON objects as zero-padded UTF-8 rows of a uint8 tensor (N, bytes)."""
    rows = [json.dumps(m, ensure_ascii=False).encode() for m in metas]
    out = torch.zeros((len(rows), max((len(r) for r in rows), default=1)), dtype=torch.uint8)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.frombuffer(bytearray(row), dtype=torch.uint8)
    return out


def decode_meta(meta: Tensor) -> list[dict[str, Any]]:
    return [json.loads(bytes(row[row != 0].tolist()).decode()) for row in meta]


# --------------------------------------------------------------------------------------------- loss


def response_nll(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, int]:
    """The summed NLL of the response tokens and their number: the body on the whole sequence, the output layer
    only at the positions that predict a response token, cross-entropy in float32."""
    body, head = peft_io.decoder_and_head(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    hidden = hidden.last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logits = head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum"), int(keep.sum())


@torch.inference_mode()
def check_output_layer(model: nn.Module) -> None:
    """Refuse a model whose logits are not its output layer applied to the last hidden state (e.g. logit
    soft-capping), for which the response-only loss would be wrong; checked on a short probe sequence."""
    body, head = peft_io.decoder_and_head(model)
    vocab = int(getattr(model.config, "vocab_size", 0) or head.weight.shape[0])
    ids = torch.arange(8).remainder(vocab).unsqueeze(0)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    full = model(input_ids=ids, attention_mask=mask).logits
    ours = head(body(input_ids=ids, attention_mask=mask).last_hidden_state)
    model.train(was_training)
    if not torch.allclose(full.float(), ours.float(), rtol=1e-4, atol=1e-4):
        raise ValueError(
            f"{type(model).__name__}: its logits are not its output layer applied to the last hidden state (logit "
            "soft-capping or scaling?); fedlora's response-only loss does not support this model"
        )


# --------------------------------------------------------------------------------------------- judging


def judged_sums(model: nn.Module, data: Encoded, tokenizer: Any, cfg: Any, metric: str) -> Sums:
    """Greedy generations judged (exact match or pass@1): ``<metric>:correct`` and ``<metric>:n``, overall and per
    report group (``<metric>:correct:<group>``)."""
    texts = generated(model, data, tokenizer, cfg)
    sums: Sums = {}
    for text, meta in zip(texts, decode_meta(data["meta"]), strict=True):
        correct = float(_judge(text, meta["ref"]))
        for suffix in ("", f":{meta['group']}" if meta["group"] else None):
            if suffix is None:
                continue
            sums[f"{metric}:correct{suffix}"] = sums.get(f"{metric}:correct{suffix}", 0.0) + correct
            sums[f"{metric}:n{suffix}"] = sums.get(f"{metric}:n{suffix}", 0.0) + 1.0
    return sums


def generated(model: nn.Module, data: Encoded, tokenizer: Any, cfg: Any) -> list[str]:
    """The greedy answers to the encoded prompts, with ``eval.max_new_tokens``, ``eval.stop`` and the batch size."""
    e = cfg.eval
    return generation.generate(
        model,
        tokenizer,
        data["prompt_ids"],
        data["prompt_mask"],
        max_new_tokens=e.max_new_tokens,
        stop=e.stop,
        batch_size=e.generation_batch_size,
        precision=cfg.model.precision,
    )


def _judge(text: str, ref: Mapping[str, str]) -> bool:
    if ref["kind"] == "code":
        return sandbox.passes(ref["head"], generation.extract_code(text), ref["tests"])
    return generation.is_correct(text, ref)


def _rates(metric: str, sums: Sums) -> dict[str, float]:
    """The rate, its standard error √(p(1−p)/n) and the rate per group."""
    n = sums[f"{metric}:n"]
    p = sums[f"{metric}:correct"] / n if n else float("nan")
    out = {metric: p, f"{metric}_se": math.sqrt(p * (1 - p) / n) if n else float("nan")}
    prefix = f"{metric}:n:"
    for key in sorted(k for k in sums if k.startswith(prefix)):
        group = key.removeprefix(prefix)
        out[f"{metric}/{group}"] = sums[f"{metric}:correct:{group}"] / sums[key]
    return out


register(CausalLM())
