"""docs/deployment.md's own commands, run as written: section 3's setup, then section 17's restart procedures.

The guide marks its runnable blocks with ``<!-- guide-block: NAME -->``; this test extracts them and runs each
in ``bash -e`` from the project root, preceded by the guide's ``demo-settings`` block with only the values of
``DEMO``, ``PORT``, ``NODE0_PORT`` and ``NODE1_PORT`` replaced (a scratch directory and free ports). So the
guide and the test cannot drift: a changed command is a changed test. Every process the blocks start is
stopped at the end (by the PID files the guide writes, by session and by the scratch path in the command line),
also when the test fails.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from clients import persist, state_io
from strategies.results import read_metrics


def _deployment_helpers():
    """This directory's conftest.py as a module (pytest's own copy of it is not importable by name)."""
    spec = importlib.util.spec_from_file_location(
        "deployment_conftest", Path(__file__).with_name("conftest.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_helpers = _deployment_helpers()
BIN, ROOT, free_port = _helpers.BIN, _helpers.ROOT, _helpers.free_port
_alive, _procs_naming = _helpers._alive, _helpers._procs_naming

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

GUIDE = ROOT / "docs" / "deployment.md"
BLOCK = re.compile(r"<!-- guide-block: (?P<name>[\w-]+)[^>]*-->\n```bash\n(?P<body>.*?)\n```", re.S)
#: The only values the test changes: the variables of the settings block.
SETTINGS = ("DEMO", "PORT", "NODE0_PORT", "NODE1_PORT")
WARNING = re.compile(r"(?:WARNING|ERROR)\s*:\s+(.{0,120})")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RESTORED = re.compile(r"node-edge-1: restored the client state of round \d+ from \S+ \(\d+ bytes")
RESTORED_BY = [re.compile(rf"node-edge-{i}: restored the client state of round \d+ from") for i in range(2)]


def guide_blocks() -> dict[str, str]:
    blocks = {m["name"]: m["body"] for m in BLOCK.finditer(GUIDE.read_text())}
    assert len(blocks) == len(BLOCK.findall(GUIDE.read_text())), "two guide blocks share a name"
    return blocks


def substitute(settings: str, values: dict[str, str]) -> str:
    """The settings block with each variable's value replaced (each must be assigned exactly once)."""
    for name, value in values.items():
        settings, n = re.subn(rf"\b{name}=\S+", f"{name}={value}", settings)
        assert n == 1, f"{name} is assigned {n} times in the guide's demo-settings block"
    return settings


def sessions_processes(sids: set[int]) -> list[int]:
    """PIDs of live processes in any of the sessions ``sids``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[4]) in sids and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


class GuideShell:
    """Runs the guide's blocks, each in ``bash -e`` with the substituted settings first, in its own session."""

    def __init__(self, blocks: dict[str, str], demo: Path) -> None:
        self.blocks, self.demo = blocks, demo
        values = {
            "DEMO": str(demo),
            "PORT": free_port(),
            "NODE0_PORT": free_port(),
            "NODE1_PORT": free_port(),
        }
        assert tuple(values) == SETTINGS
        self.settings = substitute(blocks["demo-settings"], {k: str(v) for k, v in values.items()})
        self.logs = demo.parent / "block-logs"
        self.logs.mkdir(parents=True)
        self.sids: set[int] = set()
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the guide's "venv active"
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def run(self, name: str, timeout: float) -> str:
        """Run block ``name``; its output. Fails the test with the output and the processes' logs if it fails."""
        log = self.logs / f"{name}.log"
        script = f"set -o pipefail\n{self.settings}\n{self.blocks[name]}\n"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["bash", "-e", "-c", script],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.sids.add(proc.pid)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = f"timeout after {timeout} s"
        text = log.read_text(errors="replace")
        if code != 0:
            pytest.fail(f"guide block {name!r} failed ({code}):\n{text[-4000:]}\n{self.diagnostics()}")
        return text

    def diagnostics(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.demo.glob("*.log"))
        )

    def leftovers(self) -> list[int]:
        return sorted(set(sessions_processes(self.sids)) | set(_procs_naming(str(self.demo))))

    def close(self) -> None:
        """Stop whatever the blocks left running: SIGTERM, then SIGKILL after 15 s."""
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            pids = self.leftovers()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while pids and any(_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.2)


