"""The experiment config: defaults of conventions.md §1, TOML + overrides, errors that name key, value and the
expected values, the method registry checks, and the flat / TOML round trips."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedlora import config, methods
from fedlora.config import (
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    dump_toml,
    from_flat,
    load_config,
    parse_value,
    to_dict,
    to_flat,
    with_overrides,
)

# conventions.md §1, copied by hand: the spec the defaults are checked against.
SPEC_DEFAULTS = {
    "seed": 0,
    "model.name": "fedlora:minilm",
    "model.task": "seq_cls",
    "model.precision": "bf16" if config.native_bf16() else "fp32",  # "auto", resolved (test below)
    "model.device": "auto",
    "model.lora.variant": "lora",
    "model.lora.r": 8,
    "model.lora.alpha": 16.0,
    "model.lora.rslora": False,
    "model.lora.dropout": 0.05,
    "model.lora.target_modules": [],
    "data.dataset": "fedlora:rotten-tomatoes",
    "data.text_column": "text",
    "data.label_column": "label",
    "data.max_length": 64,
    "data.test_fraction": 0.2,
    "data.local_test_fraction": 0.2,
    "data.num_clients": 10,
    "data.partition": "dirichlet",
    "data.alpha": 0.5,
    "data.labels_per_client": 2,
    "data.min_partition_size": 10,
    "federation.method": "flora_na",
    "federation.rounds": 10,
    "federation.engine": "inprocess",
    "federation.round_timeout": 600.0,
    "federation.min_clients": 1,
    "federation.screen": "finite",
    "federation.screen_z": 3.5,
    "federation.tls": False,
    "federation.node_auth": False,
    "train.local_steps": 10,
    "train.batch_size": 16,
    "train.lr": 5e-4,
    "train.weight_decay": 0.0,
    "train.max_grad_norm": 1.0,
    "train.lr_schedule": "constant",
    "train.warmup_rounds": 0,
    "train.lr_min": 0.0,
    "train.gradient_checkpointing": False,
    "eval.every": 1,
    "output.trackers": [],
    "output.keep": "last",
    "data.task_alpha": 0.5,
    "privacy.mechanism": "none",
    "privacy.clip_norm": 1.0,
    "privacy.noise_multiplier": 1.0,
    "privacy.delta": 1e-5,
    # causal LM
    "data.prompt_column": "prompt",
    "data.response_column": "response",
    "data.chat_template": "auto",
    "data.arithmetic_modules": [
        "add_or_sub",
        "add_sub_multiple",
        "mul",
        "div",
        "mixed",
        "gcd",
        "lcm",
        "div_remainder",
        "round_number",
        "linear_1d",
    ],
    "data.arithmetic_per_module": 2000,
    "eval.generation": "auto",
    "eval.max_new_tokens": 256,
    "eval.stop": [],
    "eval.generation_batch_size": 16,
}

CONFIG_TOML = """
seed = 3
model.lora.alpha = 32          # an int where a float is expected
model.lora.target_modules = ["query", "value"]

[data]
num_clients = 3
partition = "iid"

[federation]
method = "fedit"
rounds = 2

