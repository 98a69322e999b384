"""``fedlora predict`` and ``fedlora eval`` on a causal-LM run (a tiny random Llama built in the test): generation
with what the run saved equals PEFT's own load of the adapter, and eval repeats the run's NLL; ``output.keep =
"best"`` picks the round by the validation NLL (lower is better)."""

from __future__ import annotations

import pytest
import torch

import fedlora
from conftest import causal_config, read_records, sums_jsonl
from fedlora import engines, generation
from fedlora.instructions import Instructions
from fedlora.tasks import causal_lm

pytestmark = pytest.mark.integration
PROMPTS = ["3+4=", "9-2=", "a longer question than the others"]


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("causal")
    data = sums_jsonl(tmp / "sums.jsonl")
    cfg = causal_config(tiny_llama_dir, data, tmp / "run", "federation.rounds=2", "output.keep=best")
    run_dir, summary = engines.run(cfg, tmp / "run")
    return run_dir, summary


def test_predict_generates_what_peft_loading_the_adapter_generates(causal_run, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = causal_run
    outputs = fedlora.predict(run_dir / "adapter", PROMPTS)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), run_dir / "adapter")
    prompts = [(("user", p),) for p in PROMPTS]
    encoded = causal_lm.encode(Instructions(prompts, [""] * 3, [{}] * 3), tokenizer, 48, "auto")
    with torch.no_grad():
        ids, mask = encoded["prompt_ids"], encoded["prompt_mask"]
        expected = generation.generate(model, tokenizer, ids, mask, max_new_tokens=4)
    assert [o["text"] for o in outputs] == expected


def test_eval_repeats_the_saved_rounds_nll_and_keep_best_follows_the_validation_nll(causal_run):
    run_dir, summary = causal_run
    records = read_records(run_dir)
    best = min(records, key=lambda r: r["val_loss"])
    assert summary["saved_round"] == summary["best_val_round"] == best["round"]
    result = fedlora.evaluate(run_dir)
    assert result.round == best["round"] and result.baseline is None
    assert result.metrics["loss"] == pytest.approx(best["global_loss"], rel=1e-5)
