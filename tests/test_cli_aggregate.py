"""`fedlora aggregate` end to end: PEFT adapters written by PEFT in, a PEFT adapter out that
`PeftModel.from_pretrained` loads, and a merged model whose weights equal base + the method's update.

References are dense float64 sums computed here from the tensors each site saved.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from fedlora import methods
from fedlora.cli import app

R, ALPHA = 3, 7.0  # α ≠ r
runner = CliRunner()


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "a": 2}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=50)
    path = tmp_path_factory.mktemp("bert_base")
    BertForSequenceClassification(cfg).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, pad_token_id=1)
    path = tmp_path_factory.mktemp("gpt2_base")
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def make_site(
    base: Path,
    out: Path,
    seed: int,
    targets: list[str],
    rank: int = R,
    rslora: bool = False,
    model_class: Any = AutoModelForSequenceClassification,
    task: TaskType | None = TaskType.SEQ_CLS,
    init_lora_weights: bool = True,
) -> Path:
    """A site's trained adapter: PEFT init, then random (non-zero) A, B and head, saved by PEFT itself. By default
    a SEQ_CLS adapter on a sequence classifier; ``model_class`` and ``task`` choose another."""
    kwargs = {"num_labels": 2} if task == TaskType.SEQ_CLS else {}
    model = model_class.from_pretrained(base, **kwargs)
    cfg = LoraConfig(task_type=task, r=rank, lora_alpha=ALPHA, target_modules=targets, use_rslora=rslora)
    cfg.init_lora_weights = init_lora_weights
    pm = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    pm.save_pretrained(out)
    return out


def site_factors(site: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (B, A, s) straight from the saved safetensors and config (independent of fedlora)."""
    cfg = json.loads((site / "adapter_config.json").read_text())
    tensors = load_file(site / "adapter_model.safetensors")
    out = {}
    for key, A in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key[len("base_model.model.") : -len(".lora_A.weight")]
            B = tensors[key.replace("lora_A", "lora_B")]
            r = A.shape[0]
            s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
            out[module] = (B.double(), A.double(), s)
    return out


