#!/usr/bin/env python3
"""GitHub issues -> Agent Relay.

Reads one GitHub webhook payload of the `issues` event from standard input
and sends one integration event:

  opened, reopened  -> a task for the agents
  closed            -> that issue's task is marked done
  anything else (edited, labeled, assigned, ...) is ignored (exit 0)

dedupeKey    "github:<owner>/<repo>#<number>"
title        the issue's title
body         the issue's body
externalUrl  the issue's html_url
severity     from a label "severity:<x>" or "priority:<x>", when there is one

Environment: AGENT_RELAY_URL (default http://localhost:4850) and
AGENT_RELAY_INTEGRATION_TOKEN (the integration's token). When GITHUB_EVENT is
set (the X-GitHub-Event header, as webhook-stdin.py passes it) and is not
"issues", the payload is ignored. Standard library only, Python 3.8+.

    python3 github_issues.py < payload.json
    python3 github_issues.py --dry-run < payload.json   # print the event, send nothing

Exit status: 0 when the event was accepted or ignored, 1 when the relay
refused it or could not be reached, 2 for input that is not an issues payload.
"""
import argparse
import json
import os
import sys
import urllib.error
import urllib.request

FIRING = ("opened", "reopened")
RESOLVED = ("closed",)


def issue_event(payload, target=None, channel=None):
    """The Agent Relay integration event for an `issues` payload, or None when its action is not handled."""
    action = payload.get("action")
    if action not in FIRING + RESOLVED:
        return None
    issue = payload["issue"]
    repo = (payload.get("repository") or {}).get("full_name") or issue.get("repository_url", "").split("/repos/")[-1]
    labels = [lab.get("name", "") for lab in issue.get("labels") or [] if isinstance(lab, dict)]
    event = {
        "dedupeKey": "github:%s#%d" % (repo, issue["number"]),
        "status": "firing" if action in FIRING else "resolved",
        "title": (issue.get("title") or "Issue #%d" % issue["number"])[:1024],
        "metadata": {
            "repository": repo,
            "number": issue["number"],
            "action": action,
            "author": (issue.get("user") or {}).get("login"),
            "sender": (payload.get("sender") or {}).get("login"),
            "labels": labels,
            "stateReason": issue.get("state_reason"),
        },
    }
    if issue.get("body"):
        event["body"] = issue["body"]
    if issue.get("html_url"):
        event["externalUrl"] = issue["html_url"]
    for name in labels:
        for prefix in ("severity:", "priority:"):
            if name.lower().startswith(prefix) and name[len(prefix):].strip():
                event.setdefault("severity", name[len(prefix):].strip()[:32])
    if target:
        event["target"] = target
    if channel:
        event["channel"] = channel
    return event


def post_event(url, token, event, timeout=10):
    """POST one event; returns (HTTP status, answer as JSON or text)."""
    req = urllib.request.Request(
        url.rstrip("/") + "/api/integrations/events",
        data=json.dumps(event).encode("utf-8"),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer " + token},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw.decode("utf-8"))
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Send a GitHub `issues` webhook payload (stdin) to Agent Relay.")
    parser.add_argument("--target", help="tag:X, cap:X, label:X or agent id (default: the integration's first target)")
    parser.add_argument("--channel", help="channel (default: the integration's first channel)")
    parser.add_argument("--dry-run", action="store_true", help="print the event as JSON; send nothing")
    args = parser.parse_args(argv)

    github_event = os.environ.get("GITHUB_EVENT")
    if github_event and github_event != "issues":
        print("github_issues.py: ignored a %r event (only 'issues' is handled)" % github_event)
        return 0
    try:
        payload = json.load(sys.stdin)
    except ValueError as e:
        print("github_issues.py: standard input is not JSON (%s)" % e, file=sys.stderr)
        return 2
    issue = payload.get("issue") if isinstance(payload, dict) else None
    if not isinstance(issue, dict) or not isinstance(issue.get("number"), int) or "action" not in payload:
        print("github_issues.py: no 'action' and 'issue': this is not a GitHub issues payload", file=sys.stderr)
        return 2
    event = issue_event(payload, args.target, args.channel)
    if event is None:
        print("github_issues.py: ignored action %r" % payload.get("action"))
        return 0
    if args.dry_run:
        print(json.dumps(event, sort_keys=True))
        return 0

    token = os.environ.get("AGENT_RELAY_INTEGRATION_TOKEN")
    if not token:
        print("github_issues.py: set AGENT_RELAY_INTEGRATION_TOKEN to the integration's token", file=sys.stderr)
        return 2
    url = os.environ.get("AGENT_RELAY_URL") or "http://localhost:4850"
    try:
        status, answer = post_event(url, token, event)
    except (urllib.error.URLError, OSError) as e:
        print("github_issues.py: could not reach the relay at %s: %s" % (url, getattr(e, "reason", e)), file=sys.stderr)
        return 1
    if not 200 <= status < 300:
        error = answer.get("error", {}).get("message") if isinstance(answer, dict) else answer
        print("github_issues.py: %s refused (HTTP %d): %s" % (event["dedupeKey"], status, error), file=sys.stderr)
        return 1
    task = answer.get("task")
    if task is None:
        what = "no open task"
    elif event["status"] == "resolved":
        what = "task %d done" % task["id"]
    elif answer.get("created"):
        what = "task %d created" % task["id"]
    else:
        what = "task %d, occurrence %d" % (task["id"], task["occurrenceCount"])
    print("%s %s: %s" % (event["status"], event["dedupeKey"], what))
    return 0


if __name__ == "__main__":
    sys.exit(main())
