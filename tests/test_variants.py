"""Adapter variants: FLoRA-NA and FedIT on DoRA and on HiRA (model.lora.variant), end to end through the PEFT edge.

Inputs are gauge-scaled copies of one update (client u holds B·c_u, A/c_u), where both aggregations have closed
forms: FLoRA-NA is exact (B̂Â = BA) and FedIT gives κ·BA with κ = (Σ w_u c_u)(Σ w_u / c_u). Every expected model
output is a dense float64 reference built in the test from the base weights: W0 + W0 ⊙ (B̂Â) for HiRA, and
m̄ ⊙ (W0 + s·B̂Â) / ‖W0 + s·B̂Â‖_row for DoRA (m̄ the weighted mean of the clients' magnitudes).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import Tensor, nn

from conftest import assert_counted, read_records, tiny_bert, tiny_config, tiny_gpt2
from fedlora import engines, methods, peft_io
from fedlora.config import ConfigError, load_config
from fedlora.methods.base import ClientInfo, GlobalModel, ModelInfo
from fedlora.types import AggregationReport, BaseEdit, Contribution, LowRank

torch.set_num_threads(1)

R, ALPHA = 3, 5.0  # α ≠ r: DoRA's s = α/r must be handled
BERT_TARGETS = ["query", "value", "intermediate.dense"]  # intermediate.dense is non-square (48, 32)
WEIGHTS = [0.3, 0.7]
GAUGES = [0.5, 2.0]


def make(variant: str, kind: str = "bert") -> PeftModel:
    base, targets, task = (
        (tiny_bert(), BERT_TARGETS, "seq_cls") if kind == "bert" else (tiny_gpt2(), ["c_attn"], "causal_lm")
    )
    pm = peft_io.make_peft_model(
        base, r=R, alpha=ALPHA, dropout=0.0, rslora=False, target_modules=targets, variant=variant, task=task
    )
    return pm.eval()


def ids() -> Tensor:
    return torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(5))


def kappa() -> float:
    """FedIT's factor on gauge copies: (Σ w c)(Σ w / c)."""
    return sum(w * c for w, c in zip(WEIGHTS, GAUGES, strict=True)) * sum(
        w / c for w, c in zip(WEIGHTS, GAUGES, strict=True)
    )


def shared_update(pm: PeftModel, seed: int = 3) -> dict[str, tuple[Tensor, Tensor]]:
    """One (B (d, r), A (r, k)) per module in PEFT's own units (before any scale), float64."""
    gen = torch.Generator().manual_seed(seed)
    return {
        m: (
            torch.randn(s.d, R, generator=gen, dtype=torch.float64) * 0.3,
            torch.randn(R, s.k, generator=gen, dtype=torch.float64) * 0.3,
        )
        for m, s in peft_io.module_specs(pm).items()
    }


def set_client(pm: PeftModel, update: dict[str, tuple[Tensor, Tensor]], c: float, seed: int) -> dict[str, Tensor]:
    """Client state as training would leave it: PEFT's B = c·B, A = A/c; a random head and (DoRA) random positive
    magnitudes. Returns the extras the test set, by fedlora name, in float64."""
    root = pm.base_model.model
    gen = torch.Generator().manual_seed(seed)
    extras = {}
    with torch.no_grad():
        for m, (B, A) in update.items():
            layer = root.get_submodule(m)
            if hasattr(layer, "hira_A"):
                layer.hira_B["default"].copy_(B * c)
                layer.hira_A["default"].copy_(A / c)
            else:
                layer.lora_B["default"].weight.copy_(B * c)
                layer.lora_A["default"].weight.copy_(A / c)
                if "default" in layer.lora_magnitude_vector:
                    mag = 0.5 + torch.rand(B.shape[0], generator=gen, dtype=torch.float64)
                    layer.lora_magnitude_vector["default"].weight.copy_(mag)
                    extras[f"{m}.lora_magnitude_vector"] = mag
        if hasattr(root, "classifier"):
            for name in ("weight", "bias"):
                p = root.classifier.modules_to_save["default"].get_parameter(name)
                value = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.copy_(value)
                extras[f"classifier.{name}"] = value
    return extras


