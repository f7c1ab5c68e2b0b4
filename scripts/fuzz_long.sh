#!/usr/bin/env bash
# The long fuzzing run: every property of tests/test_properties.py with 10,000 examples per property and
# request shape (HYPOTHESIS_PROFILE=long), with Hypothesis statistics. Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
sp_bootstrap
cd "$SP_ROOT"
start=$(date +%s)
HYPOTHESIS_PROFILE=long "$SP_VENV/bin/python" -m pytest tests/test_properties.py -p no:cacheprovider --timeout=0 \
  --hypothesis-show-statistics -q "$@"
echo "fuzz_long: $(( $(date +%s) - start )) s"
