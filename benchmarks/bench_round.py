"""Where a round's time goes: COMP-AMS against Flower's own FedAvg in one Flower simulation, and a plain torch loop.

One Flower simulation (Ray backend, ``--clients`` virtual nodes at one CPU each, the project's ClientApp) runs
alternately the default COMP-AMS experiment (digits, Top-k 1 % with EF, AMSGrad) and ``algorithm =
"flower-fedavg"`` (Flower's FedAvg strategy, the same model, ClientApp, clients and grid), ``--rounds`` rounds
each, ``--repeats`` times (A/B, then B/A, ...), each through :func:`strategies.server_app.run_server` as ``flwr
run`` does. Every round is cut into

* **server work**: the ServerApp outside ``send_and_receive`` of the training messages (sampling and building
  the instructions, validating, decoding and aggregating the replies, the optimizer step, the central
  evaluation, writing ``metrics.jsonl``);
* the clients' work on the busiest Ray worker (the critical path of the round's client side), split into
  **client set-up** (``_setup``: config, device, node data, the model with the message's weights),
  **client compute** (the local training, ``_local_update``), **compression** (``worker_begin`` +
  ``worker_end``: statuses, EF, encode to wire bytes; for FedAvg the dense reply, ``dense_model_reply``),
  **client state** (``clients.state_io`` load/save) and **other** (the rest of the handler: reading the
  records, building the reply);
* **transport and polls**: the rest of ``send_and_receive``, i.e. Flower's message queues and their 0.1 s
  polls (the simulation's dispatcher sweeps the link state every 0.1 s, the ServerApp's grid pulls replies
  every 0.1 s), Ray's task submission and the pickling of each message and node context (COMP-AMS's context
  carries the residual) to and from the worker. Its parts *dispatch* (push to the first client starting) and
  *collect* (the last client done to the replies being returned) are shown on their own.

A round is the time from one round's ``send_and_receive`` to the next's; a two-round warm-up run of each algorithm
(worker start, imports, data loading) is not recorded, and the first and last round of every run (the last has
no next round) are left out. Medians over every remaining round of
every repetition; the components' medians need not add up to the round's median exactly.

The timers are off unless this benchmark runs: it wraps the ClientApp in :class:`TimedClientApp`, which, in each
Ray worker, wraps the ClientApp module's functions named above with ``time.perf_counter`` and attaches the
call's timings to its reply in one extra record; :class:`TimingGrid` (under the ServerApp's grid views) removes
that record before the strategy sees the reply, so bytes and results are those of an untimed run. No project
module has a timer of its own.

The **plain torch loop** runs the same clients (the same model, partitions, local steps, batch size and seeded
minibatches, :func:`tasks.training.local_update`) in this process, one after the other, with a plain averaged
SGD step: the floor a round could cost without Flower, messages and compression.

``--cache off`` turns the per-process node cache (:mod:`clients.node_cache`) off in the workers: the set-up then
rebuilds config, node data and model every message, as before the cache existed; ``--cache both`` runs every
algorithm with and without it, interleaved in the same simulation (the before/after of the cache).

The run prints the CPU that other processes (not this benchmark, its Ray cluster or workers) used while it ran:
on a machine shared with other work the numbers are noisy, and the output says so.

Run ``python benchmarks/bench_round.py`` (12 rounds x 3 repetitions per algorithm, about 2 minutes on an idle
2-core machine) or ``--rounds 4 --repeats 1 --clients 2`` (a smoke run). The last line is
``compams/fedavg seconds-per-round ratio: X``.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))
if str(_HERE) not in sys.path:  # Flower hands sys.path to the Ray workers: they import this module by name
    sys.path.insert(0, str(_HERE))

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

#: The reply record that carries a client call's timings from the worker to :class:`TimingGrid`.
TIMING_RECORD = "bench-round-timing"
ALGORITHMS = ("compams", "flower-fedavg")
#: With ``--cache both``: the workers turn their node cache off while this file exists.
NO_CACHE_FLAG_ENV = "BENCH_ROUND_NO_CACHE_FLAG"
#: (module, function) -> component. ``required`` ones must exist (the benchmark fails loudly otherwise).
CLIENT_TIMERS: dict[tuple[str, str], str] = {
    ("clients.client_app", "_setup"): "setup",
    ("clients.client_app", "_local_update"): "compute",
    ("clients.client_app", "worker_begin"): "compress",
    ("clients.client_app", "worker_end"): "compress",
    ("clients.baselines", "dense_model_reply"): "compress",
    ("clients.state_io", "restore_from_disk"): "state",
    ("clients.state_io", "load_worker_state"): "state",
    ("clients.state_io", "save_worker_state"): "state",
    ("clients.state_io", "save_to_disk"): "state",
}
REQUIRED = {"setup", "compute", "compress"}
CLIENT_PARTS = ("setup", "compute", "compress", "state")

# ------------------------------------------------------------------------------------ client side (workers)
_current: dict[str, float] = {}
_patched = False


def _timed(fn: Callable, part: str) -> Callable:
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _current[part] = _current.get(part, 0.0) + time.perf_counter() - t0

    timed.__wrapped__ = fn
    return timed


def _patch_client_modules() -> None:
    """Wrap the ClientApp's functions with timers, once per process (the worker's, never the driver's)."""
    global _patched
    if _patched:
        return
    for (module_name, name), part in CLIENT_TIMERS.items():
        module = importlib.import_module(module_name)
        fn = getattr(module, name, None)
        if fn is None:
            if part in REQUIRED:
                raise RuntimeError(f"bench_round: {module_name}.{name} is gone; update CLIENT_TIMERS")
            continue
        setattr(module, name, _timed(fn, part))
    _patched = True


