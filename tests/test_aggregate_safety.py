"""`fedlora aggregate` on adapters it did not write: bare and task models, loads that must land completely, inputs
that must be refused, and outputs that must never overwrite anything.

References come from the tensors the sites and the output saved (read here with safetensors), never from fedlora.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
)

from fedlora import peft_io
from fedlora.cli import app
from test_cli_aggregate import BERT_TARGETS, R, _tokenizer, bert_base, make_site, runner, site_factors

__all__ = ["bert_base"]  # the fixture, shared with test_cli_aggregate

BERT = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=50)
GPT2 = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, pad_token_id=1)
# name: (model class, its config, PEFT task_type, targets, class that loads the merged model)
KINDS = {
    "bert-bare": (BertModel, BERT, None, BERT_TARGETS, AutoModel),
    "gpt2-bare": (GPT2Model, GPT2, None, ["c_attn"], AutoModel),
    "bert-seq-cls": (
        BertForSequenceClassification,
        BERT,
        TaskType.SEQ_CLS,
        BERT_TARGETS,
        AutoModelForSequenceClassification,
    ),
    "gpt2-causal-lm": (GPT2LMHeadModel, GPT2, TaskType.CAUSAL_LM, ["c_attn"], AutoModelForCausalLM),
}


def save_base(kind: str, path: Path) -> Path:
    cls, cfg = KINDS[kind][:2]
    torch.manual_seed(0)
    cls(cfg).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def save_site(kind: str, base: Path, out: Path, seed: int) -> Path:
    """A site's adapter trained elsewhere: PEFT's own save, random factors, init_lora_weights = false."""
    cls, _, task, targets, _ = KINDS[kind]
    return make_site(base, out, seed, targets, model_class=cls, task=task, init_lora_weights=False)


def invoke(*args: str):
    return runner.invoke(app, ["aggregate", *args], terminal_width=400)


def text(res) -> str:
    return " ".join(res.output.split())


def tree_digest(path: Path) -> str:
    """A hash of every file's relative path and bytes below ``path``."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", list(KINDS))
def test_merged_model_equals_base_plus_the_written_adapter(tmp_path, kind):
    base = save_base(kind, tmp_path / "base")
    sites = [save_site(kind, base, tmp_path / f"s{i}", i) for i in range(2)]
    out, merged = tmp_path / "out", tmp_path / "merged"
    res = invoke(*map(str, sites), "--method", "fedit", "--weights", "1,3", "--out", str(out),
                 "--base-model", str(base), "--merged-out", str(merged))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] is True
    loader = KINDS[kind][4]
    W0 = loader.from_pretrained(base).state_dict()
    W = loader.from_pretrained(merged).state_dict()
    for module, (B, A, s) in site_factors(out).items():
        delta = s * B @ A
        key = f"{module}.weight"
        got = (W[key] - W0[key]).double()
        torch.testing.assert_close(got.T if "c_attn" in module else got, delta, atol=1e-5, rtol=1e-5)
        assert float(delta.norm()) > 0.01  # a real update, not B = 0


