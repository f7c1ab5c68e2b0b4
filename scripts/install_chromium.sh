#!/usr/bin/env bash
# Install Debian's Chromium (and a font, so text renders) for the headless screenshot test of
# `stableprefix report --html` (tests/e2e/test_report_html_e2e.py). Idempotent: when a working
# chromium is already on PATH it only prints its version. Needs root or sudo for apt-get.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && chromium --version >/dev/null 2>&1 \
   && { fc-list 2>/dev/null | grep -qi dejavu || [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; }; then
  echo "stableprefix: $(chromium --version 2>/dev/null) already installed at $(command -v chromium)" >&2
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "stableprefix: need root (or sudo) to apt-get install chromium" >&2
    exit 1
  fi
fi

echo "stableprefix: installing Debian's chromium with apt-get" >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  chromium fonts-dejavu-core >/dev/null
echo "stableprefix: $(chromium --version 2>/dev/null) installed at $(command -v chromium)" >&2