def _import_client_app():
    from flwr.clientapp import ClientApp

    return ClientApp


class TimedClientApp(_import_client_app()):
    """``app`` with its functions timed; a training reply carries the call's timings in :data:`TIMING_RECORD`."""

    def __init__(self, app) -> None:
        super().__init__()
        self.app = app

    def __call__(self, message, context):
        """Run the wrapped app, then attach this call's timings (process, wall-clock span, components)."""
        from flwr.app import ConfigRecord, MessageType

        try:
            from clients import node_cache
        except ImportError:  # a tree from before the cache (a before/after comparison): "off"
            node_cache = None

        _patch_client_modules()
        flag = os.environ.get(NO_CACHE_FLAG_ENV)
        if flag and node_cache is not None:  # --cache both: the driver switches it between runs
            node_cache.enabled = not os.path.exists(flag)
        _current.clear()
        start, t0 = time.time(), time.perf_counter()
        reply = self.app(message, context)
        total = time.perf_counter() - t0
        if message.metadata.message_type == MessageType.TRAIN and reply.has_content():
            import torch

            reply.content[TIMING_RECORD] = ConfigRecord(
                {
                    "pid": os.getpid(),
                    "start": start,
                    "end": start + total,
                    "total": total,
                    "cache": float(getattr(node_cache, "enabled", False)),
                    "threads": torch.get_num_threads(),
                    **{part: float(_current.get(part, 0.0)) for part in CLIENT_PARTS},
                }
            )
        return reply


# ------------------------------------------------------------------------------------------- server side
#: (module, attribute path) -> part of the server's work. Nested timed calls (CompAMS.configure_train calls
#: FedAvg's) count once, in the outermost.
SERVER_TIMERS: dict[tuple[str, str], str] = {
    ("flwr.serverapp.strategy", "FedAvg.configure_train"): "configure",
    ("strategies.comp_ams", "CompAMS.configure_train"): "configure",
    ("flwr.serverapp.strategy", "FedAvg.aggregate_train"): "aggregate",
    ("strategies.comp_ams", "CompAMS.aggregate_train"): "aggregate",
    ("strategies.server_app", "evaluate"): "evaluate",
}
SERVER_PARTS = ("configure", "aggregate", "evaluate")
_server: dict[str, float] = {}
_depth: dict[str, int] = {}


