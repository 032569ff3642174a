#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (see README "GPU"): the CUDA tests of the core
# and the algorithm layer, then a Flower simulation with GPU clients (Ray, 10 clients sharing one GPU) whose
# summary is printed beside a CPU-only run of the same config. Expects torch with CUDA; flwr and ray come from
# .gpu/ (built by ../shared/tools/gpu-bundle.sh) when they are not installed. Writes logs under $OUT if set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
if ! python3 -c "import flwr, ray" 2>/dev/null && [ -d .gpu ]; then
    mkdir -p .gpu/site && tar -xJf .gpu/ray-min.tar.xz -C .gpu/site \
        && python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/whl/*.whl
    export PYTHONPATH=$PWD/.gpu/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, flwr, ray; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'flwr', flwr.__version__, 'ray', ray.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/core tests/clients tests/strategies tests/tasks 2>&1 | tee "$OUT/pytest-gpu.log" | tail -5
python3 benchmarks/bench_core.py --device cuda --dims 1e7 2.5e7 --repeats 5 > "$OUT/bench-core-cuda.md" 2>&1; tail -3 "$OUT/bench-core-cuda.md"
PYTHONUNBUFFERED=1 python3 - <<'PY' 2>&1 | tee "$OUT/sim-gpu.log" | grep -v -E "WARNING|INFO|^\s*$" | tail -20
import json, os, time
from simulations.runner import run_experiment
from strategies.results import read_metrics

out = os.environ.get("OUT", "/tmp")
for name, gpus in (("gpu-clients", 0.1), ("cpu-clients", 0.0)):
    over = {"out-dir": out, "run-name": name, "num-server-rounds": 30, "device": "cuda" if gpus else "cpu"}
    t0 = time.perf_counter()
    rows = read_metrics(run_experiment(over, num_supernodes=10, num_cpus=1, num_gpus=gpus))
    last = rows[-1]
    print(json.dumps({"run": name, "rounds": last["round"], "accuracy": round(last["accuracy"], 4),
                      "uplink_bytes_per_client": last["uplink_bytes_per_client"],
                      "clients_failed": sum(r["clients_failed"] for r in rows),
                      "wall_s": round(time.perf_counter() - t0, 1)}))
PY