def test_a_head_model_adapter_without_task_type_merges_into_the_bare_model(tmp_path):
    """Keys saved on BertForSequenceClassification (bert.encoder...) with task_type unset: the bare model loads
    and the base prefix is removed (module_paths)."""
    base = save_base("bert-seq-cls", tmp_path / "base")
    pm = get_peft_model(BertForSequenceClassification.from_pretrained(base), LoraConfig(r=R, target_modules=["query"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
    pm.save_pretrained(tmp_path / "s0")
    merged = tmp_path / "merged"
    res = invoke(str(tmp_path / "s0"), "--method", "fedit", "--out", str(tmp_path / "o"),
                 "--base-model", str(base), "--merged-out", str(merged))  # fmt: skip
    assert res.exit_code == 0, res.output
    W0, W = AutoModel.from_pretrained(base).state_dict(), AutoModel.from_pretrained(merged).state_dict()
    for module, (B, A, s) in site_factors(tmp_path / "o").items():
        key = module.removeprefix("bert.") + ".weight"
        torch.testing.assert_close((W[key] - W0[key]).double(), s * B @ A, atol=1e-5, rtol=1e-5)


def test_a_base_whose_modules_cannot_match_is_refused_naming_them(tmp_path):
    bert = save_base("bert-bare", tmp_path / "bert")
    gpt2 = save_base("gpt2-bare", tmp_path / "gpt2")
    site = save_site("bert-bare", bert, tmp_path / "s0", 0)
    out, merged = tmp_path / "out", tmp_path / "merged"
    res = invoke(
        str(site), "--method", "fedit", "--out", str(out), "--base-model", str(gpt2), "--merged-out", str(merged)
    )
    assert res.exit_code == 2, res.output
    assert "has no module ['encoder.layer.0.attention.self.query'" in text(res)
    assert not out.exists() and not merged.exists()


@pytest.mark.parametrize("targets", [["query"], ["query", "value", "intermediate.dense"]])
def test_an_adapter_that_loads_only_partly_is_refused(tmp_path, targets):
    """A config whose targets differ from the tensors: tensors with no layer (value: unexpected), or layers with
    no tensor (missing). PEFT would only warn; the merge must fail and name the keys."""
    base = save_base("bert-seq-cls", tmp_path / "base")
    site = make_site(base, tmp_path / "s0", 0, ["query", "intermediate.dense"])
    config = json.loads((site / "adapter_config.json").read_text())
    (site / "adapter_config.json").write_text(json.dumps(config | {"target_modules": targets}))
    with pytest.raises(ValueError, match="did not load completely") as err:
        peft_io.merge_to_base(str(base), site, None, tmp_path / "merged")
    assert ("intermediate.dense" if targets == ["query"] else "value") in str(err.value)


def test_write_adapter_refuses_a_partial_load(monkeypatch):
    """In-process loads (client download, evaluation, resume) go through write_adapter: a tensor that PEFT does
    not load is an error, not a warning."""
    from conftest import tiny_peft

    pm = tiny_peft()
    adapter, extras = peft_io.read_adapter(pm)
    real = peft_io.set_peft_model_state_dict

    def drop_one(model, tensors, adapter_name):
        first = sorted(k for k in tensors if "lora_A" in k)[0]
        return real(model, {k: v for k, v in tensors.items() if k != first}, adapter_name=adapter_name)

    monkeypatch.setattr(peft_io, "set_peft_model_state_dict", drop_one)
    with pytest.raises(ValueError, match=r"1 adapter parameter\(s\) got no tensor, first \['base_model.model."):
        peft_io.write_adapter(pm, adapter, extras, rank=4, seed=0)


@pytest.mark.parametrize("target", ["base", "input", "nonempty", "out-is-input", "same"])
def test_outputs_never_overwrite_anything(tmp_path, target):
    base = save_base("bert-seq-cls", tmp_path / "base")
    sites = [make_site(base, tmp_path / f"s{i}", i, BERT_TARGETS) for i in range(2)]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    out, merged = tmp_path / "out", tmp_path / "merged"
    victim = {"base": base, "input": sites[1], "nonempty": other, "out-is-input": sites[0], "same": out}[target]
    if target == "out-is-input":
        out = victim
    else:
        merged = victim
    before = tree_digest(tmp_path)
    res = invoke(*map(str, sites), "--method", "fedit", "--out", str(out),
                 "--base-model", str(base), "--merged-out", str(merged))  # fmt: skip
    assert res.exit_code == 2, res.output
    assert tree_digest(tmp_path) == before  # nothing written, nothing changed, no staging left behind
    assert "nothing was written" in text(res) or "would overwrite" in text(res)


def test_a_failed_merge_leaves_nothing_behind(tmp_path):
    base = save_base("bert-seq-cls", tmp_path / "base")
    sites = [make_site(base, tmp_path / f"s{i}", i, BERT_TARGETS) for i in range(2)]
    other = save_base("gpt2-bare", tmp_path / "gpt2")
    before = tree_digest(tmp_path)
    res = invoke(*map(str, sites), "--method", "flora", "--out", str(tmp_path / "o"),
                 "--base-model", str(other), "--merged-out", str(tmp_path / "m"))  # fmt: skip
    assert res.exit_code == 2 and "--merged-out with --base-model" in text(res), res.output
    assert tree_digest(tmp_path) == before


def corrupt(site: Path, pick: str, value) -> str:
    """Set one entry of the first tensor whose key contains ``pick``; returns that key."""
    file = site / "adapter_model.safetensors"
    tensors = load_file(file)
    key = sorted(k for k in tensors if pick in k)[0]
    if isinstance(value, torch.dtype):
        tensors[key] = (tensors[key] * 10).to(value)
    else:
        tensors[key][0] = value
    save_file(tensors, file)
    return key


@pytest.mark.parametrize(
    ("pick", "value", "expected"),
    [
        ("classifier", float("nan"), "has 1 NaN/Inf values (first nan at index (0,)); expected finite"),  # head bias
        ("lora_B", float("inf"), "has 3 NaN/Inf values (first inf at index (0, 0)); expected finite"),  # a row of B
        ("lora_A", torch.int64, "has dtype torch.int64; expected a floating-point tensor"),
    ],
)
def test_bad_tensors_anywhere_are_refused_naming_site_and_tensor(tmp_path, bert_base, pick, value, expected):
    sites = [make_site(bert_base, tmp_path / f"s{i}", i, BERT_TARGETS) for i in range(2)]
    key = corrupt(sites[1], pick, value)
    res = invoke(*map(str, sites), "--method", "fedit", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2, res.output
    assert f"adapter 1 ({sites[1]})" in text(res) and f"tensor {key!r} {expected}" in text(res)
    assert not (tmp_path / "o").exists()


def test_a_directory_given_twice_is_refused(tmp_path, bert_base, monkeypatch):
    site = make_site(bert_base, tmp_path / "s0", 0, BERT_TARGETS)
    monkeypatch.chdir(tmp_path)
    res = invoke(str(site), "s0/", "--method", "fedit", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert "adapter 1 (s0) is the same directory as adapter 0" in text(res)
    assert not (tmp_path / "o").exists()


def test_adapters_of_different_base_models_need_allow_mixed_base(tmp_path, bert_base):
    sites = [make_site(bert_base, tmp_path / f"s{i}", i, BERT_TARGETS) for i in range(2)]
    config = json.loads((sites[1] / "adapter_config.json").read_text())
    (sites[1] / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "another/model"}))
    res = invoke(*map(str, sites), "--method", "fedit", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "'another/model'" in text(res) and "--allow-mixed-base" in text(res)
    assert not (tmp_path / "o").exists()
    ok = invoke(*map(str, sites), "--method", "fedit", "--out", str(tmp_path / "o"), "--allow-mixed-base")
    assert ok.exit_code == 0, ok.output


def test_bracketed_values_survive_in_error_messages(tmp_path, bert_base):
    sites = [make_site(bert_base, tmp_path / f"s{i}", i, BERT_TARGETS) for i in range(2)]
    res = invoke(*map(str, sites), "--method", "fedit", "--weights", "nan,1", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert "values must be finite, got [nan, 1.0]" in text(res)
    res = invoke(str(tmp_path / "[x]"), "--method", "fedit", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "[x]/adapter_config.json does not exist" in text(res)