def federate(name: str, clients: list[PeftModel]) -> tuple[GlobalModel, AggregationReport]:
    """One round through the Method API with the clients' adapters as the PEFT edge reads them."""
    method = methods.build(name)
    _, extras0 = peft_io.read_adapter(clients[0])
    state = method.init_server(ModelInfo(peft_io.module_specs(clients[0]), R, extras0), seed=0)
    contributions = []
    for u, (pm, w) in enumerate(zip(clients, WEIGHTS, strict=True)):
        adapter, extras = peft_io.read_adapter(pm)
        payload, _ = method.upload(method.init_client(ClientInfo(u, R)), adapter, extras, ClientInfo(u, R), 1)
        contributions.append(Contribution(u, w, payload))
    state, report = method.aggregate(state, contributions, 1)
    return method.export(state), report


def dense_reference(plain: nn.Module, weights: dict[str, Tensor], extras: dict[str, Tensor]) -> nn.Module:
    """``plain`` (an un-wrapped base model) with the given (out, in) weights and head put in place."""
    with torch.no_grad():
        for m, W in weights.items():
            layer = plain.get_submodule(m)
            stored = W.T if type(layer).__name__ == "Conv1D" else W
            layer.weight.copy_(stored.to(torch.float32))
        for name, value in extras.items():
            if name.startswith("classifier."):
                plain.get_parameter(name).copy_(value.to(torch.float32))
    return plain.eval()


def canonical_w0(plain: nn.Module, module: str) -> Tensor:
    layer = plain.get_submodule(module)
    W = layer.weight.detach().double()
    return W.T if type(layer).__name__ == "Conv1D" else W