def ideal(sites: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    per_site = [site_factors(s) for s in sites]
    return {
        m: sum(w * f[m][2] * f[m][0] @ f[m][1] for w, f in zip(weights, per_site, strict=True)) for m in per_site[0]
    }


def base_weights(base: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    return {k: v.double() for k, v in model.state_dict().items()}


def merged_weights(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return {k: v.double() for k, v in model.state_dict().items()}


BERT_TARGETS = ["query", "intermediate.dense"]  # intermediate.dense is 16 -> 24: non-square


@pytest.mark.parametrize("method", ["flora", "fedex_lora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_exact_methods_merged_model_equals_base_plus_ideal(tmp_path, bert_base, method, rslora):
    ranks = [R, R] if method == "fedex_lora" else [2, 4]
    sites = [make_site(bert_base, tmp_path / f"s{i}", i, BERT_TARGETS, r, rslora) for i, r in enumerate(ranks)]
    out, merged = tmp_path / "out", tmp_path / "merged"
    res = runner.invoke(
        app,
        ["aggregate", *map(str, sites), "--method", method, "--weights", "1,3", "--out", str(out)]
        + ["--base-model", str(bert_base), "--merged-out", str(merged)],
    )
    assert res.exit_code == 0, res.output
    M = ideal(sites, [0.25, 0.75])
    W0, W = base_weights(bert_base), merged_weights(merged)
    for module, delta in M.items():
        key = module.removeprefix("bert.") + ".weight"
        key = "bert." + key
        assert torch.allclose(W[key] - W0[key], delta, atol=1e-5), module
    assert json.loads((out / "aggregation.json").read_text())["divergence"] < 1e-6
    PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert_base, num_labels=2), out)


def test_fedit_adapter_out_is_the_weighted_mean_and_loads_in_peft(tmp_path, bert_base):
    sites = [make_site(bert_base, tmp_path / f"s{i}", 10 + i, BERT_TARGETS) for i in range(3)]
    out, merged = tmp_path / "out", tmp_path / "merged"
    res = runner.invoke(
        app,
        ["aggregate", *map(str, sites), "--method", "fedit", "--weights", "1,1,2", "--out", str(out)]
        + ["--base-model", str(bert_base), "--merged-out", str(merged)],
    )
    assert res.exit_code == 0, res.output
    w = [0.25, 0.25, 0.5]
    f = [site_factors(s) for s in sites]
    W0, W = base_weights(bert_base), merged_weights(merged)
    for module in f[0]:
        s = f[0][module][2]
        B = sum(wi * fi[module][0] for wi, fi in zip(w, f, strict=True))
        A = sum(wi * fi[module][1] for wi, fi in zip(w, f, strict=True))
        key = module + ".weight"
        assert torch.allclose(W[key] - W0[key], s * B @ A, atol=1e-5), module
    # the head is averaged with the same weights
    heads = [load_file(s / "adapter_model.safetensors") for s in sites]
    hk = next(k for k in heads[0] if k.endswith("classifier.modules_to_save.weight") or k.endswith("classifier.weight"))
    expect = sum(wi * h[hk].double() for wi, h in zip(w, heads, strict=True))
    assert torch.allclose(W["classifier.weight"], expect, atol=1e-6)
    assert not (out / "base_edits.safetensors").exists()


@pytest.mark.parametrize("method", ["flora_na", "flexlora", "hetlora"])
def test_inexact_methods_merged_equals_base_plus_written_adapter(tmp_path, bert_base, method):
    sites = [make_site(bert_base, tmp_path / f"s{i}", 20 + i, BERT_TARGETS) for i in range(3)]
    out, merged = tmp_path / "out", tmp_path / "merged"
    res = runner.invoke(
        app,
        ["aggregate", *map(str, sites), "--method", method, "--out", str(out)]
        + ["--base-model", str(bert_base), "--merged-out", str(merged)],
    )
    assert res.exit_code == 0, res.output
    written = site_factors(out)
    W0, W = base_weights(bert_base), merged_weights(merged)
    M = ideal(sites, [1 / 3] * 3)
    report = json.loads((out / "aggregation.json").read_text())
    for module, (B, A, s) in written.items():
        key = module + ".weight"
        assert torch.allclose(W[key] - W0[key], s * B @ A, atol=1e-5)
        dense_div = float((M[module] - s * B @ A).norm() / M[module].norm())
        assert report["modules"][module]["divergence"] == pytest.approx(dense_div, abs=1e-5)


def test_conv1d_layout_base_edit_is_transposed(tmp_path, gpt2_base):
    sites = [make_site(gpt2_base, tmp_path / f"s{i}", 30 + i, ["c_attn"]) for i in range(2)]  # 16 -> 48
    out, merged = tmp_path / "out", tmp_path / "merged"
    res = runner.invoke(
        app,
        ["aggregate", *map(str, sites), "--method", "fedex_lora", "--weights", "2,1", "--out", str(out)]
        + ["--base-model", str(gpt2_base), "--merged-out", str(merged)],
    )
    assert res.exit_code == 0, res.output
    M = ideal(sites, [2 / 3, 1 / 3])
    W0, W = base_weights(gpt2_base), merged_weights(merged)
    for module, delta in M.items():
        key = module + ".weight"
        assert W[key].shape == (16, 48)  # Conv1D stores (in, out)
        assert torch.allclose(W[key] - W0[key], delta.T, atol=1e-5), module


@pytest.mark.parametrize("command", ["run", "compare"])
def test_help_shows_the_config_and_override_arguments(command):
    """Square brackets in a help text are rich markup unless the app renders markdown: they must survive."""
    res = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0
    usage = next(line for line in res.output.splitlines() if "Usage:" in line)
    assert "[CONFIG.toml] [KEY=VALUE]..." in usage
    assert "[key=value ...]" in res.output or "[k=v ...]" in res.output


def test_unknown_method_suggests_and_writes_nothing(tmp_path, bert_base):
    site = make_site(bert_base, tmp_path / "s0", 0, BERT_TARGETS)
    res = runner.invoke(app, ["aggregate", str(site), "--method", "fedavg_lora", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "valid methods are" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["missing", "corrupt", "shape", "weights", "nan"])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path, bert_base, damage):
    sites = [make_site(bert_base, tmp_path / f"s{i}", i, BERT_TARGETS) for i in range(2)]
    args = ["aggregate", *map(str, sites), "--method", "flora_na", "--out", str(tmp_path / "o")]
    weights_file = sites[1] / "adapter_model.safetensors"
    if damage == "missing":
        weights_file.unlink()
        expected = "adapter 1"
    elif damage == "corrupt":
        weights_file.write_bytes(b"not a safetensors file")
        expected = "adapter 1"
    elif damage == "shape":
        other = make_site(bert_base, tmp_path / "other", 5, ["query"])  # a different module set
        args = ["aggregate", str(sites[0]), str(other), "--method", "flora_na", "--out", str(tmp_path / "o")]
        expected = "client 1: module set differs"
    elif damage == "weights":
        args += ["--weights", "1,2,3"]
        expected = "--weights: got 3 values for 2 clients"
    else:
        tensors = load_file(weights_file)
        key = next(k for k in tensors if "lora_A" in k)
        tensors[key][0, 0] = float("nan")
        save_file(tensors, weights_file)
        expected = "NaN"
    res = runner.invoke(app, args, terminal_width=400)
    assert res.exit_code == 2, res.output
    assert expected in " ".join(res.output.split()), res.output
    assert not (tmp_path / "o").exists()


ONE_STEP = ("fedit", "flora_na", "flora", "fedex_lora", "flexlora", "hetlora", "lora_fair")
AS_FEDIT = ("fedloru", "mfedloru", "fedrot_lora")  # their first server step is FedIT's


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory, bert_base) -> list[Path]:
    root = tmp_path_factory.mktemp("sites")
    return [make_site(bert_base, root / f"s{i}", 60 + i, BERT_TARGETS) for i in range(3)]


@pytest.mark.parametrize("method", methods.available())
def test_every_method_aggregates_foreign_adapters_or_refuses_in_one_line(tmp_path, three_sites, method):
    """docs/aggregate.md's lists: the one-step methods write an adapter (those that start as FedIT write FedIT's);
    every other method exits 2 with one line naming the method or the first site, and writes nothing."""
    out = tmp_path / "o"
    res = runner.invoke(
        app,
        ["aggregate", *map(str, three_sites), "--method", method, "--out", str(out), "--weights", "1,2,3"],
        terminal_width=400,
    )
    if method in ONE_STEP + AS_FEDIT:
        assert res.exit_code == 0, res.output
        assert (out / "adapter_model.safetensors").exists()
        if method in AS_FEDIT:
            fedit = tmp_path / "fedit"
            runner.invoke(
                app,
                ["aggregate", *map(str, three_sites), "--method", "fedit", "--out", str(fedit), "--weights", "1,2,3"],
            )
            got, want = load_file(out / "adapter_model.safetensors"), load_file(fedit / "adapter_model.safetensors")
            assert got.keys() == want.keys()
            assert all(torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-7) for k in want)
        return
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert method in res.output or "client 0" in res.output, res.output
    assert not out.exists()


@pytest.mark.timeout(120)
def test_cli_entry_point_in_a_subprocess(tmp_path, bert_base):
    sites = [make_site(bert_base, tmp_path / f"s{i}", 40 + i, BERT_TARGETS) for i in range(2)]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "aggregate", *map(str, sites), "--method", "flora_na", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "adapter_model.safetensors").exists() and "overall" in proc.stdout


