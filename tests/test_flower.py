"""fedlora on Flower 1.41: records and config mapping (fast), and the simulation engine against the in-process
engine on the real packaged MiniLM and a 240-example Rotten Tomatoes sample (slow: Ray starts per run)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_counted, causal_config, read_records, sums_jsonl, tiny_config
from fedlora import config, engines, rundir
from fedlora.types import Payload

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from fedlora.engines.flower import records  # noqa: E402

EXCLUDED = {"seconds", "seconds_train", "seconds_aggregate", "seconds_eval", "seconds_other"}


# ---- records and the run config --------------------------------------------------------------------------------


def test_run_config_round_trip_keeps_lists_and_method_keys():
    cfg = config.load_config(
        None,
        [
            "data.num_clients=3",
            "model.lora.ranks=[4, 8, 2]",
            'model.lora.target_modules=["query", "value"]',
            "federation.method=flexlora",
            "train.lr=1e-05",
        ],
    )
    flat = records.run_config(cfg)
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())  # Flower's run config holds scalars
    assert flat["model.lora.ranks"] == "[4, 8, 2]" and flat["model.lora.r"] == 8
    assert records.from_run_config(flat) == cfg
    assert records.from_run_config(dict(ConfigRecord(flat))) == cfg  # as it travels in a message
    with pytest.raises(ValueError, match="model.lora.rr"):
        records.from_run_config({**flat, "model.lora.rr": 3})
    # the repository app's keys (flwr run .): a fedlora TOML file and key=value overrides, as `fedlora run` takes them
    app = records.from_run_config({"config-file": "", "overrides": "data.num_clients=3 'model.lora.ranks=[4, 8, 2]'"})
    assert app == config.load_config(None, ["data.num_clients=3", "model.lora.ranks=[4, 8, 2]"])
    with pytest.raises(ValueError, match="train.lrr"):
        records.from_run_config({"config-file": "", "overrides": "train.lrr=0.1"})
    with pytest.raises(ValueError, match="mixes"):
        records.from_run_config({"overrides": "data.num_clients=3", "seed": 1})


def test_payload_records_round_trip_exactly():
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "lora.bert.encoder.layer.0.attention.self.query.A": torch.randn(4, 6, generator=gen),
        "lora.bert.encoder.layer.0.attention.self.query.B": torch.randn(5, 4, generator=gen),
        "extra.classifier.bias": torch.randn(2, generator=gen),
        "base.3.bert.encoder.layer.0.attention.self.query.left": torch.randn(5, 2, generator=gen).double(),
    }
    payload = Payload(tensors, {"round": 2, "fresh_init": False, "rank": 4})
    back = records.record_payload(RecordDict(records.payload_records(payload)))
    assert back.meta == payload.meta
    assert set(back.tensors) == set(tensors)
    for name, t in tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name], t)
    empty = records.record_payload(RecordDict(records.payload_records(Payload())))
    assert empty.tensors == {} and empty.meta == {}


def test_message_bytes_track_the_payload_and_count_identical_arrays_once_when_unique():
    gen = torch.Generator().manual_seed(0)
    tensors = {f"lora.layer{i}.A": torch.randn(8, 384, generator=gen) for i in range(6)}
    zeros = {f"lora.layer{i}.B": torch.zeros(384, 8) for i in range(6)}
    payload = Payload(tensors | zeros)
    content = RecordDict(records.payload_records(payload))
    empty = records.message_nbytes(RecordDict(records.payload_records(Payload())))
    full = records.message_nbytes(content)
    assert payload.nbytes < full - empty < 1.05 * payload.nbytes  # framing: a few hundred bytes per tensor
    unique = records.message_nbytes(content, unique=True)
    one_zero = 384 * 8 * 4
    assert full - unique == pytest.approx(5 * one_zero, rel=0.05)  # five of six identical B arrays not resent
    assert records.message_nbytes(ArrayRecord()) < 200


# ---- the simulation engine ---------------------------------------------------------------------------------------


def tiny(rt_csv: Path, out: Path, *extra: str) -> config.ExperimentConfig:
    return tiny_config(rt_csv, out, "federation.round_timeout=300", *extra)


def descendants() -> set[int]:
    """PIDs of this process's descendants (Ray's raylet, GCS and actors while a simulation runs)."""
    ps = subprocess.Popen(["ps", "-eo", "pid=,ppid=,stat="], stdout=subprocess.PIPE, text=True)
    out, _ = ps.communicate(timeout=30)
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid, stat = line.split()
        if not stat.startswith("Z") and int(pid) != ps.pid:  # neither exited-but-unreaped nor this ps
            children.setdefault(int(ppid), []).append(int(pid))
    found, todo = set(), [os.getpid()]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def assert_close_records(a: dict, b: dict, path: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_close_records(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_records(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-5), path
    else:
        assert a == b, path


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("method", "extra"),
    [("flora_na", ("output.keep=best", "train.lr_schedule=cosine")), ("fedsa_lora", ())],
    ids=["flora_na-keep_best-cosine", "fedsa_lora"],
)
def test_simulation_matches_the_in_process_engine(rt_csv, tmp_path, method, extra):
    """FLoRA-NA keeping the best round by its validation split under a cosine learning rate, and FedSA-LoRA, whose
    evaluation-only global model needs the nodes' own B (evaluation report)."""
    before = descendants()
    ref_cfg = tiny(rt_csv, tmp_path / "ref", f"federation.method={method}", *extra)
    ref_dir, ref_summary = engines.run(ref_cfg, tmp_path / "ref")
    sim_cfg = tiny(
        rt_csv, tmp_path / "sim", f"federation.method={method}", "federation.engine=flower-simulation", *extra
    )
    sim_dir, sim_summary = engines.run(sim_cfg, tmp_path / "sim")
    assert config.load_config(sim_dir / "config.toml") == sim_cfg
    ref, sim = read_records(ref_dir), read_records(sim_dir)
    for r, s in zip(ref, sim, strict=True):
        flower_keys = {k for k in s if k.startswith("flower_")}
        assert set(s) - flower_keys == set(r)  # the same keys, plus the Flower message accounting
        assert_close_records(
            {k: v for k, v in r.items() if k not in EXCLUDED}, {k: s[k] for k in r if k not in EXCLUDED}
        )
        # Flower bytes = payload + per-message overhead, within 5%
        for way in ("down", "up"):
            framing = s[f"flower_bytes_{way}"] - s["flower_messages"] * s[f"flower_overhead_{way}"]
            assert s[f"bytes_{way}"] <= framing <= 1.05 * s[f"bytes_{way}"], way
            assert 0 < s[f"flower_overhead_{way}"] < 20_000
        assert s["flower_bytes_up_unique"] <= s["flower_bytes_up"]
        assert (s["flower_bytes_report"] > 0) == (method == "fedsa_lora")  # FedSA's nodes report their own B
    # round 1 downloads carry all-zero B factors, which Flower's object store sends once
    assert sim[0]["flower_bytes_down_unique"] < 0.7 * sim[0]["flower_bytes_down"]
    assert_close_records(
        {k: v for k, v in ref_summary.items() if k != "wall_seconds"},
        {k: v for k, v in sim_summary.items() if k != "wall_seconds"},
    )
    ref_w = load_file(ref_dir / "adapter" / "adapter_model.safetensors")
    sim_w = load_file(sim_dir / "adapter" / "adapter_model.safetensors")
    assert set(ref_w) == set(sim_w)
    for name in ref_w:
        torch.testing.assert_close(sim_w[name], ref_w[name], rtol=1e-3, atol=1e-5, msg=name)
    assert (sim_dir / rundir.CHECKPOINT).exists() and (sim_dir / "summary.json").exists()
    deadline = time.monotonic() + 30  # Ray's processes exit shortly after the simulation returns
    while time.monotonic() < deadline and not descendants() <= before:
        time.sleep(0.5)
    assert descendants() <= before, "the simulation left processes behind"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_simulation_leaves_a_failing_and_a_timed_out_client_out(rt_csv, tmp_path):
    cfg = tiny(rt_csv, tmp_path / "run", "federation.method=fedit", "federation.engine=flower-simulation")
    faults = 'faults.clients={1 = "raise", 2 = "hang"}'  # simulated faults, applied on the nodes
    cfg = config.with_overrides(
        cfg, ["federation.rounds=1", "data.num_clients=3", "federation.round_timeout=60", faults]
    )
    started = time.monotonic()
    run_dir, summary = engines.run(cfg, tmp_path / "run")
    (record,) = read_records(run_dir)
    assert record["clients"] == [0] and record["flower_messages"] == 1
    assert "injected failure" in record["failed_clients"]["1"]
    assert "no reply within federation.round_timeout = 60" in record["failed_clients"]["2"]
    assert summary["rounds"] == 1 and summary["missing_clients"] == {"1": [1], "2": [1]}
    assert record["faults"] == {"1": "raise", "2": "hang"}
    assert time.monotonic() - started < 60 + 240  # waited for the round timeout, not for the hanging client
    strict = config.with_overrides(
        cfg, ["federation.min_clients=3", f"output.dir={tmp_path / 'strict'}", 'faults.clients={1 = "raise"}']
    )
    with pytest.raises(RuntimeError, match="fewer than federation.min_clients = 3"):
        engines.run(strict, tmp_path / "strict")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flwr_run_on_a_local_simulation_connection(rt_csv, tmp_path):
    """`flwr run <repo> <connection>` with the repository's own app config (config-file / overrides) on a local
    simulation SuperLink connection, as docs/deployment.md describes; the managed local SuperLink is stopped."""
    import signal

    from fedlora.engines.flower.environment import FLOWER_ENV

    repo = Path(__file__).resolve().parents[1]
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fedlora-sim"\n\n[superlink.fedlora-sim]\naddress = ":local:"\n'
        "options.num-supernodes = 2\noptions.backend.client-resources.num-cpus = 1\n"
    )
    run_dir = tmp_path / "run"
    overrides = f'data.dataset="{rt_csv}" data.num_clients=2 data.max_length=32 federation.rounds=1 '
    overrides += f'train.local_steps=2 train.batch_size=8 federation.method="fedit" output.dir="{run_dir}"'
    bin_dir = Path(sys.executable).parent  # as in an activated virtual environment: flwr starts flower-superlink
    env = dict(os.environ) | FLOWER_ENV | {"FLWR_HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    flwr = bin_dir / "flwr"
    try:
        proc = subprocess.run(
            [str(flwr), "run", str(repo), "fedlora-sim", "--run-config", f"overrides='{overrides}'", "--stream"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert (run_dir / "summary.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        links = _pids_matching(str(home))  # the detached local SuperLink flwr started (its own process group)
        helpers = [p for link in links for p in _pids_matching(f"--parent-pid {link}")]  # flower-superexec
        for pid in links + helpers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    (record,) = read_records(run_dir)
    assert record["clients"] == [0, 1] and record["failed_clients"] == {}
    assert config.load_config(run_dir / "config.toml").federation.method == "fedit"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _pids_matching(str(home)):
        time.sleep(0.5)
    assert not _pids_matching(str(home)), "the local SuperLink was left running"


def _pids_matching(text: str) -> list[int]:
    out = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True, timeout=30).stdout
    rows = [line.split(None, 1) for line in out.splitlines() if text in line]
    return [int(pid) for pid, args in rows if int(pid) != os.getpid() and not args.startswith("ps ")]


def test_an_old_flower_is_refused_before_anything_starts(monkeypatch, tmp_path):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.20.3")
    cfg = config.load_config(None, ["data.num_clients=2", "federation.engine=flower-simulation"])
    with pytest.raises(RuntimeError, match=r"flwr 1\.20\.3 is installed; the Flower engines need flwr>=1\.41"):
        engines.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_free_ports_are_distinct_and_bindable():
    import socket

    from fedlora.engines.flower.deployment import free_ports

    ports = free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_deployment_app_pyproject_carries_the_run_config(tmp_path):
    import tomllib

    from fedlora.engines.flower.deployment import app_pyproject

    cfg = config.load_config(None, ["data.num_clients=2", "model.lora.ranks=[4, 8]", "federation.method=flexlora"])
    app = tomllib.loads(app_pyproject(cfg))["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedlora.engines.flower.server_app:app",
        "clientapp": "fedlora.engines.flower.client_app:app",
    }
    assert records.from_run_config(app["config"]) == cfg


@pytest.fixture
def started(monkeypatch) -> list[int]:
    """The PIDs of every process a deployment started, collected when it stops them."""
    from fedlora.engines.flower import deployment

    pids: list[int] = []
    real_stop = deployment.Processes.stop

    def stop(self):
        pids.extend(self.pids)
        real_stop(self)

    monkeypatch.setattr(deployment.Processes, "stop", stop)
    return pids


def _kill_node_after_round(run_dir: Path, name: str, rnd: int, killed: list[int]) -> None:
    """Once metrics.jsonl has ``rnd`` rounds, SIGKILL the process group of SuperNode ``name`` (from pids.json)."""
    import signal

    deadline = time.monotonic() + 1200
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rnd:
            pid = json.loads((run_dir / "flower" / "pids.json").read_text())[name]
            os.killpg(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.2)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_deployment_survives_a_killed_supernode_and_stops_every_process(rt_csv, tmp_path, started):
    """SuperLink + 3 SuperNodes on loopback, 2 rounds of FLoRA-NA; SuperNode 2 is killed after round 1: round 2
    runs with the 2 remaining nodes, the run records who was missing, and no process is left behind."""
    import threading

    cfg = tiny(rt_csv, tmp_path / "run", "federation.method=flora_na", "federation.engine=flower-deployment")
    cfg = config.with_overrides(cfg, ["data.num_clients=3", "federation.round_timeout=90"])
    killed: list[int] = []
    killer = threading.Thread(target=_kill_node_after_round, args=(tmp_path / "run", "supernode-2", 1, killed))
    killer.start()
    run_dir, summary = engines.run(cfg, tmp_path / "run")
    killer.join(5)
    assert killed, "the SuperNode was never killed"
    first, second = read_records(run_dir)
    assert first["clients"] == [0, 1, 2] and first["failed_clients"] == {}
    assert second["clients"] == [0, 1] and set(second["failed_clients"]) == {"2"}
    assert summary["rounds"] == 2 and summary["missing_clients"] == {"2": [2]}
    for r, n in ((first, 3), (second, 2)):
        assert_counted(r["global_accuracy"])
        assert 0 <= r["divergence"] <= r["fedit_divergence"] + 1e-9
        assert r["bytes_up"] == n * (12 * 8 * (384 + 384) * 4 + (2 * 384 + 2) * 4)  # 12 modules + head
        assert r["flower_messages"] == n and r["flower_bytes_up"] > r["bytes_up"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert len(started) == 5  # superlink, 3 supernodes, flwr run
    _assert_all_gone(started)


def _start_rogues(run_dir: Path, rogues: dict[str, subprocess.Popen]) -> None:
    """Once the deployment's SuperNodes are up, start two more, each with its partition id and the SuperLink's
    address: one over TLS without the CA (with a registered key), one with the CA and a key never registered."""
    from fedlora.engines.flower import deployment, security

    flower = run_dir / "flower"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if (flower / deployment.CONNECTION).exists() and (flower / "supernode-1.log").exists():
            break
        time.sleep(0.2)
    connection = json.loads((flower / deployment.CONNECTION).read_text())
    ca = Path(connection["ca"])
    bin_dir = Path(sys.executable).parent
    ports = deployment.free_ports(2)
    registered = ca.parent / "supernode-0"  # the deployment's own credentials directory
    no_ca = deployment.supernode_argv(bin_dir, connection["superlink"], ports[0], 0, 2, ca, registered)
    no_ca = [a for i, a in enumerate(no_ca) if a != "--root-certificates" and no_ca[i - 1] != "--root-certificates"]
    stranger = security.node_keys(run_dir.parent / "stranger", "stranger").private
    unregistered = deployment.supernode_argv(bin_dir, connection["superlink"], ports[1], 1, 2, ca, stranger)
    env = dict(os.environ) | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}  # flower-superexec beside it
    for name, argv in (("no-ca", no_ca), ("unregistered", unregistered)):
        argv[argv.index("--max-wait-time") + 1] = "20"  # refused at once; give up retrying after 20 s
        log = (run_dir.parent / f"{name}.log").open("wb")
        rogues[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tls_deployment_with_node_auth_admits_only_its_registered_nodes(rt_csv, tmp_path, started):
    """TLS with a generated CA and SuperNode authentication: the run completes on its two registered SuperNodes,
    while a SuperNode that does not trust the CA and one whose key was never registered are refused."""
    import signal
    import threading

    cfg = tiny(rt_csv, tmp_path / "run", "federation.method=fedit", "federation.engine=flower-deployment")
    cfg = config.with_overrides(cfg, ["federation.rounds=1", "federation.tls=true", "federation.node_auth=true"])
    rogues: dict[str, subprocess.Popen] = {}
    starter = threading.Thread(target=_start_rogues, args=(tmp_path / "run", rogues))
    starter.start()
    try:
        run_dir, summary = engines.run(cfg, tmp_path / "run")
        starter.join(60)
        assert set(rogues) == {"no-ca", "unregistered"}
        codes = {name: proc.wait(timeout=180) for name, proc in rogues.items()}
    finally:
        for proc in rogues.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    (record,) = read_records(run_dir)
    assert record["clients"] == [0, 1] and record["failed_clients"] == {} and summary["rounds"] == 1
    assert all(code != 0 for code in codes.values()), codes
    assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "no-ca.log").read_text()
    assert "Failed to activate SuperNode" in (tmp_path / "unregistered.log").read_text()
    link_log = (run_dir / "flower" / "superlink.log").read_text()
    assert "https://127.0.0.1" in link_log  # the SuperLink served TLS only
    assert all((run_dir / "flower" / f"register-{c}.log").exists() for c in (0, 1))
    assert len(started) == 4  # superlink, 2 supernodes, flwr run
    _assert_all_gone(started)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_deployment_fails_cleanly_when_supernodes_cannot_reach_the_superlink(rt_csv, tmp_path, monkeypatch, started):
    from fedlora.engines.flower import deployment

    dead_port = deployment.free_ports(1)[0]  # nothing listens there
    real_argv = deployment.supernode_argv
    monkeypatch.setattr(deployment, "START_TIMEOUT", 15.0)
    monkeypatch.setattr(
        deployment, "supernode_argv", lambda b, link, *rest: real_argv(b, f"127.0.0.1:{dead_port}", *rest)
    )
    cfg = tiny(rt_csv, tmp_path / "run", "federation.engine=flower-deployment")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="every SuperNode exited before the run finished"):
        engines.run(cfg, tmp_path / "run")
    assert time.monotonic() - t0 < 200
    assert len(started) == 4
    _assert_all_gone(started)


def _assert_all_gone(started: list[int]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (any(_alive(p) for p in started) or _in_groups(started)):
        time.sleep(0.5)
    assert not [p for p in started if _alive(p)], "processes left behind"
    assert not _in_groups(started), "children of the started processes left behind"


def _in_groups(pgids: list[int]) -> list[int]:
    """Live processes in the process groups of ``pgids`` (each started process leads its own group)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True, timeout=30).stdout
    rows = [line.split() for line in out.splitlines()]
    return [int(pid) for pid, pgid, stat in rows if int(pgid) in pgids and not stat.startswith("Z")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, timeout=30).stdout
    return bool(state.strip()) and not state.strip().startswith("Z")


def test_engines_dispatch_to_flower_and_deployment_refuses_to_resume(tmp_path):
    cfg = config.load_config(None, ["data.num_clients=2", "federation.engine=flower-deployment"])
    with pytest.raises(ValueError, match="cannot resume"):
        engines.run(cfg, tmp_path / "run", resume=True)


# ---- causal LMs on both Flower engines -----------------------------------------------------------------------


def causal(tiny_llama_dir: Path, data: Path, out: Path, *extra: str) -> config.ExperimentConfig:
    return causal_config(
        tiny_llama_dir, data, out, "eval.generation=exact_match", "federation.round_timeout=300", *extra
    )


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["fedit", "flora_na"])
def test_causal_lm_on_the_simulation_matches_the_in_process_engine(tiny_llama_dir, tmp_path, method):
    """The tiny Llama on one-digit sums: the same records (NLL every round, exact match per group in the full
    evaluations, the global test set judged on the server) as in process, and an NLL that falls."""
    data = sums_jsonl(tmp_path / "sums.jsonl")
    ref_dir, _ = engines.run(
        causal(tiny_llama_dir, data, tmp_path / "ref", f"federation.method={method}"), tmp_path / "ref"
    )
    sim_cfg = causal(
        tiny_llama_dir, data, tmp_path / "sim", f"federation.method={method}", "federation.engine=flower-simulation"
    )
    sim_dir, _ = engines.run(sim_cfg, tmp_path / "sim")
    ref, sim = read_records(ref_dir), read_records(sim_dir)
    for r, s in zip(ref, sim, strict=True):
        assert set(s) - {k for k in s if k.startswith("flower_")} == set(r)
        assert_close_records(
            {k: v for k, v in r.items() if k not in EXCLUDED}, {k: s[k] for k in r if k not in EXCLUDED}
        )
    assert sim[-1]["global_loss"] < sim[0]["global_loss"] - 0.3
    assert sim[-1]["global_exact_match/add"] is not None and sim[-1]["local_exact_match"] is not None


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_causal_lm_on_the_deployment_engine_with_two_methods(tiny_llama_dir, tmp_path, started):
    """A SuperLink and two SuperNodes on loopback per run, two rounds; FedIT and FLoRA-NA each lower the NLL, and
    every process is stopped."""
    data = sums_jsonl(tmp_path / "sums.jsonl")
    for method in ("fedit", "flora_na"):
        cfg = causal(
            tiny_llama_dir,
            data,
            tmp_path / method,
            f"federation.method={method}",
            "federation.engine=flower-deployment",
            "federation.rounds=2",
            "eval.every=2",  # round 1: the NLL only (no generation)
        )
        run_dir, summary = engines.run(cfg, tmp_path / method)
        records = read_records(run_dir)
        assert [r["clients"] for r in records] == [[0, 1]] * 2
        assert records[-1]["global_loss"] < records[0]["global_loss"] - 0.3
        assert summary["final_global_exact_match"] == records[-1]["global_exact_match"] is not None
    assert len(started) == 2 * 4  # superlink, 2 supernodes, flwr run; per run
    _assert_all_gone(started)
