#!/usr/bin/env bash
# The browser the console tests drive (tests/scenarios/test_console_browser.py): Debian's chromium and the
# chromium-driver built from the same source, so their versions always match and nothing is downloaded at
# test time. Needs root and apt (CI runs `bash scripts/setup.sh --dev` as root on Debian). Idempotent: a
# quick no-op when both are installed. Elsewhere it says what to install and exits 0 (the tests then skip).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != "0" ]; then
  echo "setup-browser: install chromium and chromium-driver (Debian/Ubuntu: apt-get install chromium chromium-driver) for the console browser tests" >&2
  exit 0
fi
echo "installing chromium and chromium-driver (apt)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
chromium --version
