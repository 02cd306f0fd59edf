#!/usr/bin/env python3
"""Prometheus Alertmanager -> Agent Relay.

Reads one Alertmanager webhook notification (the JSON body Alertmanager POSTs
to a webhook_config receiver, version 4) from standard input and sends one
integration event per alert in it:

  firing alert    -> a task for the agents (a repeat notification only counts
                     an occurrence on the open task)
  resolved alert  -> that alert's task is marked done

dedupeKey  "alertmanager:<fingerprint>", or a hash of the alert's labels when
           the payload has no fingerprint (the same labels give the same key)
title      annotations.summary, else labels.alertname (plus the instance)
body       annotations.description (plus the runbook link)
severity   labels.severity
externalUrl  the alert's generatorURL

Environment: AGENT_RELAY_URL (default http://localhost:4850) and
AGENT_RELAY_INTEGRATION_TOKEN (the integration's token). Standard library
only, Python 3.8+.

    python3 alertmanager.py < notification.json
    python3 alertmanager.py --dry-run < notification.json   # print the events, send nothing

Exit status: 0 when every event was accepted, 1 when the relay refused one or
could not be reached, 2 for input that is not an Alertmanager notification.
"""
import argparse
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request


def alert_key(alert):
    fingerprint = alert.get("fingerprint")
    if isinstance(fingerprint, str) and fingerprint:
        return "alertmanager:" + fingerprint
    labels = alert.get("labels") or {}
    digest = hashlib.sha256(json.dumps(labels, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return "alertmanager:labels:" + digest


def alert_event(alert, notification, target=None, channel=None):
    """The Agent Relay integration event for one alert of a notification."""
    labels = alert.get("labels") or {}
    annotations = alert.get("annotations") or {}
    status = alert.get("status") or notification.get("status") or "firing"
    name = labels.get("alertname") or "alert"
    title = annotations.get("summary") or annotations.get("title")
    if not title:
        title = name + (" on " + labels["instance"] if labels.get("instance") else "")
    body = annotations.get("description") or annotations.get("message") or ""
    if annotations.get("runbook_url"):
        body = (body + "\n\n" if body else "") + "Runbook: " + annotations["runbook_url"]
    event = {
        "dedupeKey": alert_key(alert),
        "status": "resolved" if status == "resolved" else "firing",
        "title": title[:1024],
        "metadata": {
            "alertname": name,
            "labels": labels,
            "startsAt": alert.get("startsAt"),
            "endsAt": alert.get("endsAt"),
            "receiver": notification.get("receiver"),
            "groupKey": notification.get("groupKey"),
            "alertmanagerUrl": notification.get("externalURL"),
        },
    }
    if body:
        event["body"] = body
    if labels.get("severity"):
        event["severity"] = str(labels["severity"])[:32]
    if alert.get("generatorURL"):
        event["externalUrl"] = alert["generatorURL"]
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
    parser = argparse.ArgumentParser(description="Send an Alertmanager webhook notification (stdin) to Agent Relay.")
    parser.add_argument("--target", help="tag:X, cap:X, label:X or agent id (default: the integration's first target)")
    parser.add_argument("--channel", help="channel (default: the integration's first channel)")
    parser.add_argument("--dry-run", action="store_true", help="print the events as JSON lines; send nothing")
    args = parser.parse_args(argv)

    try:
        notification = json.load(sys.stdin)
    except ValueError as e:
        print("alertmanager.py: standard input is not JSON (%s)" % e, file=sys.stderr)
        return 2
    alerts = notification.get("alerts") if isinstance(notification, dict) else None
    if not isinstance(alerts, list):
        print("alertmanager.py: no 'alerts' list: this is not an Alertmanager webhook notification", file=sys.stderr)
        return 2
    events = [alert_event(a, notification, args.target, args.channel) for a in alerts if isinstance(a, dict)]
    if args.dry_run:
        for event in events:
            print(json.dumps(event, sort_keys=True))
        return 0

    token = os.environ.get("AGENT_RELAY_INTEGRATION_TOKEN")
    if not token:
        print("alertmanager.py: set AGENT_RELAY_INTEGRATION_TOKEN to the integration's token", file=sys.stderr)
        return 2
    url = os.environ.get("AGENT_RELAY_URL") or "http://localhost:4850"
    failed = 0
    for event in events:
        try:
            status, answer = post_event(url, token, event)
        except (urllib.error.URLError, OSError) as e:
            print("alertmanager.py: could not reach the relay at %s: %s" % (url, getattr(e, "reason", e)), file=sys.stderr)
            return 1
        task = answer.get("task") if isinstance(answer, dict) else None
        if 200 <= status < 300:
            if task is None:
                what = "no open task"
            elif event["status"] == "resolved":
                what = "task %d done" % task["id"]
            elif answer.get("created"):
                what = "task %d created" % task["id"]
            else:
                what = "task %d, occurrence %d" % (task["id"], task["occurrenceCount"])
            print("%s %s: %s" % (event["status"], event["dedupeKey"], what))
        else:
            failed += 1
            error = answer.get("error", {}).get("message") if isinstance(answer, dict) else answer
            print("alertmanager.py: %s %s refused (HTTP %d): %s" % (event["status"], event["dedupeKey"], status, error),
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
