#!/usr/bin/env bash
# Creates the Python venv used by crates/airlock/tests/python_sdks.rs and
# installs the official `openai` and `anthropic` SDKs into it.
#
#   scripts/python-sdk-setup.sh
#
# The venv lives at ${AIRLOCK_SDK_VENV:-<repo>/.venv}. Running the script
# again is cheap: nothing is installed when both SDKs already import.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AIRLOCK_SDK_VENV:-$REPO/.venv}"
PY="$VENV/bin/python"

# Supported majors: openai 1.x-3.x, anthropic 0.x (>= 0.40), 1.x and 2.x.
# openai's `realtime` extra brings `websockets`, for the Realtime API case.
OPENAI_SPEC='openai[realtime]>=1.50,<4'
ANTHROPIC_SPEC='anthropic>=0.40,<3'

if [[ ! -x "$PY" ]]; then
    echo "python-sdk-setup: creating venv at $VENV" >&2
    python3 -m venv "$VENV"
fi

if "$PY" -c 'import openai, anthropic, websockets' >/dev/null 2>&1; then
    echo "python-sdk-setup: openai (with its realtime extra) and anthropic already installed in $VENV" >&2
else
    echo "python-sdk-setup: installing $OPENAI_SPEC $ANTHROPIC_SPEC into $VENV" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check "$OPENAI_SPEC" "$ANTHROPIC_SPEC"
fi

"$PY" -c 'import openai, anthropic; print("python-sdk-setup: openai", openai.__version__, "anthropic", anthropic.__version__)' >&2
