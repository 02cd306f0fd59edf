#!/bin/sh
# Agent Relay installer for Linux and macOS.
#
#   curl -fsSL https://raw.githubusercontent.com/agent-relay/agent-relay/main/install.sh | sh
#   curl -fsSL .../install.sh | sh -s -- --daemon
#   sh install.sh [--daemon] [--codex]
#
# Installs agent_relay.py as one executable file, ${AGENT_RELAY_PREFIX:-$HOME/.local}/bin/agent-relay.
# Safe to run again: it replaces the old copy atomically.
#
# Everything runs from main() at the very end, so that under `curl ... | sh`
# nothing runs before the whole script has been read.

set -u

DEFAULT_SOURCE="https://raw.githubusercontent.com/agent-relay/agent-relay/main/agent_relay.py"

say() {
    printf 'agent-relay install: %s\n' "$*"
}

die() {
    printf 'agent-relay install: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    cat <<EOF
Usage: sh install.sh [--daemon] [--codex] [--help]
       curl -fsSL <url>/install.sh | sh -s -- [--daemon] [--codex]

Installs Agent Relay (one Python file, needs Python 3.8 or newer) as
  \${AGENT_RELAY_PREFIX:-\$HOME/.local}/bin/agent-relay

Options:
  --daemon    afterwards run 'agent-relay setup --yes' and install, enable and
              start the relay as a background service for this user
  --codex     afterwards run 'agent-relay codex install --yes': the hooks
              (trusted), notify and sandbox network access in \${CODEX_HOME:-~/.codex}
  -h, --help  show this help

Environment:
  AGENT_RELAY_SOURCE  where to get agent_relay.py: a URL (fetched with curl or
                      wget) or a local file path
                      (default: $DEFAULT_SOURCE)
  AGENT_RELAY_PREFIX  install prefix (default: \$HOME/.local)
EOF
}

# Runs its arguments with standard input from /dev/null when standard input is
# not a terminal: under `curl | sh` it is the rest of this script.
run_detached() {
    if [ -t 0 ]; then
        "$@"
    else
        "$@" </dev/null
    fi
}

check_python() {
    if ! command -v python3 >/dev/null 2>&1; then
        die "python3 was not found on PATH. Agent Relay needs Python 3.8 or newer: install it (e.g. 'sudo apt-get install python3', 'brew install python3' or https://www.python.org/downloads/) and run this installer again."
    fi
    py_version=$(python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null </dev/null) \
        || die "'python3' ($(command -v python3)) does not run. Agent Relay needs Python 3.8 or newer."
    if ! python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 8) else 1)' </dev/null; then
        die "python3 is Python $py_version ($(command -v python3)); Agent Relay needs Python 3.8 or newer. Install a newer Python 3 so that 'python3' runs it, then run this installer again."
    fi
}

# fetch SOURCE DEST: copies a URL or a local file to DEST.
fetch() {
    case $1 in
        http://* | https://* | ftp://*)
            if command -v curl >/dev/null 2>&1; then
                curl -fsSL --retry 2 -o "$2" "$1" || die "could not download $1 (curl failed)"
            elif command -v wget >/dev/null 2>&1; then
                wget -q -O "$2" "$1" || die "could not download $1 (wget failed)"
            else
                die "neither curl nor wget is installed: install one, or set AGENT_RELAY_SOURCE to a local copy of agent_relay.py"
            fi
            ;;
        *)
            src=${1#file://}
            [ -e "$src" ] || die "source file not found: $src (AGENT_RELAY_SOURCE)"
            [ -f "$src" ] || die "source is not a regular file: $src (AGENT_RELAY_SOURCE)"
            [ -r "$src" ] || die "source file is not readable: $src (AGENT_RELAY_SOURCE)"
            cp "$src" "$2" || die "could not copy $src"
            ;;
    esac
    [ -s "$2" ] || die "$1 is empty"
}

