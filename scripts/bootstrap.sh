#!/usr/bin/env bash
# Idempotent setup: a venv in .venv with the project installed (editable), and
# redis-server from the OS packages when it is missing. Fast when already done.
#   --test   also the test extras and Debian's chromium (the dashboard's browser test)
#   --bench  also wrk
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
want_test=0; want_bench=0
for a in "$@"; do case "$a" in --test) want_test=1 ;; --bench) want_bench=1; want_test=1 ;; esac; done

apt_install() {
  local pkgs=("$@")
  echo "bootstrap: installing ${pkgs[*]} from the OS packages" >&2
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo -n"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1 || {
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1 || true
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null
  }
}
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ "$want_bench" = 1 ] && ! command -v wrk >/dev/null 2>&1; then need+=(wrk); fi
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then apt_install "${need[@]}"
  else
    echo "bootstrap: please install: ${need[*]}" >&2
    if [ "$want_test" = 1 ]; then exit 1; fi
  fi
fi

# The OS browser for the dashboard's browser test, driven by Playwright; never `playwright install`
# (it downloads a browser build of its own). Missing, only that test fails, saying why.
if [ "$want_test" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1; then
    apt_install chromium || echo "bootstrap: could not install chromium; tests/edge/test_dashboard_browser.py will fail" >&2
  else
    echo "bootstrap: please install chromium (/usr/bin/chromium) for tests/edge/test_dashboard_browser.py" >&2
  fi
fi

py="${PYTHON:-python3}"
extras="."; stamp=".venv/.installed"
if [ "$want_test" = 1 ]; then extras=".[test]"; stamp=".venv/.installed-test"; fi
if [ "$want_bench" = 1 ]; then extras=".[test,bench]"; stamp=".venv/.installed-bench"; fi
if [ ! -x .venv/bin/python ]; then
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "bootstrap: Python 3.11+ is required ($py is older)" >&2; exit 1; }
  "$py" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing cibroker ($extras) into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e "$extras" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
  touch "$stamp"
fi
