#!/usr/bin/env bash
# The qawatch GitHub Action's setup steps (see action.yml at the repository root).
#
#   setup.sh detect    which Python to use. Outputs `python` (a command, or empty) and
#                      `setup-python` (the version actions/setup-python should install, or empty).
#   setup.sh install   a virtual environment under $RUNNER_TEMP with qawatch in it.
#                      Outputs `python` and `qawatch` (paths in that environment).
#
# Every value comes from the environment, never from ${{ }} in the YAML:
#   INPUT_PYTHON   detect: empty = the runner's python3 if it is 3.11 or newer (with venv), else
#                  setup-python installs 3.12; a version ("3.12") = always setup-python with it
#   PYTHON         install: the interpreter to create the environment with
#   INPUT_INSTALL  install: what pip installs; empty = this action's own checkout
#   GITHUB_ACTION_PATH, RUNNER_TEMP, GITHUB_OUTPUT: set by the runner
set -euo pipefail

output() {
  # one single-line output (every value here is a path or a version)
  if [[ -n "${GITHUB_OUTPUT:-}" ]]; then
    printf '%s=%s\n' "$1" "$2" >>"$GITHUB_OUTPUT"
  else
    printf '%s=%s\n' "$1" "$2"
  fi
}

usable_python() {
  # 3.11 or newer, and able to make a virtual environment with pip (Debian splits venv off)
  "$1" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

do_detect() {
  local wanted="${INPUT_PYTHON:-}"
  if [[ -n "$wanted" ]]; then
    echo "qawatch: Python ${wanted} from actions/setup-python (input python)"
    output python ""
    output setup-python "$wanted"
    return
  fi
  local candidate
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && usable_python "$candidate"; then
      echo "qawatch: using the runner's $("$candidate" --version 2>&1) ($(command -v "$candidate"))"
      output python "$candidate"
      output setup-python ""
      return
    fi
  done
  echo "qawatch: no Python 3.11+ with venv on the runner; installing 3.12 with actions/setup-python"
  output python ""
  output setup-python "3.12"
}

do_install() {
  local python="${PYTHON:-}"
  if [[ -z "$python" ]]; then
    echo "::error title=qawatch::no Python to install qawatch with" >&2
    exit 2
  fi
  local source="${INPUT_INSTALL:-}"
  if [[ -z "$source" ]]; then
    source="${GITHUB_ACTION_PATH:?GITHUB_ACTION_PATH is not set}"
  fi
  local temp="${RUNNER_TEMP:-${TMPDIR:-/tmp}}"
  # one environment per (interpreter, source): a second use of the action in a job reuses it
  local key
  key="$(printf '%s\n%s\n' "$(command -v "$python" || printf '%s' "$python")" "$source" \
    | "$python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')"
  local venv="${temp}/qawatch-venv-${key}"
  if [[ -f "${venv}/.installed" ]]; then
    echo "qawatch: reusing ${venv}"
  else
    rm -rf -- "$venv"
    "$python" -m venv -- "$venv"
  fi
  local bin="${venv}/bin" exe=""
  if [[ ! -d "$bin" && -d "${venv}/Scripts" ]]; then
    bin="${venv}/Scripts" exe=".exe"  # Windows
  fi
  if [[ ! -f "${venv}/.installed" ]]; then
    echo "qawatch: pip install ${source}"
    "${bin}/python${exe}" -m pip install --quiet --disable-pip-version-check -- "$source"
    touch -- "${venv}/.installed"
  fi
  "${bin}/qawatch${exe}" --version
  output python "${bin}/python${exe}"
  output qawatch "${bin}/qawatch${exe}"
}

case "${1:-}" in
  detect) do_detect ;;
  install) do_install ;;
  *)
    echo "usage: setup.sh detect|install" >&2
    exit 2
    ;;
esac