main() {
    daemon=0
    codex=0
    for arg in "$@"; do
        case $arg in
            --daemon) daemon=1 ;;
            --codex) codex=1 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; die "unknown option: $arg" ;;
        esac
    done

    source=${AGENT_RELAY_SOURCE:-$DEFAULT_SOURCE}
    prefix=${AGENT_RELAY_PREFIX:-}
    if [ -z "$prefix" ]; then
        [ -n "${HOME:-}" ] || die "HOME is not set; set AGENT_RELAY_PREFIX to choose where to install"
        prefix=$HOME/.local
    fi
    bindir=$prefix/bin
    dest=$bindir/agent-relay

    check_python
    say "using python3 $py_version ($(command -v python3))"

    workdir=$(mktemp -d 2>/dev/null || mktemp -d -t agent-relay) || die "could not create a temporary directory"
    staged=""
    # shellcheck disable=SC2317  # invoked by the traps
    cleanup() {
        rm -rf "$workdir"
        if [ -n "$staged" ]; then rm -f "$staged"; fi
    }
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    say "fetching $source"
    download=$workdir/agent_relay.py
    fetch "$source" "$download"

    # One executable file with a python3 shebang (agent_relay.py already starts with one).
    first_line=$(head -n 1 "$download")
    prepared=$workdir/agent-relay
    case $first_line in
        '#!/usr/bin/env python3') cp "$download" "$prepared" ;;
        '#!'*) { echo '#!/usr/bin/env python3'; tail -n +2 "$download"; } >"$prepared" ;;
        *) { echo '#!/usr/bin/env python3'; cat "$download"; } >"$prepared" ;;
    esac || die "could not prepare $prepared"

    if ! version=$(run_detached python3 "$prepared" --version 2>&1); then
        printf '%s\n' "$version" >&2
        die "the downloaded agent_relay.py does not run ('python3 agent_relay.py --version' failed); nothing was installed"
    fi

    mkdir -p "$bindir" || die "could not create $bindir"
    if [ -d "$dest" ]; then die "$dest is a directory; remove it and run this installer again"; fi
    # Stage next to the destination, then rename: the old copy is replaced in one step.
    staged=$bindir/.agent-relay.tmp.$$
    cp "$prepared" "$staged" || die "could not write to $bindir"
    chmod 755 "$staged" || die "could not make $staged executable"
    mv -f "$staged" "$dest" || die "could not install $dest"
    staged=""
    say "installed $dest ($version)"

    case ":${PATH:-}:" in
        *":$bindir:"* | *":$bindir/:"*) on_path=1 ;;
        *) on_path=0 ;;
    esac
    if [ "$on_path" = 0 ]; then
        say "note: $bindir is not on your PATH. Add it, e.g. to ~/.profile or your shell's rc file:"
        printf '\n    export PATH="%s:$%s"\n\n' "$bindir" PATH
    fi

    if [ "$daemon" = 1 ]; then
        say "running: agent-relay setup --yes"
        run_detached "$dest" setup --yes || die "'agent-relay setup --yes' failed"
        say "running: agent-relay daemon install --binary $dest --enable --start --yes"
        run_detached "$dest" daemon install --binary "$dest" --enable --start --yes \
            || die "'agent-relay daemon install' failed"
    fi

    if [ "$codex" = 1 ]; then
        say "running: agent-relay codex install --yes"
        run_detached "$dest" codex install --yes || die "'agent-relay codex install --yes' failed"
    fi

    run_detached "$dest" --version || die "'$dest --version' failed"
    if [ "$on_path" = 1 ]; then cmd=agent-relay; else cmd=$dest; fi
    if [ "$daemon" = 1 ]; then
        say "done: the relay runs in the background (dashboard: http://127.0.0.1:4850). Try: $cmd --help"
    else
        say "done. Next: start the relay with '$cmd serve' (dashboard: http://127.0.0.1:4850), or run this installer with --daemon to run it as a background service."
    fi
}

main "$@"
