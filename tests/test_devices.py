"""``model.device``: the names it takes, what ``auto`` resolves to, the refusal of a device torch does not see, the
worker rule on a GPU, and the device code (batches and autocast follow the model) run on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from fedlora import config, devices, training
from fedlora.engines import inprocess


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_names_are_accepted(name):
    assert devices.is_device_name(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_other_device_names_are_config_errors(name):
    with pytest.raises(config.ConfigError, match="model.device"):
        config.load_config(None, [f"model.device={name}"])


def test_auto_is_a_cuda_gpu_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve("auto") == torch.device("cuda")


def test_a_device_torch_does_not_see_says_what_it_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r'model.device = "cuda:0": torch sees no CUDA device.*model.device=auto'):
        devices.resolve("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r'"cuda:1": torch sees 1 CUDA device'):
        devices.resolve("cuda:1")


def test_clients_share_one_model_on_a_gpu_unless_workers_are_asked_for(monkeypatch):
    cfg = config.load_config(None, ["data.num_clients=4"])
    assert inprocess.num_workers(cfg) == min(2, os.cpu_count() or 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert inprocess.num_workers(cfg) == 0
    asked = config.load_config(None, ["data.num_clients=4", "federation.workers=2"])
    assert inprocess.num_workers(asked) == 2


def test_precision_auto_on_cuda_follows_the_gpus_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert config.load_config(None, ["model.device=cuda"]).model.precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert config.load_config(None, ["model.device=cuda"]).model.precision == "fp32"


def test_batches_follow_the_model_and_autocast_its_device_type():
    model = torch.nn.Linear(3, 2)
    batch = training.to_device({"x": torch.ones(2, 3)}, devices.of(model))
    assert batch["x"].device == devices.of(model) == torch.device("cpu")
    with training.autocast("bf16", devices.of(model)):
        assert model(batch["x"]).dtype == torch.bfloat16
    with training.autocast("fp32", devices.of(model)):
        assert model(batch["x"]).dtype == torch.float32