def wait_for_round(run_dir: Path, server_round: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(
            r["round"] >= server_round for r in read_metrics(run_dir)
        ):
            return
        time.sleep(0.3)
    raise TimeoutError(f"round {server_round} of {run_dir} did not finish in {timeout} s")


def visits(rows: list[dict], label: str) -> list[tuple[int, dict]]:
    return [
        (r["round"], r["clients"][label])
        for r in rows
        if "failure" not in r.get("clients", {}).get(label, {"failure": 1})
    ]


def test_guide_restart_procedures(tmp_path):
    blocks = guide_blocks()
    assert {
        "demo-settings",
        "demo-start",
        "demo-run",
        "demo-stop",
        "restart-run",
        "restart-supernode",
        "restart-server",
    } <= set(blocks)
    demo = tmp_path / "demo"
    shell = GuideShell(blocks, demo)
    try:
        shell.run("demo-start", timeout=300)
        shell.run("restart-run", timeout=120)
        runs, run_dir = demo / "runs", demo / "runs" / "restart-demo"
        wait_for_round(run_dir, 1)
        shell.run("restart-supernode", timeout=120)
        wait_for_round(run_dir, 3)  # the restarted node misses at most the round it was stopped in
        # Section 17's first procedure: the restarted node restored its state, logged it, and trained again
        # under its name, continuing its residual (checked with the whole chain below).
        log = (demo / "supernode-1.log").read_text(errors="replace")  # the restarted process's own log
        assert RESTORED.search(log), shell.diagnostics()
        assert "node-edge-1" in read_metrics(run_dir)[3]["clients"], read_metrics(run_dir)[3]
        streamed = shell.run("restart-server", timeout=600)  # ends with the resumed run's `flwr run --stream`
        assert "resume: continuing after round" in streamed, streamed[-4000:]
        print(
            "warnings and errors in the resumed run's stream:",
            sorted(set(WARNING.findall(ANSI.sub("", streamed)))),
        )
        rows = read_metrics(run_dir)
        assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]  # every round once, across both restarts
        for r in rows[1:]:
            print(r["round"], r["clients_ok"], r["clients_failed"], r.get("failures"))
        # The second: both nodes restored their state in the resumed run (new processes, new Flower run).
        for i in range(2):
            assert RESTORED_BY[i].search((demo / f"supernode-{i}.log").read_text(errors="replace"))
        for label in ("node-edge-0", "node-edge-1"):
            seen = visits(rows, label)
            print(
                label,
                [(rnd, c["state_rounds"], c["residual_norm_in"], c["residual_norm"]) for rnd, c in seen],
            )
            assert seen and seen[0][1]["residual_norm_in"] == 0.0
            assert [c["state_rounds"] for _, c in seen] == list(range(1, len(seen) + 1))
            for (_, prev), (_, cur) in itertools.pairwise(
                seen
            ):  # the residual continues across both restarts
                assert cur["residual_norm_in"] == prev["residual_norm"] > 0
        assert len(visits(rows, "node-edge-0")) >= 3
        assert not any(
            "node-" in k and k not in ("node-edge-0", "node-edge-1")
            for r in rows
            for k in r.get("clients", {})
        )
        # The resumed run ended: the nodes removed their state files of the run (section 8, "Clean up").
        run_key = state_io.run_key_for(str(runs), "restart-demo", 0)
        for i in range(2):
            path = persist.state_path(demo / f"state-edge-{i}", run_key, f"node-edge-{i}")
            assert not path.exists() and not persist.previous_path(path).exists()
        shell.run("demo-stop", timeout=120)
        deadline = (
            time.monotonic() + 20
        )  # Flower's SuperExec and app processes end shortly after their parent
        while shell.leftovers() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert shell.leftovers() == [], "the guide's demo-stop block left processes running"
    finally:
        shell.close()
