"""Scale: Flower simulations (Ray backend) with many stateful clients, a few sampled per round, on MNIST-1D.

For each client count N (default 10, 100 and 1,000) this runs one COMP-AMS simulation
(:func:`simulations.runner.run_experiment`: Top-k with error feedback, ``dataset = "mnist1d"``, ``model =
"mnist1d-mlp"``, d = 78,858, ``partitioner = "iid"`` over ``--samples`` generated examples so that every client
has data) with ``--per-round`` clients sampled per round (``fraction-train = per-round / N``), each case in a fresh
Python process so that no case inherits another's memory. It prints:

* seconds per round (median over rounds 2..T; round 1 includes the Ray actors' start and first imports) and the
  start-up time (from the call to the first round's row, Ray and Flower included);
* the peak RSS (``VmHWM`` of ``/proc/<pid>/status``) of every process of the run: the driver (where Flower's
  simulation engine and the ServerApp run), each Ray worker (children of the raylet: the ClientApp actors and
  idle workers) and Ray's own services, sampled every ``--sample-every`` seconds while they live;
* where client state lives: Flower's simulation keeps every virtual node's ``Context`` (hence ``context.state``,
  the residuals) in the driver process's node store, and ships it to a Ray actor with each message. The driver's
  RSS growth from the end of round 1 to the end of the run is set against the growth of the state bytes the
  clients report (``state-bytes-<slot>`` of each client's last reply, summed over the distinct clients that hold
  state; with ``state-store = "disk"`` none of it is in memory). The ratio is that growth over those bytes:
  about 1 means the state lives in the driver at its reported size, well below 1 that it lives elsewhere;
* the machine load: CPU seconds other processes used during the run (machine busy time minus that of this
  benchmark's process tree, Ray's processes included), per wall-clock second.

Run ``python benchmarks/bench_scale.py`` (10, 100 and 1,000 clients, 20 rounds of 10: a few minutes on 2 cores),
``--clients 1000 --per-round 100 --rounds 20`` (most of the 1,000 clients hold a residual), ``--state-dtype
float16`` / ``--state-store disk`` (compact client state, :mod:`clients.state_io`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIM = 78_858  # mnist1d-mlp; checked against the run's reported residual bytes


# ----------------------------------------------------------------------------------------------- /proc
def _status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssShmem of a process in bytes (empty if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmHWM", "VmRSS", "RssAnon", "RssShmem"):
                    out[name] = int(rest.split()[0]) * 1024
    except OSError:
        return {}
    return out


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class TreeSampler(threading.Thread):
    """Samples the memory and CPU time of a process and all its descendants until stopped."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.procs: dict[int, dict] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()

    def sample(self) -> None:
        parents, cpu = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                got = _stat(int(entry))
                if got is not None:
                    parents[int(entry)], cpu[int(entry)] = got
        tree, frontier = {self.root}, [self.root]
        while frontier:
            kids = [p for p, pp in parents.items() if pp in frontier and p not in tree]
            tree.update(kids)
            frontier = kids
        for pid in tree:
            status = _status(pid)
            if not status:
                continue
            rec = self.procs.setdefault(
                pid, {"parent": parents.get(pid), "cmd": _cmdline(pid), "peak_rss": 0, "peak_anon": 0}
            )
            cmd = _cmdline(pid)  # Ray renames a worker when it takes a task; a fork becomes what it executes
            if cmd:
                rec["cmd"] = cmd
            rec["hwm"] = max(rec.get("hwm", 0), status.get("VmHWM", 0))
            rec["rss"] = status.get("VmRSS", 0)
            rec["peak_rss"] = max(rec["peak_rss"], rec["rss"])
            rec["peak_anon"] = max(rec["peak_anon"], status.get("RssAnon", 0))
            rec["cpu"] = cpu.get(pid, rec.get("cpu", 0.0))

    def cpu_s(self) -> float:
        return sum(rec.get("cpu", 0.0) for rec in self.procs.values())

    def roles(self) -> list[dict]:
        """Every process seen: driver, Ray worker (a child of the raylet) or Ray service, with its peaks."""
        raylets = {p for p, r in self.procs.items() if "raylet" in r["cmd"].split(" ")[0]}
        out = []
        root_cmd = self.procs.get(self.root, {}).get("cmd")
        for pid, rec in sorted(self.procs.items()):
            if pid == self.root:
                role = "driver"
            elif (
                rec["cmd"] == root_cmd
            ):  # seen between fork and exec: the driver's pages, shared, not its own
                role = "driver fork"
            elif rec["parent"] in raylets and _is_worker(rec["cmd"]):
                role = "ray worker"
            else:
                role = "ray service"
            out.append({"pid": pid, "role": role, "name": _short(rec["cmd"]), **rec})
        return out


