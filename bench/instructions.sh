#!/usr/bin/env bash
# Instructions per proxied call, counted by valgrind's callgrind: a figure
# that moves far less than wall-clock ones with what else the machine is
# doing, for comparing two commits on a shared or virtual machine where
# load runs vary by 10-20 %.
#
#   bench/instructions.sh                  # audit off, then on: 10 s each at c=8
#   BENCH_SECONDS=20 bench/instructions.sh
#
# airlock (release build) runs under callgrind in front of the bench mock;
# wrk sends small JSON POSTs over 8 connections, 4 s to warm up, then the
# counters are zeroed and BENCH_SECONDS measured. The figure is airlock's
# user-space instructions (all threads) divided by the calls answered.
# valgrind serialises airlock's threads, so the figure shifts a little with
# the call rate (a few percent when other jobs take the CPU): compare runs
# of this script made on a quiet machine. Profiles are kept in
# target/callgrind/ (`callgrind_annotate --inclusive=yes FILE`).
#
# Then the system calls per call at c=1 (strace -c, audit off and on):
# the kernel's part of a call, which callgrind does not count.
#
#   BENCH_BIN_DIR=/tmp/old/target/release bench/instructions.sh
#                                          # another build's binaries, no build
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A relative BENCH_BIN_DIR names a directory from where the script was run.
if [ -n "${BENCH_BIN_DIR:-}" ]; then BENCH_BIN_DIR="$(cd "$BENCH_BIN_DIR" && pwd)"; fi
cd "$ROOT"

SECONDS_MEASURED="${BENCH_SECONDS:-10}"
KEY="sk-bench-real-key-0123456789"
ADMIN_TOKEN="adm_bench_instructions_$$"
AUDIT_KEY="42a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f"

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

