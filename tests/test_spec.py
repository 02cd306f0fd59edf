"""GET /api/spec, the router and the API reference (docs/api.md) stay in step.

Every (method, path) the spec lists is routed; every other method on those
paths is 405 with an Allow header naming exactly the spec's methods; and the
API reference table in docs/api.md lists exactly the spec's routes.
"""
import os
import re
import socket

import pytest

from conftest import ROOT

METHODS = ("GET", "POST", "PATCH", "DELETE", "PUT")
API_DOC = os.path.join(ROOT, "docs", "api.md")  # the API reference the README links to
# a table row: | GET | `/api/agents/{id}` | purpose |
TABLE_ROW = re.compile(r"^\|\s*(GET|POST|PATCH|DELETE|PUT|HEAD|OPTIONS)\s*\|\s*`(/api[^`]*)`\s*\|", re.M)


def spec(relay):
    r = relay.get("/api/spec")
    assert r.status == 200, r
    return r.json


def spec_routes(doc):
    return {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}


def fill(path):
    return re.sub(r"\{[^}]+\}", "placeholder-1" if path.startswith("/api/agents/") else "1", path)


def is_stream(op):
    return "text/event-stream" in str(op.get("responses", {}))


def call(relay, method, path, stream=False):
    """(status, Resp or None); a stream is read only up to its status line."""
    if stream:
        s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
        try:
            s.sendall(("%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (method, path)).encode())
            return int(s.recv(200).split(b"\r\n")[0].split()[1]), None
        finally:
            s.close()
    r = relay.request(method, path, body={} if method in ("POST", "PATCH", "PUT") else None)
    return r.status, r


def test_spec_is_openapi_3_and_describes_the_api(relay):
    doc = spec(relay)
    assert isinstance(doc.get("openapi"), str) and doc["openapi"].startswith("3."), doc.get("openapi")
    assert doc["info"]["title"] and doc["info"]["version"] == relay.get("/api/health").json["version"]
    routes = spec_routes(doc)
    # the core of the contract is there
    for route in [("POST", "/api/agents"), ("GET", "/api/agents/{id}/inbox"), ("POST", "/api/messages"),
                  ("POST", "/api/messages/{id}/claim"), ("GET", "/api/cursor"), ("GET", "/api/spec"),
                  ("GET", "/api/health"), ("GET", "/api/events")]:
        assert route in routes, route
    for path, ops in doc["paths"].items():
        assert path.startswith("/api/"), path
        for method, op in ops.items():
            assert method.upper() in METHODS, (method, path)
            assert op.get("summary") and op.get("responses"), (method, path)
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == set(re.findall(r"\{(\w+)\}", path)), (method, path, names)


def test_every_spec_route_is_routed(relay):
    relay.register("dev")
    doc = spec(relay)
    problems = []
    for path, ops in sorted(doc["paths"].items()):
        for method, op in sorted(ops.items()):
            status, r = call(relay, method.upper(), fill(path), stream=is_stream(op))
            if status in (405, 500):
                problems.append("%s %s: %s" % (method.upper(), path, r or status))
            elif status == 404 and r is not None and "no route" in r.body.decode().lower():
                problems.append("%s %s: not routed: %r" % (method.upper(), path, r))
    assert not problems, "\n".join(problems)
    assert "Traceback" not in relay.log


def test_methods_outside_the_spec_get_405(relay):
    doc = spec(relay)
    problems = []
    for path, ops in sorted(doc["paths"].items()):
        listed = {m.upper() for m in ops}
        for method in METHODS:
            if method in listed:
                continue
            status, r = call(relay, method, fill(path))
            allow = {m.strip() for m in (r.headers.get("allow") or "").split(",") if m.strip()}
            if status != 405 or r.code != "method_not_allowed":
                problems.append("%s %s: %r" % (method, path, r))
            elif allow != listed:
                problems.append("%s %s: Allow is %r, the spec lists %r" % (method, path, sorted(allow), sorted(listed)))
    assert not problems, "\n".join(problems)
    # and a path that is not in the spec at all is 404, not 405
    status, r = call(relay, "GET", "/api/not-a-route")
    assert (status, r.code) == (404, "not_found"), r


def documented_routes():
    if not os.path.exists(API_DOC):
        pytest.fail("docs/api.md is missing: it must have an API reference table with one row per route, "
                    "like | GET | `/api/agents/{id}` | purpose |")
    with open(API_DOC, encoding="utf-8") as f:
        text = f.read()
    rows = TABLE_ROW.findall(text)
    if not rows:
        pytest.fail("docs/api.md has no API reference table: expected rows like | GET | `/api/agents/{id}` | purpose |")
    routes = [(m, re.sub(r":(\w+)", r"{\1}", p.split("?")[0])) for m, p in rows]
    dupes = sorted({r for r in routes if routes.count(r) > 1})
    assert not dupes, "docs/api.md lists these routes twice: %r" % dupes
    return set(routes)


def test_api_reference_table_matches_the_spec(relay):
    documented = documented_routes()
    routed = spec_routes(spec(relay))
    missing = sorted(routed - documented)
    extra = sorted(documented - routed)
    assert not missing and not extra, (
        "docs/api.md's API table and /api/spec differ.\n  in the spec, not in docs/api.md: %r\n"
        "  in docs/api.md, not in the spec: %r" % (missing, extra))
