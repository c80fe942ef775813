#!/usr/bin/env bash
# Set up the project on this machine, then run the system or the tests.
#   bash deploy/local.sh up [forecast up options]   # everything on embedded defaults
#   bash deploy/local.sh test [pytest options]      # lint, import contracts, the test suite
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  local want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "installing dependencies (torch CPU first)" >&2
    "$VENV/bin/pip" install -q --upgrade pip
    # The pinned CPU build first: an unpinned torch would pull several GB of CUDA wheels.
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q -e '.[test]'
    echo "$want" > "$STAMP"
  fi
}

test_tools() {
  # Debian's Chromium drives the dashboard test (headless); promtool (Debian's prometheus
  # package) checks the metrics endpoints and the alert rules.
  if command -v chromium >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    return
  fi
  echo "installing Debian packages for the tests (chromium, prometheus)" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  export DEBIAN_FRONTEND=noninteractive
  command -v chromium >/dev/null 2>&1 || $SUDO apt-get install -y -qq chromium >/dev/null
  command -v promtool >/dev/null 2>&1 ||
    $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}

case "${1:-}" in
  up)
    shift
    setup
    exec "$VENV/bin/forecast" up "$@"
    ;;
  test)
    shift
    setup
    test_tools
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/lint-imports"  # the one-way layers (pyproject.toml, [tool.importlinter])
    # Line coverage on request: `bash deploy/local.sh test --cov --cov-report=term`
    # (pyproject.toml, [tool.coverage.*]; the processes the tests start included). It
    # doubles the CPU of every process, so the default run goes without it.
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: bash deploy/local.sh up [options] | test [pytest options]" >&2
    exit 2
    ;;
esac