def _is_worker(cmd: str) -> bool:
    """A Ray worker process (an actor, or an idle worker), not one of the raylet's agents."""
    if cmd.startswith("ray::"):
        return not cmd.split(" ")[0].endswith("Agent")
    return "_worker.py" in cmd


def _short(cmd: str) -> str:
    if cmd.startswith("ray::"):
        return cmd.split(" ")[0]
    first = cmd.split(" ")[0]
    if "python" in os.path.basename(first) and len(cmd.split(" ")) > 1:
        first = next((a for a in cmd.split(" ")[1:] if not a.startswith("-")), first)
    return os.path.basename(first)[:40]


# ----------------------------------------------------------------------------------------------- one case
def run_case(args: argparse.Namespace) -> dict:
    """One simulation of ``args.one`` clients in this process; returns what the table needs."""
    sys.path.insert(0, str(ROOT))
    from simulations.runner import run_experiment

    n = args.one
    per_round = min(args.per_round, n)
    out_dir = tempfile.mkdtemp(prefix="bench-scale-")
    overrides = {
        "dataset": "mnist1d",
        "model": "mnist1d-mlp",
        "mnist1d-samples": args.samples,
        "partitioner": "iid",
        "num-server-rounds": args.rounds,
        "fraction-train": per_round / n,
        "min-train-nodes": per_round,
        "seed": args.seed,
        "state-dtype": args.state_dtype,
        "state-store": args.state_store,
        "out-dir": out_dir,
        "run-name": f"scale-{n}",
    }
    me = os.getpid()
    sampler = TreeSampler(me, args.sample_every)
    sampler.sample()
    held: dict[str, int] = {}  # client label -> state bytes of its last reply
    rounds: list[dict] = []
    busy0, t0 = machine_busy_s(), time.perf_counter()
    start_rss = _status(me)

    def on_round(row: dict) -> None:
        for label, client in (row.get("clients") or {}).items():
            total = sum(
                v for k, v in client.items() if k.startswith("state_bytes_") and isinstance(v, int | float)
            )
            if total:
                held[label] = int(total)
        residual = [c.get("state_bytes_residual", 0) for c in (row.get("clients") or {}).values()]
        rounds.append(
            {
                "round": row.get("round"),
                "t": time.perf_counter() - t0,
                "status": _status(me),
                "state_bytes": sum(held.values()),
                "holders": len(held),
                "residual_bytes": max(residual, default=0),
                "accuracy": row.get("test_accuracy", row.get("accuracy")),
                "clients_ok": row.get("clients_ok"),
            }
        )

    sampler.start()
    try:
        run_experiment(overrides, num_supernodes=n, num_cpus=args.num_cpus, on_round=on_round)
    finally:
        sampler.stop()
        shutil.rmtree(out_dir, ignore_errors=True)
    wall = time.perf_counter() - t0
    other = max(0.0, (machine_busy_s() - busy0) - sampler.cpu_s()) / wall
    return {
        "clients": n,
        "per_round": per_round,
        "rounds": rounds,
        "wall": wall,
        "own_cpu": sampler.cpu_s() / wall,
        "other_cpu": other,
        "start_rss": start_rss,
        "procs": sampler.roles(),
        "state_dtype": args.state_dtype,
        "state_store": args.state_store,
    }


