#!/usr/bin/env bash
# README command 1: set up (first run only) and replay the embedded Claude-Code-shaped session
# through real mitmdump with and without the addon.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
sp_bootstrap
exec "$SP_VENV/bin/stableprefix" demo "$@"
