"""Real Flower deployments on 127.0.0.1 for the tests: a SuperLink, SuperNodes and the flwr CLI as processes.

Every process is started in its own session (``start_new_session=True``) and stopped by process group, SuperNodes
first (so they unregister while the SuperLink still answers), then the SuperLink; descendants that left the group
(Flower detaches its SuperExec) are found through ``/proc`` and stopped by PID. This also runs when a test fails.
Ports are free ports picked on 127.0.0.1, ``FLWR_HOME`` is a temporary directory, and the SuperLink never installs
dependencies. Nothing here touches the network beyond 127.0.0.1.
"""

from __future__ import annotations

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
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONNECTION = "dep"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (read from /proc)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


class Proc:
    """A process started by the tests in its own session, with its output in a log file."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str], cwd: Path) -> None:
        self.name, self.args, self.log = name, args, log
        self.seen: set[int] = set()  # descendants seen by wait(): stop() ends those that outlived the process
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int | None:
        """Its exit code once it has exited, ``None`` after ``timeout`` s; notes its descendants meanwhile."""
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            self.seen.update(descendants(self.pid))
            time.sleep(0.2)
        return self.popen.poll()

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds; stray descendants by PID."""
        family = set(descendants(self.pid)) | self.seen
        if self.running():
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait(10)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in family:
            if _alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class Deployment:
    """A SuperLink on 127.0.0.1 with SuperNodes, driven through the flwr CLI with its own ``FLWR_HOME``.

    Parameters
    ----------
    tmp
        Scratch directory (FLWR_HOME, logs).
    certs
        Directory with ``ca.crt``, ``server.crt``, ``server.key`` for TLS; ``None`` = ``--insecure``.
    supernode_auth
        Start the SuperLink with ``--enable-supernode-auth`` (needs ``certs``): only registered keys may join.
    """

    def __init__(self, tmp: Path, certs: Path | None = None, supernode_auth: bool = False) -> None:
        self.tmp, self.certs, self.supernode_auth = tmp, certs, supernode_auth
        self.home = tmp / "flwr-home"
        self.logs = tmp / "logs"
        self.home.mkdir(parents=True)
        self.logs.mkdir()
        self.port = free_port()
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.write_cli_config(self.home, f"127.0.0.1:{self.port}")
        self.superlink: Proc | None = None
        self.supernodes: dict[str, Proc] = {}
        self.cli: list[Proc] = []
        self.helpers: list[Proc] = []  # other processes of the deployment, such as a proxy

    # --------------------------------------------------------------------------------------------- processes
    def _tls_args(self, server: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if server:
            return [
                "--ssl-ca-certfile",
                str(self.certs / "ca.crt"),
                "--ssl-certfile",
                str(self.certs / "server.crt"),
                "--ssl-keyfile",
                str(self.certs / "server.key"),
            ]
        return ["--root-certificates", str(self.certs / "ca.crt")]

    def start_superlink(self, timeout: float = 60) -> None:
        args = [str(BIN / "flower-superlink"), *self._tls_args(server=True)]
        args += ["--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.supernode_auth:
            args.append("--enable-supernode-auth")
        self.superlink = Proc("superlink", args, self.logs / "superlink.log", self.env, self.tmp)
        scheme = "https" if self.certs else "http"
        context = None
        if self.certs:
            context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
            context.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python >= 3.13 checks by default
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{scheme}://127.0.0.1:{self.port}/health", timeout=1, context=context)
                return
            except OSError as err:
                if not self.superlink.running() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SuperLink did not come up ({err}):\n{self.superlink.text()[-3000:]}"
                    ) from err
                time.sleep(0.3)

    def _supernode(
        self, name: str, node_config: str, key: Path | None, superlink: str | None
    ) -> tuple[Proc, int]:
        """Start a SuperNode (private key ``key``, SuperLink address ``superlink``); its log offset."""
        args = [str(BIN / "flower-supernode"), *self._tls_args(server=False)]
        args += ["--superlink", superlink or f"127.0.0.1:{self.port}", "--port", str(free_port())]
        args += ["--node-config", node_config]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key)]
        log = self.logs / f"supernode-{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        return Proc(name, args, log, self.env, self.tmp), offset

    def start_supernode(
        self,
        name: str,
        node_config: str,
        timeout: float = 60,
        key: Path | None = None,
        superlink: str | None = None,
    ) -> int:
        """Start a SuperNode and return its node id once it is connected."""
        proc, offset = self._supernode(name, node_config, key, superlink)
        self.supernodes[name] = proc
        deadline = time.monotonic() + timeout
        while True:
            text = proc.text()[offset:]
            if "SuperNode ID:" in text:
                return int(text.split("SuperNode ID:")[1].split()[0])
            if not proc.running() or time.monotonic() > deadline:
                raise RuntimeError(f"SuperNode {name} did not connect:\n{text[-3000:]}")
            time.sleep(0.2)

    def refused_supernode(
        self, name: str, node_config: str, key: Path | None = None, timeout: float = 60
    ) -> tuple[int, str]:
        """Start a SuperNode the SuperLink should refuse; its exit code and log once it has exited.

        Raises if it is still running after ``timeout`` seconds (it was let in, or hangs); it is stopped then.
        """
        proc, offset = self._supernode(name, node_config, key, None)
        code = proc.wait(timeout)
        proc.stop()  # also its detached SuperExec, if that is still there
        text = proc.text()[offset:]
        if code is None:
            raise RuntimeError(f"SuperNode {name} was not refused within {timeout} s:\n{text[-3000:]}")
        return code, text

    free_port = staticmethod(free_port)

    def start_helper(self, name: str, args: list[str]) -> Proc:
        """Another process of the deployment (log ``logs/<name>.log``), stopped after the SuperNodes."""
        proc = Proc(name, args, self.logs / f"{name}.log", self.env, self.tmp)
        self.helpers.append(proc)
        return proc

    def stop_supernode(self, name: str) -> None:
        self.supernodes.pop(name).stop()

    def close(self) -> None:
        errors = []
        for proc in self.cli:
            proc.stop(grace=5)
        for name in list(self.supernodes):
            try:
                self.stop_supernode(name)
            except Exception as err:  # keep stopping the others
                errors.append(err)
        for proc in self.helpers:
            proc.stop(grace=5)
        if self.superlink is not None:
            self.superlink.stop()
        if errors:
            raise errors[0]

    # --------------------------------------------------------------------------------------------- flwr CLI
    def write_cli_config(self, home: Path, address: str) -> None:
        """``home/config.toml``: connection ``dep`` to ``address``, trusting this deployment's CA (if TLS)."""
        tls = f'root-certificates = "{self.certs / "ca.crt"}"' if self.certs else "insecure = true"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{tls}\n'
        )

    def flwr(self, *args: str, timeout: float = 120, home: Path | None = None) -> subprocess.CompletedProcess:
        """The flwr CLI with this deployment's FLWR_HOME, or with ``home`` (another CLI's config.toml)."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env if home is None else {**self.env, "FLWR_HOME": str(home)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_run(self, run_config: str) -> Proc:
        """``flwr run . dep --stream --run-config ...`` from the project root, in the background."""
        args = [str(BIN / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config", run_config]
        proc = Proc("flwr-run", args, self.logs / "flwr-run.log", self.env, ROOT)
        self.cli.append(proc)
        return proc

    def flwr_json(self, *args: str, home: Path | None = None) -> dict:
        """``flwr <args> dep --format json``: its JSON answer (``"success"`` says whether it worked)."""
        proc = self.flwr(*args, CONNECTION, "--format", "json", home=home)
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError as err:
            raise RuntimeError(f"flwr {' '.join(args)} gave no JSON: {proc.stdout}{proc.stderr}") from err

    def runs(self) -> list[dict]:
        """``flwr ls dep --format json``: every run of this SuperLink with its status."""
        out = self.flwr_json("ls")
        if not out.get("success"):
            raise RuntimeError(f"flwr ls failed: {out}")
        return out["runs"]

    def diagnostics(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.logs.iterdir())
        )


@pytest.fixture
def deployment(tmp_path) -> Iterator[callable]:
    """Factory: ``deployment(certs=None, supernode_auth=False)`` starts a SuperLink; all is stopped at teardown."""
    started: list[Deployment] = []

    def make(certs: Path | None = None, supernode_auth: bool = False) -> Deployment:
        dep = Deployment(tmp_path / f"dep{len(started)}", certs, supernode_auth)
        started.append(dep)
        dep.start_superlink()
        return dep

    try:
        yield make
    finally:
        for dep in started:
            dep.close()


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    """A CA and a SuperLink certificate for 127.0.0.1, made by the documented script (openssl)."""
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "make_certs.sh"), str(out)], check=True, capture_output=True
    )
    return out


def _procs_naming(text: str) -> list[int]:
    """PIDs whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def ray_head(tmp_path) -> Iterator[str]:
    """A one-machine Ray cluster with 2 CPUs and 1 declared GPU; yields its address ``127.0.0.1:<port>``.

    Started with ``ray start --head --block`` in its own session and stopped by its process group, then by PID
    for anything whose command line names the head's private temp dir; never with ``ray stop``, which stops every
    Ray instance of the user on the machine, including ones the tests did not start.
    """
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    port = free_port()
    args = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=1",  # a declared (logical) GPU, so the test can check that clients request GPUs from Ray
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--block",
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    head = Proc("ray-head", args, tmp_path / "ray-head.log", env, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in head.text():
            if not head.running() or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start:\n{head.text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.stop(grace=20)
        for pid in _procs_naming(str(temp)):  # anything of this head's session that outlived its group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