# ----------------------------------------------------------------------------------------------- report
def mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def summarize(case: dict) -> dict:
    """Seconds per round, driver growth against state growth, and the process peaks of one case."""
    zero = next((r for r in case["rounds"] if r["round"] == 0), None)
    rows = [r for r in case["rounds"] if r["round"]]
    first = rows[0]
    times = [b["t"] - a["t"] for a, b in itertools.pairwise(rows)]
    last = rows[-1]
    growth = last["status"]["VmRSS"] - first["status"]["VmRSS"]
    anon = last["status"]["RssAnon"] - first["status"]["RssAnon"]
    state = last["state_bytes"] - first["state_bytes"]
    procs = case["procs"]
    workers = [p for p in procs if p["role"] == "ray worker"]
    services = [p for p in procs if p["role"] == "ray service"]
    driver = next(p for p in procs if p["role"] == "driver")
    in_memory = case["state_store"] == "memory"
    return {
        "s_per_round": statistics.median(times) if times else float("nan"),
        "startup": first["t"],
        "holders": last["holders"],
        "state_bytes": last["state_bytes"],
        "residual_bytes": last["residual_bytes"],
        "state_growth": state,
        "driver_growth": growth,
        "anon_growth": anon,
        "ratio": growth / state if state and in_memory else None,
        "anon_ratio": anon / state if state and in_memory else None,
        "to_round0": zero["t"] if zero else float("nan"),
        "round1": first["t"] - zero["t"] if zero else float("nan"),
        "anon0": zero["status"]["RssAnon"] if zero else 0,
        "driver_hwm": driver.get("hwm", 0),
        "actor_hwm": [p.get("hwm", 0) for p in workers if "Actor" in p["name"]],
        "idle_hwm": [p.get("hwm", 0) for p in workers if "Actor" not in p["name"]],
        "service_hwm": sum(p.get("hwm", 0) for p in services),
        "accuracy": last["accuracy"],
        "workers": workers,
        "services": services,
        "driver": driver,
    }


