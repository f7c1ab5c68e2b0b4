#!/usr/bin/env bash
# Find a Python >= 3.12 (mitmproxy 12 needs it), create .venv with it and install the project into it.
# Sourced by the other scripts; safe to run alone. Idempotent: a second run only checks.
# Override the interpreter with STABLEPREFIX_PYTHON=/path/to/python3.12.
set -euo pipefail

SP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SP_VENV="${STABLEPREFIX_VENV:-$SP_ROOT/.venv}"

sp_ok_python() { # prints the path when $1 is a Python >= 3.12 with venv support
  local exe="$1"
  [ -n "$exe" ] && [ -x "$exe" ] || return 1
  "$exe" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null || return 1
  echo "$exe"
}

sp_find_python() {
  local c
  for c in "${STABLEPREFIX_PYTHON:-}" \
           "$(command -v python3.13 || true)" "$(command -v python3.12 || true)" \
           $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python 2>/dev/null | sort -rV) \
           $(ls -d /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9] 2>/dev/null) \
           "$(command -v python3 || true)"; do
    sp_ok_python "$c" && return 0
  done
  echo "stableprefix: no Python >= 3.12 found (mitmproxy 12 needs it)." >&2
  echo "  Install one (pyenv install 3.12, or apt-get install python3.12) or set STABLEPREFIX_PYTHON." >&2
  return 1
}

sp_cache_dir() { # sp_cache_dir SUB: creates ${STABLEPREFIX_CACHE:-$HOME/.cache/stableprefix}/SUB, prints its real path
  local base
  if [ -n "${STABLEPREFIX_CACHE:-}" ]; then
    base="$STABLEPREFIX_CACHE"
  elif [ -n "${HOME:-}" ]; then
    base="$HOME/.cache/stableprefix"
  else
    echo "stableprefix: neither STABLEPREFIX_CACHE nor HOME is set" >&2
    return 2
  fi
  mkdir -p "$base/$1" && (cd "$base/$1" && pwd -P)
}

sp_bootstrap() {
  local stamp="$SP_VENV/.stableprefix-installed" want
  want="$(cat "$SP_ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
  if [ -x "$SP_VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$SP_VENV/bin/python" ]; then
    local py
    py="$(sp_find_python)"
    echo "stableprefix: creating $SP_VENV with $py ($("$py" --version 2>&1))" >&2
    "$py" -m venv "$SP_VENV"
  fi
  echo "stableprefix: installing the project into $SP_VENV" >&2
  "$SP_VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  "$SP_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$SP_ROOT[dev]" >&2
  echo "$want" > "$stamp"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  sp_bootstrap
  echo "$SP_VENV/bin/python"
fi