def mean_extras(per_client: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {n: sum(w * e[n] for w, e in zip(WEIGHTS, per_client, strict=True)) for n in per_client[0]}


# ---------------------------------------------------------------------------------------------------------------
# HiRA


@pytest.mark.parametrize(("name", "kind"), [("flora_na", "bert"), ("fedit", "bert"), ("flora_na", "gpt2")])
def test_hira_output_after_aggregation_equals_dense_reference(name: str, kind: str) -> None:
    clients = [make("hira", kind) for _ in WEIGHTS]
    update = shared_update(clients[0])
    client_extras = [
        set_client(pm, update, c, seed=10 + u) for u, (pm, c) in enumerate(zip(clients, GAUGES, strict=True))
    ]
    exported, report = federate(name, clients)
    factor = 1.0 if name == "flora_na" else kappa()
    for m, (B, A) in update.items():  # the inner product B̂Â, s = 1
        torch.testing.assert_close(exported.adapter[m].dense().double(), factor * B @ A, atol=1e-5, rtol=1e-5)
    server = make("hira", kind)
    peft_io.write_adapter(server, exported.adapter, exported.extras, rank=R, seed=0)
    plain = tiny_bert() if kind == "bert" else tiny_gpt2()
    weights = {}
    for m, (B, A) in update.items():
        W0 = canonical_w0(plain, m)
        weights[m] = W0 + W0 * (factor * B @ A)  # W0 x + (W0 ⊙ B̂Â) x
    reference = dense_reference(plain, weights, mean_extras(client_extras))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(server(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-5, rtol=1e-4)
    # uplink: r(d + k) float32 scalars per module (+ the head), as FedIT's and FLoRA-NA's formula says
    specs = peft_io.module_specs(server)
    head = sum(e.numel() for e in client_extras[0].values())
    assert report.bytes_up == dict.fromkeys(range(2), 4 * (sum(R * (s.d + s.k) for s in specs.values()) + head))
    if name == "flora_na":
        assert report.divergence < 1e-5 < report.fedit


def test_hira_edge_names_round_trip_and_disk(tmp_path: Path) -> None:
    pm = make("hira")
    assert peft_io.peft_type(pm) == "HIRA"
    update = shared_update(pm)
    set_client(pm, update, 1.0, seed=1)
    adapter, extras = peft_io.read_adapter(pm)
    assert set(extras) == {"classifier.weight", "classifier.bias"}
    for m, (B, A) in update.items():  # s = 1: canonical B̃ is PEFT's hira_B itself
        assert peft_io.lora_scale(pm, m) == 1.0
        torch.testing.assert_close(adapter[m].B.double(), B, atol=1e-7, rtol=0)
        torch.testing.assert_close(adapter[m].A.double(), A, atol=1e-7, rtol=0)
    keys = set(load_file(str(_saved(pm, tmp_path / "saved") / peft_io.ADAPTER_WEIGHTS)))
    assert {f"base_model.model.{m}.hira_A" for m in update} <= keys
    on_disk = peft_io.read_adapter_dir(tmp_path / "saved")
    assert on_disk.config["peft_type"] == "HIRA" and set(on_disk.scales.values()) == {1.0}
    for m in update:
        torch.testing.assert_close(on_disk.adapter[m].dense(), adapter[m].dense())
    # write_adapter_dir with the HiRA template loads in PEFT and computes the same outputs
    peft_io.write_adapter_dir(tmp_path / "written", on_disk.adapter, on_disk.extras, peft_io.peft_config_dict(pm))
    loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "written")).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, pm(input_ids=x).logits, atol=1e-6, rtol=1e-5)
        merged = loaded.merge_and_unload()  # PEFT's own merge: W0 + W0 ⊙ (B·A)
        torch.testing.assert_close(merged(input_ids=x).logits, pm(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    # another rank re-creates the HiRA layers; PEFT factors come back unchanged
    gen = torch.Generator().manual_seed(4)
    new = {
        m: LowRank(torch.randn(s.d, 2, generator=gen), torch.randn(2, s.k, generator=gen))
        for m, s in peft_io.module_specs(pm).items()
    }
    peft_io.write_adapter(pm, new, {}, rank=2, seed=0)
    back, _ = peft_io.read_adapter(pm)
    for m in new:
        assert back[m].rank == 2
        torch.testing.assert_close(back[m].B, new[m].B)
    # trainable flags and live parameters address hira_A / hira_B
    peft_io.set_trainable(pm, frozenset({"B"}), train_extras=False)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert len(trainable) == len(new) and all(n.endswith(".hira_B.default") for n in trainable)
    params = peft_io.lora_parameters(pm)
    assert all(A.shape == (2, peft_io.module_specs(pm)[m].k) for m, (A, _) in params.items())


def _saved(pm: PeftModel, path: Path) -> Path:
    pm.save_pretrained(str(path))
    return path


def test_hira_refuses_base_edits_and_rslora() -> None:
    pm = make("hira")
    m = next(iter(peft_io.module_specs(pm)))
    d, k = peft_io.module_specs(pm)[m].d, peft_io.module_specs(pm)[m].k
    peft_io.apply_base_edits(pm, [])  # nothing to apply: fine
    with pytest.raises(ValueError, match=r"HiRA.*model\.lora\.variant = 'hira'"):
        peft_io.apply_base_edits(pm, [BaseEdit(1, dense={m: torch.zeros(d, k)})])
    with pytest.raises(ValueError, match=r"model\.lora\.rslora = true.*'hira'"):
        peft_io.make_peft_model(
            tiny_bert(),
            r=R,
            alpha=ALPHA,
            dropout=0.0,
            rslora=True,
            target_modules=["query"],
            variant="hira",
            task="seq_cls",
        )


# ---------------------------------------------------------------------------------------------------------------
# DoRA


@pytest.mark.parametrize("name", ["flora_na", "fedit"])
def test_dora_magnitudes_averaged_and_direction_aggregated_by_the_method(name: str) -> None:
    clients = [make("dora") for _ in WEIGHTS]
    update = shared_update(clients[0])
    client_extras = [
        set_client(pm, update, c, seed=20 + u) for u, (pm, c) in enumerate(zip(clients, GAUGES, strict=True))
    ]
    exported, report = federate(name, clients)
    expected_extras = mean_extras(client_extras)
    assert set(exported.extras) == set(expected_extras)
    for n, value in expected_extras.items():  # magnitudes (and head): the weighted mean
        torch.testing.assert_close(exported.extras[n].double(), value, atol=1e-6, rtol=1e-6)
    factor = 1.0 if name == "flora_na" else kappa()
    s = ALPHA / R
    for m, (B, A) in update.items():  # direction: the method's aggregate of the canonical s·B·A
        torch.testing.assert_close(exported.adapter[m].dense().double(), factor * s * B @ A, atol=1e-5, rtol=1e-5)
    server = make("dora")
    peft_io.write_adapter(server, exported.adapter, exported.extras, rank=R, seed=0)
    plain = tiny_bert()
    weights = {}
    for m, (B, A) in update.items():
        V = canonical_w0(plain, m) + factor * s * B @ A
        magnitude = expected_extras[f"{m}.lora_magnitude_vector"]
        weights[m] = (magnitude / V.norm(dim=1))[:, None] * V
    reference = dense_reference(plain, weights, expected_extras)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(server(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-5, rtol=1e-4)
    specs = peft_io.module_specs(server)
    extras_size = sum(e.numel() for e in client_extras[0].values())  # head + one magnitude (d,) per module
    assert extras_size == 3 * 32 + 3 + sum(sp.d for sp in specs.values())
    assert report.bytes_up[0] == 4 * (sum(R * (sp.d + sp.k) for sp in specs.values()) + extras_size)


# ---------------------------------------------------------------------------------------------------------------
# Configuration


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


def test_variants_the_method_does_not_support_are_clear_errors(monkeypatch) -> None:
    for method in ("flora_na", "fedit"):
        for variant in ("dora", "hira"):
            assert load_config(None, [f"federation.method={method}", f"model.lora.variant={variant}"])
    real = methods.capabilities

    def patched(name):
        caps = real(name)
        if name == "fedit":
            return dataclasses.replace(caps, variants=("lora",))
        if name == "flora_na":
            return dataclasses.replace(caps, writes_base=True)
        return caps

    monkeypatch.setattr(methods, "capabilities", patched)
    msg = _error(["federation.method=fedit", "model.lora.variant=dora"])
    assert msg.startswith("model.lora.variant = \"dora\": expected one of 'lora' (") and "'fedit'" in msg
    msg = _error(["federation.method=flora_na", "model.lora.variant=hira"])
    assert (
        msg.startswith('model.lora.variant = "hira": expected') and "writes base weights" in msg and "'flora_na'" in msg
    )
    assert load_config(None, ["federation.method=flora_na", "model.lora.variant=dora"])


def test_methods_declare_their_variants() -> None:
    for name in methods.available():
        caps = methods.capabilities(name)
        assert set(caps.variants) <= {"lora", "dora", "hira"} and "lora" in caps.variants
        assert not ("hira" in caps.variants and caps.writes_base), name
    assert "hira" in methods.capabilities("flora_na").variants and "hira" in methods.capabilities("fedit").variants


# ---------------------------------------------------------------------------------------------------------------
# Integration: 2 clients × 2 rounds on the packaged MiniLM


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["dora", "hira"])
@pytest.mark.parametrize("name", ["flora_na", "fedit"])
def test_two_clients_two_rounds_on_minilm(rt_csv: Path, tmp_path: Path, variant: str, name: str) -> None:
    cfg = tiny_config(rt_csv, tmp_path / "run", f"federation.method={name}", f"model.lora.variant={variant}")
    run_dir, summary = engines.run(cfg, tmp_path / "run")
    records = read_records(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert_counted(r["global_accuracy"])
    magnitudes = 12 * 384 if variant == "dora" else 0  # one (d,) vector per adapted module
    per_client = 4 * (12 * 8 * (384 + 384) + 2 * 384 + 2 + magnitudes)
    assert records[0]["bytes_up"] == 2 * per_client
    if name == "flora_na":
        assert all(r["divergence"] <= r["fedit_divergence"] + 1e-9 for r in records)
    saved = peft_io.read_adapter_dir(run_dir / "adapter")
    assert saved.config["peft_type"] == ("HIRA" if variant == "hira" else "LORA")
    assert saved.config.get("use_dora", False) == (variant == "dora")
    assert all(lr.B.abs().sum() > 0 for lr in saved.adapter.values())  # B (hira_B / lora_B) was trained
    assert sum(n.endswith(".lora_magnitude_vector") for n in saved.extras) == (12 if variant == "dora" else 0)
    assert summary["rounds"] == 2
