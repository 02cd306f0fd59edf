"""Hostile input: generated requests against every route in /api/spec.

Hypothesis draws thousands of requests (right and wrong types, SQL-looking
strings, paths, NUL bytes, huge numbers, deep JSON, invalid UTF-8, lone
surrogates, wrong methods and content types). For each: no 5xx, an error is
the documented envelope (JSON-RPC's on /api/mcp), every JSON answer is strict
JSON and fits /api/spec (its status declared, its body the declared schema),
no traceback reaches the log, and a rejected (4xx) request changes nothing,
neither in the database (a fingerprint of every table) nor in the relay's
memory (the agent list).
Strings are stored literally (read back identical) or refused with 400.
"""
import http.client
import json
import sqlite3
import tempfile
import time
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Relay, raw_exchange

INTEG_TOKEN = "fuzz-integration-token"
BASE_AGENTS = {
    "fz-a": {"tags": ["t1", "shared"], "capabilities": ["c1"], "label": "la"},
    "fz-b": {"tags": ["shared"], "channels": ["ops", "all"]},
    "fz-g": {"approvalMode": "guarded", "tags": ["shared"]},
    "fz-r": {"approvalMode": "read-only", "tags": ["shared"]},
    "fz-c": {"channels": ["ops"]},
}
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=False)

HOSTILE = [
    "'; DROP TABLE messages; --", "\" OR \"1\"=\"1", "1; DELETE FROM agents", "%", "_", "\\", "%_\\%",
    "../../../../etc/passwd", "..\\..\\boot.ini", "/api/agents", "?token=x", "#frag", "a/b", "%2F", "%00",
    "a\x00b", "\x00", "\x00\x00\x00", "\u2028\u2029", "\u202e", "\ufeff", "\ud800", "a\udfffb", "\U0001f4a5",
    "é\u0301", "漢字", "<script>alert(1)</script>", "${jndi:ldap://127.0.0.1/x}", "{{7*7}}", "%s%s%n", "\r\nX-Evil: 1",
    " ", "", "\t", "a" * 300, "9" * 30, str(2 ** 70), str(-2 ** 70), "-1", "0", "1e400", "NaN",
    "null", "true", "[]", "{}", "tag:", "cap:", "label:", "tag:shared", "cap:c1", "label:la", "broadcast", "BROADCAST",
    "human", "system", "all", "ops", "fz-a", "fz-b", "fz-g", "fz-r", "fz-c", "nobody", "open", "claimed", "done",
    "guarded", "read-only", "firing", "resolved",
]
HUGE = [2 ** 70, -2 ** 70, 2 ** 63, 2 ** 63 - 1, -1, 0, 1, 2, 3, 10 ** 30]


def text():
    return st.one_of(st.sampled_from(HOSTILE), st.text(max_size=30), st.from_regex(r"[a-z0-9:._@/-]{1,20}", fullmatch=True))


def json_values():
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE),
                        st.floats(allow_nan=False, allow_infinity=False), text())
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(text(), inner, max_size=4)), max_leaves=12)


def typed(kind):
    if isinstance(kind, list):  # ["string", "null"]: an optional field, which may be null
        kind = next((k for k in kind if k != "null"), None)
    if kind == "string":
        return text()
    if kind == "integer":
        return st.one_of(st.integers(min_value=0, max_value=60), st.sampled_from(HUGE))
    if kind == "boolean":
        return st.booleans()
    if kind == "object":
        return st.dictionaries(text(), json_values(), max_size=4)
    if kind == "array":
        return st.lists(text(), max_size=5)
    return json_values()


def query_value(kind):
    words = st.sampled_from(["", "true", "false", "yes", "1", "0", "-1", "abc", str(2 ** 70), "1.5", "%", "nul\x00l"])
    if kind == "integer":
        return st.one_of(st.integers(min_value=0, max_value=500).map(str), words)
    return st.one_of(text(), words)


class Raw(bytes):
    """A request body that Hypothesis reports by its size and start, not in full."""

    def __repr__(self):
        return "Raw(%d bytes: %r...)" % (len(self), bytes(self[:40]))


