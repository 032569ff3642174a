"""Throughput of the COMP-AMS core: encode, decode, EF step, codec and server aggregation vs. a plain copy.

For every dimension d and compressor this times, on the CPU or with ``--device cuda`` on a GPU (float32 vectors):

* ``encode``    ``c.encode(x)``
* ``decode``    ``c.decode(payload)``
* ``ef_step``   ``ef_step(c, x, residual)`` (x + e, encode, decode, subtract)
* ``to_bytes``  ``to_bytes(payload)``
* ``from_bytes`` ``from_bytes(data, d)`` (parse and validate one payload)
* ``aggregate`` ``weighted_mean(payloads, weights, d)`` over the payloads of 10 different clients, each parsed
  beforehand from its bytes (the parsing is not in this time; it is the ``from_bytes`` row, per payload)

and reports the median time, the bandwidth ``4 d bytes / time`` (the float32 vector processed) and the ratio
``t_copy / t_op`` to ``dst.copy_(x)`` into a preallocated tensor, measured in the same run with the same
interleaved repetitions. For ``aggregate`` the ratio is ``t_copy / t_all_10`` (one copy of one vector against
all 10 payloads), which is conservative. References, not library code: ``torch.topk`` (``torch.topk(x.abs(), k,
sorted=False)``) for exact Top-k 1%, ``torch.zeros(d)`` (the accumulator ``weighted_mean`` allocates) and the
Top-k sum into a reused accumulator. Medians are the verdict; the fastest repetition is printed as a noise check,
and so is the CPU that other processes used during the run (torch's 2-thread ops stall on a busy 2-core machine).

Run ``python benchmarks/bench_core.py`` (all four sizes) or ``--quick`` (1e5 and 1e6, a smoke run). On a GPU
(``--device cuda``) every input, payload and accumulator lives on the device (the codec's rows include the host
copies they need), each timed sample is bracketed by ``torch.cuda.synchronize()``, and the targets are the GPU
ones: at d >= 1e7 every encode, decode and 10-payload aggregation >= 10% of the device copy, and the Top-k
encode within 1.5x of ``torch.topk``.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import fl_compams
from fl_compams import aggregation_weights, ef_step, from_bytes, make_compressor, to_bytes, weighted_mean

DEFAULT_DIMS = (100_000, 1_000_000, 10_000_000, 25_000_000)
QUICK_DIMS = (100_000, 1_000_000)
N_CLIENTS = 10
TOPK_RATIO = 0.01
# Fractions of d per block, like a small CNN's tensors (conv/fc weights with their tiny biases); the last
# block takes the remainder, so block boundaries generally fall inside a byte of packed signs.
BLOCK_FRACTIONS = (0.0017, 0.00003, 0.0371, 0.00007, 0.1483, 0.00013, 0.5912, 0.00041, 0.2207)
# A timed sample repeats the call until it lasts at least this long (small d is otherwise timer noise).
MIN_SAMPLE_S = 0.005
MAX_INNER = 200

#: (compressor label, op) -> minimum fraction of copy bandwidth (t_copy / t_op).
TARGETS = {
    ("blocksign", "encode"): 0.25,
    ("blocksign", "decode"): 0.25,
    ("topk-1% int32+f32", "encode"): 0.10,
    ("topk-1% varint+f16", "encode"): 0.10,
    ("topk-1% int32+f32", "aggregate"): 0.20,
    ("topk-1% varint+f16", "aggregate"): 0.20,
}
#: On a GPU, from d = 1e7 on: each of these ops >= 10% of the device copy, for every compressor.
CUDA_TARGET_OPS, CUDA_TARGET, CUDA_TARGET_MIN_D = ("encode", "decode", "aggregate"), 0.10, 10_000_000
#: Exact Top-k encode against torch.topk on a GPU: at most this many times slower.
CUDA_TOPK_FACTOR = 1.5
OPS = ("encode", "decode", "ef_step", "to_bytes", "from_bytes", "aggregate")


def target_for(label: str, op: str, d: int, device: str) -> float | None:
    """Minimum ``t_copy / t_op`` for this case on this device, or None."""
    if device == "cuda":
        known = label in compressors_for(1_000_000)
        return CUDA_TARGET if known and op in CUDA_TARGET_OPS and d >= CUDA_TARGET_MIN_D else None
    return TARGETS.get((label, op))


def block_sizes_for(d: int) -> tuple[int, ...]:
    """About ten uneven blocks that sum to d (the model's tensors for Block-Sign)."""
    sizes = [max(1, int(f * d)) for f in BLOCK_FRACTIONS]
    sizes.append(d - sum(sizes))
    if sizes[-1] < 1:
        raise ValueError(f"d={d} is too small for the benchmark's block layout")
    return tuple(sizes)


def compressors_for(d: int) -> dict[str, object]:
    """The compressors under test, by label."""
    return {
        "identity": make_compressor("identity"),
        "topk-1% int32+f32": make_compressor("topk", ratio=TOPK_RATIO),
        "topk-1% varint+f16": make_compressor(
            "topk", ratio=TOPK_RATIO, value_dtype="float16", index_coding="varint"
        ),
        "blocksign": make_compressor("blocksign", block_sizes=block_sizes_for(d)),
    }


@dataclass
class Case:
    """One timed call and the samples collected for it (seconds per call)."""

    label: str
    op: str
    fn: Callable[[], object]
    inner: int = 1
    samples: list[float] | None = None

    sync: Callable[[], None] = lambda: None  # torch.cuda.synchronize on a GPU

    def calibrate(self) -> None:
        """Warm up and choose how many calls one sample holds."""
        self.fn()  # first call: lazy initialisation, page faults of first-touch buffers
        self.sync()
        t0 = time.perf_counter()
        self.fn()
        self.sync()
        one = time.perf_counter() - t0
        self.inner = max(1, min(MAX_INNER, math.ceil(MIN_SAMPLE_S / max(one, 1e-9))))
        self.samples = []

    def sample(self) -> None:
        """Time ``inner`` calls; record the mean time per call."""
        fn = self.fn
        self.sync()
        t0 = time.perf_counter()
        for _ in range(self.inner):
            fn()
        self.sync()
        self.samples.append((time.perf_counter() - t0) / self.inner)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def build_cases(d: int, seed: int, device: str = "cpu") -> list[Case]:
    """All timed calls for dimension d (inputs prepared here, outside the timings)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=gen).to(device)
    residual = (0.1 * torch.randn(d, generator=gen)).to(device)
    dst = torch.empty_like(x)
    dst.copy_(x)
    weights = aggregation_weights("uniform", [1] * N_CLIENTS)
    k = make_compressor("topk", ratio=TOPK_RATIO).k_for(d)

    cases = [
        Case("copy", "copy", lambda: dst.copy_(x)),
        Case("torch.topk", "encode", lambda: torch.topk(x.abs(), k, sorted=False)),
        # what weighted_mean allocates for its accumulator (a fresh d-sized torch tensor)
        Case("torch.zeros", "alloc", lambda: torch.zeros(d, device=device)),
    ]
    for label, comp in compressors_for(d).items():
        payload = comp.encode(x)
        data = to_bytes(payload)
        # 10 different clients: each encodes its own vector, the server parses the bytes, then aggregates.
        client_payloads = []
        for i in range(N_CLIENTS):
            xi = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1 + i))
            client_payloads.append(from_bytes(to_bytes(comp.encode(xi)), d).to(device))
            del xi
        cases += [
            Case(label, "encode", lambda c=comp: c.encode(x)),
            Case(label, "decode", lambda c=comp, p=payload: c.decode(p)),
            Case(label, "ef_step", lambda c=comp: ef_step(c, x, residual)),
            Case(label, "to_bytes", lambda p=payload: to_bytes(p)),
            Case(label, "from_bytes", lambda b=data: from_bytes(b, d)),
            Case(label, "aggregate", lambda ps=client_payloads: weighted_mean(ps, weights, d, device=device)),
        ]
        if label == "topk-1% int32+f32":
            # Reference, not library code: the same sum into an accumulator allocated once and reused
            # (zero_() each time), which separates weighted_mean's allocation of a fresh d-sized tensor.
            acc = torch.zeros(d, device=device)
            cases.append(
                Case(
                    "ref: reused accumulator",
                    "aggregate",
                    lambda ps=client_payloads, acc=acc: _accumulate(ps, weights, acc),
                )
            )
    return cases


def _accumulate(payloads, weights, out: torch.Tensor) -> torch.Tensor:
    out.zero_()
    for p, w in zip(payloads, weights, strict=True):
        p.add_to(out, w)
    return out


def run_dim(d: int, repeats: int, seed: int, device: str = "cpu") -> list[dict]:
    """Time every case for dimension d with interleaved repetitions; return one row per case."""
    cases = build_cases(d, seed, device)
    for case in cases:
        if device == "cuda":
            case.sync = torch.cuda.synchronize
        case.calibrate()
    gc.collect()
    gc.disable()
    try:
        for rep in range(repeats):
            # rotate the order so that no case always follows the same neighbour
            shift = rep % len(cases)
            for case in cases[shift:] + cases[:shift]:
                case.sample()
    finally:
        gc.enable()
    copy = next(c for c in cases if c.op == "copy")
    t_copy, t_copy_min = copy.median, min(copy.samples)
    rows = []
    for case in cases:
        t = case.median
        target = target_for(case.label, case.op, d, device)
        ratio = t_copy / t
        rows.append(
            {
                "d": d,
                "label": case.label,
                "op": case.op,
                "ms": t * 1e3,
                "gbps": 4 * d / t / 1e9,
                "ratio": ratio,
                "min_ms": min(case.samples) * 1e3,
                "ratio_min": t_copy_min / min(case.samples),
                "target": target,
                "ok": None if target is None else ratio >= target,
                "inner": case.inner,
                "spread": (max(case.samples) - min(case.samples)) / t,
            }
        )
    if device == "cuda" and d >= CUDA_TARGET_MIN_D:
        by = {(r["label"], r["op"]): r for r in rows}
        ref = by[("torch.topk", "encode")]
        for label in [r["label"] for r in rows if r["label"].startswith("topk") and r["op"] == "encode"]:
            r = by[(label, "encode")]
            factor = r["ms"] / ref["ms"]
            rows.append(
                {
                    **r,
                    "op": "encode vs torch.topk",
                    "ratio": ref["ms"] / r["ms"],
                    "ratio_min": ref["min_ms"] / r["min_ms"],
                    "target": 1 / CUDA_TOPK_FACTOR,
                    "ok": factor <= CUDA_TOPK_FACTOR,
                }
            )
    del cases
    gc.collect()
    return rows


# ----------------------------------------------------------------------------------------------- output
def machine_info() -> list[str]:
    """CPU model, cores, versions and thread counts."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    mem = "unknown"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
            mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    thp = "unknown"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().strip()
    except OSError:
        pass
    return [
        f"- CPU: {model} ({os.cpu_count()} logical cores, {usable} usable)",
        f"- RAM: {mem}; transparent huge pages: {thp}",
        f"- Python {platform.python_version()}, torch {torch.__version__} "
        f"(intra-op threads {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}), "
        f"numpy {np.__version__}",
        f"- THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '(unset)')}; "
        f"fl_compams from {os.path.dirname(fl_compams.__file__)}",
    ]


def cpu_times() -> tuple[float, float]:
    """(busy seconds of the whole machine, CPU seconds of this process) so far."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy, ru.ru_utime + ru.ru_stime


def fmt_d(d: int) -> str:
    """1e5, 1e6, 2.5e7 ..."""
    e = math.floor(math.log10(d))
    m = d / 10**e
    return f"{m:g}e{e}" if m != 1 else f"1e{e}"


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def targets_table(rows: list[dict]) -> list[str]:
    out = [
        "| target | d | time (ms) | copy (ms) | ratio t_copy/t | required | result | best-of ratio |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    copies = {r["d"]: r["ms"] for r in rows if r["op"] == "copy"}
    for r in rows:
        if r["target"] is None:
            continue
        out.append(
            f"| {r['label']} {r['op']} | {fmt_d(r['d'])} | {fmt_ms(r['ms'])} | {fmt_ms(copies[r['d']])} "
            f"| {100 * r['ratio']:.1f}% | {100 * r['target']:.0f}% | {'pass' if r['ok'] else 'MISS'} "
            f"| {100 * r['ratio_min']:.1f}% |"
        )
    return out


def summary_table(rows: list[dict]) -> list[str]:
    """One row per (d, compressor): ratio to copy of each op (compact overview)."""
    out = [
        "| d | compressor | " + " | ".join(OPS) + " | torch.topk |",
        "|---|---|" + "---:|" * (len(OPS) + 1),
    ]
    by = {(r["d"], r["label"], r["op"]): r for r in rows}
    for d in dict.fromkeys(r["d"] for r in rows):
        copy = by[(d, "copy", "copy")]
        out.append(
            f"| {fmt_d(d)} | copy | {fmt_ms(copy['ms'])} ms = {copy['gbps']:.1f} GB/s"
            + " |" * len(OPS)
            + " |"
        )
        for label in dict.fromkeys(r["label"] for r in rows if r["d"] == d and r["op"] in OPS):
            if not all((d, label, op) in by for op in OPS):
                continue  # references (torch.topk, the numpy accumulator) are in the full table
            cells = [f"{100 * by[(d, label, op)]['ratio']:.1f}%" for op in OPS]
            ref = by[(d, "torch.topk", "encode")] if label.startswith("topk") else None
            cells.append(f"{100 * ref['ratio']:.1f}%" if ref else "")
            out.append(f"| {fmt_d(d)} | {label} | " + " | ".join(cells) + " |")
    return out


def full_table(rows: list[dict]) -> list[str]:
    out = [
        "| d | compressor | op | time (ms) | GB/s | t_copy/t | best (ms) | spread | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        target = (
            "" if r["target"] is None else f">= {100 * r['target']:.0f}%: {'pass' if r['ok'] else 'MISS'}"
        )
        out.append(
            f"| {fmt_d(r['d'])} | {r['label']} | {r['op']} | {fmt_ms(r['ms'])} | {r['gbps']:.2f} "
            f"| {100 * r['ratio']:.1f}% | {fmt_ms(r['min_ms'])} | {100 * r['spread']:.0f}% | {target} |"
        )
    return out


def parse_dims(values: list[str]) -> tuple[int, ...]:
    dims = []
    for v in values:
        for part in v.split(","):
            if part.strip():
                dims.append(int(float(part)))
    return tuple(dims)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dims", nargs="+", default=None, help="vector sizes, e.g. 1e5 1e6 1e7 2.5e7 (the default)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed samples per case (median)")
    parser.add_argument("--quick", action="store_true", help="smoke run: only d = 1e5 and 1e6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the vectors live")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.quick and args.dims:
        parser.error("--quick and --dims are exclusive")
    dims = QUICK_DIMS if args.quick else parse_dims(args.dims) if args.dims else DEFAULT_DIMS
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    start = time.perf_counter()
    try:
        busy0, own0 = cpu_times()
    except (OSError, ValueError):
        busy0 = None
    print("## Machine\n")
    print("\n".join(machine_info()))
    print(f"\nCommand: `python {' '.join([os.path.relpath(sys.argv[0]), *(argv or sys.argv[1:])])}`")
    if args.device == "cuda":
        print(f"- GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    print(
        f"dims {[fmt_d(d) for d in dims]}, {args.repeats} interleaved repetitions (median), seed {args.seed}, "
        f"device {args.device}\n"
    )
    rows: list[dict] = []
    for d in dims:
        t0 = time.perf_counter()
        rows += run_dim(d, args.repeats, args.seed, args.device)
        print(f"d={fmt_d(d)} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    print(
        "## Targets (ratio = t_copy / t_op of the medians; aggregate = t_copy / t_all_10_payloads; "
        "best-of ratio uses the fastest repetition of each)\n"
    )
    print("\n".join(targets_table(rows)))
    print("\n## Ratio to copy bandwidth, all ops (t_copy / t_op)\n")
    print("\n".join(summary_table(rows)))
    print(
        "\n## All measurements (median; GB/s = 4 d bytes / time; best = fastest repetition; "
        "spread = (max - min) / median)\n"
    )
    print("\n".join(full_table(rows)))
    if busy0 is not None:
        busy1, own1 = cpu_times()
        wall = time.perf_counter() - start
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
        print(
            f"\nLoad during the run: other processes used {other:.2f} of {os.cpu_count()} cores on average "
            f"(this benchmark {(own1 - own0) / wall:.2f}); load average at the end {os.getloadavg()[0]:.2f}"
        )
    misses = sum(1 for r in rows if r["ok"] is False)
    total = sum(1 for r in rows if r["ok"] is not None)
    print(f"\n{total - misses}/{total} target checks met; benchmark took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
