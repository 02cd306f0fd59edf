#!/bin/sh
# ops-alert.sh: raise (or resolve) an alert on Agent Relay from any script, cron job or CI step.
#
#   ops-alert.sh [options] KEY TITLE        raise: opens a task, or counts one more occurrence of it
#   ops-alert.sh -r [options] KEY           resolve: the open task for KEY is marked done
#
# KEY is the dedupe key: the same KEY while its task is open never makes a second task.
# Options:
#   -r            resolve instead of raise
#   -s SEVERITY   e.g. critical, warning, info
#   -b BODY       longer text for the agent that picks it up
#   -u URL        link to the dashboard, log or runbook (externalUrl)
#   -T TARGET     tag:X, cap:X, label:X or an agent id (default: the integration's first target)
#   -c CHANNEL    channel (default: the integration's first channel)
#
# Environment:
#   AGENT_RELAY_URL                 relay address (default http://localhost:4850)
#   AGENT_RELAY_INTEGRATION_TOKEN   this integration's token (from AGENT_RELAY_INTEGRATIONS on the relay)
#
# Prints the relay's answer (JSON) and exits 0 on success; 1 when the relay refuses; 2 on bad usage.
# Needs only a POSIX shell and curl. The token goes to curl on its standard input, never on its command line.
set -eu

usage() {
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# json_string TEXT: TEXT as a JSON string literal (backslash, quote, tab and newline escaped;
# other control characters dropped).
json_string() {
    json_escaped=$(printf '%s' "$1" | tr -d '\000-\010\013-\037' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/	/\\t/g' |
        awk 'NR > 1 { printf "%s", "\\n" } { printf "%s", $0 }')
    printf '"%s"' "$json_escaped"
}

status=firing severity="" body="" url="" target="" channel=""
while getopts rs:b:u:T:c:h opt; do
    case "$opt" in
        r) status=resolved ;;
        s) severity=$OPTARG ;;
        b) body=$OPTARG ;;
        u) url=$OPTARG ;;
        T) target=$OPTARG ;;
        c) channel=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))

[ $# -ge 1 ] || usage
key=$1
title=${2:-}
if [ "$status" = firing ] && [ -z "$title" ]; then
    echo "ops-alert.sh: a TITLE is needed to raise an alert (or -r to resolve one)" >&2
    exit 2
fi
token=${AGENT_RELAY_INTEGRATION_TOKEN:-}
if [ -z "$token" ]; then
    echo "ops-alert.sh: set AGENT_RELAY_INTEGRATION_TOKEN to the integration's token" >&2
    exit 2
fi
relay=${AGENT_RELAY_URL:-http://localhost:4850}
relay=${relay%/}

payload="{\"dedupeKey\":$(json_string "$key"),\"status\":\"$status\""
[ -z "$title" ] || payload="$payload,\"title\":$(json_string "$title")"
[ -z "$severity" ] || payload="$payload,\"severity\":$(json_string "$severity")"
[ -z "$body" ] || payload="$payload,\"body\":$(json_string "$body")"
[ -z "$url" ] || payload="$payload,\"externalUrl\":$(json_string "$url")"
[ -z "$target" ] || payload="$payload,\"target\":$(json_string "$target")"
[ -z "$channel" ] || payload="$payload,\"channel\":$(json_string "$channel")"
payload="$payload}"

out=$(mktemp)
trap 'rm -f "$out"' EXIT
code=$(printf 'header = "Authorization: Bearer %s"\n' "$token" |
    curl -sS -K - -X POST -H 'Content-Type: application/json' --data-binary "$payload" \
        -o "$out" -w '%{http_code}' "$relay/api/integrations/events") || {
    echo "ops-alert.sh: could not reach the relay at $relay" >&2
    exit 1
}
case "$code" in
    2??) cat "$out"; echo ;;
    *)
        echo "ops-alert.sh: the relay answered HTTP $code: $(cat "$out")" >&2
        exit 1
        ;;
esac
