#!/usr/bin/env bash
# Install the real Claude Code CLI, pinned, from the npm registry, for stableprefix's end-to-end tests
# and the real-client benchmark.
#
#   npm install @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION
# into $ROOT/$CLAUDE_CODE_VERSION, ROOT=${STABLEPREFIX_CACHE:-$HOME/.cache/stableprefix}/claude-code.
# npm picks the platform package (e.g. @anthropic-ai/claude-code-linux-x64, a ~400 MB native binary).
#
# stdout carries exactly one line, for `eval "$(scripts/install_claude_code.sh)"`:
#   CLAUDE_BIN=<path of the native binary, or the wrapper's bin when there is no platform package>
# All progress goes to stderr. Re-running is a no-op once installed.
#
# Exit codes: 0 ok, 1 install failure, 2 missing prerequisites or bad usage.
set -euo pipefail

# A version bump is this one constant.
readonly CLAUDE_CODE_VERSION="2.1.332"
readonly PACKAGE="@anthropic-ai/claude-code"

exec 3>&1 1>&2

log() { printf '[install_claude_code] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

FORCE=0
while (($#)); do
  case "$1" in
    --force) FORCE=1 ;;
    -h | --help)
      log "usage: scripts/install_claude_code.sh [--force]  (prints CLAUDE_BIN=<path>)"
      exit 0
      ;;
    *) log "unknown argument: $1"; exit 2 ;;
  esac
  shift
done

# shellcheck source=bootstrap.sh
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" # sp_cache_dir, sp_find_python (nothing else runs)
ROOT="$(sp_cache_dir claude-code)" || exit 2
readonly ROOT
readonly DEST="$ROOT/$CLAUDE_CODE_VERSION"

# The binary npm installed: the platform package's native binary when there is one, else the wrapper's bin.
find_bin() { # find_bin PREFIX -> path or nothing
  local nm="$1/node_modules/@anthropic-ai" cand
  for cand in "$nm"/claude-code-*/claude; do
    [[ -x "$cand" ]] && { printf '%s\n' "$cand"; return 0; }
  done
  cand="$1/node_modules/.bin/claude"
  [[ -x "$cand" ]] && { printf '%s\n' "$cand"; return 0; }
  return 1
}

bin_ok() { # bin_ok PATH: runs and reports the pinned version
  local out
  out="$(HOME="$ROOT/.home" timeout 60 "$1" --version 2>/dev/null)" || return 1
  [[ "$out" == "$CLAUDE_CODE_VERSION"* ]]
}

emit() { printf 'CLAUDE_BIN=%s\n' "$1" >&3; }

if ((!FORCE)) && bin="$(find_bin "$DEST")" && bin_ok "$bin"; then
  log "already installed: $PACKAGE@$CLAUDE_CODE_VERSION"
  emit "$bin"
  exit 0
fi

for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || {
    log "missing prerequisite: $tool (e.g. apt-get install -y nodejs npm)"
    exit 2
  }
done
mkdir -p "$ROOT/.home"

# Serialise concurrent installers.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$ROOT/.lock"
  flock 9
  if ((!FORCE)) && bin="$(find_bin "$DEST")" && bin_ok "$bin"; then
    log "installed by a concurrent run"
    emit "$bin"
    exit 0
  fi
  rm -rf "$ROOT"/.work.*
fi

# Install into a work dir, then rename it into place: a reader never sees a partial install.
WORK="$(mktemp -d "$ROOT/.work.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
log "npm install $PACKAGE@$CLAUDE_CODE_VERSION (the native binary is ~400 MB)"
printf '{"name":"stableprefix-claude-code","private":true}\n' >"$WORK/package.json"
npm install --prefix "$WORK" --no-audit --no-fund --no-save --loglevel=error \
  "$PACKAGE@$CLAUDE_CODE_VERSION" >&2 || die "npm install $PACKAGE@$CLAUDE_CODE_VERSION failed"
bin="$(find_bin "$WORK")" || die "npm installed no claude binary under $WORK/node_modules"
bin_ok "$bin" || die "$bin --version does not report $CLAUDE_CODE_VERSION"

rm -rf "$DEST"
mv "$WORK" "$DEST"
trap - EXIT
bin="$(find_bin "$DEST")" || die "no claude binary under $DEST after the move"
bin_ok "$bin" || die "$bin --version does not report $CLAUDE_CODE_VERSION after the move"
log "installed $PACKAGE@$CLAUDE_CODE_VERSION into $DEST"
emit "$bin"
