"""The Python API (``import fedlora``): configs from keyword overrides, runs and comparisons with typed results
that hold what the run directory holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fedlora
from conftest import read_records
from fedlora.config import ConfigError


def test_import_is_light_and_the_api_loads_on_first_use():
    code = "import fedlora, sys; assert 'torch' not in sys.modules; fedlora.run; assert 'fedlora.api' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_config_takes_sections_top_level_and_dotted_keys():
    cfg = fedlora.load_config(
        None, seed=3, train={"lr": 2e-3}, model={"lora": {"r": 4}}, method={"solver": "als"}, **{"eval.every": 2}
    )
    assert (cfg.seed, cfg.train.lr, cfg.model.lora.r, cfg.method, cfg.eval.every) == (3, 2e-3, 4, {"solver": "als"}, 2)
    again = fedlora.load_config(cfg, federation={"rounds": 4})
    assert again.federation.rounds == 4 and again.train.lr == 2e-3  # an existing config keeps its other values
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        fedlora.load_config(None, train={"lrr": 0.1})


@pytest.mark.integration
def test_run_and_compare_return_what_the_run_directories_hold(rt_csv, tmp_path):
    small = {
        "data": {"dataset": str(rt_csv), "num_clients": 2, "max_length": 32},
        "federation": {"rounds": 1, "workers": 0},
    }
    small |= {"train": {"local_steps": 1, "batch_size": 8}}
    result = fedlora.run(None, output={"dir": str(tmp_path / "run")}, **small)
    assert result.summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(result.records) == read_records(tmp_path / "run")
    assert (result.adapter_dir / "adapter_config.json").exists() and result.config.federation.rounds == 1
    results = fedlora.compare(None, ["fedit", "flora_na"], out=tmp_path / "cmp", **small)
    assert set(results) == {"fedit", "flora_na"}
    assert results["fedit"].config.federation.method == "fedit"
    assert results["flora_na"].records[-1]["divergence"] <= results["fedit"].records[-1]["fedit_divergence"] + 1e-9
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["fedit"] == results["fedit"].summary