[train]
local_steps = 7
"""


def _write(tmp_path, text: str):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    return str(info.value)


# ---- defaults -------------------------------------------------------------------------------------------------


def test_defaults_match_conventions():
    cfg = ExperimentConfig()
    assert to_flat(cfg) == SPEC_DEFAULTS
    assert cfg.model.lora.ranks is None
    assert cfg.federation.clients_per_round is None
    assert cfg.train.local_epochs is None
    assert cfg.output.dir is None
    assert cfg.method == {}
    assert load_config() == cfg


def test_config_is_frozen_and_lists_are_tuples():
    cfg = load_config(None, ["model.lora.target_modules=['query']"])
    assert cfg.model.lora.target_modules == ("query",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


# ---- loading --------------------------------------------------------------------------------------------------


def test_toml_file_with_tables_dotted_keys_and_overrides(tmp_path):
    path = _write(tmp_path, CONFIG_TOML)
    cfg = load_config(path, ["data.alpha=0.1", "federation.rounds=5", "output.dir=runs/x"])
    assert cfg.seed == 3
    assert cfg.model.lora.alpha == 32.0 and isinstance(cfg.model.lora.alpha, float)
    assert cfg.model.lora.target_modules == ("query", "value")
    assert (cfg.data.num_clients, cfg.data.partition, cfg.data.alpha) == (3, "iid", 0.1)
    assert (cfg.federation.method, cfg.federation.rounds) == ("fedit", 5)
    assert cfg.train.local_steps == 7
    assert cfg.output.dir == "runs/x"
    assert cfg.model.name == "fedlora:minilm"  # untouched keys keep their defaults


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("federation.method=fedit", "federation.method", "fedit"),  # bare string
        ('model.name="org/model"', "model.name", "org/model"),  # TOML string
        ("model.name=./local/model", "model.name", "./local/model"),
        ("model.lora.rslora=true", "model.lora.rslora", True),
        ("model.lora.target_modules=['q', 'v']", "model.lora.target_modules", ["q", "v"]),
        (" data.alpha = 2 ", "data.alpha", 2.0),
    ],
)
def test_override_values_are_toml_literals_or_bare_strings(override, key, value):
    assert to_flat(load_config(None, [override]))[key] == value


@pytest.mark.parametrize(
    ("text", "value"), [(" 0.1", 0.1), ("[4, 8]", [4, 8]), ("'a b'", "a b"), ("fedit ", "fedit"), ("a = b", "a = b")]
)
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_later_override_of_the_same_key_wins():
    assert load_config(None, ["seed=1", "seed=2"]).seed == 2


def test_with_overrides_leaves_the_input_config_alone():
    cfg = load_config(None, ["seed=5"])
    new = with_overrides(cfg, ["data.alpha=0.1"])
    assert (new.seed, new.data.alpha) == (5, 0.1)
    assert cfg.data.alpha == 0.5


@pytest.mark.parametrize("override", ["noequals", "=3", "data..alpha=1"])
def test_malformed_override(override):
    assert "expected" in _error([override])


def test_invalid_toml_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "[data\nalpha = 1"))


# ---- unknown keys ---------------------------------------------------------------------------------------------


def test_unknown_top_level_key_lists_sections_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "sed = 1\n"))
    msg = str(info.value)
    assert "unknown key 'sed'" in msg
    assert "seed, model, data, federation, method, train, eval, output" in msg
    assert "did you mean 'seed'?" in msg


def test_unknown_nested_key_lists_the_section_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "[model.lora]\nrnak = 4\n"))
    msg = str(info.value)
    assert "unknown key 'model.lora.rnak'" in msg
    for key in ("model.lora.variant", "model.lora.r", "model.lora.ranks", "model.lora.target_modules"):
        assert key in msg
    assert "did you mean 'model.lora.ranks'?" in msg


def test_unknown_key_in_an_override_and_a_key_in_the_wrong_section():
    assert "did you mean 'model.lora.alpha'?" in _error(["model.lora.alpah=3"])  # not data.alpha
    assert "did you mean 'data.partition'?" in _error(["data.partiton=iid"])
    assert "did you mean 'train.lr'?" in _error(["lr=0.001"])


def test_unknown_flat_key():
    with pytest.raises(ConfigError, match=r"unknown key 'federation.round'.*did you mean 'federation.rounds'"):
        from_flat({"federation.round": 3})


@pytest.mark.parametrize(("native", "resolved"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_the_cpu_and_is_saved_resolved(native, resolved, monkeypatch, tmp_path):
    monkeypatch.setattr(config, "native_bf16", lambda: native)
    cfg = load_config(None, ['model.precision="auto"'])
    assert cfg.model.precision == resolved
    assert f'precision = "{resolved}"' in dump_toml(cfg)
    assert to_flat(cfg)["model.precision"] == resolved
    for explicit in ("fp32", "bf16"):  # an explicit choice is kept on any CPU
        assert load_config(None, [f'model.precision="{explicit}"']).model.precision == explicit


@pytest.mark.parametrize(
    ("precision", "native", "warns"),
    [("bf16", False, True), ("bf16", True, False), ("fp32", False, False), ("fp32", True, False)],
)
def test_bf16_on_a_cpu_that_emulates_it_warns_and_names_the_key(precision, native, warns, monkeypatch):
    monkeypatch.setattr(config, "native_bf16", lambda: native)
    warning = config.emulated_bf16_warning(precision)
    assert (warning is not None) == warns
    if warns:
        assert "model.precision" in warning and "bf16" in warning and "fp32" in warning


# ---- values ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "allowed"),
    [
        ("model.task", ['"seq_cls"', '"causal_lm"']),
        ("model.precision", ['"auto"', '"fp32"', '"bf16"']),
        ("model.lora.variant", ['"lora"', '"dora"', '"hira"']),
        ("data.chat_template", ['"auto"', '"none"']),
        ("eval.generation", ['"auto"', '"none"', '"exact_match"', '"pass_at_1"']),
        ("data.partition", ['"iid"', '"dirichlet"', '"pathological"']),
        ("federation.engine", ['"inprocess"', '"flower-simulation"', '"flower-deployment"']),
    ],
)
def test_bad_literal_lists_the_allowed_values(key, allowed):
    msg = _error([f"{key}=bogus"])
    assert msg.startswith(f'{key} = "bogus": expected one of ')
    for value in allowed:
        assert value in msg


@pytest.mark.parametrize(
    ("override", "shown"),
    [
        ("seed=1.5", "seed = 1.5"),
        ("model.lora.r=2.0", "model.lora.r = 2.0"),
        ("data.alpha='high'", 'data.alpha = "high"'),
        ("data.num_clients=true", "data.num_clients = true"),
        ("model.lora.rslora=1", "model.lora.rslora = 1"),
        ("model.lora.target_modules=query", 'model.lora.target_modules = "query"'),
        ("model.lora.ranks=[4, 'x']", 'model.lora.ranks = [4, "x"]'),
        ("model.lora=4", "model.lora = 4"),
    ],
)
def test_wrong_type_names_key_and_value(override, shown):
    msg = _error([override])
    assert msg.startswith(shown)
    assert "expected" in msg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.alpha=-1", "data.alpha = -1.0: expected a positive float"),
        ("data.test_fraction=1", "data.test_fraction = 1.0: expected a float in (0, 1)"),
        ("model.lora.dropout=1.0", "model.lora.dropout = 1.0: expected a float in [0, 1)"),
        ("train.lr=inf", "train.lr = inf: expected a positive float"),
        ("model.lora.r=0", "model.lora.r = 0: expected a positive int"),
        ("seed=-1", "seed = -1: expected a non-negative int"),
        ('model.name=""', 'model.name = "": expected'),
        ('data.partition_by="cluster:1"', "data.partition_by = \"cluster:1\": expected a column name or 'cluster:K'"),
        ('data.partition_by="cluster:x"', 'data.partition_by = "cluster:x": expected'),
        ("data.arithmetic_modules=[]", "data.arithmetic_modules = []: expected a non-empty list of distinct"),
        ('data.arithmetic_modules=["mul", "mul"]', 'data.arithmetic_modules = ["mul", "mul"]: expected'),
        ("eval.max_new_tokens=0", "eval.max_new_tokens = 0: expected a positive int"),
        ('eval.stop=[""]', 'eval.stop = [""]: expected a list of non-empty strings'),
    ],
)
def test_out_of_range_value(override, message):
    assert _error([override]).startswith(message)


# ---- clients, ranks, local steps ------------------------------------------------------------------------------


def test_ranks_one_per_client():
    cfg = load_config(None, ["data.num_clients=3", "model.lora.ranks=[4, 8, 4]"])
    assert cfg.model.lora.ranks == (4, 8, 4)
    msg = _error(["data.num_clients=3", "model.lora.ranks=[4, 8]"])
    assert msg.startswith("model.lora.ranks = [4, 8]: expected a list of 3 positive ints")
    assert "data.num_clients = 3" in msg
    assert _error(["data.num_clients=2", "model.lora.ranks=[4, 0]"]).startswith("model.lora.ranks = [4, 0]")


def test_heterogeneous_ranks_need_a_method_that_supports_them(monkeypatch):
    real = methods.capabilities

    def no_hetero(name):
        return dataclasses.replace(real(name), heterogeneous_ranks="no")

    monkeypatch.setattr(methods, "capabilities", no_hetero)
    msg = _error(["data.num_clients=2", "model.lora.ranks=[4, 8]", "federation.method=fedit"])
    assert msg.startswith("model.lora.ranks = [4, 8]") and "'fedit'" in msg
    load_config(None, ["data.num_clients=2", "model.lora.ranks=[4, 4]", "federation.method=fedit"])


def test_clients_per_round_and_min_clients_fit_the_clients():
    cfg = load_config(None, ["data.num_clients=4", "federation.clients_per_round=4", "federation.min_clients=4"])
    assert cfg.federation.clients_per_round == 4
    msg = _error(["data.num_clients=4", "federation.clients_per_round=5"])
    assert msg.startswith("federation.clients_per_round = 5: expected an int in [1, 4]")
    assert _error(["federation.clients_per_round=0"]).startswith("federation.clients_per_round = 0")
    msg = _error(["data.num_clients=4", "federation.clients_per_round=2", "federation.min_clients=3"])
    assert msg.startswith("federation.min_clients = 3: expected an int in [1, 2]")


def test_local_epochs_alone_unsets_local_steps():
    cfg = load_config(None, ["train.local_epochs=2"])
    assert (cfg.train.local_steps, cfg.train.local_epochs) == (None, 2)
    assert TrainConfig(local_epochs=2).local_steps is None
    assert TrainConfig().local_steps == 10


def test_local_steps_and_local_epochs_together_are_an_error(tmp_path):
    for steps in (5, 10):
        msg = _error([f"train.local_steps={steps}", "train.local_epochs=2"])
        assert "train.local_steps = " in msg and "train.local_epochs = 2" in msg
    with pytest.raises(ConfigError, match=r"train.local_steps.*train.local_epochs"):
        load_config(_write(tmp_path, "[train]\nlocal_steps = 5\nlocal_epochs = 1\n"))


def test_an_override_replaces_the_other_of_local_steps_and_epochs(tmp_path):
    from_file = load_config(_write(tmp_path, CONFIG_TOML), ["train.local_epochs=1"])
    assert (from_file.train.local_steps, from_file.train.local_epochs) == (None, 1)
    back = with_overrides(from_file, ["train.local_steps=3"])
    assert (back.train.local_steps, back.train.local_epochs) == (3, None)


# ---- the method ---------------------------------------------------------------------------------------------------


def test_unknown_method_lists_methods_and_suggests():
    msg = _error(["federation.method=fedi"])
    assert msg.startswith('federation.method = "fedi"')
    assert "fedit" in msg and "flora_na" in msg
    assert "did you mean 'fedit'?" in msg


def test_method_values_are_validated_by_the_method():
    cfg = load_config(None, ["federation.method=flora_na", "method.solver=als"])
    assert cfg.method == {"solver": "als"}
    msg = _error(["federation.method=flora_na", "method.solvr=als"])
    assert "'method.solvr'" in msg and "method.solver" in msg and "did you mean 'method.solver'?" in msg
    assert "method.foo" in _error(["federation.method=fedit", "method.foo=1"])
    assert "method.solver" in _error(["method.solver=bogus"])


def test_changing_the_method_drops_the_previous_methods_values(tmp_path):
    path = _write(tmp_path, '[federation]\nmethod = "flora_na"\n[method]\nsolver = "als"\n')
    assert load_config(path, ["federation.method=fedit"]).method == {}
    assert load_config(path, ["federation.method=flora_na"]).method == {"solver": "als"}
    assert load_config(path, ["federation.method=flora_na", "method.solver=adam"]).method == {"solver": "adam"}
    assert "method.solver" in _error(["federation.method=fedit", "method.solver=als"])


# ---- round trips ----------------------------------------------------------------------------------------------


def _rich_config():
    return load_config(
        None,
        [
            "seed=7",
            'model.name="dir/with \\"quotes\\" and \\\\ back\\tslash"',
            "model.lora.ranks=[2, 4, 8]",
            "model.lora.target_modules=['query', 'value']",
            "data.num_clients=3",
            "federation.clients_per_round=2",
            "method.solver=als",
            "method.tol=1e-10",
            "train.local_epochs=1",
            "output.dir=runs/exp",
        ],
    )


@pytest.mark.parametrize("make", [ExperimentConfig, _rich_config], ids=["defaults", "rich"])
def test_flat_round_trip(make):
    cfg = make()
    flat = to_flat(cfg)
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", k) for k in flat)
    assert from_flat(flat) == cfg


@pytest.mark.parametrize("make", [ExperimentConfig, _rich_config], ids=["defaults", "rich"])
def test_toml_round_trip(make, tmp_path):
    cfg = make()
    text = dump_toml(cfg)
    assert load_config(_write(tmp_path, text)) == cfg
    assert json.loads(json.dumps(to_dict(cfg))) == to_dict(cfg)


def test_dump_omits_unset_values():
    flat = to_flat(ExperimentConfig())
    assert "model.lora.ranks" not in flat and "output.dir" not in flat and "train.local_epochs" not in flat
    assert "local_epochs" not in dump_toml(ExperimentConfig())


_floats = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False)
_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**63 - 1),
    alpha=st.one_of(_floats, st.integers(1, 100)),
    lr=_floats,
    num_clients=st.integers(1, 50),
    rslora=st.booleans(),
    partition=st.sampled_from(["iid", "dirichlet", "pathological"]),
    name=_text,
)
def test_overrides_round_trip(seed, alpha, lr, num_clients, rslora, partition, name, tmp_path_factory):
    overrides = [
        f"seed={seed}",
        f"data.alpha={alpha!r}",
        f"train.lr={lr!r}",
        f"data.num_clients={num_clients}",
        f"model.lora.rslora={str(rslora).lower()}",
        f"data.partition={partition}",
        f"model.name={json.dumps(name, ensure_ascii=False)}",
    ]
    cfg = load_config(None, overrides)
    assert (cfg.seed, cfg.data.alpha, cfg.train.lr) == (seed, float(alpha), lr)
    assert (cfg.data.num_clients, cfg.model.lora.rslora, cfg.data.partition) == (num_clients, rslora, partition)
    assert cfg.model.name == name
    assert from_flat(to_flat(cfg)) == cfg
    assert with_overrides(ExperimentConfig(), overrides) == cfg
    path = tmp_path_factory.mktemp("dump") / "cfg.toml"
    path.write_text(dump_toml(cfg), encoding="utf-8")
    assert load_config(path) == cfg


@settings(max_examples=40, deadline=None)
@given(name=st.text(min_size=1, max_size=30))
@example(name='\x00\x1f\x7f\t\n"\\ é 😀')
def test_any_string_survives_the_toml_round_trip(name, tmp_path_factory):
    cfg = ExperimentConfig(model=ModelConfig(name=name))
    path = tmp_path_factory.mktemp("dump") / "cfg.toml"
    path.write_text(dump_toml(cfg), encoding="utf-8")
    assert load_config(path) == cfg
