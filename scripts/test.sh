#!/usr/bin/env bash
# The test command (README command 2, and what .ci/run calls): install if needed, then pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/install.sh
exec "${RL_SERVICE_VENV:-$root/.venv}/bin/python" -m pytest "$@"