def _server_timed(fn: Callable, part: str) -> Callable:
    def timed(*args, **kwargs):
        _depth[part] = _depth.get(part, 0) + 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _depth[part] -= 1
            if not _depth[part]:
                _server[part] = _server.get(part, 0.0) + time.perf_counter() - t0

    return timed


def _patch_server() -> Callable[[], None]:
    """Wrap the server's functions with timers; returns the function that restores them."""
    undo = []
    for (module_name, path), part in SERVER_TIMERS.items():
        owner = importlib.import_module(module_name)
        *outer, name = path.split(".")
        for attr in outer:
            owner = getattr(owner, attr)
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, _server_timed(original, part))
        undo.append((owner, name, original))

    def restore() -> None:
        for owner, name, original in reversed(undo):
            setattr(owner, name, original)

    return restore


class TimingGrid:
    """A view of the ServerApp's grid that times each ``send_and_receive`` of training messages.

    It removes the timing record from every reply before handing them on, so the strategy measures and
    validates exactly the replies of an untimed run. Each round's record also holds the server's timed parts
    (:data:`SERVER_TIMERS`) from its ``send_and_receive`` to the next one's.
    """

    def __init__(self, grid) -> None:
        self._grid = grid
        self.rounds: list[dict] = []

    def send_and_receive(self, messages, timeout=None):
        """Forward to the grid; for training messages record the span and the clients' timings."""
        from flwr.app import MessageType

        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self._grid.send_and_receive(messages, timeout=timeout)
        if self.rounds:  # the previous round's aggregation, evaluation and this round's instructions
            self.rounds[-1]["server"] = dict(_server)
        _server.clear()
        start = time.time()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        end = time.time()
        clients = []
        for reply in replies:
            if reply.has_content() and TIMING_RECORD in reply.content:
                clients.append(dict(reply.content[TIMING_RECORD]))
                del reply.content[TIMING_RECORD]
        self.rounds.append({"start": start, "end": end, "clients": clients, "sent": len(messages)})
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def breakdown(rounds: Sequence[Mapping]) -> list[dict[str, float]]:
    """Per-round components (seconds) of one run's timed rounds, without its first and last round.

    ``wall`` = from this round's ``send_and_receive`` to the next one's = ``server`` (outside
    ``send_and_receive``: ``configure``, ``aggregate``, ``evaluate`` and ``server_other``) + ``exchange`` (in it).
    The exchange is cut along the busiest worker process (the largest summed handler time this round):
    ``dispatch`` (the push to its first call's start) + its handler time (``setup``, ``compute``, ``compress``,
    ``state`` and ``other``) + ``gaps`` (between its calls: Ray's task hand-over, pickling message and context
    both ways) + ``collect`` (its last call's end to the replies' return); ``transport`` = dispatch + gaps +
    collect. Per-call means: ``call_total``, ``call_setup``; ``setup_share`` = set-up / handler time over the
    round's calls.
    """
    rows = []
    for cur, nxt in itertools.pairwise(rounds[1:]):
        wall = nxt["start"] - cur["start"]
        exchange = cur["end"] - cur["start"]
        calls = cur["clients"]
        per_worker: dict[int, list[Mapping]] = {}
        for call in calls:
            per_worker.setdefault(int(call["pid"]), []).append(call)
        busiest = max(per_worker.values(), key=lambda cs: sum(float(c["total"]) for c in cs), default=[])
        busy = {key: sum(float(c[key]) for c in busiest) for key in ("total", *CLIENT_PARTS)}
        first = min((float(c["start"]) for c in busiest), default=cur["start"])
        last = max((float(c["end"]) for c in busiest), default=cur["start"])
        server_parts = {part: float(cur.get("server", {}).get(part, 0.0)) for part in SERVER_PARTS}
        handler = sum(float(c["total"]) for c in calls)
        row = {
            "wall": wall,
            "server": wall - exchange,
            **server_parts,
            "server_other": wall - exchange - sum(server_parts.values()),
            "exchange": exchange,
            **{part: busy[part] for part in CLIENT_PARTS},
            "other": busy["total"] - sum(busy[part] for part in CLIENT_PARTS),
            "client_critical": busy["total"],
            "transport": exchange - busy["total"],
            "dispatch": first - cur["start"] if busiest else float("nan"),
            "gaps": (last - first) - busy["total"] if busiest else float("nan"),
            "collect": cur["end"] - last if busiest else float("nan"),
            "workers": float(len(per_worker)),
            "calls": float(len(calls)),
            "busiest_calls": float(len(busiest)),
            "call_total": handler / len(calls) if calls else float("nan"),
            "call_setup": sum(float(c["setup"]) for c in calls) / len(calls) if calls else float("nan"),
            "setup_share": sum(float(c["setup"]) for c in calls) / handler if handler else float("nan"),
        }
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- the runs
def variants(cache: str) -> list[tuple[str, bool]]:
    """(algorithm, node cache on) of every run of a repetition, for ``--cache on|off|both``."""
    modes = {"on": (True,), "off": (False,), "both": (True, False)}[cache]
    return [(algorithm, cached) for cached in modes for algorithm in ALGORITHMS]


