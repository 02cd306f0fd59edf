#!/usr/bin/env bash
# THE test command: `bash tests/run.sh [pytest args...]`.
#
# On a fresh Debian machine it installs what the tests need (Python packages
# from tests/requirements.txt; Debian's chromium, shellcheck and systemd when running
# as root or under CI; the npm packages pinned in tests/cli and clients/typescript),
# checks that agent_relay.py stays Python 3.8 compatible (vermin), then runs
# pytest. Already-installed things are skipped, so a second run starts testing
# within a few seconds. Exits with pytest's exit code; the last line of output
# is pytest's summary line.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
IN_CI=0
case "${CI:-}" in 1 | true | TRUE | True | yes) IN_CI=1 ;; esac

say() { printf 'run.sh: %s\n' "$*"; }
die() {
    printf 'run.sh: error: %s\n' "$*" >&2
    exit 1
}

# Debian packages are installed as root, or under CI with passwordless sudo.
SUDO=()
CAN_APT=0
if [ "$(id -u)" = 0 ]; then
    CAN_APT=1
elif [ "$IN_CI" = 1 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
    CAN_APT=1
fi
command -v apt-get >/dev/null 2>&1 || CAN_APT=0
LOG_DIR=${TMPDIR:-/tmp}

APT_UPDATED=0
# apt_install PACKAGE...: installs Debian packages when we may, else says why not.
apt_install() {
    if [ "$CAN_APT" = 0 ]; then
        say "cannot install $* (Debian package): not root or no apt-get; tests that need it will be skipped"
        return 0
    fi
    if [ "$APT_UPDATED" = 0 ]; then
        say "updating Debian package lists (apt-get update)..."
        ${SUDO[@]+"${SUDO[@]}"} apt-get update -q >"$LOG_DIR/agent-relay-apt-update.log" 2>&1 \
            || { cat "$LOG_DIR/agent-relay-apt-update.log" >&2; die "apt-get update failed"; }
        APT_UPDATED=1
    fi
    ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" \
        >"$LOG_DIR/agent-relay-apt-install.log" 2>&1 \
        || { tail -n 30 "$LOG_DIR/agent-relay-apt-install.log" >&2; die "apt-get install $* failed"; }
}

# --- Python ------------------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: the tests need Python 3.8 or newer"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 8) else 1)' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1): the tests need Python 3.8 or newer"

if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    say "installing python3-pip (Debian package)..."
    apt_install python3-pip
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON -m pip is not available; install pip for $PYTHON"
fi

# Where pip may write: a virtualenv as is; a Debian "externally managed" system
# Python needs --break-system-packages; a site-packages we cannot write needs --user.
PIP_EXTRA=()
IN_VENV=1 EXT_MANAGED=0 SITE_WRITABLE=1
read -r IN_VENV EXT_MANAGED SITE_WRITABLE < <("$PYTHON" - <<'EOF'
import os, sys, sysconfig
venv = sys.prefix != getattr(sys, "base_prefix", sys.prefix)
marker = os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")
purelib = sysconfig.get_paths()["purelib"]
print(int(venv), int(os.path.exists(marker)), int(os.access(purelib, os.W_OK)))
EOF
) || true
if [ "$IN_VENV" = 0 ]; then
    if [ "$EXT_MANAGED" = 1 ]; then PIP_EXTRA+=(--break-system-packages); fi
    if [ "$SITE_WRITABLE" = 0 ]; then PIP_EXTRA+=(--user); fi
fi

# pip is quick (about a second) when everything is already installed.
say "installing Python test packages (pip install -r tests/requirements.txt; quick when already there)..."
PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check \
    ${PIP_EXTRA[@]+"${PIP_EXTRA[@]}"} -r "$ROOT/tests/requirements.txt" \
    || die "pip install -r tests/requirements.txt failed"

# --- Debian packages -----------------------------------------------------------
# Chromium for the dashboard tests (driven by Playwright through executable_path,
# never `playwright install`), shellcheck for the installer test, systemd for
# systemd-analyze (the daemon test verifies the unit it writes; nothing is started).
if [ -x /usr/bin/chromium ]; then
    say "chromium already installed"
else
    say "installing chromium (Debian package)..."
    apt_install chromium
fi
if command -v shellcheck >/dev/null 2>&1; then
    say "shellcheck already installed"
else
    say "installing shellcheck (Debian package)..."
    apt_install shellcheck
fi
if command -v systemd-analyze >/dev/null 2>&1; then
    say "systemd-analyze already installed"
else
    say "installing systemd for systemd-analyze (Debian package)..."
    apt_install systemd
fi
if command -v tmux >/dev/null 2>&1; then
    say "tmux already installed"
else
    say "installing tmux (Debian package)..."
    apt_install tmux
fi

# --- npm packages pinned by a package-lock.json --------------------------------
# npm_stale DIR [BIN...]: true when DIR/node_modules lacks a package that DIR/package-lock.json pins (optional ones,
# such as another platform's native binary, aside), holds another version, or lacks one of the BINs.
npm_stale() {
    "$PYTHON" - "$@" <<'EOF'
import json, os, sys
d, bins = sys.argv[1], sys.argv[2:]
for path, meta in json.load(open(os.path.join(d, "package-lock.json")))["packages"].items():
    if not path or meta.get("optional"):
        continue
    try:
        have = json.load(open(os.path.join(d, path, "package.json"))).get("version")
    except (OSError, ValueError):
        have = None
    if have != meta.get("version"):
        sys.exit(0)
sys.exit(0 if not all(os.path.exists(os.path.join(d, "node_modules", ".bin", b)) for b in bins) else 1)
EOF
}
# npm_ci DIR WHAT [BIN...]: `npm ci` in DIR (exactly what its lock file pins) when npm_stale says so; true when it
# installed, false when all was in place already.
npm_ci() {
    local dir=$1 what=$2 log
    shift 2
    log=$LOG_DIR/agent-relay-npm-ci-$(basename "$dir").log
    if ! npm_stale "$dir" "$@"; then
        say "$what already installed in ${dir#"$ROOT"/}"
        return 1
    fi
    say "installing $what (npm ci in ${dir#"$ROOT"/})..."
    (cd "$dir" && npm ci --no-audit --no-fund >"$log" 2>&1) \
        || { tail -n 30 "$log" >&2; die "npm ci in ${dir#"$ROOT"/} failed"; }
    npm_stale "$dir" "$@" && die "npm ci in ${dir#"$ROOT"/} did not install what its package-lock.json pins (see $log)"
    return 0
}
if ! command -v npm >/dev/null 2>&1; then
    say "installing nodejs and npm (Debian packages)..."
    apt_install nodejs npm
fi

# --- the real Claude Code and Codex CLIs (npm, pinned in tests/cli) --------------
# tests/test_real_claude.py, test_real_codex.py and test_real_mcp.py drive them against a scripted model on
# loopback. Both ship their native binary inside the npm package.
CLI_DIR=$ROOT/tests/cli
if ! command -v npm >/dev/null 2>&1; then
    say "npm is not available: the real-CLI tests will be skipped"
elif npm_ci "$CLI_DIR" "the real CLIs ($(tr -d '\n ' <"$CLI_DIR/package.json" | grep -o '"dependencies":{[^}]*}'))" claude codex; then
    for bin in claude codex; do
        "$CLI_DIR/node_modules/.bin/$bin" --version >/dev/null 2>&1 \
            || die "tests/cli/node_modules/.bin/$bin --version fails after npm ci (its native binary is missing?)"
    done
fi

# --- the TypeScript client's compiler (npm, pinned in clients/typescript) --------
# tests/test_typescript_client.py compiles clients/typescript with the typescript that its package-lock.json pins.
if ! command -v npm >/dev/null 2>&1; then
    say "npm is not available: the TypeScript client's tests will be skipped"
else
    npm_ci "$ROOT/clients/typescript" "the TypeScript client's compiler" || true
fi

# --- static check: agent_relay.py must run on Python 3.8 -----------------------
# --eval-annotations: without `from __future__ import annotations`, 3.8 evaluates
# annotations at definition time, so `list[int]` in a signature breaks it.
run_vermin() {
    local scripts user_scripts
    scripts=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["scripts"])')
    user_scripts=$("$PYTHON" -c 'import site, os; print(os.path.join(site.getuserbase(), "bin"))')
    if [ -x "$scripts/vermin" ]; then
        "$scripts/vermin" "$@"
    elif [ -x "$user_scripts/vermin" ]; then
        "$user_scripts/vermin" "$@"
    else
        "$PYTHON" -c 'import sys, vermin; sys.argv[0] = "vermin"; sys.exit(vermin.main())' "$@"
    fi
}
[ -f "$ROOT/agent_relay.py" ] || die "agent_relay.py is missing from $ROOT"
say "vermin: checking agent_relay.py against Python 3.8..."
if ! vermin_out=$(run_vermin -t=3.8- --no-tips --violations -vvv --eval-annotations --no-config-file agent_relay.py 2>&1); then
    printf '%s\n' "$vermin_out" >&2
    die "vermin: agent_relay.py uses something newer than Python 3.8 (see above)"
