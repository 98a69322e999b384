"""``federation.engine = "flower-deployment"``: a real Flower deployment on this machine's loopback interface.

Starts one ``flower-superlink`` and one ``flower-supernode`` per client (``--node-config "partition-id=<c>
num-partitions=<n>"``) on 127.0.0.1 with free ports found first, then submits the app with
``flwr run <app> deploy --stream``. Insecure by default; with ``federation.tls`` a CA and the SuperLink's
certificate are generated (:mod:`fedlora.engines.flower.security`) and every connection (SuperNodes, ``flwr``,
the health check) verifies the SuperLink against that CA; with ``federation.node_auth`` (which needs ``tls``) each
SuperNode gets its own key pair, the SuperLink runs with ``--enable-supernode-auth``, and the public keys are
registered (``flwr supernode register``) before the SuperNodes start, so only they can join. Credentials live in
the temporary ``FLWR_HOME`` directory (mode 0700) and are deleted with it; ``<run_dir>/flower/deployment.json``
names the SuperLink's address and CA certificate while the run lasts. The app directory is generated in a
temporary directory: a ``pyproject.toml`` whose ``[tool.flwr.app.components]`` name
:mod:`fedlora.engines.flower.server_app` and :mod:`fedlora.engines.flower.client_app` and whose
``[tool.flwr.app.config]`` is the experiment's run config (:func:`fedlora.engines.flower.records.run_config`), so
the ServerApp in the SuperLink's process tree rebuilds exactly this config. Flower runs with the current virtual
environment (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, ``--disable-runtime-dependency-installation``) and
keeps its state in a temporary ``FLWR_HOME``.

Every process this module starts is its own session leader; on exit, failure or Ctrl-C each is stopped by PID
(its process group: SIGTERM, then SIGKILL after ``STOP_TIMEOUT``), which also ends the ``flower-superexec`` and
``flwr-clientapp`` children Flower spawned under it. Every wait has a timeout: SuperNodes give up reaching the
SuperLink after ``START_TIMEOUT`` (``--max-wait-time``), the run fails early once every SuperNode has exited, and a
SuperNode that dies mid-run only leaves its client out of the remaining rounds (recorded in ``failed_clients`` and
the summary's ``missing_clients``). Logs and ``pids.json`` (name → PID of every started process) are kept in
``<run_dir>/flower/``. Multi-host deployments with TLS and node authentication: docs/deployment.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from fedlora import config as cfgmod
from fedlora.engines.flower import records, security

STOP_TIMEOUT = 10.0
START_TIMEOUT = 120.0
HOST = "127.0.0.1"
PIDS = "pids.json"
"""{process name: PID} of every process a deployment started, in ``<run_dir>/flower/`` while it runs."""
CONNECTION = "deployment.json"
"""{"superlink": address, "ca": CA certificate path or null, "tls": bool, "node_auth": bool}, in
``<run_dir>/flower/``."""
REGISTER_TIMEOUT = 60.0


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct ports free on ``host`` now (bound to port 0, then released); a clear error if none."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, 0))
            except OSError as e:
                s.close()
                raise RuntimeError(f"flower-deployment: no free TCP port on {host} ({e})") from None
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Processes:
    """The processes a deployment started, each in its own session; ``stop`` ends them all by PID."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env = log_dir, env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: list[str] = []
        self.logs: list[IO[bytes]] = []

    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session, log to ``<log_dir>/<name>.log``, record its PID in pids.json."""
        log = (self.log_dir / f"{name}.log").open("wb")
        self.logs.append(log)
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd, start_new_session=True
        )
        self.procs.append(proc)
        self.names.append(name)
        (self.log_dir / PIDS).write_text(json.dumps(dict(zip(self.names, self.pids, strict=True)), indent=2))
        return proc

    def exited(self, prefix: str) -> dict[str, int]:
        """{name: exit code} of the started processes whose name starts with ``prefix`` and that have exited."""
        return {
            n: p.returncode
            for n, p in zip(self.names, self.procs, strict=True)
            if n.startswith(prefix) and p.poll() is not None
        }

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)  # the group's leftovers (superexec, clientapp children)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
        for log in self.logs:
            log.close()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the process group led by ``proc`` (start_new_session made its PID the group id)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path, ca: Path | None = None) -> None:
    """Until ``GET /health`` answers 200 (over TLS verified against ``ca`` when given)."""
    deadline = time.monotonic() + START_TIMEOUT
    scheme, context = ("https", ssl.create_default_context(cafile=str(ca))) if ca is not None else ("http", None)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; log {log}:\n{_tail(log)}")
        url = f"{scheme}://{HOST}:{port}/health"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5, context=context) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"flower-superlink on {HOST}:{port} not healthy within {START_TIMEOUT} s; log {log}")


def _tail(path: Path, n: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


def supernode_argv(
    bin_dir: Path,
    superlink: str,
    port: int,
    client: int,
    num_clients: int,
    ca: Path | None = None,
    key: Path | None = None,
) -> list[str]:
    """One client's SuperNode on loopback: insecure, or verifying the SuperLink against ``ca``; authenticated with
    private ``key`` when given; its partition in the node config; bounded reconnecting."""
    security = ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    security += [] if key is None else ["--auth-supernode-private-key", str(key)]
    return [
        str(bin_dir / "flower-supernode"),
        *security,
        "--superlink",
        superlink,
        "--port",
        str(port),
        "--node-config",
        f"partition-id={client} num-partitions={num_clients}",
        "--max-wait-time",  # a node that cannot reach the SuperLink gives up instead of retrying forever
        str(START_TIMEOUT),
    ]


def superlink_argv(bin_dir: Path, port: int, certs: security.Certificates | None, node_auth: bool) -> list[str]:
    """The SuperLink on loopback: insecure, or TLS with ``certs``; SuperNode authentication with ``node_auth``."""
    if certs is None:
        tls = ["--insecure"]
    else:
        tls = ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key)]
    auth = ["--enable-supernode-auth"] if node_auth else []
    where = ["--host", HOST, "--port", str(port)]
    return [str(bin_dir / "flower-superlink"), *tls, *auth, *where, "--disable-runtime-dependency-installation"]


def _register(bin_dir: Path, public_key: Path, env: dict[str, str], cwd: Path, log: Path) -> None:
    """``flwr supernode register <public key> deploy``: the SuperLink then admits the SuperNode holding its key."""
    argv = [str(bin_dir / "flwr"), "supernode", "register", str(public_key), "deploy"]
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=REGISTER_TIMEOUT, check=False)
    log.write_bytes(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"flower-deployment: registering {public_key.name} failed; log {log}:\n{_tail(log)}")


def _exited_nodes(procs: Processes, log_dir: Path) -> str:
    """Each SuperNode that has exited: its exit code and the tail of its log (for error messages)."""
    gone = procs.exited("supernode-")
    return "".join(f"\n{name} exited with code {rc}:\n{_tail(log_dir / f'{name}.log', 8)}" for name, rc in gone.items())


def _wait_run(run: subprocess.Popen[bytes], procs: Processes, n: int, timeout: float, log_dir: Path) -> int:
    """Wait for ``flwr run``; fail early when every SuperNode has exited (none can serve the run any more).
    Some SuperNodes exiting is tolerated: the ServerApp leaves their clients out and records them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return run.wait(1.0)
        if len(procs.exited("supernode-")) == n:
            raise RuntimeError(
                f"flower-deployment: every SuperNode exited before the run finished{_exited_nodes(procs, log_dir)}"
            )
    raise RuntimeError(
        f"flower-deployment: the run did not finish within {timeout:.0f} s "
        "(rounds × 3 × federation.round_timeout + start-up)"
    )