def machine_lines() -> list[str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:
        mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    import flwr
    import ray
    import torch

    return [
        f"- CPU: {model} ({os.cpu_count()} logical cores); RAM {mem / 2**30:.1f} GiB",
        f"- Python {platform.python_version()}, torch {torch.__version__}, flwr {flwr.__version__}, "
        f"ray {ray.__version__}",
    ]


def report(cases: list[dict], args: argparse.Namespace, argv: list[str]) -> None:
    print("## Machine\n")
    print("\n".join(machine_lines()))
    print(f"\nCommand: `python benchmarks/bench_scale.py {' '.join(argv)}`".rstrip() + "")
    print(
        f"\nCOMP-AMS Top-k 1% with EF, MNIST-1D MLP (d = {MODEL_DIM:,}), iid over {args.samples:,} samples "
        f"(80% train), {args.rounds} rounds, state-dtype {args.state_dtype}, state-store {args.state_store}, "
        f"{args.num_cpus:g} CPU per Ray actor, seed {args.seed}\n"
    )
    print(
        "| clients | per round | s / round | to round 0 s | round 1 s | clients holding state | state MiB | "
        "driver anon at round 0 MiB | state growth MiB | driver RSS / anon growth MiB | growth / state (RSS, anon) | "
        "driver peak MiB | Ray actors peak MiB | idle workers peak MiB | Ray services peak MiB | "
        "other CPU (cores) | test acc |"
    )
    print("|" + "---:|" * 17)
    for case in cases:
        s = summarize(case)
        ratio = "n/a"
        if s["ratio"] is not None:
            ratio = f"{s['ratio']:.2f}, {s['anon_ratio']:.2f}"
        actors = ", ".join(mib(h) for h in sorted(s["actor_hwm"], reverse=True))
        idle = ", ".join(mib(h) for h in sorted(s["idle_hwm"], reverse=True))
        acc = f"{s['accuracy']:.3f}" if isinstance(s["accuracy"], float) else "-"
        print(
            f"| {case['clients']:,} | {case['per_round']} | {s['s_per_round']:.3f} | {s['to_round0']:.1f} | "
            f"{s['round1']:.1f} | {s['holders']:,} | {mib(s['state_bytes'])} | {mib(s['anon0'])} | "
            f"{mib(s['state_growth'])} | {mib(s['driver_growth'])} / {mib(s['anon_growth'])} | {ratio} | "
            f"{mib(s['driver_hwm'])} | {actors} | {idle} | {mib(s['service_hwm'])} | {case['other_cpu']:.2f} | "
            f"{acc} |"
        )
    print("\n## Every process (peak RSS = VmHWM; anon = peak RssAnon)\n")
    print("| clients | role | pid | process | peak RSS MiB | peak anon MiB | CPU s |")
    print("|---:|---|---:|---|---:|---:|---:|")
    for case in cases:
        for p in case["procs"]:
            print(
                f"| {case['clients']:,} | {p['role']} | {p['pid']} | {p['name']} | {mib(p.get('hwm', 0))} | "
                f"{mib(p['peak_anon'])} | {p.get('cpu', 0.0):.1f} |"
            )
    print(
        "\nto round 0: from the call to the initial evaluation (Ray start, data, the server's hello to every node); "
        "round 1 includes the Ray actors' first ClientApp load. growth / state: driver RSS (and anonymous RSS) "
        "growth over state-bytes growth from the end of round 1 to the end (n/a: no state added after round 1, or "
        "state-store = disk)"
    )
    print("\n## Where client state lives\n")
    for case in cases:
        s = summarize(case)
        per_client = s["residual_bytes"]
        where = (
            "in the driver process (Flower's node store keeps every virtual node's Context)"
            if case["state_store"] == "memory"
            else "on disk (context.state keeps only the rounds counter and the file's path)"
        )
        line = (
            f"- {case['clients']:,} clients: {s['holders']:,} hold state, {mib(s['state_bytes'])} MiB in all "
            f"(residual {per_client:,} bytes each), {where}; driver RSS grew {mib(s['driver_growth'])} MiB "
            f"(anonymous {mib(s['anon_growth'])} MiB) while the state grew {mib(s['state_growth'])} MiB"
        )
        if s["ratio"] is not None:
            line += f": ratio {s['ratio']:.2f} (anonymous {s['anon_ratio']:.2f})"
        print(line)
    worst = max(c["other_cpu"] for c in cases)
    print(
        f"\nLoad: other processes used up to {worst:.2f} of {os.cpu_count()} cores during a case (see the table); "
        f"load average at the end {os.getloadavg()[0]:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000], help="simulated clients N")
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--rounds", type=int, default=20, help="server rounds per case")
    parser.add_argument(
        "--samples", type=int, default=40_000, help="mnist1d-samples (80%% train, split iid over the clients)"
    )
    parser.add_argument("--state-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--state-store", default="memory", choices=("memory", "disk"))
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per Ray actor (2 cores: 2 actors)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-every", type=float, default=0.5, help="seconds between /proc samples")
    parser.add_argument("--json", type=Path, help="also write every case's raw measurements here")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.per_round < 1 or min(args.clients) < 1:
        parser.error("--rounds must be >= 2, --per-round and --clients >= 1")
    if (args.samples * 4 // 5) // max(args.clients) < 10:
        parser.error(
            f"--samples {args.samples}: fewer than 10 training examples per client at {max(args.clients)}"
        )
    if args.one is not None:
        print("BENCH-SCALE-CASE " + json.dumps(run_case(args)), flush=True)
        return 0
    cases = []
    for n in args.clients:
        cmd = [sys.executable, __file__, *argv, "--one", str(n)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH-SCALE-CASE ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            print(f"case {n} clients failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        cases.append(json.loads(line.split(" ", 1)[1]))
        print(f"{n} clients done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(cases, indent=1))
    report(cases, args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
