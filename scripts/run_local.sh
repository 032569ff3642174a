#!/usr/bin/env bash
# Run the default COMP-AMS experiment with `flwr run .` on a local simulation SuperLink that this script
# starts (isolated FLWR_HOME, free port, no runtime dependency installation) and always stops, by PID.
# Extra arguments are passed to `flwr run` (e.g. --run-config "num-server-rounds=5").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV_BIN=${VENV_BIN:-$ROOT/.venv/bin}
NUM_SUPERNODES=${NUM_SUPERNODES:-10}
export FLWR_HOME=${FLWR_HOME:-$ROOT/.flwr}
export FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1
export PATH="$VENV_BIN:$PATH"
mkdir -p "$FLWR_HOME"
python -c 'import importlib.metadata as m; print("versions: " + ", ".join(f"{p} {m.version(p)}" for p in ("flwr", "ray", "torch")))'

RUN_NAME=${RUN_NAME:-default-$(date +%Y%m%d-%H%M%S)}
OUT_DIR=${OUT_DIR:-$ROOT/runs}
RUN_CONFIG="out-dir='$OUT_DIR' run-name='$RUN_NAME'"
# Validate pyproject's run config and every --run-config with the project's own parser before Flower starts:
# a bad key fails here in about two seconds, with the parser's message (exit code 2).
python scripts/check_run_config.py . --run-config "$RUN_CONFIG" "$@" || exit $?

PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "compams-local"

[superlink.compams-local]
address = "127.0.0.1:$PORT"
insecure = true
TOML

LOG=$FLWR_HOME/superlink.log
setsid flower-superlink --insecure --simulation --isolation subprocess --host 127.0.0.1 --port "$PORT" \
    --disable-runtime-dependency-installation >"$LOG" 2>&1 &
SUPERLINK_PID=$!
stop_superlink() { kill -TERM -- "-$SUPERLINK_PID" 2>/dev/null || true; sleep 1; kill -KILL -- "-$SUPERLINK_PID" 2>/dev/null || true; }
trap stop_superlink EXIT

# Bounded wait (60 x 0.5 s) for the SuperLink's health endpoint; say which process failed and where its log is.
for i in $(seq 1 60); do
    if python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; then break; fi
    kill -0 "$SUPERLINK_PID" 2>/dev/null || { echo "flower-superlink exited before answering; see $LOG" >&2; exit 1; }
    [ "$i" -lt 60 ] || { echo "flower-superlink did not answer on 127.0.0.1:$PORT/health within 30 s; see $LOG" >&2; exit 1; }
    sleep 0.5
done

START=$(date +%s)
flwr run . compams-local --stream \
    --federation-config "num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=1" \
    --run-config "$RUN_CONFIG" "$@"
# `flwr run` exits 0 even when the run failed: check the status and the results.
python -m simulations.report.run_status "$OUT_DIR/$RUN_NAME" --status-json "$(flwr ls compams-local --format json)" \
    --wall-s $(( $(date +%s) - START ))