def app_pyproject(cfg: cfgmod.ExperimentConfig) -> str:
    """The generated app's pyproject.toml: components and the run config (flat keys as quoted TOML keys)."""
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedlora-flower-app"',
        'version = "0.1.0"',
        "dependencies = []  # runs in fedlora's environment (runtime dependency installation disabled)",
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        'publisher = "fedlora"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedlora.engines.flower.server_app:app"',
        'clientapp = "fedlora.engines.flower.client_app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in records.run_config(cfg).items()]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (main thread only), so the processes are stopped on it too."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_deployment(cfg: cfgmod.ExperimentConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on a SuperLink and ``data.num_clients`` SuperNodes on loopback; returns the summary."""
    if resume:
        raise ValueError(
            "federation.engine = 'flower-deployment' cannot resume a run (the SuperNodes' client states are gone); "
            "resume it with federation.engine = 'inprocess' or 'flower-simulation'"
        )
    from fedlora.engines.flower.environment import FLOWER_ENV

    cfg = cfgmod.with_overrides(cfg, [f"output.dir={json.dumps(str(run_dir))}"])
    n = cfg.data.num_clients
    bin_dir = Path(sys.executable).parent
    missing = [b for b in ("flower-superlink", "flower-supernode", "flwr") if not (bin_dir / b).exists()]
    if missing:
        raise RuntimeError(f"flower-deployment: {missing} not found in {bin_dir} (install fedlora[flower])")
    log_dir = run_dir / "flower"
    log_dir.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="fedlora-flwr-"))
    env = dict(os.environ) | FLOWER_ENV | {"FLWR_HOME": str(home / "home"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    app_dir = home / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(app_pyproject(cfg))
    link_port, *node_ports = free_ports(1 + n)
    fed = cfg.federation
    certs = security.certificates(home / "credentials") if fed.tls else None
    keys = [security.node_keys(home / "credentials", f"supernode-{c}") for c in range(n)] if fed.node_auth else None
    address = f"{HOST}:{link_port}"
    trust = f'root-certificates = "{certs.ca}"' if certs is not None else "insecure = true"
    conn = f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "{address}"\n{trust}\n'
    (home / "home").mkdir()
    (home / "home" / "config.toml").write_text(conn)
    connection = {
        "superlink": address,
        "ca": str(certs.ca) if certs else None,
        "tls": fed.tls,
        "node_auth": fed.node_auth,
    }
    (log_dir / CONNECTION).write_text(json.dumps(connection, indent=2))
    procs = Processes(log_dir, env)
    deadline = cfg.federation.rounds * 3 * cfg.federation.round_timeout + START_TIMEOUT
    try:
        with _sigterm_as_interrupt():
            link = procs.start("superlink", superlink_argv(bin_dir, link_port, certs, fed.node_auth))
            _wait_healthy(link_port, link, log_dir / "superlink.log", certs.ca if certs else None)
            for c, keypair in enumerate(keys or []):
                _register(bin_dir, keypair.public, env, app_dir, log_dir / f"register-{c}.log")
            for c, port in enumerate(node_ports):
                key = keys[c].private if keys else None
                ca = certs.ca if certs else None
                procs.start(f"supernode-{c}", supernode_argv(bin_dir, address, port, c, n, ca, key))
            flwr_run = procs.start(
                "flwr-run", [str(bin_dir / "flwr"), "run", str(app_dir), "deploy", "--stream"], cwd=app_dir
            )
            code = _wait_run(flwr_run, procs, n, deadline, log_dir)
        summary_path = run_dir / "summary.json"
        if code != 0 or not summary_path.exists():
            raise RuntimeError(
                f"flower-deployment: `flwr run` exited with code {code} and no {summary_path} was written; logs in "
                f"{log_dir}:\n{_tail(log_dir / 'flwr-run.log')}{_exited_nodes(procs, log_dir)}"
            )
        return json.loads(summary_path.read_text())
    finally:
        procs.stop()
        shutil.rmtree(home, ignore_errors=True)
