"""Shared fixtures: every test talks HTTP to a real relay process.

`relay` starts `agent_relay.py serve` on port 0 with a temporary database and
stops it afterwards; `relay_factory` starts more (with other variables or
flags) and `Relay.restart(kill=True)` simulates a crash with SIGKILL.
"""
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import pytest

try:
    import jsonschema
except ImportError:  # tests/requirements.txt installs it; without it, answers are not checked against the spec
    jsonschema = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELAY_PY = os.path.join(ROOT, "agent_relay.py")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
if IN_CI and jsonschema is None:  # the check of every answer against /api/spec is not skipped under CI
    raise ImportError("missing under CI: jsonschema (tests/requirements.txt), which checks each answer against /api/spec")


def need(tool_ok, why):
    """Skip a test for a missing tool locally; fail it under CI, where .ci/run installs everything."""
    if tool_ok:
        return
    if IN_CI:
        pytest.fail("missing under CI: " + why)
    pytest.skip(why)


def wait_for(predicate, timeout=20.0, every=0.05):
    """Poll until predicate() is truthy (returning its value) or the time is up (returning its last value)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


def hang_up(s):
    """Closes a socket with a reset (SO_LINGER 0), as a killed client does."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    s.close()


def raw_exchange(port, data, head_only=False, reset=False, timeout=10):
    """Send `data` exactly as given on a fresh connection (http.client would add and fix headers) and read the answer:
    only its head, or until the body is complete or the relay closes. `reset` hangs up with RST, as a killed client
    does. Returns (status, headers with lower-case names, body); status 0 when no HTTP answer came."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = b""
    try:
        s.sendall(data)
        while True:
            head, sep, body = got.partition(b"\r\n\r\n")
            if sep:
                lengths = [int(l.split(b":", 1)[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                if head_only or (lengths and len(body) >= lengths[0]):
                    break
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    finally:
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    head, _, body = got.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return 0, {}, got
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers, body


class Resp:
    def __init__(self, status, body, headers):
        self.status = status
        self.body = body
        self.headers = headers
        try:
            self.json = json.loads(body.decode("utf-8")) if body else None
        except ValueError:
            self.json = None

    @property
    def code(self):
        """The error code of an error envelope, or None."""
        if isinstance(self.json, dict) and isinstance(self.json.get("error"), dict):
            return self.json["error"].get("code")
        return None

    def __repr__(self):
        return "<Resp %s %r>" % (self.status, self.body[:300])


class SpecCheck:
    """The relay's /api/spec, and the check every answer to an /api request gets against it: its status is one the
    spec declares for the operation, and its JSON body validates against the schema declared for that status. An
    answer to no operation of the spec (404 no route, 405) must be the relay's error envelope. Streams (SSE) and
    bodies that are not JSON are left alone."""

    def __init__(self, spec):
        self.spec = spec
        self.operations = []  # (method, path pattern, path template, operation), paths with fewer parameters first
        for path, ops in sorted(spec["paths"].items(), key=lambda kv: (kv[0].count("{"), kv[0])):
            regex = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$")
            for method, op in ops.items():
                self.operations.append((method.upper(), regex, path, op))
        self._validators = {}

    def operation(self, method, path):
        method = "GET" if method == "HEAD" else method
        for m, regex, template, op in self.operations:
            if m == method and regex.match(path):
                return template, op
        return None, None

    def validator(self, key, schema):
        v = self._validators.get(key)
        if v is None:
            root = dict(schema)
            root["components"] = self.spec["components"]  # for the #/components/... references
            v = self._validators[key] = jsonschema.Draft202012Validator(root)
        return v

    def component_problem(self, name, value):
        """What is wrong with `value` as the spec's components/schemas/<name>, or None."""
        errors = list(self.validator(name, {"$ref": "#/components/schemas/" + name}).iter_errors(value))
        if not errors:
            return None
        e = jsonschema.exceptions.best_match(errors)
        return "%s: at %s: %s" % (name, "/".join(str(p) for p in e.absolute_path) or "(the value)", e.message[:500])

    def problem(self, method, path, status, headers, body):
        """What is wrong with this answer per the spec, or None."""
        ctype = (headers.get("content-type") or "").split(";")[0].strip().lower()
        if method == "HEAD" or ctype == "text/event-stream":
            return None
        template, op = self.operation(method, path)
        where = "%s %s" % (method, template or path)
        if op is None:
            declared, schema = {"content": {"application/json": {}}}, {"$ref": "#/components/schemas/Error"}
            if status < 400:
                return "%s: answered %d, but the spec has no such operation" % (where, status)
        else:
            declared = op["responses"].get(str(status))
            if declared is None:
                return "%s: answered %d, which the spec does not declare for it (it declares %s)" % (
                    where, status, ", ".join(sorted(op["responses"])))
            while "$ref" in declared:
                declared = self.spec["components"]["responses"][declared["$ref"].rsplit("/", 1)[1]]
            schema = ((declared.get("content") or {}).get("application/json") or {}).get("schema")
        if "application/json" not in (declared.get("content") or {}):
            if body and ctype == "application/json":
                return "%s: answered %d with a JSON body, where the spec declares none" % (where, status)
            return None
        if ctype != "application/json":
            return None  # not JSON: left alone by design
        try:
            value = json.loads(body.decode("utf-8"))
        except ValueError as e:
            return "%s: answered %d with a body that is not JSON (%s): %r" % (where, status, e, body[:200])
        errors = sorted(self.validator((where, status), schema or {}).iter_errors(value),
                        key=lambda e: (len(list(e.absolute_path)), str(e.message)))
        if not errors:
            return None
        e = jsonschema.exceptions.best_match(errors)
        at = "/".join(str(p) for p in e.absolute_path) or "(the body)"
        return "%s: the %d answer does not fit the spec's schema: at %s: %s (schema path %s); body %s" % (
            where, status, at, e.message[:500], "/".join(str(p) for p in e.absolute_schema_path), body[:300])


