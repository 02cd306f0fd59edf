#!/bin/sh
# support-ticket.sh: hand a customer support ticket to the agents on Agent Relay, and close the loop.
#
#   support-ticket.sh [options] TICKET-ID STATUS [SUBJECT [BODY]]
#
# STATUS is the helpdesk's word for the ticket:
#   new, open, pending, reopened   -> a task for the support agents (one per ticket: repeats are counted)
#   solved, closed, resolved       -> that ticket's task is marked done
# SUBJECT is needed for a ticket that is not solved yet.
# Options:
#   -p PRIORITY   the ticket's priority (urgent, high, normal, low); sent as the task's severity
#   -u URL        link to the ticket in the helpdesk (externalUrl)
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

priority="" url="" target="" channel=""
while getopts p:u:T:c:h opt; do
    case "$opt" in
        p) priority=$OPTARG ;;
        u) url=$OPTARG ;;
        T) target=$OPTARG ;;
        c) channel=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))

[ $# -ge 2 ] || usage
ticket=$1
subject=${3:-}
body=${4:-}
case "$2" in
    new | open | pending | reopened) status=firing ;;
    solved | closed | resolved) status=resolved ;;
    *)
        echo "support-ticket.sh: unknown ticket status '$2' (new, open, pending, reopened, solved, closed, resolved)" >&2
        exit 2
        ;;
esac
if [ "$status" = firing ] && [ -z "$subject" ]; then
    echo "support-ticket.sh: a SUBJECT is needed for an open ticket" >&2
    exit 2
fi
token=${AGENT_RELAY_INTEGRATION_TOKEN:-}
if [ -z "$token" ]; then
    echo "support-ticket.sh: set AGENT_RELAY_INTEGRATION_TOKEN to the integration's token" >&2
    exit 2
fi
relay=${AGENT_RELAY_URL:-http://localhost:4850}
relay=${relay%/}

payload="{\"dedupeKey\":$(json_string "ticket:$ticket"),\"status\":\"$status\""
if [ -n "$subject" ]; then
    payload="$payload,\"title\":$(json_string "Ticket $ticket: $subject")"
fi
[ -z "$body" ] || payload="$payload,\"body\":$(json_string "$body")"
[ -z "$priority" ] || payload="$payload,\"severity\":$(json_string "$priority")"
[ -z "$url" ] || payload="$payload,\"externalUrl\":$(json_string "$url")"
[ -z "$target" ] || payload="$payload,\"target\":$(json_string "$target")"
[ -z "$channel" ] || payload="$payload,\"channel\":$(json_string "$channel")"
payload="$payload,\"metadata\":{\"ticket\":$(json_string "$ticket"),\"helpdeskStatus\":$(json_string "$2")}}"

out=$(mktemp)
trap 'rm -f "$out"' EXIT
code=$(printf 'header = "Authorization: Bearer %s"\n' "$token" |
    curl -sS -K - -X POST -H 'Content-Type: application/json' --data-binary "$payload" \
        -o "$out" -w '%{http_code}' "$relay/api/integrations/events") || {
    echo "support-ticket.sh: could not reach the relay at $relay" >&2
    exit 1
}
case "$code" in
    2??) cat "$out"; echo ;;
    *)
        echo "support-ticket.sh: the relay answered HTTP $code: $(cat "$out")" >&2
        exit 1
        ;;
esac