def label(algorithm: str, cached: bool) -> str:
    return algorithm if cached else f"{algorithm} (no cache)"


def _simulate(args, base: dict, out_dir: Path, load: LoadMonitor) -> dict[str, list[dict]]:
    """One Flower simulation that runs the variants alternately; the timed rounds of every run, by variant."""
    import logging

    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from simulations.virtual_nodes import WithContext
    from strategies.server_app import run_server

    flag = out_dir / "no-cache"
    os.environ[NO_CACHE_FLAG_ENV] = str(flag)  # before Ray starts: the workers inherit it
    runs: dict[str, list[dict]] = {label(*v): [] for v in variants(args.cache)}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        for algorithm in ALGORITHMS:  # warm-up, not recorded: workers start, import, load their data
            flag.unlink(missing_ok=True)
            warm = {**base, "num-server-rounds": 2, "algorithm": algorithm, "out-dir": str(out_dir)}
            run_server(TimingGrid(grid), {**warm, "run-name": f"warm-up-{algorithm}"})
        for rep in range(args.repeats):
            order = variants(args.cache)
            for algorithm, cached in order if rep % 2 == 0 else order[::-1]:
                if cached:
                    flag.unlink(missing_ok=True)
                else:
                    flag.touch()
                timing = TimingGrid(grid)
                name = label(algorithm, cached)
                config = {
                    **base,
                    "algorithm": algorithm,
                    "out-dir": str(out_dir),
                    "run-name": f"{algorithm}-cache{int(cached)}-{rep}",
                }
                t0, cpu0 = time.perf_counter(), load.own_now()
                run_server(timing, config)
                cpu = load.own_now() - cpu0
                print(
                    f"  {name} repetition {rep + 1}/{args.repeats}: {args.rounds} rounds in "
                    f"{time.perf_counter() - t0:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
                seen = {c["cache"] for r in timing.rounds for c in r["clients"]}
                if seen - {float(cached)}:
                    raise RuntimeError(f"{name}: the workers' node cache was not {'on' if cached else 'off'}")
                runs[name].append({"rounds": timing.rounds, "cpu": cpu})

    logging.getLogger("flwr").setLevel(logging.ERROR)
    app = TimedClientApp(WithContext(client_app, base, {}))
    restore = _patch_server()
    try:
        run_simulation(
            server_app=server_app,
            client_app=app,
            num_supernodes=args.clients,
            backend_name="ray",
            backend_config={
                "client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                "init_args": {"logging_level": "ERROR", "log_to_driver": False},
            },
            verbose_logging=False,
        )
    finally:
        restore()
        os.environ.pop(NO_CACHE_FLAG_ENV, None)
    if any(len(r) != args.repeats for r in runs.values()):
        raise RuntimeError("the simulation ended before every run finished; run Flower verbosely to see why")
    return runs


def plain_loop(base: dict, clients: int, rounds: int, threads: int) -> list[float]:
    """Seconds per round of the same clients' local training in a plain torch loop (no Flower, no compression).

    ``threads``: torch's intra-op threads during the loop (those of a Ray worker with one CPU).
    """
    import torch

    from fl_compams import ParamSpec, flatten, parse_config, protocol, unflatten
    from tasks.task import client_data, model_for_task
    from tasks.training import local_update

    cfg = parse_config(base)
    model = model_for_task(cfg.data, cfg.seed)
    spec = ParamSpec.from_module(model)
    theta = flatten(model.state_dict(), spec)
    data = [client_data(cfg.data, pid, clients, cfg.seed, torch.device("cpu")) for pid in range(clients)]
    times = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rnd in range(1, rounds + 1):
            t0 = time.perf_counter()
            updates = []
            for pid, (x, y) in enumerate(data):
                model.load_state_dict(unflatten(theta, spec))
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(protocol.derive_seed(cfg.seed, pid, rnd, 1))
                    gen = torch.Generator().manual_seed(protocol.derive_seed(cfg.seed, pid, rnd, 0))
                    update, _ = local_update(
                        model,
                        x,
                        y,
                        steps=cfg.train.local_steps,
                        lr=cfg.train.local_lr,
                        batch_size=cfg.train.batch_size,
                        generator=gen,
                    )
                updates.append(update)
            theta = theta - cfg.train.local_lr * torch.stack(updates).mean(0)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return times[1:]


# ----------------------------------------------------------------------------------------------- load
class LoadMonitor:
    """CPU used by this benchmark's process tree (Ray included) and by every other process, sampled from /proc."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.own = self.other = 0.0
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._hz = os.sysconf("SC_CLK_TCK")
        self._lock = threading.Lock()
        self.available = Path("/proc/self/stat").exists()

    def own_now(self) -> float:
        """CPU seconds this benchmark's process tree has used since the monitor started (NaN without /proc)."""
        if not self.available:
            return float("nan")
        self._sample()
        return self.own

    def _sample(self, first: bool = False) -> None:
        with self._lock:
            self._sample_locked(first)

    def _sample_locked(self, first: bool) -> None:
        procs: dict[int, tuple[int, float]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            procs[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self._hz)
        mine = {os.getpid()}
        changed = True
        while changed:  # the descendants of this process
            changed = False
            for pid, (ppid, _) in procs.items():
                if ppid in mine and pid not in mine:
                    mine.add(pid)
                    changed = True
        for pid, (_, cpu) in procs.items():
            delta = cpu - self._last.get(pid, 0.0 if not first else cpu)
            if not first:
                if pid in mine:
                    self.own += delta
                else:
                    self.other += delta
            self._last[pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> LoadMonitor:
        if self.available:
            self._sample(first=True)
            self._thread.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.start
        if self.available:
            self._stop.set()
            self._thread.join()
            self._sample()


# ---------------------------------------------------------------------------------------------- report
#: (title, [(row key, column name)]) of the tables, each a median over the runs' rounds (ms).
TABLES = (
    (
        "A round",
        [
            ("wall", "round"),
            ("server", "server work"),
            ("client_critical", "client work (busiest worker)"),
            ("transport", "transport + polls"),
        ],
    ),
    (
        "Server work (outside send_and_receive)",
        [
            ("configure", "configure_train"),
            ("aggregate", "aggregate_train"),
            ("evaluate", "central evaluation"),
            ("server_other", "other (hooks, metrics, Flower's loop)"),
        ],
    ),
    (
        "Client work on the busiest worker (all its calls this round)",
        [
            ("busiest_calls", "calls"),
            ("setup", "set-up"),
            ("compute", "local training"),
            ("compress", "compression"),
            ("state", "client state"),
            ("other", "other"),
        ],
    ),
    (
        "Transport and polls (along the busiest worker)",
        [
            ("dispatch", "push to its first call"),
            ("gaps", "between its calls"),
            ("collect", "its last call to the replies"),
        ],
    ),
    (
        "Per client call (set-up share = set-up / handler time over a round's calls)",
        [("call_total", "handler"), ("call_setup", "set-up"), ("setup_share", "set-up share")],
    ),
)


def _median(rows: Sequence[Mapping[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def _cell(rows: Sequence[Mapping[str, float]], key: str) -> str:
    value = _median(rows, key)
    if key == "setup_share":
        return f"{100 * value:.1f}%"
    if key == "busiest_calls":
        return f"{value:.0f}"
    return _ms(value)


def report(
    rows: Mapping[str, list[dict]],
    plain: list[float],
    args,
    threads: int,
    load: LoadMonitor | None,
    cpu: Mapping[str, float] | None = None,
) -> list[str]:
    """The markdown tables and the verdict lines (the ratio last)."""
    out = [
        f"Medians over {args.repeats} x ({args.rounds} - 2) rounds per run, in ms; a round runs from one "
        "send_and_receive of training messages to the next.\n"
    ]
    for title, columns in TABLES:
        out += [
            f"## {title}\n",
            "| run | " + " | ".join(name for _, name in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        out += [
            f"| {name} | " + " | ".join(_cell(r, key) for key, _ in columns) + " |"
            for name, r in rows.items()
        ]
        out.append("")
    cached = args.cache != "off"
    c, f = rows[label("compams", cached)], rows[label("flower-fedavg", cached)]
    comp, fedavg = _median(c, "wall"), _median(f, "wall")
    floor = statistics.median(plain)
    out += [
        "## Against a plain torch loop of the same clients\n",
        f"- plain torch loop (same model, data, local steps, batch; {args.clients} clients one after another in "
        f"one process, {threads} torch thread(s) as in a worker, a plain averaged SGD step): {_ms(floor)} ms "
        "per round",
        f"- COMP-AMS in Flower: {_ms(comp)} ms per round, {comp / floor:.1f}x the plain loop. Server work "
        f"{_ms(_median(c, 'server'))} ms (instructions {_ms(_median(c, 'configure'))}, validating, decoding and "
        f"the AMSGrad step {_ms(_median(c, 'aggregate'))}, central evaluation {_ms(_median(c, 'evaluate'))}, "
        f"the rest {_ms(_median(c, 'server_other'))}); Flower's transport and polls "
        f"{_ms(_median(c, 'transport'))} ms (the dispatcher's and the grid's 0.1 s polls: "
        f"{_ms(_median(c, 'dispatch'))} ms to the first call, {_ms(_median(c, 'collect'))} ms after the last; "
        f"{_ms(_median(c, 'gaps'))} ms between calls for Ray and pickling each message and node context); the "
        f"busiest worker's {_median(c, 'busiest_calls'):.0f} clients {_ms(_median(c, 'client_critical'))} ms, "
        f"of which local training {_ms(_median(c, 'compute'))} ms and compression {_ms(_median(c, 'compress'))} "
        f"ms (the {args.clients} clients run on {_median(c, 'workers'):.0f} workers in parallel)",
        f"- client set-up: {100 * _median(c, 'setup_share'):.1f}% of a COMP-AMS client's handler time "
        f"(target < 10%), {100 * _median(f, 'setup_share'):.1f}% of a FedAvg client's (node cache "
        f"{'on' if cached else 'off'})",
    ]
    if args.cache == "both":
        off = rows[label("compams", False)]
        out.append(
            f"- without the node cache: COMP-AMS {_ms(_median(off, 'wall'))} ms per round, set-up "
            f"{_ms(_median(off, 'call_setup'))} ms per call ({100 * _median(off, 'setup_share'):.1f}%); with it "
            f"{_ms(comp)} ms, {_ms(_median(c, 'call_setup'))} ms ({100 * _median(c, 'setup_share'):.1f}%)"
        )
    if len(c) > 1 and len(f) > 1:  # the first quartile of the rounds' wall times
        qc, qf = (statistics.quantiles([r["wall"] for r in rs], n=4)[0] for rs in (c, f))
        out.append(
            f"- the fastest quarter of rounds (less exposed to other processes): COMP-AMS {_ms(qc)} ms, FedAvg "
            f"{_ms(qf)} ms, ratio {qc / qf:.2f}"
        )
    if cpu and all(math.isfinite(v) for v in cpu.values()):
        cc, cf = cpu[label("compams", cached)], cpu[label("flower-fedavg", cached)]
        out.append(
            f"- CPU per round of this benchmark's processes (server, Ray, workers; a run's CPU / its rounds, "
            f"median over runs; independent of waiting): COMP-AMS {_ms(cc)} ms, FedAvg {_ms(cf)} ms, ratio "
            f"{cc / cf:.2f}"
        )
    if load is not None and load.available:
        other = load.other / load.wall
        busy = " (a busy machine: these numbers are noisy)" if other > 0.2 else ""
        out.append(
            f"- load during the run: other processes used {other:.2f} of {os.cpu_count()} cores on average, this "
            f"benchmark and its Ray workers {load.own / load.wall:.2f}; load average at the end "
            f"{os.getloadavg()[0]:.2f}{busy}"
        )
    out.append(f"\ncompams/fedavg seconds-per-round ratio: {comp / fedavg:.2f}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, default=12, help="rounds per run (>= 3; the first and last are left out)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, alternating")
    parser.add_argument("--clients", type=int, default=10, help="virtual nodes (all sampled every round)")
    parser.add_argument("--plain-rounds", type=int, default=30, help="rounds of the plain torch loop")
    parser.add_argument(
        "--cache",
        choices=("on", "off", "both"),
        default="on",
        help="the workers' node cache (both: A/B it too)",
    )
    parser.add_argument(
        "--server-threads",
        type=int,
        default=0,
        help="torch threads of the ServerApp's process (0: torch's default)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 3 or args.repeats < 1 or args.clients < 1 or args.plain_rounds < 2:
        parser.error("need --rounds >= 3, --repeats >= 1, --clients >= 1, --plain-rounds >= 2")
    base = {"num-server-rounds": args.rounds}

    import platform

    import flwr
    import torch

    print("## Machine\n")
    print(f"- CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)")
    print(f"- Python {platform.python_version()}, torch {torch.__version__}, flwr {flwr.__version__}")
    print(f"\nCommand: `python {' '.join([os.path.relpath(sys.argv[0]), *(argv or sys.argv[1:])])}`")
    print(
        f"{args.clients} clients (1 CPU each), {args.rounds} rounds x {args.repeats} repetitions per run, node "
        f"cache {args.cache}, default config otherwise (digits, Top-k 1 % + EF, AMSGrad)\n"
    )
    if args.server_threads:
        torch.set_num_threads(args.server_threads)
    print(f"ServerApp process: {torch.get_num_threads()} torch thread(s)\n")
    with LoadMonitor() as load, tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        runs = _simulate(args, base, Path(tmp), load)
        threads = int(
            statistics.median(
                c["threads"]
                for r in runs.values()
                for run in r
                for rnd in run["rounds"]
                for c in rnd["clients"]
            )
        )
        plain = plain_loop(base, args.clients, args.plain_rounds, threads)
    rows = {name: [row for run in r for row in breakdown(run["rounds"])] for name, r in runs.items()}
    cpu = {name: statistics.median(run["cpu"] / args.rounds for run in r) for name, r in runs.items()}
    print("\n".join(report(rows, plain, args, threads, load, cpu)))
    return 0


if __name__ == "__main__":
    # run as the module ``bench_round`` (not ``__main__``), so the Ray workers unpickle TimedClientApp by name
    sys.exit(importlib.import_module("bench_round").main())
