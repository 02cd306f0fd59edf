"""GET /api/spec, the router and the API reference (docs/api.md) stay in step.

Every (method, path) the spec lists is routed; every other method on those
paths is 405 with an Allow header naming exactly the spec's methods; and the
API reference table in docs/api.md lists exactly the spec's routes.
"""
import os
import re
import socket

import pytest

from conftest import ROOT, need

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


def openapi_validator():
    try:
        from openapi_spec_validator import validate
    except ImportError:
        return None
    return validate


@pytest.mark.parametrize("token", [None, "spec-token-0123456789"], ids=["open", "token"])
def test_spec_is_valid_openapi(relay_factory, token):
    validate = openapi_validator()
    need(validate is not None, "openapi-spec-validator is not installed (bash tests/run.sh installs tests/requirements.txt)")
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": token} if token else {})
    doc = spec(relay)
    validate(doc)  # raises, naming what is wrong, on a document that is not OpenAPI
    assert doc["openapi"].startswith("3.1"), doc["openapi"]
    # the security it states is the relay's: open without a token (the {} alternative), the token's with one
    health = doc["paths"]["/api/health"]["get"]
    assert health["security"] == [], health.get("security")
    agents = doc["paths"]["/api/agents"]["get"]["security"]
    assert ({} in agents) == (token is None), agents
    assert doc["paths"]["/api/integrations/events"]["post"]["security"] == [{"integrationToken": []}]
    r = relay.get("/api/agents", token=False)
    assert r.status == (401 if token else 200), r


def each_schema(schema, where):
    """(where, schema) for a schema and every schema inside it."""
    yield where, schema
    if not isinstance(schema, dict):
        return
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, ())):
            yield from each_schema(sub, "%s/%s/%d" % (where, key, i))
    for name, sub in (schema.get("properties") or {}).items():
        yield from each_schema(sub, "%s.%s" % (where, name))
    for key in ("items", "if", "then", "else"):
        if isinstance(schema.get(key), dict):
            yield from each_schema(schema[key], "%s/%s" % (where, key))


def unbounded(schema):
    """What a request field's schema leaves unbounded, or None."""
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or ())
    if "string" in kinds and not ({"maxLength", "enum", "const", "x-boundedBy"} & set(schema)):
        return "a string without maxLength or enum (or x-boundedBy: the request's size)"
    if "integer" in kinds and not ({"minimum", "maximum"} <= set(schema)):
        return "a whole number without minimum and maximum"
    if "array" in kinds and "maxItems" not in schema:
        return "a list without maxItems"
    return None


def test_every_route_is_declared_in_full(relay):
    """Each request field states its bounds, and each operation what it answers: a route added with the older
    shorthand (types only, any object back) shows up here until it is declared in full."""
    doc = spec(relay)
    problems = []
    for path, ops in sorted(doc["paths"].items()):
        for method, op in sorted(ops.items()):
            where = "%s %s" % (method.upper(), path)
            if op.get("x-acting") is None and op.get("security") not in ([], None) and method != "get" and \
                    path != "/api/mcp":
                problems.append("%s: says nothing of who may act (x-acting)" % where)
            fields = [("parameter %s" % p["name"], p["schema"]) for p in op.get("parameters", [])]
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None and "$ref" not in str(body):  # its fields (its anyOf/if rules combine them)
                fields += [("body.%s" % name, sub) for name, sub in body.get("properties", {}).items()]
            for name, schema in fields:
                for at, sub in each_schema(schema, name):
                    problem = unbounded(sub)
                    if problem:
                        problems.append("%s: %s is %s" % (where, at, problem))
            answers = {s: a for s, a in op["responses"].items() if s.startswith("2")}
            if not answers:
                problems.append("%s: declares no success answer" % where)
            for status, answer in answers.items():
                for ctype, media in (answer.get("content") or {}).items():
                    if media.get("schema") in ({"type": "object"}, {}):
                        problems.append("%s: its %s answer (%s) is any object" % (where, status, ctype))
            for status in ("400", "403"):
                if status not in op["responses"]:
                    problems.append("%s: does not declare %s" % (where, status))
    assert not problems, "\n".join(problems)