RAW_BODIES = [
    b"", b" ", b"{", b"}", b"[]", b"null", b"\"x\"", b"1", b"{\"a\":NaN}", b"{\"a\":Infinity}", b"{\"a\":1e400}",
    b"{\"a\":-1e400}", b"\xef\xbb\xbf{}", b"{\"from\":\"fz-a\x00\"}", b"{\"a\":\"\xff\xfe\"}", b"\xc3\x28",
    b"{\"a\":\"\xed\xa0\x80\"}", b"{\"a\":\"\\ud800\"}", b"{\"a\":\"\\udc00x\"}", b"{" + b"\"a\":{" * 5000 + b"}" * 5000 + b"}",
    b"[" * 10000 + b"]" * 10000, b"{\"p\":" + b"[" * 150 + b"]" * 150 + b"}", b"{\"a\":1}{\"b\":2}", b"{\"a\":1,}",
    b"{'a':1}", b"{\"upTo\":" + str(2 ** 70).encode() + b"}", b"{\"epoch\":" + str(2 ** 70).encode() + b"}",
    b"{\"replyTo\":" + str(2 ** 70).encode() + b"}", b"{\"a\":" + b"9" * 5000 + b"}",
]
RAW_BODIES = [Raw(b) for b in RAW_BODIES]


class Fuzzer:
    """A relay for the whole module, its spec, and a fingerprint of what it stores."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="relay-fuzz-")
        integ = [{"name": "fz", "token": INTEG_TOKEN, "scopes": ["tasks:create"], "targets": ["tag:shared", "fz-a"],
                  "channels": ["ops"]}]
        self.relay = Relay(self.dir, env={"AGENT_RELAY_INTEGRATIONS": json.dumps(integ), "STALE_TTL_MS": "3600000",
                                          "AGENT_RELAY_SSE_PING_MS": "100",
                                          "AGENT_RELAY_INTEGRATION_RATE_LIMIT_PER_MINUTE": "100000"}).start()
        self.spec = self.relay.get("/api/spec").json
        self.routes = [(m.upper(), p, op) for p, ops in sorted(self.spec["paths"].items()) for m, op in sorted(ops.items())]
        self.conn = None
        self.db = None
        self.log_seen = 0
        for aid in BASE_AGENTS:
            self.restore(aid)
        # something behind most small ids: plain, fan-out, claimable, held and task messages, and tasks
        self.message_ids, self.task_ids = [], []
        for i in range(12):
            self.message_ids.append(self.relay.send("fz-a", "fz-b", "seed %d" % i)["id"])
            self.message_ids.append(self.relay.send("fz-a", "tag:shared", "work %d" % i, claimable=True)["id"])
            self.message_ids.append(self.relay.send("fz-b", "fz-g", "held %d" % i)["id"])
            self.message_ids.append(self.relay.send("fz-c", "broadcast", "all %d" % i, channel="ops")["id"])
            t = self.relay.post("/api/tasks", {"title": "seed task %d" % i, "target": "tag:shared", "from": "fz-a"}).json["task"]
            self.task_ids.append(t["id"])

    def restore(self, agent_id):
        card = dict(BASE_AGENTS[agent_id], id=agent_id)
        card.setdefault("channels", ["all"])
        card.setdefault("tags", [])
        card.setdefault("capabilities", [])
        card.setdefault("approvalMode", "open")
        card.setdefault("label", None)
        r = self.relay.post("/api/agents", card)
        assert r.status in (200, 201), r

    # -- what is stored ------------------------------------------------------
    FINGERPRINT = """SELECT
        (SELECT COUNT(*) || '/' || group_concat(id || status || approval_mode || tags || capabilities || channels ||
                 COALESCE(label, '-') || ready || epoch || COALESCE(instance_id, '-') || meta || cursor || floor_id ||
                 COALESCE(key_hash, '-') || name, '|') FROM agents),
        (SELECT COUNT(*) || '/' || COALESCE(MAX(id), 0) || '/' || TOTAL(LENGTH(claimed_by)) || '/' || TOTAL(claimed_at)
                 FROM messages),
        (SELECT COUNT(*) || '/' || TOTAL(LENGTH(state)) || '/' || TOTAL(delivered_at) || '/' || TOTAL(read_at) FROM receipts),
        (SELECT COUNT(*) FROM redeliveries),
        (SELECT COUNT(*) || '/' || group_concat(id || status || COALESCE(claimed_by, '-') || occurrence_count ||
                 COALESCE(progress, '-') || COALESCE(result, '-') || updated_at, '|') FROM tasks),
        (SELECT COUNT(*) || '/' || COALESCE(MAX(id), 0) FROM task_events),
        (SELECT COUNT(*) || '/' || COALESCE(MAX(id), 0) FROM callbacks),
        (SELECT COUNT(*) || '/' || COALESCE(MAX(id), 0) FROM events)"""

    def fingerprint(self):
        if self.db is None:
            self.db = sqlite3.connect("file:%s?mode=ro" % self.relay.db_path, uri=True, timeout=10, isolation_level=None)
        stored = self.db.execute(self.FINGERPRINT).fetchone()
        agents = self.call("GET", "/api/agents")[2]["agents"]
        memory = sorted(json.dumps({k: v for k, v in a.items() if k not in ("lastSeen", "listening")}, sort_keys=True) for a in agents)
        return stored, memory

    # -- talking to it -------------------------------------------------------
    def call(self, method, path, body=None, headers=None):
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.relay.port, timeout=30)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                raw = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                headers = dict((k.lower(), v) for k, v in r.getheaders())
                answer = self.strict_json(raw, r)
                problem = self.relay.spec_check().problem(method, urllib.parse.urlsplit(path).path, r.status, headers, raw)
                assert problem is None, problem
                return r.status, headers, answer
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise

    @staticmethod
    def strict_json(raw, r):
        if not raw or "json" not in (r.getheader("Content-Type") or ""):
            return None

        def no_constants(name):
            raise AssertionError("the relay answered with %s, which is not JSON" % name)

        return json.loads(raw.decode("utf-8"), parse_constant=no_constants)

    def stream_status(self, path, headers):
        """A stream's status line and headers only; then hang up."""
        lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1"] + ["%s: %s" % kv for kv in headers.items()]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        try:
            return raw_exchange(self.relay.port, data, head_only=True, reset=True, timeout=5)[0]
        finally:
            # an agent's stream marks it active when it ends: wait for that, so it cannot land in a later check
            deadline = time.monotonic() + 5
            while self.call("GET", "/api/stats")[2]["streams"] and time.monotonic() < deadline:
                time.sleep(0.02)

    def new_log(self):
        lines = self.relay.output[self.log_seen:]
        self.log_seen += len(lines)
        return "\n".join(lines)

    def close(self):
        if self.db is not None:
            self.db.close()
        if self.conn is not None:
            self.conn.close()
        self.relay.stop()


