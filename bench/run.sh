#!/usr/bin/env bash
# The airlock load benchmark, in one command (works from any directory):
#
#   bench/run.sh                    # defaults: 5s per load run, a few minutes in all
#   bench/run.sh --duration 10s     # any further options go to bench-run (--help)
#   BENCH_NICE=-10 bench/run.sh     # run the benchmark above other jobs' priority
#
# Installs wrk and nginx from Debian's packages if they are missing, builds
# airlock and the bench crate in release mode, then runs direct / nginx /
# airlock (audit on) / airlock (audit off) side by side on loopback. The
# report is printed and written to bench/results.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

missing=()
have wrk || missing+=(wrk)
have nginx || missing+=(nginx-light)
if ((${#missing[@]})); then
    echo "[bench] installing ${missing[*]}" >&2
    # nginx-light is the smallest build; fall back to the full one.
    if ! install_packages "${missing[@]}"; then
        install_packages "${missing[@]/nginx-light/nginx}"
    fi
fi

echo "[bench] building airlock and airlock-bench (release)" >&2
cargo build --release --locked -p airlock -p airlock-bench

# On a machine shared with other jobs, BENCH_NICE=-10 (as root) gives the
# benchmark's processes priority over them; the report records the value.
PRIORITY=()
if [ -n "${BENCH_NICE:-}" ]; then
    PRIORITY=(nice -n "$BENCH_NICE")
fi

# PostgreSQL next to SQLite: a fresh database when a server answers at
# BENCH_PG (default the local one); the peer is left out otherwise.
PG_ARGS=()
BENCH_PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
if command -v psql >/dev/null 2>&1 && psql "$BENCH_PG/postgres" -qc 'SELECT 1' >/dev/null 2>&1; then
    psql "$BENCH_PG/postgres" -qc 'DROP DATABASE IF EXISTS airlock_bench' >/dev/null
    psql "$BENCH_PG/postgres" -qc 'CREATE DATABASE airlock_bench' >/dev/null
    PG_ARGS=(--postgres-url "$BENCH_PG/airlock_bench")
else
    echo "[bench] no PostgreSQL at $BENCH_PG: the PostgreSQL peer is left out" >&2
fi

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
exec "${PRIORITY[@]}" "$TARGET_DIR/release/bench-run" \
    "${PG_ARGS[@]}" \
    --root "$ROOT" \
    --out "$ROOT/bench/results.md" \
    --airlock-bin "$TARGET_DIR/release/airlock" \
    --mock-bin "$TARGET_DIR/release/bench-mock" \
    "$@"
