"""benchmarks/bench_scale.py: the /proc sampler sees every process of the tree, and the summary's ratios."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"
spec = importlib.util.spec_from_file_location("bench_scale", _PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

MIB = 2**20


def test_sampler_records_the_peak_memory_of_a_child_process():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; x = bytearray(64 * 2**20); x[::4096] = b'1' * len(x[::4096]); "
         "time.sleep(30)"]
    )  # fmt: skip
    try:
        sampler = bench.TreeSampler(bench.os.getpid(), 0.05)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            sampler.sample()
            if sampler.procs.get(child.pid, {}).get("hwm", 0) >= 64 * MIB:
                break
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()
    roles = {p["pid"]: p for p in sampler.roles()}
    assert roles[bench.os.getpid()]["role"] == "driver"
    assert roles[child.pid]["role"] == "ray service"  # not a child of a raylet
    assert roles[child.pid]["hwm"] >= 64 * MIB and roles[child.pid]["peak_anon"] >= 64 * MIB


def test_summary_sets_driver_growth_against_state_growth():
    def row(rnd, t, rss, anon, state):
        return {"round": rnd, "t": t, "status": {"VmRSS": rss, "RssAnon": anon}, "state_bytes": state,
                "holders": state // MIB, "residual_bytes": MIB, "accuracy": 0.5}  # fmt: skip

    rounds = [row(0, 10.0, 500 * MIB, 400 * MIB, 0), row(1, 12.0, 510 * MIB, 401 * MIB, 10 * MIB)]
    rounds += [row(r, 11.0 + r, (490 + 20 * r) * MIB, (391 + 10 * r) * MIB, 10 * r * MIB) for r in (2, 3, 4)]
    procs = [
        {"role": "driver", "name": "python", "hwm": 900 * MIB},
        {"role": "ray worker", "name": "ray::ClientAppActor", "hwm": 800 * MIB},
        {"role": "ray worker", "name": "ray::IDLE", "hwm": 80 * MIB},
        {"role": "ray service", "name": "raylet", "hwm": 30 * MIB},
    ]
    case = {"rounds": rounds, "procs": procs, "state_store": "memory"}
    s = bench.summarize(case)
    assert s["s_per_round"] == 1.0 and s["to_round0"] == 10.0 and s["round1"] == 2.0
    assert s["state_growth"] == 30 * MIB and s["ratio"] == 2.0 and s["anon_ratio"] == 1.0
    assert s["actor_hwm"] == [800 * MIB] and s["idle_hwm"] == [80 * MIB]
    assert bench.summarize({**case, "state_store": "disk"})["ratio"] is None  # nothing of it is in memory
    assert bench._is_worker("ray::ClientAppActor.run") and not bench._is_worker("ray::DashboardAgent")