def shared_edit(sites: list[Path], seed: int) -> dict[str, torch.Tensor]:
    """A base edit (rank 2, non-square modules) written beside the adapter of every site, as a FedEx-LoRA or FLoRA
    run saves it; returns its dense deltas (float64, computed here)."""
    from fedlora.peft_io import BASE_EDITS_FILE, write_base_edits
    from fedlora.types import BaseEdit, LowRank

    gen = torch.Generator().manual_seed(seed)
    factored = {}
    for module, (B, A, _) in site_factors(sites[0]).items():
        factored[module] = LowRank(torch.randn(B.shape[0], 2, generator=gen), torch.randn(2, A.shape[1], generator=gen))
    for site in sites:
        write_base_edits(site / BASE_EDITS_FILE, [BaseEdit(3, factored)])
    return {m: lr.B.double() @ lr.A.double() for m, lr in factored.items()}


@pytest.mark.parametrize("method", ["fedit", "fedex_lora"])
def test_inputs_sharing_base_edits_are_aggregated_on_top_of_them(tmp_path, bert_base, method):
    sites = [make_site(bert_base, tmp_path / f"s{i}", 40 + i, BERT_TARGETS) for i in range(2)]
    edit = shared_edit(sites, 0)
    out, merged = tmp_path / "out", tmp_path / "merged"
    res = runner.invoke(
        app,
        ["aggregate", *map(str, sites), "--method", method, "--weights", "1,3", "--out", str(out)]
        + ["--base-model", str(bert_base), "--merged-out", str(merged)],
    )
    assert res.exit_code == 0, res.output
    assert (out / "base_edits.safetensors").exists()
    W0, W = base_weights(bert_base), merged_weights(merged)
    f, w = [site_factors(s) for s in sites], [0.25, 0.75]
    for module in f[0]:
        s = f[0][module][2]
        if method == "fedit":  # the mean of the factors
            update = (
                s
                * sum(wi * fi[module][0] for wi, fi in zip(w, f, strict=True))
                @ sum(wi * fi[module][1] for wi, fi in zip(w, f, strict=True))
            )
        else:  # exact: the mean of the products
            update = ideal(sites, w)[module]
        assert torch.allclose(W[module + ".weight"] - W0[module + ".weight"], edit[module] + update, atol=1e-4), module


def test_inputs_on_different_base_weights_are_refused(tmp_path, bert_base):
    sites = [make_site(bert_base, tmp_path / f"s{i}", 50 + i, BERT_TARGETS) for i in range(3)]
    shared_edit(sites[:2], 0)
    res = runner.invoke(app, ["aggregate", *map(str, sites), "--method", "fedit", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "adapter 0" in res.output and "adapter 2" in res.output and "base_edits.safetensors" in res.output
    shared_edit(sites[2:], 1)  # now every site has edits, but the third site's differ
    res = runner.invoke(app, ["aggregate", *map(str, sites), "--method", "fedit", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "adapter 2" in res.output and "differs from adapter 0's" in res.output
    assert not (tmp_path / "o").exists()


def test_a_run_directory_given_as_an_adapter_names_its_adapter(tmp_path, bert_base):
    site = make_site(bert_base, tmp_path / "run" / "adapter", 60, BERT_TARGETS)
    res = runner.invoke(
        app, ["aggregate", str(site.parent), str(site), "--method", "fedit", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2
    assert "is a run directory, not an adapter directory" in res.output and str(site) in res.output.replace("\n", "")