@pytest.fixture(scope="module")
def fz():
    f = Fuzzer()
    yield f
    log = f.relay.log
    f.close()
    assert "Traceback" not in log, log


def path_id(draw, template):
    """Mostly ids that exist (agents by name; messages and tasks are numbered from 1), else anything."""
    if template.startswith("/api/agents/"):
        known = st.sampled_from(list(BASE_AGENTS))
    else:
        known = st.integers(min_value=1, max_value=40 if template.startswith("/api/tasks/") else 200)
    value = draw(st.one_of(known, known, st.integers(min_value=0, max_value=60), text(), st.sampled_from(HUGE)))
    return urllib.parse.quote(str(value), safe="", errors="surrogatepass")


@st.composite
def requests(draw, fz):
    method, template, op = draw(st.sampled_from(fz.routes))
    path = template
    if "{id}" in template:
        path = template.replace("{id}", path_id(draw, template))
    query = {}
    for p in op.get("parameters", []):
        if p["in"] != "query" or not draw(st.booleans()):
            continue
        if p["name"] in ("wait", "timeout"):  # a long-poll or message wait that really waits (up to 60 s, past this
            # client's 30 s) would only slow the run down
            query[p["name"]] = draw(st.sampled_from(["0", "", "-1", "61", "x", str(2 ** 70)]))
        elif p["name"] in ("agentId", "agent", "from", "to", "claimedBy") and draw(st.booleans()):
            query[p["name"]] = draw(st.sampled_from(list(BASE_AGENTS)))
        else:
            query[p["name"]] = draw(query_value(p["schema"]["type"]))
    if draw(st.integers(0, 20)) == 0:
        query[draw(st.sampled_from(["token", "access_token", "unknown", "since"]))] = draw(text())
    if query:
        path += "?" + urllib.parse.urlencode(query, encoding="utf-8", errors="surrogatepass")
    headers = {}
    body = None
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if schema is not None or method != "GET":
        shape = draw(st.integers(0, 9))
        if shape == 0:
            body = draw(st.sampled_from(RAW_BODIES))
        else:
            props = (schema or {}).get("properties", {})
            obj = {}
            for name, prop in props.items():
                if draw(st.integers(0, 2)):
                    if name in ("from", "agentId", "target", "to") and draw(st.booleans()):
                        obj[name] = draw(st.sampled_from(list(BASE_AGENTS) + ["tag:shared", "broadcast", "human"]))
                    elif draw(st.integers(0, 4)):
                        obj[name] = draw(typed(prop.get("type")))
                    else:
                        obj[name] = draw(json_values())
            if draw(st.integers(0, 10)) == 0:
                obj[draw(text())] = draw(json_values())
            body = Raw(json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass"))
        headers["Content-Type"] = draw(st.sampled_from(["application/json"] * 8 + [
            "text/plain", "application/json; charset=utf-8", "application/x-www-form-urlencoded", "multipart/form-data"]))
    if method in ("POST", "PATCH", "DELETE") and draw(st.integers(0, 15)) == 0:
        headers["Origin"] = draw(st.sampled_from(["http://evil.example", "null", "http://127.0.0.1:1"]))
    if template == "/api/integrations/events":
        token = draw(st.sampled_from([INTEG_TOKEN] * 6 + ["", "wrong-token-1234"]))
        if token:
            headers["Authorization"] = "Bearer " + token
    if draw(st.integers(0, 25)) == 0:
        method = draw(st.sampled_from(["PUT", "OPTIONS", "TRACE", "HEAD", "GET", "POST", "DELETE", "PATCH"]))
    return method, template, path, body, headers


def check_one(fz, method, template, path, body, headers):
    before = fz.fingerprint()
    if template == "/api/events" and method == "GET":
        status, answer = fz.stream_status(path, headers), None
    else:
        status, _, answer = fz.call(method, path, body, headers)
    log = fz.new_log()
    assert "Traceback" not in log, log
    assert 200 <= status < 500, (status, method, path, body, answer)
    if status >= 400 and method != "HEAD" and answer is not None:
        if template == "/api/mcp" and "jsonrpc" in answer:
            # the MCP transport answers in JSON-RPC, as the MCP specification says: an error object with a code
            assert answer["jsonrpc"] == "2.0" and isinstance(answer["error"]["code"], int) and answer["error"]["message"], answer
        else:
            assert set(answer) == {"error"} and answer["error"]["code"] and answer["error"]["message"], answer
    if 400 <= status < 500:
        after = fz.fingerprint()
        assert after == before, "a rejected request (%d %s) changed stored data: %s %s %r" % (
            status, answer, method, path, body[:300] if body else body)
    else:
        for aid in BASE_AGENTS:  # a successful delete or edit of a base agent is undone for the next example
            if template.startswith("/api/agents") and aid in urllib.parse.unquote(path):
                fz.restore(aid)
    return status


def test_spec_lists_every_route(fz):
    paths = {(m, p) for m, p, _ in fz.routes}
    assert len(paths) >= 28 and ("POST", "/api/messages") in paths and ("GET", "/api/events") in paths


@settings(max_examples=2400, **SETTINGS)
@given(data=st.data())
def test_generated_requests_on_every_route(fz, data):
    check_one(fz, *data.draw(requests(fz)))


@settings(max_examples=300, **SETTINGS)
@given(s=text())
def test_strings_are_stored_literally_or_refused(fz, s):
    """Every string field of a message and a task: what was sent is what is read back, or 400."""
    body = s if s.strip() else "x" + s
    msg = {"from": "fz-a", "to": "fz-b", "body": body, "subject": s, "payload": {s: [s, {"k": s}]}, "meta": {"m": s}}
    raw = json.dumps(msg).encode()
    status, _, out = fz.call("POST", "/api/messages", raw, {"Content-Type": "application/json"})
    has_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in s)
    if status == 400:
        assert has_surrogate or len(s) > 1024, (s, out)  # a lone surrogate is not text; a long subject is too long
        return
    assert status == 201 and not has_surrogate, (status, out)
    got = fz.call("GET", "/api/messages/%d" % out["message"]["id"])[2]["message"]
    for k in ("body", "subject", "payload", "meta"):
        assert got[k] == msg[k], k
    row = fz.relay.sql("SELECT body, subject FROM messages WHERE id = ?", (got["id"],))[0]
    assert (row["body"], row["subject"]) == (body, s)
    if len(s) <= 1024:
        status, _, out = fz.call("POST", "/api/tasks", json.dumps({"title": "t " + s, "target": "fz-a", "body": s,
                                                                    "metadata": {"s": s}, "from": "fz-b"}).encode(),
                                 {"Content-Type": "application/json"})
        assert status == 201, out
        task = fz.call("GET", "/api/tasks/%d" % out["task"]["id"])[2]["task"]
        assert (task["title"], task["body"], task["metadata"]) == ("t " + s, s, {"s": s})


