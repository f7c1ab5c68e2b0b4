#!/usr/bin/env bash
# Install the two cache-aware LLM routers the team-gateway test and benchmark put behind stableprefix:
#   sglang-router (SGLang Model Gateway; policies random, round_robin, cache_aware, power_of_two, manual)
#   vllm-router   (vLLM router; adds consistent_hash on the X-Session-ID header, kv_aware, ...)
# each from PyPI (pinned, transitive dependencies pinned too) into its own venv under
#   ${STABLEPREFIX_CACHE:-$HOME/.cache/stableprefix}/routers/<name>-<version>
# with the project's Python >= 3.12 (scripts/bootstrap.sh's sp_find_python; override: STABLEPREFIX_PYTHON).
#
# stdout carries exactly two lines, for `eval "$(bash scripts/install_routers.sh)"`:
#   SGLANG_ROUTER=<path>
#   VLLM_ROUTER=<path>
# All progress goes to stderr. Re-running is a no-op (well under a second) once installed.
#
# Exit codes: 0 ok, 1 install failure, 2 bad usage or no suitable Python.
set -euo pipefail

readonly SGLANG_ROUTER_VERSION="0.3.2"
readonly VLLM_ROUTER_VERSION="0.1.17"
readonly STAMP_FORMAT="1"
# The dependency set both wheels resolved to when pinned (pip freeze, Python 3.13, 2026); a change here
# reinstalls. Both routers are Rust binaries in abi3 wheels; these are their small Python launchers' needs.
readonly CONSTRAINTS="aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
attrs==26.1.0
certifi==2026.10.19.post1
charset-normalizer==3.5.3
click==8.5.1
fastapi==0.165.0
frozenlist==1.8.0
h11==0.16.0
idna==3.20
multidict==7.2.1
opentelemetry-api==1.45.2
orjson==3.13.0
propcache==0.5.4
pydantic==2.14.4
pydantic_core==2.50.5
requests==2.34.2
setproctitle==1.3.8
starlette==1.10.0
typing-inspection==0.4.5
typing_extensions==4.16.0
urllib3==2.8.0
uvicorn==0.55.0
yarl==1.25.1"

exec 3>&1 1>&2 # fd 3 is the real stdout; everything else goes to stderr

log() { printf '[install_routers] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
  cat >&2 <<'EOF'
Usage: scripts/install_routers.sh [--force] [-h|--help]

Installs sglang-router and vllm-router (pinned, from PyPI) into their own venvs under
${STABLEPREFIX_CACHE:-$HOME/.cache/stableprefix}/routers and prints
  SGLANG_ROUTER=<path>
  VLLM_ROUTER=<path>
on stdout. Re-running is a no-op once installed.

  --force   reinstall both
Environment:
  STABLEPREFIX_CACHE    cache root (default $HOME/.cache/stableprefix)
  STABLEPREFIX_PYTHON   the Python (>= 3.12) to build the venvs with
EOF
}

FORCE=0
while (($#)); do
  case "$1" in
    --force) FORCE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) log "unknown argument: $1"; usage; exit 2 ;;
  esac
  shift
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=bootstrap.sh
source "$HERE/bootstrap.sh" # defines sp_find_python (does nothing else when sourced)

ROOT="$(sp_cache_dir routers)" || exit 2
readonly ROOT

constraints_hash() { printf '%s\n' "$CONSTRAINTS" | sha256sum | cut -c1-16; }

venv_dir() { printf '%s/%s-%s' "$ROOT" "$1" "$2"; } # NAME VERSION
want_key() { printf 'format=%s %s==%s constraints=%s' "$STAMP_FORMAT" "$1" "$2" "$(constraints_hash)"; }

installed_ok() { # NAME VERSION EXE
  local dir
  dir="$(venv_dir "$1" "$2")"
  [[ -x "$dir/bin/$3" && -x "$dir/bin/python" ]] || return 1
  [[ "$(cat "$dir/.stableprefix-stamp" 2>/dev/null)" == "$(want_key "$1" "$2")" ]] || return 1
  "$dir/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null
}

install_one() { # NAME VERSION EXE MODULE
  local name="$1" version="$2" exe="$3" module="$4" dir py cons
  dir="$(venv_dir "$name" "$version")"
  if ((!FORCE)) && installed_ok "$name" "$version" "$exe"; then
    log "$name $version already installed"
    return 0
  fi
  py="$(sp_find_python)" || exit 2
  log "installing $name==$version into $dir with $py ($("$py" --version 2>&1))"
  rm -rf "$dir" # a venv is not relocatable: build in place; the stamp, written last, marks it complete
  "$py" -m venv "$dir"
  cons="$(mktemp)"
  printf '%s\n' "$CONSTRAINTS" >"$cons"
  if ! "$dir/bin/python" -m pip install -q --disable-pip-version-check --no-input \
    -c "$cons" "$name==$version" >&2; then
    rm -f "$cons"
    rm -rf "$dir"
    die "pip install $name==$version failed (is PyPI reachable? check pip's index settings)"
  fi
  rm -f "$cons"
  [[ -x "$dir/bin/$exe" ]] || die "$name installed but $dir/bin/$exe is missing"
  "$dir/bin/python" -c "import $module" || die "$name installed but 'import $module' fails"
  want_key "$name" "$version" >"$dir/.stableprefix-stamp"
  log "installed $name $version"
}

emit() {
  printf 'SGLANG_ROUTER=%s/bin/sglang-router\nVLLM_ROUTER=%s/bin/vllm-router\n' \
    "$(venv_dir sglang-router "$SGLANG_ROUTER_VERSION")" "$(venv_dir vllm-router "$VLLM_ROUTER_VERSION")" >&3
}

all_ok() {
  installed_ok sglang-router "$SGLANG_ROUTER_VERSION" sglang-router &&
    installed_ok vllm-router "$VLLM_ROUTER_VERSION" vllm-router
}

if ((!FORCE)) && all_ok; then
  log "already installed (sglang-router $SGLANG_ROUTER_VERSION, vllm-router $VLLM_ROUTER_VERSION)"
  emit
  exit 0
fi

if command -v flock >/dev/null 2>&1; then # serialise concurrent installers
  exec 9>"$ROOT/.lock"
  if ! flock -n 9; then
    log "another installer holds $ROOT/.lock; waiting for it"
    flock 9
  fi
fi

install_one sglang-router "$SGLANG_ROUTER_VERSION" sglang-router sglang_router.sglang_router_rs
install_one vllm-router "$VLLM_ROUTER_VERSION" vllm-router vllm_router_rs
all_ok || die "installed routers failed their check"
emit
