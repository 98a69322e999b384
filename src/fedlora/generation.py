"""Greedy generation in batches, and judging what was generated: answer extraction and exact match.

:func:`generate` decodes left-padded prompts in batches with Hugging Face ``generate`` (greedy, KV cache), stops a
sequence at the end-of-sequence token or at any of the stop strings, and returns the new text of every prompt, cut
at the first stop string. Judging is pure text:

- ``exact``: the first non-empty line of the generated text, stripped of surrounding spaces and a final period,
  equals the reference answer; when both are numbers (``-12``, ``3.5``, ``5/4``, ``1,024``) they compare as exact
  rationals, so ``0.50`` equals ``0.5`` and ``2/4`` equals ``1/2``.
- ``gsm8k``: the number after the last ``####`` of the generated text, else its last number, equals the reference
  number (as rationals).
- ``code``: :func:`extract_code` takes the first fenced code block (or the rest of the text from an opening fence
  that never closed, or the whole text without a fence); ``fedlora.sandbox`` runs it with the tests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationConfig

from fedlora import devices
from fedlora.training import autocast

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 16,
    precision: str = "fp32",
) -> list[str]:
    """Greedy continuations of left-padded prompts ``prompt_ids`` / ``prompt_mask`` (N, P), ``batch_size`` at a
    time; each the decoded new tokens (special tokens dropped), cut at the first of ``stop``."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=_eos_ids(model, tokenizer),
        stop_strings=list(stop) or None,
    )
    model.eval()
    texts: list[str] = []
    device = devices.of(model)
    for start in range(0, int(prompt_ids.shape[0]), batch_size):
        ids, mask = prompt_ids[start : start + batch_size], prompt_mask[start : start + batch_size]
        first = int(mask.any(0).nonzero()[0]) if mask.any() else 0  # drop columns that are padding in every row
        ids, mask = ids[:, first:].to(device), mask[:, first:].to(device)
        with torch.inference_mode(), autocast(precision, device):
            out = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, tokenizer=tokenizer if stop else None
            )
        new = out[:, ids.shape[1] :]
        texts += [cut(t, stop) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The tokenizer's end-of-sequence id and the model's generation-config ones (chat models end turns with
    their own token)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return sorted(i for i in ids if i is not None)


def cut(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    end = min((i for s in stop if (i := text.find(s)) >= 0), default=len(text))
    return text[:end]


def as_number(text: str) -> Fraction | None:
    """``text`` as an exact rational when it is one number (``-12``, ``3.50``, ``5/4``, ``1,024``, ``$18``), else
    None."""
    text = text.strip().removeprefix("$").replace(",", "")
    try:
        return Fraction(text) if _NUMBER.fullmatch(text) else None
    except (ValueError, ZeroDivisionError):
        return None


def same_answer(predicted: str, reference: str) -> bool:
    """Equal as rationals when both are numbers, else as stripped strings."""
    a, b = as_number(predicted), as_number(reference)
    if a is not None and b is not None:
        return a == b
    return predicted.strip() == reference.strip()


def exact_answer(text: str) -> str:
    """The answer in a generated text judged by exact match: its first non-empty line, without a final period."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].removesuffix(".").strip() if lines else ""


def gsm8k_prediction(text: str) -> str:
    """The number a GSM8K-style answer gives: the first number after its last ``####``, else its last number
    ("" when it has none)."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        return found[0].rstrip(".") if found else ""
    found = _NUMBER.findall(text)
    return found[-1].rstrip(".") if found else ""


def is_correct(generated: str, reference: Mapping[str, str]) -> bool:
    """Whether ``generated`` answers an ``exact`` or ``gsm8k`` reference (module docstring)."""
    kind = reference["kind"]
    if kind == "exact":
        return same_answer(exact_answer(generated), reference["answer"])
    if kind == "gsm8k":
        predicted = gsm8k_prediction(generated)
        return bool(predicted) and same_answer(predicted, reference["answer"])
    raise ValueError(f"reference kind {kind!r} is not judged by exact match (expected 'exact' or 'gsm8k')")


def extract_code(text: str) -> str:
    """The code in a generated answer: the first fenced block (to the end of the text when it never closes), else
    the whole text."""
    match = _FENCE.search(text)
    return match.group(1) if match else text