def is_json_object(raw):
    """What the contract accepts as a body: empty, or a strict-JSON object in UTF-8 (no NaN, no overflow), not absurdly deep."""
    if not raw.strip():
        return True

    def refuse(_):
        raise ValueError

    def finite(t):
        if float(t) in (float("inf"), float("-inf")):
            raise ValueError
        return float(t)

    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=refuse, parse_float=finite)
        json.dumps(value).encode("utf-8")
    except (ValueError, RecursionError, UnicodeError):
        return False
    return isinstance(value, dict) and b"[" * 101 not in raw and b"{" * 101 not in raw and b"\\ud8" not in raw and b"\\udc" not in raw


@pytest.mark.parametrize("raw", RAW_BODIES, ids=lambda b: repr(b[:24]))
@pytest.mark.parametrize("route", ["/api/messages", "/api/agents", "/api/tasks", "/api/agents/fz-a/read",
                                   "/api/agents/fz-a/heartbeat"])
def test_hostile_bodies_are_refused_or_harmless(fz, route, raw):
    """A body that is not a JSON object in UTF-8 is 400 invalid_json on every route; anything else is no 5xx."""
    status = check_one(fz, "POST", route, route, raw, {"Content-Type": "application/json"})
    if not is_json_object(raw):
        assert status == 400, (route, raw, status)


