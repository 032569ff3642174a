"""Per-round cost of ResNet-18 on CIFAR-10-shaped data: client step, EF compression, server step, bytes.

Times, on the CPU and on random 3x32x32 inputs (the cost does not depend on the pixels):

* ``client fwd+bwd``  one local step of the ClientApp's training loop (``tasks.training.local_update``, H = 1:
  forward and backward of one minibatch in train mode, BatchNorm statistics updated)
* ``EF step <C>``     ``worker_end``: ``payload = C(u + e)``, ``e' = u + e - decode(payload)``, ``to_bytes``
* ``server step <C>`` the server's round for ``--clients`` replies: ``from_bytes`` of every payload,
  ``server_step`` (bound, weighted mean, AMSGrad) and the clients' BatchNorm buffers (checked by
  ``strategies.validate.buffers_reply``, then averaged; also timed alone)

and reports the bytes of one round per client: the payload, the buffers record and the whole reply as Flower
serialises them (``strategies.wire.wire_bytes``), the dense broadcast, and the theory bits. Prints the machine
load it ran under (other processes' CPU share), as ``bench_core.py`` does.

    .venv/bin/python benchmarks/bench_resnet.py                  # batch 32, 10 clients, 3 repeats (minutes)
    .venv/bin/python benchmarks/bench_resnet.py --model digits-bn-cnn --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_core import cpu_times, machine_info

from fl_compams import ParamSpec, buffers, flatten, parse_config, protocol
from fl_compams.aggregate import aggregation_weights
from fl_compams.algorithm import ServerReply, WorkerState, server_step, worker_end
from fl_compams.codec import from_bytes
from fl_compams.config import build_algorithm
from fl_compams.server import init_server_state
from strategies import validate
from strategies.wire import wire_bytes
from tasks.models import build_model
from tasks.training import local_update

COMPRESSORS = {
    "topk 1%": {"compressor": "topk", "topk-ratio": 0.01},
    "blocksign": {"compressor": "blocksign"},
}


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (after one warm-up call) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def shape_for(model: str) -> tuple[int, ...]:
    return (1, 8, 8) if model.startswith("digits") else (3, 32, 32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a model with buffers (resnet18, digits-bn-cnn)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--clients", type=int, default=10, help="replies the server step aggregates")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per case (median)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.batch_size, args.clients, args.repeats) < 1:
        parser.error("--batch-size, --clients and --repeats must be >= 1")

    start = time.perf_counter()
    busy0, own0 = cpu_times()
    print("## Machine\n")
    print("\n".join(machine_info()))
    print(f"\nCommand: `python {' '.join([os.path.relpath(sys.argv[0]), *(argv or sys.argv[1:])])}`\n")

    shape = shape_for(args.model)
    model = build_model(args.model, 10, shape, seed=args.seed)
    spec = ParamSpec.from_module(model)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size * 4, *shape, generator=gen)
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    print(
        f"Model {args.model}: d = {spec.dim:,} trainable, {spec.buffer_dim:,} buffer values; batch {args.batch_size}"
    )

    def client_step():
        return local_update(
            model,
            x,
            y,
            steps=1,
            lr=0.05,
            batch_size=args.batch_size,
            generator=torch.Generator().manual_seed(1),
        )

    t_client, (update, _) = timed(client_step, args.repeats)
    rows = [("client fwd+bwd (one minibatch)", t_client)]
    sd = model.state_dict()
    buffer_set = {n: sd[n].detach().clone() for n in spec.buffer_names}
    # as the ClientApp sends them (clients.model_buffers): one float32 and one int64 vector
    buffer_record = ArrayRecord({k: Array(t.numpy()) for k, t in buffers.pack(spec, buffer_set).items()})
    reply_buffers = RecordDict({protocol.BUFFERS: buffer_record})
    weights = aggregation_weights("num-examples", [100] * args.clients)

    def buffer_round():
        sets = [validate.buffers_reply(reply_buffers, spec, expected=True) for _ in range(args.clients)]
        return buffers.average(spec, sets, weights)

    t_buffers, _ = timed(buffer_round, args.repeats)
    rows.append(
        (f"server: check and average {args.clients} buffer sets (in the server steps below)", t_buffers)
    )
    dense = RecordDict({protocol.ARRAYS: ArrayRecord({k: v.detach().contiguous() for k, v in sd.items()})})
    byte_rows = []
    for label, settings in COMPRESSORS.items():
        cfg = parse_config({**settings, "update-norm-bound": "off", "seed": args.seed})
        algorithm = build_algorithm(cfg, spec.block_sizes)
        worker = WorkerState(residual=torch.zeros(spec.dim))
        t_ef, (reply, _) = timed(
            lambda a=algorithm, w=worker: worker_end(a, w, update, round=1), args.repeats
        )
        rows.append((f"EF step {label} (C(u + e), residual, to_bytes)", t_ef))
        # the server's round: every client's bytes (perturbed updates so the payloads differ)
        datas = []
        for i in range(args.clients):
            u = update + 0.01 * torch.randn(spec.dim, generator=torch.Generator().manual_seed(100 + i))
            datas.append(worker_end(algorithm, worker, u, round=1)[0].payload)
        state = init_server_state(
            flatten(sd, spec), algorithm.server_opt, buffers=flatten(sd, spec, trainable=False)
        )
        kind = algorithm.compressor.kind

        def server_round(a=algorithm, s=state, ds=datas, k=kind):
            replies = [
                ServerReply(
                    f"partition-{i}",
                    1,
                    from_bytes(d, spec.dim, expected_kind=k, block_sizes=spec.block_sizes),
                    100,
                )
                for i, d in enumerate(ds)
            ]
            new, _ = server_step(a, s, 1, replies)
            return new, buffer_round()

        t_server, _ = timed(server_round, args.repeats)
        rows.append((f"server step {label} ({args.clients} replies + buffer average)", t_server))
        content = RecordDict(
            {
                protocol.PAYLOAD: ConfigRecord(
                    {protocol.PAYLOAD_BYTES: reply.payload, protocol.REPLY_ROUND: 1}
                ),
                protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 100, protocol.TRAIN_LOSS: 1.0}),
                protocol.BUFFERS: buffer_record,
            }
        )
        without = RecordDict({k: v for k, v in content.items() if k != protocol.BUFFERS})
        byte_rows.append(
            (
                label,
                len(reply.payload),
                wire_bytes(content) - wire_bytes(without),
                wire_bytes(content),
                algorithm.compressor.theory_bits(spec.dim) / 8,
                buffers.theory_bits(spec) / 8,
            )
        )

    print("\n## Time per operation (median of", args.repeats, "after one warm-up)\n")
    print("| operation | ms |\n|---|---:|")
    for name, t in rows:
        print(f"| {name} | {1000 * t:,.1f} |")
    print("\n## Bytes per client per round (uplink measured as Flower serialises the reply)\n")
    print("| compressor | payload | buffers record | whole reply | theory: payload | theory: buffers |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, payload, buf, whole, theory, theory_buf in byte_rows:
        print(f"| {label} | {payload:,} | {buf:,} | {whole:,} | {theory:,.0f} | {theory_buf:,.0f} |")
    print(
        f"\nDownlink (dense model with buffers, one instruction's arrays): {wire_bytes(dense):,} bytes per client"
    )
    busy1, own1 = cpu_times()
    wall = time.perf_counter() - start
    other = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    print(
        f"\nLoad during the run: other processes used {other:.2f} of {os.cpu_count()} cores on average "
        f"(this benchmark {(own1 - own0) / wall:.2f}); load average at the end {os.getloadavg()[0]:.2f}; "
        f"took {wall:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
