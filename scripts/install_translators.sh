#!/usr/bin/env bash
# Install the two translating routers the router end-to-end tests put in the loop, pinned:
#   claude-code-router  npm  @musistudio/claude-code-router@$CCR_VERSION  -> $ROOT/ccr/$CCR_VERSION
#   LiteLLM's proxy     PyPI litellm[proxy]==$LITELLM_VERSION, its own venv -> $ROOT/litellm/$LITELLM_VERSION
# with ROOT=${STABLEPREFIX_CACHE:-$HOME/.cache/stableprefix}. LiteLLM has heavy dependencies, so it never
# shares the project's .venv.
#
# stdout carries exactly two lines, for `eval "$(scripts/install_translators.sh)"`:
#   CCR_BIN=<path of the ccr command (a node script)>
#   LITELLM_BIN=<path of the litellm command in its venv>
# All progress goes to stderr. Re-running is a no-op once installed (well under a second).
#
# Options: --only ccr|litellm (install one; the other line is printed empty), --force (reinstall).
# Exit codes: 0 ok, 1 install failure, 2 missing prerequisites or bad usage.
set -euo pipefail

# A version bump is one of these constants.
readonly CCR_VERSION="2.0.0"
readonly LITELLM_VERSION="1.108.7"

exec 3>&1 1>&2

log() { printf '[install_translators] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

FORCE=0
ONLY=""
while (($#)); do
  case "$1" in
    --force) FORCE=1 ;;
    --only)
      shift
      [[ "${1:-}" == ccr || "${1:-}" == litellm ]] || { log "--only takes ccr or litellm"; exit 2; }
      ONLY="$1"
      ;;
    -h | --help)
      log "usage: scripts/install_translators.sh [--only ccr|litellm] [--force]  (prints CCR_BIN=, LITELLM_BIN=)"
      exit 0
      ;;
    *) log "unknown argument: $1"; exit 2 ;;
  esac
  shift
done

# shellcheck source=bootstrap.sh
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" # sp_cache_dir, sp_find_python (nothing else runs)
CACHE_BASE="$(sp_cache_dir .)" || exit 2
readonly CACHE_BASE

# Serialise concurrent installers of one router (flock when there is one).
lock() { # lock DIR
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$1/.lock"
    flock 9
  fi
}

# --- claude-code-router --------------------------------------------------------------------------------
ccr_bin() { # ccr_bin PREFIX -> path of the ccr entry, or nothing
  local cand="$1/node_modules/@musistudio/claude-code-router/dist/cli.js"
  [[ -f "$cand" ]] && { printf '%s\n' "$cand"; return 0; }
  return 1
}

ccr_ok() { # the installed package.json says the pinned version
  local pkg="$1/node_modules/@musistudio/claude-code-router/package.json"
  [[ -f "$pkg" ]] && node -e 'process.exit(require(process.argv[1]).version === process.argv[2] ? 0 : 1)' \
    "$pkg" "$CCR_VERSION"
}

install_ccr() {
  local root="$CACHE_BASE/ccr" dest work bin
  dest="$root/$CCR_VERSION"
  for tool in node npm; do
    command -v "$tool" >/dev/null 2>&1 || { log "missing prerequisite: $tool (apt-get install -y nodejs npm)"; exit 2; }
  done
  mkdir -p "$root"
  if ((!FORCE)) && ccr_ok "$dest" && bin="$(ccr_bin "$dest")"; then
    log "already installed: @musistudio/claude-code-router@$CCR_VERSION"
    CCR_BIN="$bin"
    return 0
  fi
  lock "$root"
  if ((!FORCE)) && ccr_ok "$dest" && bin="$(ccr_bin "$dest")"; then
    CCR_BIN="$bin"
    return 0
  fi
  rm -rf "$root"/.work.*
  work="$(mktemp -d "$root/.work.XXXXXX")"
  log "npm install @musistudio/claude-code-router@$CCR_VERSION"
  printf '{"name":"stableprefix-ccr","private":true}\n' >"$work/package.json"
  npm install --prefix "$work" --no-audit --no-fund --no-save --loglevel=error \
    "@musistudio/claude-code-router@$CCR_VERSION" >&2 || { rm -rf "$work"; die "npm install failed"; }
  ccr_ok "$work" || { rm -rf "$work"; die "npm did not install claude-code-router $CCR_VERSION"; }
  rm -rf "$dest"
  mv "$work" "$dest"
  CCR_BIN="$(ccr_bin "$dest")" || die "no dist/cli.js under $dest"
  log "installed @musistudio/claude-code-router@$CCR_VERSION into $dest"
}

# --- LiteLLM proxy -------------------------------------------------------------------------------------
litellm_ok() { # the venv's litellm is the pinned version and its proxy extra imports
  [[ -x "$1/bin/litellm" ]] || return 1
  "$1/bin/python" - "$LITELLM_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("litellm") == sys.argv[1]
import litellm.proxy.proxy_server  # noqa: F401  (the [proxy] extra is complete)
PY
}

install_litellm() {
  local root="$CACHE_BASE/litellm" dest work py
  dest="$root/$LITELLM_VERSION"
  mkdir -p "$root"
  if ((!FORCE)) && [[ -f "$dest/.ok" ]] && [[ -x "$dest/bin/litellm" ]]; then
    log "already installed: litellm[proxy]==$LITELLM_VERSION"
    LITELLM_BIN="$dest/bin/litellm"
    return 0
  fi
  lock "$root"
  if ((!FORCE)) && [[ -f "$dest/.ok" ]] && [[ -x "$dest/bin/litellm" ]]; then
    LITELLM_BIN="$dest/bin/litellm"
    return 0
  fi
  # The interpreter the project itself uses (bootstrap.sh's search: Python >= 3.12).
  py="$(sp_find_python)" || exit 2
  rm -rf "$root"/.work.* "$dest"
  # A venv's scripts carry its absolute path: build it in place, mark it complete last.
  log "creating a venv for litellm[proxy]==$LITELLM_VERSION with $py"
  "$py" -m venv "$dest"
  "$dest/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  "$dest/bin/python" -m pip install -q --disable-pip-version-check "litellm[proxy]==$LITELLM_VERSION" >&2 \
    || die "pip install litellm[proxy]==$LITELLM_VERSION failed"
  litellm_ok "$dest" || die "litellm $LITELLM_VERSION in $dest does not import its proxy"
  touch "$dest/.ok"
  LITELLM_BIN="$dest/bin/litellm"
  log "installed litellm[proxy]==$LITELLM_VERSION into $dest"
}

CCR_BIN=""
LITELLM_BIN=""
[[ "$ONLY" == litellm ]] || install_ccr
[[ "$ONLY" == ccr ]] || install_litellm
printf 'CCR_BIN=%s\nLITELLM_BIN=%s\n' "$CCR_BIN" "$LITELLM_BIN" >&3
