#!/usr/bin/env bash
# README command 2: set up (first run only), then lint, type-check and run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not llama").
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
sp_bootstrap
cd "$SP_ROOT"
"$SP_VENV/bin/ruff" check addon tests scripts
"$SP_VENV/bin/ruff" format --check addon tests scripts
"$SP_VENV/bin/mypy"
exec "$SP_VENV/bin/python" -m pytest "$@"