missing=()
have wrk || missing+=(wrk)
have valgrind || missing+=(valgrind)
have curl || missing+=(curl)
have strace || missing+=(strace)
if ((${#missing[@]})); then
    echo "[instructions] installing ${missing[*]}" >&2
    install_packages "${missing[@]}"
fi

if [ -n "${BENCH_BIN_DIR:-}" ]; then
    BIN="$BENCH_BIN_DIR"
else
    echo "[instructions] building airlock and airlock-bench (release)" >&2
    cargo build --release --locked -p airlock -p airlock-bench
    BIN="$ROOT/target/release"
fi
OUT="${BENCH_OUT_DIR:-$ROOT/target/callgrind}"
mkdir -p "$OUT"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Waits up to $3 seconds for a line starting with $2 in file $1; prints
# the rest of that line.
wait_for_line() {
    local file="$1" prefix="$2" limit="$3" waited=0
    while ((waited < limit * 10)); do
        if line="$(grep -m1 "$prefix" "$file" 2>/dev/null)"; then
            echo "${line#*"$prefix"}"
            return 0
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    echo "[instructions] no '$prefix' in $file after ${limit}s:" >&2
    cat "$file" >&2
    return 1
}

"$BIN/bench-mock" --listen 127.0.0.1:0 --expect-auth "Bearer $KEY" >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
MOCK_URL="$(wait_for_line "$WORK/mock.log" "listening on " 10)"

cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
done = function(summary, latency, requests)
  io.write(string.format("CALLS %d ERRORS %d\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout))
end
LUA

# The session's calls in flight above the load's concurrency, unless the
# build refuses the key (one from before it, measured with BENCH_BIN_DIR).
SESSIONS_CONF=$'[sessions]\nmax_calls_in_flight = 1024\n\n'
printf '%s' "$SESSIONS_CONF" >"$WORK/probe.toml"
"$BIN/airlock" config check --config "$WORK/probe.toml" >/dev/null 2>&1 && probe=0 || probe=$?
if [ "$probe" = 64 ]; then
    SESSIONS_CONF=""
fi

# start_airlock MODE WRAPPER...: writes MODE's config (audit off or on),
# starts airlock under WRAPPER (may be empty), waits for its listeners and
# opens a session. Sets $pid, $url and $token.
start_airlock() {
    local mode="$1"
    shift
    local dir="$WORK/$mode-$RANDOM"
    mkdir -p "$dir"
    {
        printf '[proxy]\nlisten = "127.0.0.1:0"\n\n[admin]\nlisten = "127.0.0.1:0"\n\n'
        printf '[store]\nurl = "sqlite://%s/airlock.db"\n\n' "$dir"
        printf '%s' "$SESSIONS_CONF"
        printf '[providers.mock]\nupstream = "%s"\nauth = "bearer"\ncredential = "env:BENCH_KEY"\n' "$MOCK_URL"
        printf 'env_key = "MOCK_API_KEY"\nenv_base_url = "MOCK_BASE_URL"\nbase_path = ""\n'
        if [ "$mode" = off ]; then printf '\n[audit]\nenabled = false\n'; fi
    } >"$dir/airlock.toml"
    BENCH_KEY="$KEY" AIRLOCK_ADMIN_TOKEN="$ADMIN_TOKEN" AIRLOCK_AUDIT_KEY="$AUDIT_KEY" RUST_LOG=warn \
        "$@" "$BIN/airlock" serve --config "$dir/airlock.toml" >"$dir/log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    local proxy admin
    proxy="$(wait_for_line "$dir/log" "airlock proxy listening on " 120)"
    admin="$(wait_for_line "$dir/log" "airlock admin listening on " 120)"
    token="$(curl -sf -X POST -H "Authorization: Bearer $ADMIN_TOKEN" \
        -H 'content-type: application/json' \
        -d '{"scope":[{"provider":"mock","methods":["POST"],"paths":["/v1/chat/completions"]}],"ttl_seconds":3600}' \
        "$admin/v1/sessions" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')"
    [ -n "$token" ] || { echo "[instructions] no session token" >&2; exit 1; }
    url="$proxy/mock/v1/chat/completions"
}

# load CONNECTIONS SECONDS: small JSON POSTs by wrk; sets $calls (exits on
# any error).
load() {
    local result errors
    result="$(BENCH_TOKEN="$token" wrk -t1 -c"$1" -d"$2s" -s "$WORK/post.lua" "$url")"
    calls="$(sed -n 's/^CALLS \([0-9]*\) .*/\1/p' <<<"$result")"
    errors="$(sed -n 's/^CALLS [0-9]* ERRORS \([0-9]*\)$/\1/p' <<<"$result")"
    if [ -z "$calls" ] || [ "$calls" -eq 0 ] || [ "${errors:-1}" -ne 0 ]; then
        echo "[instructions] $calls calls, ${errors:-?} errors" >&2
        echo "$result" >&2
        exit 1
    fi
}

stop_airlock() {
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

printf '%-12s %10s %16s %22s\n' "airlock" "calls" "instructions" "instructions per call"
for mode in off on; do
    profile="$OUT/audit-$mode.cg"
    rm -f "$profile"*
    start_airlock "$mode" valgrind --tool=callgrind --callgrind-out-file="$profile" --dump-instr=no
    load 8 4
    callgrind_control -z "$pid" >/dev/null 2>&1
    load 8 "$SECONDS_MEASURED"
    callgrind_control -d "$pid" >/dev/null 2>&1
    stop_airlock
    dump="$(ls -t "$profile".* | head -1)"
    total="$(sed -n 's/^summary: //p' "$dump")"
    printf '%-12s %10d %16d %22d\n' "audit $mode" "$calls" "$total" "$((total / calls))"
done
echo "[instructions] profiles: $OUT/audit-{off,on}.cg.*" >&2

# System calls per call at c=1, where each one adds to the latency: the
# kernel's share, which callgrind does not see (a timer that makes tokio
# wake its own thread costs a write and an extra epoll_wait per call, and
# nothing in user space). nginx's figure, for comparison: two recvfrom,
# two writev, two epoll_wait.
for mode in off on; do
    start_airlock "$mode"
    load 1 2
    strace -c -f -p "$pid" -o "$OUT/syscalls-audit-$mode.txt" 2>"$WORK/strace-$mode.log" &
    tracer=$!
    PIDS+=("$tracer")
    if ! wait_for_line "$WORK/strace-$mode.log" "attached" 10 >/dev/null 2>&1; then
        # kernel.yama.ptrace_scope, or a container without CAP_SYS_PTRACE.
        echo "[instructions] strace cannot attach to airlock: no system call counts" >&2
        cat "$WORK/strace-$mode.log" >&2
        break
    fi
    load 1 "$SECONDS_MEASURED"
    kill -INT "$tracer"
    wait "$tracer" 2>/dev/null || true
    stop_airlock
    printf '\naudit %s, c=1: system calls per call (%d calls; at least 0.05 per call)\n' "$mode" "$calls"
    # strace -c's columns: % time, seconds, usecs/call, calls, [errors,] name.
    awk -v calls="$calls" '$1 ~ /^[0-9.]+$/ && $NF != "total" && $4 / calls >= 0.05 {
        printf "  %-14s %6.2f\n", $NF, $4 / calls
    }' "$OUT/syscalls-audit-$mode.txt"
done
