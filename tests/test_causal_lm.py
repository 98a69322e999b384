"""The causal-LM task on a tiny random Llama built in the test (byte-level ChatML tokenizer): what is trained
(response tokens only, the chat template, truncation that keeps the response), how answers are judged (extraction,
exact match, pass@1 in the sandbox), batched generation, data formats and partitions, and short federated runs
whose NLL falls."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from conftest import causal_config, read_records, sums_jsonl, tiny_config, tiny_llama, tiny_tokenizer
from fedlora import config, engines, generation, instructions, methods, peft_io, sandbox, tasks
from fedlora.data import DataError
from fedlora.experiment import build
from fedlora.instructions import Instructions
from fedlora.tasks import causal_lm

TASK = causal_lm.CausalLM()


def examples(prompts: list[str], responses: list[str], system: str | None = None) -> Instructions:
    turns = [((("system", system),) if system else ()) + (("user", p),) for p in prompts]
    return Instructions(turns, responses, [{"kind": "exact", "answer": r} for r in responses])


# ---- what is trained ---------------------------------------------------------------------------------------------


def test_response_only_loss_masks_exactly_the_prompt_tokens():
    tok = tiny_tokenizer()
    data = causal_lm.encode(examples(["What is 2+3?", "12-5="], ["5", "7"]), tok, 64, "auto")
    for i, (prompt, response) in enumerate([("What is 2+3?", "5"), ("12-5=", "7")]):
        ids, labels, mask = data["input_ids"][i], data["labels"][i], data["attention_mask"][i]
        head = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        n_prompt, n = len(tok(head, add_special_tokens=False)["input_ids"]), int(mask.sum())
        assert tok.decode(ids[:n_prompt]) == head
        assert tok.decode(ids[n_prompt:n]) == f"{response}<|im_end|>\n"
        assert (labels[:n_prompt] == -100).all() and (labels[n:] == -100).all()  # prompt and padding
        assert torch.equal(labels[n_prompt:n], ids[n_prompt:n])  # every response token, the end of turn included
        assert (ids[n:] == tok.eos_token_id).all()  # padded with eos
    model = tiny_llama(len(tok))
    batch = {k: data[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        ours = TASK.loss(model, batch)
        reference = model(**batch).loss  # Hugging Face: full logits, shifted labels, mean over the unmasked targets
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_the_loss_changes_when_a_response_token_changes_but_not_a_prompt_token():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    data = causal_lm.encode(examples(["What is 2+3?"], ["5"]), tok, 64, "auto")
    batch = {k: data[k].clone() for k in ("input_ids", "attention_mask", "labels")}
    first_response = int((batch["labels"][0] != -100).nonzero()[0])
    with torch.no_grad():
        base = TASK.loss(model, batch)
        changed = {k: v.clone() for k, v in batch.items()}
        changed["labels"][0, first_response] = changed["input_ids"][0, first_response] = tok.convert_tokens_to_ids("6")
        assert not torch.isclose(TASK.loss(model, changed), base)
        unlabelled = {k: v.clone() for k, v in batch.items()}
        unlabelled["labels"][0, 0] = -100  # already a prompt position: nothing changes
        assert torch.equal(TASK.loss(model, unlabelled), base)


def test_chat_template_is_applied_with_the_system_prompt_and_none_uses_plain_text():
    tok = tiny_tokenizer()
    chat = causal_lm.encode(examples(["2+2="], ["4"], system="Answer only."), tok, 64, "auto")
    n = int(chat["attention_mask"][0].sum())
    expected = "<|im_start|>system\nAnswer only.<|im_end|>\n<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(chat["input_ids"][0, :n]) == expected + "4<|im_end|>\n"
    plain = causal_lm.encode(examples(["2+2="], ["4"], system="Answer only."), tok, 64, "none")
    n = int(plain["attention_mask"][0].sum())
    assert tok.decode(plain["input_ids"][0, :n]) == "Answer only.\n\n2+2=\n4<|im_end|>"
    no_template = tiny_tokenizer(chat_template=None)
    auto = causal_lm.encode(examples(["2+2="], ["4"]), no_template, 64, "auto")
    assert tok.decode(auto["input_ids"][0, : int(auto["attention_mask"][0].sum())]) == "2+2=\n4<|im_end|>"
    # the generation prompt is the training prompt, left-padded
    p = chat["prompt_mask"][0].bool()
    assert tok.decode(chat["prompt_ids"][0][p]) == expected


@pytest.mark.parametrize(
    ("prompt", "response", "budget", "kept"),
    [(100, 20, 64, (44, 20)), (10, 100, 64, (10, 54)), (100, 100, 64, (32, 32)), (5, 5, 64, (5, 5))],
)
def test_truncation_keeps_the_response_and_cuts_the_prompt_from_the_left(prompt, response, budget, kept):
    p, r = list(range(prompt)), list(range(1000, 1000 + response))
    fp, fr = causal_lm.fit(p, r, budget)
    assert (len(fp), len(fr)) == kept and len(fp) + len(fr) <= budget
    assert fp == p[len(p) - len(fp) :] and fr == r[: len(fr)]  # the prompt's end, the response's start


def test_encoded_truncation_keeps_every_response_label():
    tok = tiny_tokenizer()
    data = causal_lm.encode(examples(["x" * 80], ["12345"]), tok, 32, "auto")
    assert int(data["attention_mask"][0].sum()) == 32
    labels = data["labels"][0]
    assert tok.decode(labels[labels != -100]) == "12345<|im_end|>\n"


# ---- judging -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer", "correct"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", "18", True),
        ("#### 1,024 dollars", "1024", True),
        ("so 3 + 4 = 7, then 7 * 2 = 14", "14", True),  # no ####: the last number
        ("so 3 + 4 = 7, then 7 * 2 = 14 apples.", "7", False),
        ("#### 18\nand then 20", "18", True),
        ("The answer is 0.50", "0.5", True),
        ("no number here", "3", False),
    ],
)
def test_gsm8k_answers_are_the_number_after_the_marks_else_the_last(text, answer, correct):
    assert generation.is_correct(text, {"kind": "gsm8k", "answer": answer}) is correct


@pytest.mark.parametrize(
    ("text", "answer", "correct"),
    [
        ("-1044", "-1044", True),
        ("  -1044.\n", "-1044", True),
        ("2/4", "1/2", True),  # rationals compare as numbers
        ("3.50", "3.5", True),
        ("-1044\nbecause 359 - 1403", "-1044", True),  # the first line
        ("The answer is -1044", "-1044", False),  # exact: no search inside the text
        ("1044", "-1044", False),
        ("x = 5", "x = 5", True),  # not numbers: strings
        ("", "0", False),
    ],
)
def test_arithmetic_answers_match_exactly(text, answer, correct):
    assert generation.is_correct(text, {"kind": "exact", "answer": answer}) is correct


def test_gsm8k_reference_answers_and_calculator_marks(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [
        {"question": "Janet has 16 eggs and eats 3. How many are left?", "answer": "16 - 3 = <<16-3=13>>13\n#### 13"},
        {"question": "Two boxes of 1,000?", "answer": "2 * 1000 = <<2*1000=2000>>2000\n#### 2,000"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = instructions.load(str(path))
    assert ds.responses == ["16 - 3 = 13\n#### 13", "2 * 1000 = 2000\n#### 2,000"]
    assert [r["answer"] for r in ds.references] == ["13", "2000"] and ds.generation == "exact_match"
    assert all(generation.is_correct(resp, ref) for resp, ref in zip(ds.responses, ds.references, strict=True))


@pytest.mark.timeout(60)
def test_pass_at_1_runs_each_solution_in_a_sandbox_and_only_the_correct_one_passes():
    head = 'def add(a, b):\n    """Return a + b."""\n'
    tests = "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n\ncheck(add)\n"
    solutions = {
        "correct": "```python\ndef add(a, b):\n    return a + b\n```",
        "wrong": "```python\ndef add(a, b):\n    return a - b\n```",
        "loops": "```python\ndef add(a, b):\n    while True:\n        pass\n```",
        "memory": "```python\ndef add(a, b):\n    return len(bytearray(8 * 1024**3))\n```",
        "exits early": "```python\nimport sys\ndef add(a, b):\n    sys.exit(0)\n```",
    }
    started = time.monotonic()
    outcomes = {
        name: sandbox.run(f"{head}\n{generation.extract_code(text)}\n\n{tests}", timeout=2.0)
        for name, text in solutions.items()
    }
    assert time.monotonic() - started < 2.0 + 4 * 1.5  # one timeout, the rest at once: nothing hangs
    assert {name for name, o in outcomes.items() if o.passed} == {"correct"}
    assert outcomes["wrong"].reason == "exit 1: AssertionError"
    assert outcomes["loops"].reason == "timeout"
    assert "MemoryError" in outcomes["memory"].reason
    assert outcomes["exits early"].reason == "exited before its end"


def test_code_is_extracted_from_fenced_blocks_or_taken_whole():
    assert generation.extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert generation.extract_code("```\nx = 1\n") == "x = 1\n"  # an unclosed fence: to the end
    assert generation.extract_code("    return 1\n") == "    return 1\n"


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    ds = instructions.load(instructions.HUMANEVAL)
    assert len(ds) == 164 and ds.generation == "pass_at_1"
    for i in (0, 1, 2):
        ref = ds.references[i]
        assert sandbox.passes(ref["head"], generation.extract_code(ds.responses[i]), ref["tests"])
        assert not sandbox.passes(ref["head"], "", ref["tests"])  # the stub alone returns None


def test_judged_sums_and_rates_per_group(monkeypatch):
    tok = tiny_tokenizer()
    ds = Instructions(
        [(("user", q),) for q in ("1+1", "2+2", "3+3", "4+4", "5+5")],
        ["2", "4", "6", "8", "10"],
        [{"kind": "exact", "answer": a} for a in ("2", "4", "6", "8", "10")],
        report=["add", "add", "add", "mul", "mul"],
        generation="exact_match",
    )
    data = causal_lm.encode(ds, tok, 32, "auto")
    monkeypatch.setattr(generation, "generate", lambda *a, **k: ["2", "5", "6", "8", "1"])
    cfg = config.load_config(None, ["model.task=causal_lm", "model.precision=fp32"])
    sums = causal_lm.judged_sums(tiny_llama(len(tok)), data, tok, cfg, "exact_match")
    assert sums == {
        "exact_match:correct": 3.0,
        "exact_match:n": 5.0,
        "exact_match:correct:add": 2.0,
        "exact_match:n:add": 3.0,
        "exact_match:correct:mul": 1.0,
        "exact_match:n:mul": 2.0,
    }
    out = TASK.finish(sums | {"n": 5.0, "nll": 3.0, "tokens": 12.0})
    assert out["loss"] == 0.25 and out["exact_match"] == 0.6
    assert out["exact_match_se"] == pytest.approx(math.sqrt(0.6 * 0.4 / 5))
    assert out["exact_match/add"] == pytest.approx(2 / 3) and out["exact_match/mul"] == 0.5


def test_batched_greedy_generation_equals_one_prompt_at_a_time():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=3, initializer_range=0.2, tied=False)
    prompts = ["1", "22+7=", "a much longer prompt than the others", "9"]
    data = causal_lm.encode(examples(prompts, [""] * 4), tok, 64, "auto")
    ids, mask = data["prompt_ids"], data["prompt_mask"]
    batched = generation.generate(model, tok, ids, mask, max_new_tokens=6, batch_size=4)
    alone = [generation.generate(model, tok, ids[i : i + 1], mask[i : i + 1], max_new_tokens=6)[0] for i in range(4)]
    assert batched == alone and any(batched)
    text = max(batched, key=lambda t: len(set(t)))
    k = next(k for k in range(1, len(text)) if text[k] not in text[:k])  # a character that first occurs at k
    stopped = generation.generate(model, tok, ids, mask, max_new_tokens=6, stop=[text[k]], batch_size=4)
    assert stopped[batched.index(text)] == text[:k]


# ---- data: formats, partitions --------------------------------------------------------------------------------


def test_chat_mbpp_and_unknown_formats(tmp_path):
    chat = tmp_path / "chat.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat.write_text(json.dumps({"messages": [*turns, {"role": "assistant", "content": "Hello"}]}) + "\n")
    ds = instructions.load(str(chat))
    assert ds.prompts == [(("system", "Be brief."), ("user", "Hi"))] and ds.responses == ["Hello"]
    assert ds.generation == "none"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(DataError, match="must end with an assistant turn"):
        instructions.load(str(bad))
    mbpp = tmp_path / "mbpp.jsonl"
    row = {"text": "Add two numbers.", "code": "def add(a, b):\n  return a + b", "test_list": ["assert add(1, 2) == 3"]}
    mbpp.write_text(json.dumps(row | {"test_imports": ["import math"]}) + "\n")
    ds = instructions.load(str(mbpp))
    assert ds.prompts[0][0][1] == f"Add two numbers.\n{instructions.MBPP_INSTRUCTION}\nassert add(1, 2) == 3"
    assert ds.responses == ["```python\ndef add(a, b):\n  return a + b\n```"]
    assert ds.references[0]["tests"] == "import math\n\nassert add(1, 2) == 3\n"
    other = tmp_path / "other.csv"
    pd.DataFrame({"q": ["a"], "a": ["b"]}).to_csv(other, index=False)
    with pytest.raises(DataError, match="no known instruction format"):
        instructions.load(str(other))
    ds = instructions.load(str(other), prompt_column="q", response_column="a")
    assert ds.prompts == [(("user", "a"),)] and ds.responses == ["b"]


def test_partition_by_a_column_and_a_stratified_global_test_set(tmp_path, tiny_llama_dir):
    data = sums_jsonl(tmp_path / "sums.jsonl", n=200)
    cfg = causal_config(tiny_llama_dir, data, tmp_path / "run", "data.alpha=0.1", "data.test_fraction=0.1")
    task_data = TASK.load(cfg)
    ops = pd.read_json(data, lines=True)["op"]
    test_groups = pd.Series(task_data.test.report).value_counts().to_dict()
    assert test_groups == {op: round(count * 0.1) for op, count in ops.value_counts().items()}
    skew = [train.label_counts() for train, _ in task_data.clients]
    assert all(len(c) == 2 for c in skew) and sum(map(sum, skew)) + len(task_data.test) < 200
    with pytest.raises(DataError, match="no such column"):
        TASK.load(config.with_overrides(cfg, ["data.partition_by=topic"]))
    ungrouped = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, partition_by=None))
    with pytest.raises(DataError, match="needs groups to skew"):
        TASK.load(ungrouped)


@pytest.mark.integration
def test_cluster_partition_groups_prompts_by_meaning(tmp_path, monkeypatch):
    from fedlora import clustering

    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path / "cache"))
    cooking = [f"Give me a recipe for {dish} with garlic and olive oil." for dish in ("pasta", "soup", "bread", "rice")]
    money = [f"Should I invest my savings in {asset} this year?" for asset in ("stocks", "bonds", "gold", "funds")]
    ds = examples(cooking + money, [""] * 8)
    labels = clustering.prompt_clusters(ds, 2, seed=0)
    assert len(set(labels[:4])) == 1 and len(set(labels[4:])) == 1 and labels[0] != labels[4]
    assert clustering.prompt_clusters(ds, 2, seed=0) == labels  # cached, and deterministic
    assert len(list((tmp_path / "cache" / "clusters").glob("*.json"))) == 1


def test_arithmetic_is_deterministic_per_seed_and_module(tmp_path, monkeypatch):
    from fedlora import arithmetic

    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    a = arithmetic.generate(["add_or_sub", "mul"], 5, seed=1)
    assert [m for m, _, _ in a] == ["add_or_sub"] * 5 + ["mul"] * 5
    assert arithmetic.generate(["mul"], 5, seed=1) == a[5:]  # a module's items do not depend on the others
    assert arithmetic.generate(["add_or_sub", "mul"], 5, seed=2) != a
    assert arithmetic.cached(["add_or_sub", "mul"], 5, seed=1) == a == arithmetic.cached(["add_or_sub", "mul"], 5, 1)
    for _, question, answer in a:
        if question.startswith("What is ") and " times " in question:
            x, y = question.removeprefix("What is ").removesuffix("?").split(" times ")
            assert generation.same_answer(answer, str(generation.as_number(x) * generation.as_number(y)))
    with pytest.raises(ValueError, match="unknown mathematics-dataset modules"):
        arithmetic.generate(["add_or_subtract"], 1, seed=0)
    ds = instructions.load(instructions.ARITHMETIC, arithmetic_modules=["div"], arithmetic_per_module=3, seed=1)
    assert ds.columns["module"] == ["div"] * 3 and ds.generation == "exact_match"


# ---- models and runs -------------------------------------------------------------------------------------------


def test_a_causal_lm_checkpoint_must_load_completely(tmp_path):
    from safetensors.torch import load_file, save_file

    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "ok")  # tied embeddings: lm_head.weight is not saved
    model = peft_io.load_base_model(str(tmp_path / "ok"), "causal_lm")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    causal_lm.check_output_layer(model)
    tiny_llama(len(tok)).save_pretrained(tmp_path / "broken")
    weights = load_file(tmp_path / "broken" / "model.safetensors")
    del weights["model.layers.1.self_attn.q_proj.weight"]
    save_file(weights, tmp_path / "broken" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"uninitialised: missing \['model.layers.1.self_attn.q_proj.weight'\]"):
        peft_io.load_base_model(str(tmp_path / "broken"), "causal_lm")


@pytest.mark.parametrize("method", ["fedit", "flora_na"])
def test_a_short_federated_run_in_process_lowers_the_nll(tmp_path, tiny_llama_dir, method):
    from peft import PeftConfig

    data = sums_jsonl(tmp_path / "sums.jsonl")
    extra = [f"federation.method={method}", "eval.generation=exact_match", "eval.every=2"]
    run_dir, summary = engines.run(causal_config(tiny_llama_dir, data, tmp_path / "run", *extra), tmp_path / "run")
    records = read_records(run_dir)
    assert [r["evaluated"] for r in records] == [False, True, True]
    assert records[-1]["global_loss"] < records[0]["global_loss"] - 0.3
    assert records[-1]["local_loss"] < records[0]["local_loss"] - 0.3
    assert records[0]["global_exact_match"] is None and records[0]["local_global_gap"] is not None  # NLL every round
    last = records[-1]
    assert {"global_exact_match", "global_exact_match_se", "global_exact_match/add", "global_exact_match/sub"} <= set(
        last
    )
    assert last["local_exact_match"] is not None and len(last["clients_local_loss"]) == 2
    assert last["local_global_gap"] == pytest.approx(last["global_loss_on_local"] - last["local_loss"])
    assert summary["best_global_loss"] == min(r["global_loss"] for r in records)
    assert summary["final_global_exact_match"] == last["global_exact_match"]
    assert PeftConfig.from_pretrained(run_dir / "adapter").task_type == "CAUSAL_LM"


def _lora_gradients_and_layer_calls(tmp_path: Path, model_dir: Path, *extra: str) -> tuple[dict[str, Any], int]:
    """One training step's LoRA gradients on a client's first 8 examples, and how often the first decoder layer's
    MLP ran (a recomputation in the backward pass calls its forward again; module hooks do not see recomputations)."""
    tmp_path.mkdir()
    data = sums_jsonl(tmp_path / "sums.jsonl")
    exp = build(causal_config(model_dir, data, tmp_path / "run", "model.lora.dropout=0.1", *extra))
    batch = {k: v[:8] for k, v in exp.clients[0].train.items()}
    mlp = peft_io.decoder_and_head(exp.model)[0].layers[0].mlp
    calls, forward = [], mlp.forward

    def counted(*args: Any) -> Any:
        calls.append(1)
        return forward(*args)

    mlp.forward = counted
    torch.manual_seed(0)
    for name, param in exp.model.named_parameters():
        if "lora_B" in name:  # B = 0 at initialisation would leave A without a gradient
            param.data.normal_(0, 0.1)
    exp.model.train()
    TASK.loss(exp.model, batch).backward()
    grads = {n: p.grad.clone() for n, p in exp.model.named_parameters() if p.requires_grad and "lora_" in n}
    return grads, len(calls)


def test_gradient_checkpointing_recomputes_the_layers_and_keeps_the_gradients(tmp_path, tiny_llama_dir):
    plain, plain_calls = _lora_gradients_and_layer_calls(tmp_path / "plain", tiny_llama_dir)
    saved, saved_calls = _lora_gradients_and_layer_calls(
        tmp_path / "ckpt", tiny_llama_dir, "train.gradient_checkpointing=true"
    )
    assert (plain_calls, saved_calls) == (1, 2)  # the layer runs again in the backward pass
    assert plain.keys() == saved.keys() and len(plain) == 8  # A and B of q_proj, v_proj in 2 layers
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(saved[name], grad, rtol=1e-5, atol=1e-7)  # dropout draws the same masks


def test_gradient_checkpointing_is_refused_for_a_model_without_it(tmp_path, tiny_llama_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    data = sums_jsonl(tmp_path / "sums.jsonl")
    cfg = causal_config(tiny_llama_dir, data, tmp_path / "run", "train.gradient_checkpointing=true")
    with pytest.raises(ValueError, match="LlamaForCausalLM does not support activation checkpointing"):
        build(cfg)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_processes_give_the_same_causal_lm_results(tmp_path, tiny_llama_dir):
    data = sums_jsonl(tmp_path / "sums.jsonl")
    extra = ["federation.method=fedit", "eval.generation=exact_match", "federation.rounds=2"]
    seq, _ = engines.run(causal_config(tiny_llama_dir, data, tmp_path / "seq", *extra), tmp_path / "seq")
    par_cfg = causal_config(tiny_llama_dir, data, tmp_path / "par", *extra, "federation.workers=2")
    par, _ = engines.run(par_cfg, tmp_path / "par")
    for a, b in zip(read_records(seq), read_records(par), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if k.startswith("seconds"):
                continue
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
            elif k != "divergence_per_module":
                assert a[k] == b[k], k


def test_generation_metric_follows_the_data_and_refuses_mismatches(tmp_path, tiny_llama_dir):
    data = sums_jsonl(tmp_path / "sums.jsonl")
    cfg = causal_config(tiny_llama_dir, data, tmp_path / "run")
    assert build(cfg).metrics == ("loss",)  # prompt/response data: the loss only, unless asked
    assert build(config.with_overrides(cfg, ["eval.generation=exact_match"])).metrics == ("loss", "exact_match")
    with pytest.raises(DataError, match="pass_at_1 needs the global test set and the clients' data both"):
        build(config.with_overrides(cfg, ["eval.generation=pass_at_1"]))
    humaneval_test = config.with_overrides(cfg, ["data.eval_dataset=fedlora:humaneval"])
    with pytest.raises(DataError, match="the global test set measures pass_at_1"):
        build(humaneval_test)


def test_compare_writes_an_nll_table_and_plots_for_causal_runs(tmp_path, tiny_llama_dir):
    from typer.testing import CliRunner

    from fedlora.cli import app

    data = sums_jsonl(tmp_path / "sums.jsonl")
    cfg = causal_config(tiny_llama_dir, data, tmp_path / "cmp", "eval.generation=exact_match", "federation.rounds=2")
    path = tmp_path / "cfg.toml"
    path.write_text(config.dump_toml(cfg))
    args = ["compare", str(path), "--methods", "fedit,flexlora", "--out", str(tmp_path / "cmp")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "final global NLL" in table and "final global exact match (± se)" in table
    summaries = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    for name in ("fedit", "flexlora"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"{summaries[name]['final_global_loss']:.4f}" in row
    assert "global" in result.output and "NLL" in result.output  # the console's summary table
    assert (tmp_path / "cmp" / "loss.png").exists()


def test_aggregate_merges_causal_lm_adapters_into_a_causal_lm(tmp_path, tiny_llama_dir):
    """Two sites' CAUSAL_LM adapters (α ≠ r; v_proj is 32 → 16 under grouped-query attention) aggregated exactly by
    FedEx-LoRA with weights 1:3 and merged: the saved AutoModelForCausalLM holds W0 + Σ w_u s B_u A_u, computed
    here in float64 from the tensors PEFT saved."""
    from peft import LoraConfig, TaskType, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from fedlora.cli import app

    rank, alpha = 3, 7.0
    sites = []
    for seed in (0, 1):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
        site = get_peft_model(model, lora)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in site.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        site.save_pretrained(tmp_path / f"site{seed}")
        sites.append(tmp_path / f"site{seed}")
    out, merged = tmp_path / "out", tmp_path / "merged"
    args = ["aggregate", *map(str, sites), "--method", "fedex_lora", "--weights", "1,3", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--base-model", str(tiny_llama_dir), "--merged-out", str(merged)])
    assert result.exit_code == 0, result.output
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    saved = [load_file(s / "adapter_model.safetensors") for s in sites]
    for key in [k for k in saved[0] if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        ideal = sum(
            w * (alpha / rank) * t[key.replace("lora_A", "lora_B")].double() @ t[key].double()
            for w, t in zip((0.25, 0.75), saved, strict=True)
        )
        delta = after[f"{module}.weight"].double() - base[f"{module}.weight"].double()
        torch.testing.assert_close(delta, ideal, rtol=0, atol=1e-5)
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(after[untouched], base[untouched])


@pytest.mark.parametrize(
    ("method", "variant"),
    [(m, "lora") for m in methods.available()] + [("fedit", "dora"), ("flora_na", "hira")],
)
def test_every_method_and_variant_trains_a_causal_lm(tmp_path, tiny_llama_dir, method, variant):
    data = sums_jsonl(tmp_path / "sums.jsonl", n=120)
    extra = [f"federation.method={method}", f"model.lora.variant={variant}", "federation.rounds=2"]
    run_dir, summary = engines.run(causal_config(tiny_llama_dir, data, tmp_path / "run", *extra), tmp_path / "run")
    records = read_records(run_dir)
    assert [r["round"] for r in records] == [1, 2] and not records[-1]["failed_clients"]
    assert all(math.isfinite(r["global_loss"]) and math.isfinite(r["local_loss"]) for r in records)
    assert summary["total_bytes_up"] > 0 and (run_dir / "adapter" / "adapter_config.json").exists()


def test_keys_of_the_other_task_are_refused_not_ignored(tmp_path, tiny_llama_dir, rt_csv):
    data = sums_jsonl(tmp_path / "sums.jsonl")
    with pytest.raises(DataError, match="data.text_column = 'question'.*are for classification"):
        TASK.load(causal_config(tiny_llama_dir, data, tmp_path / "c", "data.text_column=question"))
    seq_cls = tasks.get("seq_cls")
    with pytest.raises(DataError, match="data.eval_dataset = 'fedlora:humaneval' is for model.task = 'causal_lm'"):
        seq_cls.load(tiny_config(rt_csv, tmp_path / "s", "data.eval_dataset=fedlora:humaneval"))
    with pytest.raises(DataError, match="sequence classification partitions by the label"):
        seq_cls.load(tiny_config(rt_csv, tmp_path / "s", "data.partition_by=cluster:3"))


def _family(name: str, vocab: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if name == "llama":
        return tiny_llama(vocab, initializer_range=0.2, tied=False)
    if name == "qwen2":
        cfg = Qwen2Config(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.2,
        )  # fmt: skip
        return Qwen2ForCausalLM(cfg).eval()
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab, initializer_range=0.2)).eval()


@pytest.mark.parametrize(
    ("family", "targets"), [("llama", ["q_proj", "v_proj"]), ("qwen2", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])]
)
def test_each_family_gets_its_default_targets_and_the_response_only_loss(family, targets):
    """Llama, Qwen2 and GPT-2 (Conv1D) wrapped by PEFT with random B: the response-only loss (the body, then the
    output layer at response positions) equals Hugging Face's full-logit loss, and its gradient too."""
    tok = tiny_tokenizer()
    base = _family(family, len(tok))
    assert peft_io.default_target_modules(base) == targets
    causal_lm.check_output_layer(base)
    model = peft_io.make_peft_model(
        base, r=4, alpha=8.0, dropout=0.0, rslora=False, target_modules=targets, task="causal_lm"
    )
    with torch.no_grad():
        for _, B in peft_io.lora_parameters(model).values():
            B.copy_(torch.randn(B.shape) * 0.1)
    data = causal_lm.encode(examples(["What is 2+3?", "7*8="], ["5", "56"]), tok, 64, "auto")
    batch = {k: data[k] for k in ("input_ids", "attention_mask", "labels")}
    ours = TASK.loss(model, batch)
    (grad_ours,) = torch.autograd.grad(ours, [next(iter(peft_io.lora_parameters(model).values()))[1]])
    reference = model(**batch).loss
    (grad_ref,) = torch.autograd.grad(reference, [next(iter(peft_io.lora_parameters(model).values()))[1]])
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)


def _build_slowly(target: str, log: str) -> str:
    from fedlora.cache import build_once

    def build(tmp: Path) -> None:
        with open(log, "a") as fh:
            fh.write("built\n")
        time.sleep(1.0)
        tmp.write_text("complete")

    return build_once(Path(target), build).read_text()


def test_the_cache_builds_an_entry_once_while_parallel_processes_wait(tmp_path):
    import multiprocessing as mp

    target, log = tmp_path / "entry", tmp_path / "log"
    with mp.get_context("fork").Pool(3) as pool:
        results = pool.starmap(_build_slowly, [(str(target), str(log))] * 3)
    assert results == ["complete"] * 3 and log.read_text() == "built\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.lock", "log"]  # no temporary left