class Relay:
    """One relay process plus a small HTTP client for it. Every answer to an /api request is checked against the
    relay's own /api/spec (SpecCheck; fetched once per relay): a test fails on an answer that the spec does not
    describe."""

    def __init__(self, tmpdir, env=None, args=None, db_path=None, cwd=None, script=None):
        self.tmpdir = tmpdir
        self.db_path = db_path or os.path.join(tmpdir, "relay.db")
        self.extra_env = dict(env or {})
        self.args = list(args or [])
        self.cwd = cwd or tmpdir
        self.script = script or RELAY_PY
        self.proc = None
        self.port = None
        self.output = []
        self.token = self.extra_env.get("AGENT_RELAY_TOKEN")
        self._local = threading.local()
        self.check_answers = jsonschema is not None and self.script == RELAY_PY  # another relay file has its own spec
        self._spec_check = None

    # -- process -----------------------------------------------------------
    def start(self, port=0, timeout=15):
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("AGENT_RELAY_") or k in ("HOST", "PORT", "STALE_TTL_MS", "OFFLINE_PRUNE_MS", "RETENTION_DAYS"):
                del env[k]
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [sys.executable, self.script, "serve", "--port", str(port), "--db", self.db_path] + self.args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        self.output = []
        found = threading.Event()

        def pump():
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.output.append(line)
                m = re.search(r"listening on http://[^\s:]+:(\d+)", line)
                if m and not found.is_set():
                    self.port = int(m.group(1))
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.time() + timeout
        while not found.wait(0.05):
            if self.proc.poll() is not None or time.time() > deadline:
                time.sleep(0.2)
                raise RuntimeError("relay did not start:\n" + "\n".join(self.output))
        self._local = threading.local()
        return self

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def kill(self):
        return self.stop(signal.SIGKILL)

    def restart(self, kill=False, same_port=False):
        port = self.port if same_port else 0
        self.kill() if kill else self.stop()
        return self.start(port=port)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def log(self):
        return "\n".join(self.output)

    # -- HTTP --------------------------------------------------------------
    def _conn(self, timeout):
        c = getattr(self._local, "conn", None)
        if c is None or getattr(self._local, "port", None) != self.port:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            self._local.conn = c
            self._local.port = self.port
        c.timeout = timeout
        if c.sock is not None:
            c.sock.settimeout(timeout)
        return c

    def spec_check(self):
        """The SpecCheck of this relay's /api/spec, fetched on first use."""
        if self._spec_check is None:
            r = self.request("GET", "/api/spec", check=False)
            assert r.status == 200 and isinstance(r.json, dict), "GET /api/spec: %r" % r
            self._spec_check = SpecCheck(r.json)
        return self._spec_check

    def check_answer(self, method, path, r):
        """Fails the test when the answer `r` to method path does not fit the relay's spec."""
        path = urllib.parse.urlsplit(path).path
        if not path.startswith("/api/"):
            return
        problem = self.spec_check().problem(method, path, r.status, r.headers, r.body)
        if problem:
            pytest.fail("the relay's answer does not match /api/spec: " + problem, pytrace=False)

    def request(self, method, path, body=None, headers=None, raw=None, timeout=30, token=True, query=None, check=True):
        hdrs = {}
        if token and self.token:
            hdrs["Authorization"] = "Bearer " + self.token
        if raw is not None:
            data = raw if isinstance(raw, bytes) else raw.encode("utf-8")
            hdrs["Content-Type"] = "application/json"
        elif body is not None:
            data = json.dumps(body).encode("utf-8")
            hdrs["Content-Type"] = "application/json"
        else:
            data = None
        hdrs.update(headers or {})
        hdrs = {k: v for k, v in hdrs.items() if v is not None}
        if query:
            path = path + ("&" if "?" in path else "?") + urllib.parse.urlencode(query)
        for attempt in (1, 2):
            c = self._conn(timeout)
            try:
                c.request(method, path, body=data, headers=hdrs)
                r = c.getresponse()
                payload = r.read()
                if r.getheader("Connection", "").lower() == "close":
                    c.close()
                    self._local.conn = None
                resp = Resp(r.status, payload, dict((k.lower(), v) for k, v in r.getheaders()))
                if check and self.check_answers:
                    self.check_answer(method, path, resp)
                return resp
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.CannotSendRequest):
                c.close()
                self._local.conn = None
                if attempt == 2:
                    raise

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body=body, **kw)

    def patch(self, path, body=None, **kw):
        return self.request("PATCH", path, body=body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    # -- conveniences ------------------------------------------------------
    def register(self, agent_id, **fields):
        fields["id"] = agent_id
        r = self.post("/api/agents", fields)
        assert r.status in (200, 201), r
        return r.json

    def send(self, frm, to, body, **fields):
        fields.update({"from": frm, "to": to, "body": body})
        r = self.post("/api/messages", fields)
        assert r.status in (200, 201), r
        return r.json["message"]

    def inbox(self, agent_id, **query):
        q = urllib.parse.urlencode(query)
        r = self.get("/api/agents/%s/inbox%s" % (agent_id, "?" + q if q else ""))
        assert r.status == 200, r
        return r.json

    def sql(self, query, params=()):
        """Read the stored state straight from the database file."""
        import sqlite3

        con = sqlite3.connect("file:%s?mode=ro" % self.db_path, uri=True, timeout=10)
        try:
            con.row_factory = sqlite3.Row
            return [dict(r) for r in con.execute(query, params)]
        finally:
            con.close()


@pytest.fixture
def relay_factory(tmp_path):
    started = []

    def make(env=None, args=None, start=True, **kw):
        d = tempfile.mkdtemp(dir=str(tmp_path))
        r = Relay(d, env=env, args=args, **kw)
        started.append(r)
        return r.start() if start else r

    yield make
    for r in started:
        r.stop()


@pytest.fixture
def relay(relay_factory):
    return relay_factory()


# -- the real CLIs' surroundings (tests/test_real_*.py, tests/test_codex_launcher.py) ------------------------------


@pytest.fixture
def proxy():
    """A loopback proxy port that refuses every connection: the real CLIs' outbound traffic goes nowhere."""
    from realcli import RefusingProxy

    p = RefusingProxy()
    yield p
    p.close()


@pytest.fixture
def model_factory():
    """Starts scripted model endpoints (tests/scripted_model.py) for the real CLIs, stopped after the test."""
    from scripted_model import ScriptedModel

    started = []

    def make(policy):
        m = ScriptedModel(policy).start()
        started.append(m)
        return m

    yield make
    for m in started:
        m.stop()