fi

# --- tests ----------------------------------------------------------------------
# With no arguments: the whole suite, in two groups that run at once: schemathesis' runs against the live relay
# (about half the suite's time, and mostly schemathesis' own CPU) in the background, everything else in front.
# Each group's pytest summary is printed last, and the exit code is the first group's failure, if any.
run_pytest() {
    local code=0
    "$PYTHON" -m pytest -q "$@" || code=$?
    if [ "$code" = 5 ]; then
        echo "run.sh: error: pytest collected no tests (exit code 5); treating that as a failure" >&2
        code=1
    fi
    return "$code"
}
status=0
if [ $# -gt 0 ]; then
    say "running: $PYTHON -m pytest -q $*"
    run_pytest "$@" || status=$?
    exit "$status"
fi
SLOW=(tests/test_schemathesis.py)
SLOW_LOG=$LOG_DIR/agent-relay-tests-slow.log
say "running in the background: $PYTHON -m pytest -q ${SLOW[*]} (output: $SLOW_LOG)"
run_pytest -p no:cacheprovider "${SLOW[@]}" >"$SLOW_LOG" 2>&1 &
slow_pid=$!
IGNORE=()
for t in "${SLOW[@]}"; do IGNORE+=("--ignore=$t"); done
say "running: $PYTHON -m pytest -q tests ${IGNORE[*]}"
run_pytest tests "${IGNORE[@]}" || status=$?
slow_status=0
wait "$slow_pid" || slow_status=$?
say "the background group (${SLOW[*]}):"
cat "$SLOW_LOG"
[ "$status" = 0 ] && status=$slow_status
say "exit code $status: the main group's summary is above the background group's, which is just above"
exit "$status"
