# Bounded waits for the commands of docs/deployment.md: `source scripts/waits.sh`, then
#   wait_until SECONDS WHAT LOG COMMAND [ARGS ...]   until COMMAND succeeds (checked every second)
#   wait_exit SECONDS WHAT LOG PID                   until process PID has exited
# Each gives up after SECONDS with one line on stderr naming the process (WHAT) and its log, and returns 1
# (it never exits: sourced into an interactive shell it leaves that shell open).

wait_until() {
    local seconds=$1 what=$2 log=$3 i
    shift 3
    for ((i = 0; i < seconds; i++)); do
        "$@" > /dev/null 2>&1 && return 0
        sleep 1
    done
    echo "$what: not ready after $seconds s (waited for: $*); see $log" >&2
    return 1
}

wait_exit() {
    local seconds=$1 what=$2 log=$3 pid=$4 i
    for ((i = 0; i < seconds; i++)); do
        kill -0 "$pid" 2> /dev/null || return 0
        sleep 1
    done
    echo "$what (pid $pid): still running after $seconds s; see $log" >&2
    return 1
}