def test_huge_numbers_in_every_integer_field_are_400(fz):
    big = 2 ** 70
    cases = [
        ("POST", "/api/messages", {"from": "fz-a", "to": "fz-b", "body": "x", "replyTo": big}),
        ("POST", "/api/agents/fz-a/read", {"upTo": big}),
        ("POST", "/api/agents/fz-a/heartbeat", {"epoch": big}),
        ("PATCH", "/api/agents/fz-a", {"epoch": big}),
        ("POST", "/api/messages/%d/claim" % fz.message_ids[1], {"agentId": "fz-b", "epoch": big}),
        ("POST", "/api/tasks/%d/claim" % fz.task_ids[0], {"agentId": "fz-b", "epoch": -1}),
    ]
    for method, path, body in cases:
        status = check_one(fz, method, path, path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        assert status == 400, (path, body, status)
    for path in ("/api/agents/fz-a/inbox?since=%d" % big, "/api/messages?before=%d" % big, "/api/callbacks?taskId=%d" % big,
                 "/api/messages?limit=%d" % big, "/api/events?since=%d" % big, "/api/tasks?limit=-1"):
        template = path.split("?")[0]
        assert check_one(fz, "GET", template, path, None, {}) == 400, path
    for path in ("/api/messages/%d" % big, "/api/tasks/%d" % big, "/api/messages/-1", "/api/tasks/%d/events" % big):
        assert check_one(fz, "GET", path, path, None, {}) == 404, path
    # inside a payload a huge number is just data: stored and read back exactly
    status, _, out = fz.call("POST", "/api/messages", json.dumps({"from": "fz-a", "to": "fz-b", "body": "n",
                                                                   "payload": {"n": big, "m": -big}}).encode(),
                             {"Content-Type": "application/json"})
    assert status == 201
    assert fz.call("GET", "/api/messages/%d" % out["message"]["id"])[2]["message"]["payload"] == {"n": big, "m": -big}


def test_deep_json_and_odd_paths(fz):
    deep = b"{\"from\":\"fz-a\",\"to\":\"fz-b\",\"body\":\"x\",\"payload\":" + b"[" * 10000 + b"]" * 10000 + b"}"
    assert check_one(fz, "POST", "/api/messages", "/api/messages", deep, {"Content-Type": "application/json"}) == 400
    for path in ("/api/agents/..%2F..%2Fetc%2Fpasswd", "/api/agents/%00", "/api/../api/health", "/api/agents/fz-a/../fz-b",
                 "/api/messages/1%00", "/api/messages/%F0%9F%92%A5", "/%2e%2e/%2e%2e/etc/passwd", "/api//agents",
                 "/api/agents/" + "a" * 5000, "/api/messages?q=%FF%FE%00", "/api/agents?tag=%ED%A0%80"):
        status = check_one(fz, "GET", path.split("?")[0], path, None, {})
        assert status in (200, 400, 403, 404), (path, status)
