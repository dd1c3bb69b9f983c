#!/usr/bin/env bash
# The whole test suite: one command, the same locally and in CI.
#   scripts/test.sh            # everything
#   scripts/test.sh -p airlock-core   # extra args go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

# The official OpenAI and Anthropic Python SDKs, for the SDK end-to-end test.
scripts/python-sdk-setup.sh

# Build once; every test binary and the `airlock` binary share this build.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked "$@"
