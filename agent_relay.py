#!/usr/bin/env python3
"""Agent Relay: a message bus for AI coding agents, in one file.

One file, standard library only, Python 3.8 or newer. Run it with
`python3 agent_relay.py` and it serves the relay on http://127.0.0.1:4850:
agents register, address each other by id, tag, capability, label or
broadcast, claim work, and get their messages the moment they arrive through
long-polls or a Server-Sent Events stream. Alerts and tickets from outside
systems become deduplicated tasks whose progress is called back to the system
that raised them. Everything is kept in SQLite, so a restart loses nothing,
and the dashboard at `/` shows it all live.

The same file is the client: `RelayClient`, the agent commands (`register`,
`send`, `inbox`, `watch`, ...), the hooks for Claude Code and Codex, and the
operations commands (`setup`, `daemon`, `backup`). `python3 agent_relay.py
--help` lists them.

Data flow: a request enters through the route table (HTTP layer), is
validated there, goes down to the relay's domain methods, which write through
`Storage` in one short transaction, then publish an event to the `Hub`, which
wakes exactly the long-polls and streams the change concerns.

The HTTP contract lives in API.md beside the README; `GET /api/spec` serves
it as OpenAPI, and tests/test_spec.py keeps that and the router in step.
"""

__version__ = "0.1.0"

import sys

if sys.version_info < (3, 8):  # noqa: UP036 - the friendly message is the point
    sys.stderr.write(
        "agent-relay needs Python 3.8 or newer; this is Python %s.\n"
        "Install a newer python3 (e.g. `apt install python3`, `brew install python`, "
        "or python.org) and run it again.\n" % sys.version.split()[0]
    )
    sys.exit(1)

import argparse
import base64
import binascii
import bisect
import collections
import contextlib
import gzip
import hashlib
import hmac
import http.client
import io
import json
import os
import platform
import queue
import re
import secrets
import select
import signal
import socket
import sqlite3
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# ============================================================================
# Small helpers
# ============================================================================


def now_ms():
    return int(time.time() * 1000)


def dumps(obj):
    """Compact JSON; non-ASCII is kept as UTF-8."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def loads_or(text, default):
    if text is None:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def is_loopback_host(host):
    host = (host or "").strip("[]").lower()
    if host in ("localhost", "::1"):
        return True
    return host.startswith("127.")


def say(*parts):
    print(*parts, flush=True)


# Subcommands register here (defined this early so that any section can use @command);
# the command line at the end of the file builds its parser from COMMANDS.
COMMANDS = {}  # name -> (function, configure parser, help)


def command(name, help_text):
    def register(fn):
        COMMANDS[name] = (fn, getattr(fn, "configure", None), help_text)
        return fn

    return register


# ============================================================================
# Errors
# ============================================================================


class ApiError(Exception):
    """An error the client is told about, as {"error": {"code", "message"}}."""

    def __init__(self, status, code, message, headers=None, **extra):
        Exception.__init__(self, message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def body(self):
        err = {"code": self.code, "message": self.message}
        err.update(self.extra)
        return {"error": err}


def invalid(field, problem):
    return ApiError(400, "invalid_field", "%s: %s" % (field, problem), field=field)


def not_found(what):
    return ApiError(404, "not_found", "%s was not found." % what)


def unknown_agent(agent_id):
    return ApiError(404, "unknown_agent", "No agent %r is registered; register it with POST /api/agents first." % agent_id)


class ConfigError(Exception):
    """A configuration value that stops the start, with a message naming it."""


# ============================================================================
# Configuration: one object from variables and flags, validated once
# ============================================================================


def default_db_path():
    home = os.path.expanduser("~")
    if sys.platform == "darwin":
        base = os.path.join(home, "Library", "Application Support")
    elif os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(home, "AppData", "Local")
    else:
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    return os.path.join(base, "agent-relay", "relay.db")


def _parse_int(lo=0, hi=None):
    def parse(text):
        try:
            value = int(str(text).strip())
        except ValueError:
            raise ValueError("%r is not a whole number" % text)
        if value < lo or (hi is not None and value > hi):
            raise ValueError("%r is out of range (%s..%s)" % (text, lo, hi if hi is not None else "any"))
        return value

    return parse


def _parse_bool(text):
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("%r is not a boolean (use 1 or 0)" % text)


def _parse_list(text):
    return [p.strip() for p in str(text).split(",") if p.strip()]


def _parse_str(text):
    return str(text)


def _parse_integrations(text):
    try:
        data = json.loads(text) if str(text).strip() else []
    except ValueError as e:
        raise ValueError("is not valid JSON (%s)" % e)
    if not isinstance(data, list):
        raise ValueError("must be a JSON list of integrations")
    seen = set()
    out = []
    for i, item in enumerate(data):
        where = "integration #%d" % (i + 1)
        if not isinstance(item, dict):
            raise ValueError("%s is not an object" % where)
        for key in ("name", "token"):
            if not isinstance(item.get(key), str) or not item.get(key):
                raise ValueError("%s needs a non-empty string %r" % (where, key))
        name = item["name"]
        if not re.match(r"^[A-Za-z0-9._-]{1,64}$", name):
            raise ValueError("%s: name %r may hold only letters, digits, '.', '_' and '-'" % (where, name))
        if name in seen:
            raise ValueError("integration name %r appears twice" % name)
        seen.add(name)
        for key in ("scopes", "targets", "channels"):
            v = item.get(key, [])
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                raise ValueError("integration %r: %r must be a list of strings" % (name, key))
        if not item.get("targets"):
            raise ValueError("integration %r: 'targets' needs at least one target" % name)
        for key in ("callbackUrl", "callbackSecret"):
            if item.get(key) is not None and not isinstance(item.get(key), str):
                raise ValueError("integration %r: %r must be a string" % (name, key))
        url = item.get("callbackUrl")
        if url and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("integration %r: callbackUrl must be an http(s) URL" % name)
        out.append(
            {
                "name": name,
                "token": item["token"],
                "scopes": list(item.get("scopes", [])),
                "targets": list(item["targets"]),
                "channels": list(item.get("channels", [])),
                "callbackUrl": url or None,
                "callbackSecret": item.get("callbackSecret") or None,
            }
        )
    return out


# (attribute, variable, flag, parser, default, help)
SETTINGS = [
    ("host", "HOST", "--host", _parse_str, "127.0.0.1", "Bind address"),
    ("port", "PORT", "--port", _parse_int(0, 65535), 4850, "Port (0 picks a free one and prints it)"),
    ("db", "AGENT_RELAY_DB", "--db", _parse_str, None, "SQLite file; :memory: for a throwaway relay"),
    ("token", "AGENT_RELAY_TOKEN", "--token", _parse_str, None, "Shared token (prefer the variable: flags show in ps)"),
    ("allowed_hosts", "AGENT_RELAY_ALLOWED_HOSTS", "--allowed-hosts", _parse_list, [], "Extra Host names, comma-separated"),
    ("stale_ttl_ms", "STALE_TTL_MS", "--stale-ttl-ms", _parse_int(100), 90000, "Silence before an agent is offline"),
    ("offline_prune_ms", "OFFLINE_PRUNE_MS", "--offline-prune-ms", _parse_int(0), 604800000, "Offline time before removal"),
    ("retention_days", "RETENTION_DAYS", "--retention-days", _parse_int(0), 14, "Age at which old rows go (0 keeps all)"),
    ("max_body_bytes", "AGENT_RELAY_MAX_BODY_BYTES", "--max-body-bytes", _parse_int(1024), 262144, "Largest request body"),
    ("integrations", "AGENT_RELAY_INTEGRATIONS", "--integrations", _parse_integrations, [], "Integrations, a JSON list"),
    (
        "integration_rate_limit",
        "AGENT_RELAY_INTEGRATION_RATE_LIMIT_PER_MINUTE",
        "--integration-rate-limit-per-minute",
        _parse_int(1),
        120,
        "Per-integration ingress limit",
    ),
    ("callback_max_attempts", "AGENT_RELAY_CALLBACK_MAX_ATTEMPTS", "--callback-max-attempts", _parse_int(1, 100), 8, "Callback tries"),
    ("sse_ping_ms", "AGENT_RELAY_SSE_PING_MS", "--sse-ping-ms", _parse_int(100), 15000, "Stream keep-alive interval"),
    ("agent_keys", "AGENT_RELAY_AGENT_KEYS", "--agent-keys", _parse_bool, False, "Per-agent keys (1 to turn on)"),
    ("admin_token", "AGENT_RELAY_ADMIN_TOKEN", "--admin-token", _parse_str, None, "The person's token when agent keys are on"),
]


class Config:
    """Every setting of a relay, built from variables and flags (a flag beats its variable)."""

    def __init__(self, **values):
        for attr, _var, _flag, _parse, default, _help in SETTINGS:
            setattr(self, attr, values.get(attr, default))
        if self.db is None:
            self.db = default_db_path()

    @classmethod
    def from_sources(cls, env=None, flags=None):
        env = os.environ if env is None else env
        flags = flags or {}
        values = {}
        for attr, var, flag, parse, default, _help in SETTINGS:
            raw, source = None, None
            if flags.get(attr) is not None:
                raw, source = flags[attr], flag
            elif env.get(var) not in (None, ""):
                raw, source = env[var], var
            if source is None:
                values[attr] = default
                continue
            try:
                values[attr] = parse(raw)
            except ValueError as e:
                raise ConfigError("%s: %s" % (source, e))
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self):
        if self.token is not None and len(self.token) < 8:
            raise ConfigError("AGENT_RELAY_TOKEN: a token needs at least 8 characters")
        if not is_loopback_host(self.host) and not self.token:
            raise ConfigError(
                "HOST: binding %s (not loopback) needs AGENT_RELAY_TOKEN, or anyone who can reach the port "
                "controls your agents. Make one with:\n  export AGENT_RELAY_TOKEN=$(python3 -c "
                "'import secrets; print(secrets.token_urlsafe(32))')" % self.host
            )
        if self.agent_keys and not (self.token and self.admin_token):
            raise ConfigError("AGENT_RELAY_AGENT_KEYS: agent keys need both AGENT_RELAY_TOKEN and AGENT_RELAY_ADMIN_TOKEN")
        if self.admin_token is not None and self.token is not None and hmac.compare_digest(self.admin_token, self.token):
            raise ConfigError("AGENT_RELAY_ADMIN_TOKEN: the admin token must differ from AGENT_RELAY_TOKEN")
        names = {i["token"] for i in self.integrations}
        if self.token in names or (self.admin_token and self.admin_token in names):
            raise ConfigError("AGENT_RELAY_INTEGRATIONS: an integration token must differ from the relay's tokens")

    @property
    def loopback(self):
        return is_loopback_host(self.host)


# ============================================================================
# Storage: schema, migrations, and one method per query
# ============================================================================

SCHEMA = [
    # version 1
    """
    CREATE TABLE agents(
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        label TEXT,
        machine TEXT,
        rig TEXT,
        project TEXT,
        tags TEXT NOT NULL DEFAULT '[]',
        capabilities TEXT NOT NULL DEFAULT '[]',
        channels TEXT NOT NULL DEFAULT '["all"]',
        status TEXT NOT NULL DEFAULT 'online',
        ready INTEGER NOT NULL DEFAULT 1,
        approval_mode TEXT NOT NULL DEFAULT 'open',
        instance_id TEXT,
        epoch INTEGER NOT NULL DEFAULT 0,
        meta TEXT NOT NULL DEFAULT '{}',
        last_seen INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        offline_since INTEGER,
        system INTEGER NOT NULL DEFAULT 0,
        floor_id INTEGER NOT NULL DEFAULT 0,
        cursor INTEGER NOT NULL DEFAULT 0,
        key_hash TEXT
    );
    CREATE TABLE messages(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        from_agent TEXT NOT NULL,
        to_target TEXT NOT NULL,
        subject TEXT,
        body TEXT NOT NULL,
        kind TEXT NOT NULL DEFAULT 'chat',
        channel TEXT,
        claimable INTEGER NOT NULL DEFAULT 0,
        claimed_by TEXT,
        claimed_at INTEGER,
        reply_to INTEGER,
        thread_id INTEGER,
        idempotency_key TEXT,
        payload TEXT NOT NULL DEFAULT '{}',
        meta TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL
    );
    CREATE INDEX messages_target ON messages(to_target, id);
    CREATE INDEX messages_from ON messages(from_agent, id);
    CREATE INDEX messages_thread ON messages(thread_id, id);
    CREATE INDEX messages_created ON messages(created_at);
    CREATE INDEX messages_claimed_by ON messages(claimed_by) WHERE claimed_by IS NOT NULL;
    CREATE INDEX messages_unclaimed ON messages(id) WHERE claimable = 1 AND claimed_by IS NULL;
    CREATE UNIQUE INDEX messages_idempotency ON messages(from_agent, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE TABLE receipts(
        message_id INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        state TEXT NOT NULL,
        delivered_at INTEGER,
        read_at INTEGER,
        PRIMARY KEY(message_id, agent_id)
    ) WITHOUT ROWID;
    CREATE INDEX receipts_agent ON receipts(agent_id, state);
    CREATE INDEX receipts_held ON receipts(state, message_id) WHERE state = 'held';
    CREATE TABLE redeliveries(
        agent_id TEXT NOT NULL,
        message_id INTEGER NOT NULL,
        PRIMARY KEY(agent_id, message_id)
    ) WITHOUT ROWID;
    CREATE TABLE tasks(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        title TEXT NOT NULL,
        body TEXT,
        status TEXT NOT NULL,
        target TEXT NOT NULL,
        channel TEXT,
        severity TEXT,
        dedupe_key TEXT,
        source TEXT NOT NULL,
        integration TEXT,
        external_url TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        claimed_by TEXT,
        claimed_at INTEGER,
        progress TEXT,
        result TEXT,
        occurrence_count INTEGER NOT NULL DEFAULT 1,
        first_seen_at INTEGER NOT NULL,
        last_seen_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        message_id INTEGER
    );
    CREATE UNIQUE INDEX tasks_active_dedupe ON tasks(source, dedupe_key)
        WHERE dedupe_key IS NOT NULL AND status IN ('open', 'claimed', 'blocked');
    CREATE INDEX tasks_status ON tasks(status, id);
    CREATE INDEX tasks_message ON tasks(message_id);
    CREATE INDEX tasks_claimed_by ON tasks(claimed_by) WHERE claimed_by IS NOT NULL;
    CREATE INDEX tasks_updated ON tasks(updated_at);
    CREATE TABLE task_events(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id INTEGER NOT NULL,
        type TEXT NOT NULL,
        actor TEXT,
        data TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL
    );
    CREATE INDEX task_events_task ON task_events(task_id, id);
    CREATE TABLE callbacks(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task_id INTEGER NOT NULL,
        integration TEXT NOT NULL,
        event TEXT NOT NULL,
        body TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending',
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        last_error TEXT,
        created_at INTEGER NOT NULL,
        delivered_at INTEGER
    );
    CREATE INDEX callbacks_pending ON callbacks(integration, task_id, id) WHERE status = 'pending';
    CREATE INDEX callbacks_task ON callbacks(task_id, id);
    CREATE INDEX callbacks_status ON callbacks(status, created_at);
    CREATE TABLE events(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        type TEXT NOT NULL,
        agent_id TEXT,
        audience TEXT,
        data TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX events_created ON events(created_at);
    """,
]


class StorageUnavailable(Exception):
    """The database cannot take a write right now (read-only, full, locked)."""


def storage_problem(exc):
    """Words a person can act on for an sqlite3 error, or None when it is not a storage fault."""
    text = str(exc).lower()
    if "readonly" in text or "read-only" in text or "attempt to write a readonly" in text:
        return "The database file is read-only; make it writable again (the relay recovers by itself)."
    if "disk is full" in text or "full" in text and "database" in text:
        return "The disk holding the database is full; free some space (the relay recovers by itself)."
    if "locked" in text or "busy" in text:
        return "The database is locked by another process; stop it or wait (the relay recovers by itself)."
    if "disk i/o" in text or "unable to open" in text:
        return "The database file cannot be written (%s); check the disk and the file." % exc
    return None


class Storage:
    """The SQLite database: one writer connection behind a lock, a pool of readers.

    Writes are short `BEGIN IMMEDIATE` transactions; readers use their own
    connections so that they never wait for the write lock (WAL).
    """

    BUSY_TIMEOUT_MS = 5000

    def __init__(self, path):
        self.path = path
        self.memory = path == ":memory:"
        if not self.memory:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
        self.lock = threading.RLock()
        self._writer = self._connect()
        self._readers = queue.LifoQueue()
        self._closed = False
        self.migrate()

    def _connect(self, readonly=False):
        if self.memory:
            con = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        else:
            con = sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT_MS / 1000.0, check_same_thread=False, isolation_level=None)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA busy_timeout = %d" % self.BUSY_TIMEOUT_MS)
        if not self.memory and not readonly:
            con.execute("PRAGMA journal_mode = WAL")
        con.execute("PRAGMA synchronous = NORMAL")
        con.execute("PRAGMA foreign_keys = OFF")
        if readonly:
            con.execute("PRAGMA query_only = ON")
        return con

    def migrate(self):
        with self.lock:
            c = self._writer
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > len(SCHEMA):
                raise ConfigError(
                    "AGENT_RELAY_DB: %s was written by a newer agent-relay (schema %d, this one knows %d); "
                    "upgrade agent_relay.py" % (self.path, version, len(SCHEMA))
                )
            for v in range(version, len(SCHEMA)):
                c.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in SCHEMA[v].split(";"):
                        if stmt.strip():
                            c.execute(stmt)
                    c.execute("PRAGMA user_version = %d" % (v + 1))
                    c.execute("COMMIT")
                except BaseException:
                    c.execute("ROLLBACK")
                    raise

    @contextlib.contextmanager
    def write(self):
        """One short write transaction; yields the writer connection."""
        with self.lock:
            if self._closed:
                raise StorageUnavailable("The relay is shutting down.")
            c = self._writer
            try:
                c.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise StorageUnavailable(storage_problem(e) or "The database is unavailable: %s" % e)
            try:
                yield c
                c.execute("COMMIT")
            except BaseException as e:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(e, sqlite3.OperationalError) and storage_problem(e):
                    raise StorageUnavailable(storage_problem(e))
                raise

    @contextlib.contextmanager
    def read(self):
        """A connection for reading; never takes the write lock (except for :memory:)."""
        if self.memory:
            with self.lock:
                yield self._writer
            return
        try:
            con = self._readers.get_nowait()
        except queue.Empty:
            con = self._connect(readonly=True)
        try:
            yield con
        except sqlite3.OperationalError as e:
            problem = storage_problem(e)
            if problem:
                raise StorageUnavailable(problem)
            raise
        finally:
            if con.in_transaction:
                con.execute("ROLLBACK")
            if self._closed or self._readers.qsize() >= 16:
                con.close()
            else:
                self._readers.put(con)

    def query(self, sql, params=()):
        with self.read() as c:
            return c.execute(sql, params).fetchall()

    def query_one(self, sql, params=()):
        with self.read() as c:
            return c.execute(sql, params).fetchone()

    def backup_to(self, dest_path):
        """A consistent online copy, through SQLite's backup API."""
        dest = sqlite3.connect(dest_path)
        try:
            with self.read() as c:
                c.backup(dest)
        finally:
            dest.close()

    def close(self):
        with self.lock:
            self._closed = True
            while True:
                try:
                    self._readers.get_nowait().close()
                except queue.Empty:
                    break
            try:
                if not self.memory:
                    self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._writer.close()

# ============================================================================
# Domain rules: validation, targets, visibility, task transitions (pure)
# ============================================================================

SYSTEM_AGENTS = ("human", "system")
STATUSES = ("online", "idle", "busy", "offline")
APPROVAL_MODES = ("open", "guarded", "read-only")
FANOUT_PREFIXES = ("tag:", "cap:", "label:")
TASK_STATUSES = ("open", "claimed", "blocked", "done", "failed", "canceled")
TASK_ACTIVE = ("open", "claimed", "blocked")
TASK_FINAL = ("done", "failed", "canceled")
# status -> the statuses a PATCH may move it to (claiming has its own route)
TASK_TRANSITIONS = {
    "open": ("canceled",),
    "claimed": ("blocked", "open", "done", "failed", "canceled"),
    "blocked": ("claimed", "open", "done", "failed", "canceled"),
    "done": (),
    "failed": (),
    "canceled": (),
}
AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
MAX_INT = 2 ** 63 - 1
MAX_TEXT = 64 * 1024


class Fields:
    """Typed access to a JSON request body; every problem names its field."""

    def __init__(self, data, where="body"):
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "The request body must be a JSON object, not %s." % type(data).__name__)
        self.data = data

    def has(self, name):
        return name in self.data

    def string(self, name, required=False, max_len=256, empty=False, default=None):
        v = self.data.get(name)
        if v is None:
            if required:
                raise invalid(name, "is required (a string)")
            return default
        if not isinstance(v, str):
            raise invalid(name, "must be a string")
        if not empty and not v.strip():
            raise invalid(name, "must not be empty")
        if len(v) > max_len:
            raise invalid(name, "is longer than %d characters" % max_len)
        return v

    def integer(self, name, required=False, lo=0, hi=MAX_INT, default=None):
        v = self.data.get(name)
        if v is None:
            if required:
                raise invalid(name, "is required (a whole number)")
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise invalid(name, "must be a whole number")
        if v < lo or v > hi:
            raise invalid(name, "must be between %d and %d" % (lo, hi))
        return v

    def boolean(self, name, default=None):
        v = self.data.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise invalid(name, "must be true or false")
        return v

    def obj(self, name, default=None, max_bytes=64 * 1024):
        v = self.data.get(name)
        if v is None:
            return default
        if not isinstance(v, dict):
            raise invalid(name, "must be a JSON object")
        if len(dumps(v)) > max_bytes:
            raise invalid(name, "is larger than %d bytes" % max_bytes)
        return v

    def str_list(self, name, default=None, max_items=64, max_len=64, pattern=None):
        v = self.data.get(name)
        if v is None:
            return default
        if isinstance(v, str):  # "a,b" is accepted for convenience
            v = [p.strip() for p in v.split(",") if p.strip()]
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
            raise invalid(name, "must be a list of non-empty strings")
        if len(v) > max_items:
            raise invalid(name, "has more than %d items" % max_items)
        out = []
        for s in v:
            s = s.strip()
            if len(s) > max_len:
                raise invalid(name, "item %r is longer than %d characters" % (s[:20], max_len))
            if pattern and not pattern.match(s):
                raise invalid(name, "item %r may hold only letters, digits and . _ : @ -" % s)
            if s not in out:
                out.append(s)
        return out

    def choice(self, name, choices, default=None):
        v = self.data.get(name)
        if v is None:
            return default
        if v not in choices:
            raise invalid(name, "must be one of %s" % ", ".join(choices))
        return v

    def any_json(self, name, default=None, max_bytes=64 * 1024):
        if name not in self.data or self.data[name] is None:
            return default
        v = self.data[name]
        if len(dumps(v)) > max_bytes:
            raise invalid(name, "is larger than %d bytes" % max_bytes)
        return v


WORD_RE = re.compile(r"^[A-Za-z0-9._:@/-]{1,64}$")


def check_agent_id(agent_id, field="id"):
    if not isinstance(agent_id, str) or not AGENT_ID_RE.match(agent_id):
        raise invalid(field, "an agent id is 1-128 letters, digits or . _ : @ - and starts with a letter or digit")
    low = agent_id.lower()
    if low == "broadcast" or low.startswith(FANOUT_PREFIXES):
        raise invalid(field, "an agent id may not be 'broadcast' nor start with tag:, cap: or label:")
    return agent_id


def derive_agent_id(machine, rig, project, seed):
    """{machine}-{rig}-{project}-{8 hex of sha1(seed)}, lower-case, unsafe characters as '-'."""
    digest = hashlib.sha1(seed.encode("utf-8")).hexdigest()[:8]
    parts = [p if p else "unknown" for p in (machine, rig, project)] + [digest]
    raw = "-".join(parts).lower()
    return re.sub(r"[^a-z0-9._-]+", "-", raw).strip("-")[:128]


def parse_target(to, field="to"):
    """Returns (kind, value): kind is 'agent', 'tag', 'cap', 'label' or 'broadcast'."""
    if not isinstance(to, str) or not to.strip():
        raise invalid(field, "is required: an agent id, tag:X, cap:X, label:X or broadcast")
    if to == "broadcast":
        return "broadcast", None
    for prefix in FANOUT_PREFIXES:
        if to.startswith(prefix):
            value = to[len(prefix):]
            if not value or len(value) > 64:
                raise invalid(field, "%r needs a name after %r (1-64 characters)" % (to, prefix))
            return prefix[:-1], value
    if not AGENT_ID_RE.match(to):
        raise invalid(field, "%r is not an agent id, tag:X, cap:X, label:X or broadcast" % to[:80])
    return "agent", to


def agent_targets(agent):
    """The `to` values that address this agent, by its current id, tags, capabilities and label."""
    if agent.get("system"):
        return [agent["id"]]  # built-in agents get direct messages only, as fanout_reaches says
    out = [agent["id"], "broadcast"]
    out.extend("tag:" + t for t in agent["tags"])
    out.extend("cap:" + c for c in agent["capabilities"])
    if agent.get("label"):
        out.append("label:" + agent["label"])
    return out


def fanout_reaches(agent, to, channel, sender):
    """Whether a message to `to` on `channel` from `sender` is addressed to this agent."""
    if to == agent["id"]:
        return True
    if sender == agent["id"] or agent.get("system"):
        return False
    if to != "broadcast":
        kind, value = to.split(":", 1) if ":" in to else ("", "")
        if kind == "tag":
            if value not in agent["tags"]:
                return False
        elif kind == "cap":
            if value not in agent["capabilities"]:
                return False
        elif kind == "label":
            if agent.get("label") != value:
                return False
        else:
            return False
    chans = agent["channels"]
    return "all" in chans or (channel is not None and channel in chans)


def task_transition(old, new):
    """Raise 409 invalid_transition unless a PATCH may move a task from `old` to `new`."""
    if old in TASK_FINAL:
        raise ApiError(409, "invalid_transition", "The task is %s, which is final; it cannot change any more." % old)
    if new != old and new not in TASK_TRANSITIONS[old]:
        raise ApiError(
            409,
            "invalid_transition",
            "A task cannot go from %s to %s (allowed: %s)." % (old, new, ", ".join(TASK_TRANSITIONS[old]) or "none"),
        )


def agent_from_row(row):
    return {
        "id": row["id"],
        "name": row["name"],
        "label": row["label"],
        "machine": row["machine"],
        "rig": row["rig"],
        "project": row["project"],
        "tags": loads_or(row["tags"], []),
        "capabilities": loads_or(row["capabilities"], []),
        "channels": loads_or(row["channels"], ["all"]),
        "status": row["status"],
        "ready": bool(row["ready"]),
        "approvalMode": row["approval_mode"],
        "instanceId": row["instance_id"],
        "epoch": row["epoch"],
        "meta": loads_or(row["meta"], {}),
        "lastSeen": row["last_seen"],
        "createdAt": row["created_at"],
        "system": bool(row["system"]),
        "offlineSince": row["offline_since"],
        "floor": row["floor_id"],
        "cursor": row["cursor"],
        "keyHash": row["key_hash"],
    }


CARD_FIELDS = (
    "id name label machine rig project tags capabilities channels status ready approvalMode "
    "instanceId epoch meta lastSeen createdAt system"
).split()


def message_from_row(row):
    return {
        "id": row["id"],
        "from": row["from_agent"],
        "to": row["to_target"],
        "subject": row["subject"],
        "body": row["body"],
        "kind": row["kind"],
        "channel": row["channel"],
        "claimable": bool(row["claimable"]),
        "claimedBy": row["claimed_by"],
        "claimedAt": row["claimed_at"],
        "replyTo": row["reply_to"],
        "threadId": row["thread_id"] if row["thread_id"] is not None else row["id"],
        "idempotencyKey": row["idempotency_key"],
        "payload": loads_or(row["payload"], {}),
        "meta": loads_or(row["meta"], {}),
        "createdAt": row["created_at"],
    }


def task_from_row(row):
    return {
        "id": row["id"],
        "title": row["title"],
        "body": row["body"],
        "status": row["status"],
        "target": row["target"],
        "channel": row["channel"],
        "severity": row["severity"],
        "dedupeKey": row["dedupe_key"],
        "source": row["source"],
        "externalUrl": row["external_url"],
        "metadata": loads_or(row["metadata"], {}),
        "claimedBy": row["claimed_by"],
        "claimedAt": row["claimed_at"],
        "progress": loads_or(row["progress"], None),
        "result": loads_or(row["result"], None),
        "occurrenceCount": row["occurrence_count"],
        "firstSeenAt": row["first_seen_at"],
        "lastSeenAt": row["last_seen_at"],
        "createdAt": row["created_at"],
        "updatedAt": row["updated_at"],
        "messageId": row["message_id"],
    }


def callback_from_row(row):
    return {
        "id": row["id"],
        "taskId": row["task_id"],
        "integration": row["integration"],
        "event": row["event"],
        "status": row["status"],
        "attempts": row["attempts"],
        "nextAttemptAt": row["next_attempt_at"] if row["status"] == "pending" else None,
        "lastError": row["last_error"],
        "createdAt": row["created_at"],
        "deliveredAt": row["delivered_at"],
    }


# ============================================================================
# The wake-up hub and the event log
# ============================================================================


class Waiter:
    """One long-poll or stream: woken only by what concerns it."""

    __slots__ = ("agent_id", "event", "kind")

    def __init__(self, agent_id, kind):
        self.agent_id = agent_id
        self.kind = kind
        self.event = threading.Event()


class Event:
    __slots__ = ("id", "type", "agent_id", "audience", "data", "created_at")

    def __init__(self, id, type, agent_id, audience, data, created_at):
        self.id = id
        self.type = type
        self.agent_id = agent_id
        self.audience = audience  # frozenset of agent ids the event concerns, or None for nobody in particular
        self.data = data  # JSON text
        self.created_at = created_at

    def concerns(self, agent_id):
        return agent_id == self.agent_id or (self.audience is not None and agent_id in self.audience)

    def frame(self):
        return ("id: %d\nevent: %s\ndata: %s\n\n" % (self.id, self.type, self.data)).encode("utf-8")


class Hub:
    """Wakes long-polls and streams for the agents a change concerns.

    Keeps the newest events in memory so that streams never poll the
    database; older ones are replayed from the events table.
    """

    RING = 20000

    def __init__(self):
        self.lock = threading.Lock()
        self.by_agent = collections.defaultdict(set)
        self.everyone = set()
        self.ring = []
        self.ring_ids = []
        self.head = 0
        self.stopping = False

    def subscribe(self, agent_id, kind):
        w = Waiter(agent_id, kind)
        with self.lock:
            if agent_id is None:
                self.everyone.add(w)
            else:
                self.by_agent[agent_id].add(w)
        if self.stopping:
            w.event.set()
        return w

    def unsubscribe(self, w):
        with self.lock:
            if w.agent_id is None:
                self.everyone.discard(w)
            else:
                s = self.by_agent.get(w.agent_id)
                if s is not None:
                    s.discard(w)
                    if not s:
                        del self.by_agent[w.agent_id]

    def listening(self, agent_id):
        return bool(self.by_agent.get(agent_id))

    def counts(self):
        with self.lock:
            polls = streams = 0
            for ws in list(self.by_agent.values()) + [self.everyone]:
                for w in ws:
                    if w.kind == "poll":
                        polls += 1
                    else:
                        streams += 1
            return polls, streams

    def wake(self, agent_ids):
        with self.lock:
            for a in agent_ids:
                for w in self.by_agent.get(a, ()):
                    w.event.set()

    def publish(self, events):
        """Called in id order (under the storage write lock) after the commit."""
        if not events:
            return
        with self.lock:
            for ev in events:
                self.ring.append(ev)
                self.ring_ids.append(ev.id)
                self.head = max(self.head, ev.id)
            if len(self.ring) > 2 * self.RING:
                del self.ring[: -self.RING]
                del self.ring_ids[: -self.RING]
            woken = set()
            for ev in events:
                if ev.agent_id is not None:
                    woken.add(ev.agent_id)
                if ev.audience:
                    woken.update(ev.audience)
            for a in woken:
                for w in self.by_agent.get(a, ()):
                    w.event.set()
            for w in self.everyone:
                w.event.set()

    def after(self, last_id, limit=500):
        """Events newer than last_id from memory; None when memory no longer reaches back that far."""
        with self.lock:
            if self.ring_ids and last_id < self.ring_ids[0] - 1:
                return None
            if not self.ring_ids and last_id < self.head:
                return None
            i = bisect.bisect_right(self.ring_ids, last_id)
            return self.ring[i : i + limit]

    def stop(self):
        with self.lock:
            self.stopping = True
            for ws in list(self.by_agent.values()) + [self.everyone]:
                for w in ws:
                    w.event.set()

# ============================================================================
# The relay: domain operations over storage, publishing to the hub
# ============================================================================


class Tx:
    """A write transaction plus the events it will publish once committed."""

    def __init__(self, relay, con):
        self.relay = relay
        self.c = con
        self.events = []
        self.wake = set()
        self.callbacks = False

    def execute(self, sql, params=()):
        return self.c.execute(sql, params)

    def emit(self, type, data, agent_id=None, audience=None):
        ts = now_ms()
        text = dumps(data)
        aud = ",%s," % ",".join(sorted(audience)) if audience else None
        cur = self.c.execute(
            "INSERT INTO events(type, agent_id, audience, data, created_at) VALUES (?,?,?,?,?)",
            (type, agent_id, aud, text, ts),
        )
        self.events.append(Event(cur.lastrowid, type, agent_id, frozenset(audience) if audience else None, text, ts))


class Relay:
    """Agents, messages, tasks and integrations: the rules of the relay."""

    def __init__(self, config):
        self.config = config
        self.db = Storage(config.db)
        self.hub = Hub()
        self.started = time.time()
        self.agents = {}  # id -> agent dict; written through under the storage lock
        self.index = collections.defaultdict(set)  # target string -> agent ids (fan-out routing)
        self.dirty_seen = set()  # agents whose lastSeen changed in memory only
        self.integrations = {i["name"]: i for i in config.integrations}
        self.rate = {name: collections.deque() for name in self.integrations}
        self.rate_lock = threading.Lock()
        self.callback_cv = threading.Condition()
        self.stopping = threading.Event()
        self.threads = []
        self._load()

    # -- startup -----------------------------------------------------------
    def _load(self):
        ts = now_ms()
        with self.db.write() as c:
            for sid in SYSTEM_AGENTS:
                c.execute(
                    "INSERT OR IGNORE INTO agents(id, name, status, last_seen, created_at, system) VALUES (?,?,?,?,?,1)",
                    (sid, "Human (dashboard)" if sid == "human" else "Relay", "online", ts, ts),
                )
        for row in self.db.query("SELECT * FROM agents"):
            self._cache(agent_from_row(row))
        head = self.db.query_one("SELECT COALESCE(MAX(id), 0) FROM events")[0]
        self.hub.head = head

    def _cache(self, agent):
        old = self.agents.get(agent["id"])
        if old is not None:
            for t in agent_targets(old):
                self.index[t].discard(old["id"])
        self.agents[agent["id"]] = agent
        if not agent["system"]:
            for t in agent_targets(agent):
                if t != agent["id"]:
                    self.index[t].add(agent["id"])

    def _uncache(self, agent_id):
        old = self.agents.pop(agent_id, None)
        if old is not None:
            for t in agent_targets(old):
                self.index[t].discard(agent_id)

    @contextlib.contextmanager
    def tx(self):
        """One write transaction; its events are published, in order, after the commit."""
        with self.db.lock:
            with self.db.write() as c:
                t = Tx(self, c)
                yield t
            self.hub.publish(t.events)
            if t.wake:
                self.hub.wake(t.wake)
        if t.callbacks:
            with self.callback_cv:
                self.callback_cv.notify_all()

    # -- agents ------------------------------------------------------------
    def card(self, agent):
        card = {k: agent[k] for k in CARD_FIELDS}
        card["listening"] = self.hub.listening(agent["id"])
        return card

    def get_agent(self, agent_id):
        agent = self.agents.get(agent_id)
        if agent is None:
            raise unknown_agent(agent_id)
        return agent

    def touch(self, agent_id):
        """Activity: keeps an agent online; an offline one comes back."""
        agent = self.agents.get(agent_id)
        if agent is None or agent["system"]:
            return
        agent["lastSeen"] = now_ms()
        self.dirty_seen.add(agent_id)
        if agent["status"] == "offline":
            with self.tx() as t:
                self._set_agent(t, agent, {"status": "online", "offlineSince": None})

    def check_fence(self, agent, instance_id, epoch):
        if instance_id is not None and agent["instanceId"] is not None and instance_id != agent["instanceId"]:
            raise ApiError(409, "superseded", "A newer instance of %s has registered (instance %s, epoch %d); this one should stop."
                           % (agent["id"], agent["instanceId"], agent["epoch"]), epoch=agent["epoch"])
        if epoch is not None and epoch != agent["epoch"]:
            raise ApiError(409, "superseded", "Epoch %d of %s is not the current one (%d); a newer instance registered."
                           % (epoch, agent["id"], agent["epoch"]), epoch=agent["epoch"])

    COLUMN = {
        "name": "name", "label": "label", "machine": "machine", "rig": "rig", "project": "project",
        "tags": "tags", "capabilities": "capabilities", "channels": "channels", "status": "status",
        "ready": "ready", "approvalMode": "approval_mode", "instanceId": "instance_id", "epoch": "epoch",
        "meta": "meta", "lastSeen": "last_seen", "offlineSince": "offline_since", "cursor": "cursor",
        "keyHash": "key_hash",
    }

    def _set_agent(self, t, agent, changes, event="agent.updated"):
        """Write changed card fields of an agent and publish the new card."""
        cols, vals = [], []
        for k, v in changes.items():
            cols.append(self.COLUMN[k] + " = ?")
            vals.append(dumps(v) if isinstance(v, (list, dict)) else (int(v) if isinstance(v, bool) else v))
        new = dict(agent)
        new.update(changes)
        new["lastSeen"] = max(new["lastSeen"], agent["lastSeen"])
        t.execute("UPDATE agents SET %s WHERE id = ?" % ", ".join(cols), vals + [agent["id"]])
        self._cache(new)
        if event:
            t.emit(event, {"agent": self.card(new)}, agent_id=agent["id"])
        return new

    def register(self, body, auth):
        f = Fields(body)
        agent_id = f.string("id", max_len=128)
        session = f.string("session", max_len=512)
        instance_id = f.string("instanceId", max_len=128)
        machine = f.string("machine", max_len=64)
        rig = f.string("rig", max_len=64)
        project = f.string("project", max_len=128)
        if agent_id is None:
            seed = session or instance_id
            if not seed:
                raise invalid("id", "give an id, or a session or instanceId to derive one from")
            agent_id = derive_agent_id(machine or "", rig or "", project or "", seed)
        check_agent_id(agent_id)
        if agent_id in SYSTEM_AGENTS:
            raise ApiError(403, "forbidden", "%r is a built-in agent and cannot be registered." % agent_id)
        meta = f.obj("meta")
        mode = f.choice("approvalMode", APPROVAL_MODES)
        if mode is None and meta and "approvalMode" in meta:
            mode = Fields(meta).choice("approvalMode", APPROVAL_MODES)
        fields = {
            "name": f.string("name", max_len=128),
            "label": f.string("label", max_len=64),
            "machine": machine,
            "rig": rig,
            "project": project,
            "tags": f.str_list("tags", pattern=WORD_RE),
            "capabilities": f.str_list("capabilities", pattern=WORD_RE),
            "channels": f.str_list("channels", pattern=WORD_RE),
            "status": f.choice("status", ("online", "idle", "busy")),
            "ready": f.boolean("ready"),
            "approvalMode": mode,
            "instanceId": instance_id,
            "meta": meta,
        }
        if fields["channels"] == []:
            raise invalid("channels", "needs at least one channel (use [\"all\"] to see every fan-out)")
        fields = {k: v for k, v in fields.items() if v is not None}
        key = None
        with self.tx() as t:
            existing = self.agents.get(agent_id)
            if existing is not None:
                auth.act_as(existing)
                changes = dict(fields)
                if instance_id is not None and instance_id != existing["instanceId"]:
                    changes["epoch"] = existing["epoch"] + 1
                changes.setdefault("status", "online")
                changes["offlineSince"] = None
                changes["lastSeen"] = now_ms()
                if self.config.agent_keys and not existing["keyHash"]:
                    key = secrets.token_urlsafe(24)
                    changes["keyHash"] = hashlib.sha256(key.encode()).hexdigest()
                agent = self._set_agent(t, existing, changes)
                created = False
            else:
                ts = now_ms()
                floor = t.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
                if self.config.agent_keys:
                    key = secrets.token_urlsafe(24)
                agent = {
                    "id": agent_id, "name": agent_id, "label": None, "machine": None, "rig": None, "project": None,
                    "tags": [], "capabilities": [], "channels": ["all"], "status": "online", "ready": True,
                    "approvalMode": "open", "instanceId": None, "epoch": 0, "meta": {}, "lastSeen": ts,
                    "createdAt": ts, "system": False, "offlineSince": None, "floor": floor, "cursor": floor,
                    "keyHash": hashlib.sha256(key.encode()).hexdigest() if key else None,
                }
                agent.update(fields)
                if instance_id is not None:
                    agent["epoch"] = 1
                t.execute(
                    "INSERT INTO agents(id, name, label, machine, rig, project, tags, capabilities, channels, status, "
                    "ready, approval_mode, instance_id, epoch, meta, last_seen, created_at, system, floor_id, cursor, key_hash) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,0,?,?,?)",
                    (agent_id, agent["name"], agent["label"], agent["machine"], agent["rig"], agent["project"],
                     dumps(agent["tags"]), dumps(agent["capabilities"]), dumps(agent["channels"]), agent["status"],
                     int(agent["ready"]), agent["approvalMode"], agent["instanceId"], agent["epoch"], dumps(agent["meta"]),
                     ts, ts, floor, floor, agent["keyHash"]),
                )
                self._cache(agent)
                t.emit("agent.registered", {"agent": self.card(agent)}, agent_id=agent_id)
                created = True
            self._queue_open_work(t, agent)
        card = self.card(agent)
        if key:
            card["agentKey"] = key
        return card, created

    def _queue_open_work(self, t, agent):
        """Unclaimed claimable messages that now reach the agent but lie behind its cursor: deliver them once."""
        targets = agent_targets(agent)
        rows = t.execute(
            "SELECT id, from_agent, to_target, channel FROM messages WHERE claimable = 1 AND claimed_by IS NULL "
            "AND id <= ? AND to_target IN (%s)" % ",".join("?" * len(targets)),
            [agent["cursor"]] + targets,
        ).fetchall()
        for r in rows:
            if fanout_reaches(agent, r["to_target"], r["channel"], r["from_agent"]):
                t.execute("INSERT OR IGNORE INTO redeliveries(agent_id, message_id) VALUES (?,?)", (agent["id"], r["id"]))
                t.wake.add(agent["id"])

    def list_agents(self, status=None, tag=None, cap=None, label=None):
        out = []
        for a in list(self.agents.values()):
            if status and a["status"] != status:
                continue
            if tag and tag not in a["tags"]:
                continue
            if cap and cap not in a["capabilities"]:
                continue
            if label and a.get("label") != label:
                continue
            out.append(self.card(a))
        out.sort(key=lambda a: (-a["lastSeen"], a["id"]))
        return out

    def patch_agent(self, agent_id, body, auth):
        agent = self.get_agent(agent_id)
        auth.act_as(agent, person_may=True)
        f = Fields(body)
        self.check_fence(agent, f.string("instanceId", max_len=128), f.integer("epoch"))
        changes = {}
        if f.has("label"):
            changes["label"] = f.string("label", max_len=64)
        for name in ("tags", "capabilities", "channels"):
            if f.has(name):
                changes[name] = f.str_list(name, default=[], pattern=WORD_RE)
        if "channels" in changes and not changes["channels"]:
            raise invalid("channels", "needs at least one channel (use [\"all\"] to see every fan-out)")
        status = f.choice("status", ("online", "idle", "busy"))
        if status:
            changes["status"] = status
            changes["offlineSince"] = None
        ready = f.boolean("ready")
        if ready is not None:
            changes["ready"] = ready
        meta = f.obj("meta")
        mode = f.choice("approvalMode", APPROVAL_MODES)
        if meta is not None:
            merged = dict(agent["meta"])
            for k, v in meta.items():
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
            changes["meta"] = merged
            if mode is None and "approvalMode" in meta and meta["approvalMode"] is not None:
                mode = Fields(meta).choice("approvalMode", APPROVAL_MODES)
        if mode:
            changes["approvalMode"] = mode
        if agent["system"] and changes:
            raise ApiError(403, "forbidden", "Built-in agent %r cannot be changed." % agent_id)
        if not changes:
            return self.card(agent)
        with self.tx() as t:
            agent = self._set_agent(t, self.get_agent(agent_id), changes)
            if any(k in changes for k in ("tags", "capabilities", "channels", "label")):
                self._queue_open_work(t, agent)
        if auth.agent_id == agent_id:
            self.touch(agent_id)
        return self.card(agent)

    def heartbeat(self, agent_id, body, auth):
        agent = self.get_agent(agent_id)
        auth.act_as(agent)
        f = Fields(body)
        self.check_fence(agent, f.string("instanceId", max_len=128), f.integer("epoch"))
        status = f.choice("status", ("online", "idle", "busy"))
        agent["lastSeen"] = now_ms()
        self.dirty_seen.add(agent_id)
        if agent["status"] == "offline" or (status and status != agent["status"]):
            with self.tx() as t:
                agent = self._set_agent(t, agent, {"status": status or "online", "offlineSince": None})
        return {"ok": True, "agent": self.card(agent)}

    def end_session(self, agent_id, purge, auth):
        agent = self.get_agent(agent_id)
        auth.act_as(agent, person_may=True)
        if agent["system"]:
            raise ApiError(403, "forbidden", "Built-in agent %r cannot be removed." % agent_id)
        with self.tx() as t:
            self.release_claims_of(t, agent_id)
            if purge:
                t.execute("DELETE FROM agents WHERE id = ?", (agent_id,))
                t.execute("DELETE FROM redeliveries WHERE agent_id = ?", (agent_id,))
                self._uncache(agent_id)
                card = self.card(agent)
                card["status"] = "offline"
                t.emit("agent.removed", {"agent": card}, agent_id=agent_id)
                return card
            agent = self._set_agent(t, agent, {"status": "offline", "offlineSince": now_ms()}, event="agent.offline")
        self.hub.wake([agent_id])
        return self.card(agent)

    def release_claims_of(self, t, agent_id):
        """Give back every message and unfinished task the agent had claimed."""
        rows = t.execute(
            "SELECT m.* FROM messages m WHERE m.claimed_by = ? AND m.claimable = 1 AND NOT EXISTS "
            "(SELECT 1 FROM tasks k WHERE k.message_id = m.id AND k.status IN ('done','failed','canceled'))",
            (agent_id,),
        ).fetchall()
        for row in rows:
            self._release_message(t, row, agent_id)
        for row in t.execute("SELECT * FROM tasks WHERE claimed_by = ? AND status IN ('claimed','blocked')", (agent_id,)).fetchall():
            self._release_task(t, row, agent_id, also_message=False)

    # -- messages ----------------------------------------------------------
    def matching_agents(self, to, channel, sender):
        """Agent ids a message reaches now (the sender never gets its own fan-out)."""
        if to in self.agents and not to.startswith(FANOUT_PREFIXES) and to != "broadcast":
            return [to]
        ids = self.agents.keys() if to == "broadcast" else self.index.get(to, ())
        out = []
        for aid in list(ids):
            a = self.agents.get(aid)
            if a is not None and fanout_reaches(a, to, channel, sender):
                out.append(aid)
        out.sort()
        return out

    def held_for(self, agent, sender):
        return agent["approvalMode"] == "guarded" and sender not in SYSTEM_AGENTS and sender != agent["id"]

    def visible_to(self, agent, row, receipt_state=None):
        """Whether a stored message is visible to an agent (for claims, reads and replies)."""
        if not fanout_reaches(agent, row["to_target"], row["channel"], row["from_agent"]):
            return False
        return receipt_state not in ("held", "rejected")

    def receipt_state(self, c, message_id, agent_id):
        r = c.execute("SELECT state FROM receipts WHERE message_id = ? AND agent_id = ?", (message_id, agent_id)).fetchone()
        return r[0] if r else None

    def send(self, body, auth):
        f = Fields(body)
        sender = f.string("from", required=True, max_len=128)
        to = f.string("to", required=True, max_len=200)
        text = f.string("body", required=True, max_len=self.config.max_body_bytes)
        subject = f.string("subject", max_len=1024, empty=True)
        kind = f.string("kind", max_len=32, default="chat")
        if not WORD_RE.match(kind):
            raise invalid("kind", "may hold only letters, digits and . _ : @ / -")
        channel = f.string("channel", max_len=64)
        if channel is not None and not WORD_RE.match(channel):
            raise invalid("channel", "may hold only letters, digits and . _ : @ / -")
        claimable = f.boolean("claimable", default=False)
        reply_to = f.integer("replyTo", lo=1)
        idem = f.string("idempotencyKey", max_len=256)
        payload = f.obj("payload", default={})
        meta = f.obj("meta", default={})
        target_kind, _ = parse_target(to)
        agent = self.agents.get(sender)
        if agent is None:
            raise unknown_agent(sender)
        auth.act_as(agent)
        if target_kind == "agent" and to not in self.agents:
            raise unknown_agent(to)
        return self._send(sender, to, text, subject=subject, kind=kind, channel=channel, claimable=claimable,
                          reply_to=reply_to, idem=idem, payload=payload, meta=meta)

    def _send(self, sender, to, text, subject=None, kind="chat", channel=None, claimable=False, reply_to=None,
              idem=None, payload=None, meta=None, t=None):
        agent = self.agents[sender]
        if agent["approvalMode"] == "read-only" and reply_to is None:
            raise ApiError(403, "read_only", "%s is read-only: it may reply to messages (replyTo) but not start conversations." % sender)
        if agent["approvalMode"] == "read-only" and claimable:
            raise ApiError(403, "read_only", "%s is read-only: it may not hand out claimable work." % sender)
        with (contextlib.nullcontext(t) if t is not None else self.tx()) as t:
            if idem is not None:
                row = t.execute("SELECT * FROM messages WHERE from_agent = ? AND idempotency_key = ?", (sender, idem)).fetchone()
                if row is not None:
                    msg = message_from_row(row)
                    matched = self.matching_agents(msg["to"], msg["channel"], sender)
                    return {"message": msg, "matched": matched, "online": self._online(matched), "duplicate": True}, False
            thread = None
            if reply_to is not None:
                parent = t.execute("SELECT * FROM messages WHERE id = ?", (reply_to,)).fetchone()
                if parent is None:
                    raise ApiError(404, "not_found", "replyTo: message %d was not found." % reply_to)
                if agent["approvalMode"] == "read-only" and parent["from_agent"] != sender and not self.visible_to(
                    agent, parent, self.receipt_state(t.c, reply_to, sender)
                ):
                    raise ApiError(403, "not_addressed", "%s never received message %d, so it may not reply to it." % (sender, reply_to))
                thread = parent["thread_id"] if parent["thread_id"] is not None else parent["id"]
            matched = self.matching_agents(to, channel, sender)
            held = [a for a in matched if self.held_for(self.agents[a], sender)]
            ts = now_ms()
            cur = t.execute(
                "INSERT INTO messages(from_agent, to_target, subject, body, kind, channel, claimable, reply_to, thread_id, "
                "idempotency_key, payload, meta, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (sender, to, subject, text, kind, channel, int(claimable), reply_to, thread, idem,
                 dumps(payload or {}), dumps(meta or {}), ts),
            )
            mid = cur.lastrowid
            msg = {
                "id": mid, "from": sender, "to": to, "subject": subject, "body": text, "kind": kind, "channel": channel,
                "claimable": bool(claimable), "claimedBy": None, "claimedAt": None, "replyTo": reply_to,
                "threadId": thread if thread is not None else mid, "idempotencyKey": idem, "payload": payload or {},
                "meta": meta or {}, "createdAt": ts,
            }
            audience = set(matched) - set(held)
            audience.add(sender)
            t.emit("message.created", {"message": msg}, agent_id=None, audience=audience)
            for a in held:
                t.execute("INSERT INTO receipts(message_id, agent_id, state) VALUES (?,?,'held')", (mid, a))
                t.emit("message.held", {"message": msg, "agentId": a}, audience={sender})
        if sender not in SYSTEM_AGENTS:
            self.touch(sender)
        return {"message": msg, "matched": matched, "online": self._online(matched)}, True

    def _online(self, ids):
        return sum(1 for a in ids if a in self.agents and self.agents[a]["status"] != "offline")

    def get_message_row(self, c, message_id):
        row = c.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise not_found("Message %d" % message_id)
        return row

    def message_detail(self, message_id):
        with self.db.read() as c:
            row = self.get_message_row(c, message_id)
            receipts = [
                {"agentId": r["agent_id"], "state": r["state"], "deliveredAt": r["delivered_at"], "readAt": r["read_at"]}
                for r in c.execute("SELECT * FROM receipts WHERE message_id = ? ORDER BY agent_id", (message_id,))
            ]
        return {"message": message_from_row(row), "receipts": receipts}

    def thread(self, message_id):
        with self.db.read() as c:
            row = self.get_message_row(c, message_id)
            tid = row["thread_id"] if row["thread_id"] is not None else row["id"]
            rows = c.execute("SELECT * FROM messages WHERE id = ? OR thread_id = ? ORDER BY id", (tid, tid)).fetchall()
        return {"threadId": tid, "messages": [message_from_row(r) for r in rows]}

    def _visibility_sql(self, agent):
        """WHERE clause (and its parameters) for messages addressed to this agent."""
        targets = agent_targets(agent)
        sql = "m.to_target IN (%s) AND (m.to_target = ? OR m.from_agent != ?)" % ",".join("?" * len(targets))
        params = targets + [agent["id"], agent["id"]]
        if "all" not in agent["channels"]:
            sql += " AND (m.to_target = ? OR m.channel IN (%s))" % ",".join("?" * len(agent["channels"]))
            params += [agent["id"]] + agent["channels"]
        return sql, params

    def visible_messages_for(self, agent, since, limit, unread=False):
        """(messages, more, redelivered ids): what the inbox returns for `since`."""
        vis, params = self._visibility_sql(agent)
        sql = (
            "SELECT m.*, r.state AS receipt FROM messages m LEFT JOIN receipts r ON r.message_id = m.id AND r.agent_id = ? "
            "WHERE " + vis + " AND m.id > ? AND (m.id > ? OR (m.claimable = 1 AND m.claimed_by IS NULL)) "
            "AND (r.state IS NULL OR r.state NOT IN ('held','rejected'))"
        )
        if unread:
            sql += " AND (r.state IS NULL OR r.state != 'read')"
        sql += " ORDER BY m.id LIMIT ?"
        with self.db.read() as c:
            rows = c.execute(sql, [agent["id"]] + params + [since, agent["floor"], limit + 1]).fetchall()
            extra = c.execute(
                "SELECT m.*, r.state AS receipt FROM redeliveries d JOIN messages m ON m.id = d.message_id "
                "LEFT JOIN receipts r ON r.message_id = m.id AND r.agent_id = d.agent_id WHERE d.agent_id = ? ORDER BY m.id",
                (agent["id"],),
            ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        redelivered = []
        seen = {r["id"] for r in rows}
        out = []
        for r in extra:
            redelivered.append(r["id"])
            if r["id"] > since or r["id"] in seen or not self.visible_to(agent, r, r["receipt"]):
                continue
            if unread and r["receipt"] == "read":
                continue
            out.append(r)
        out.extend(rows)
        out.sort(key=lambda r: r["id"])
        messages = []
        for r in out:
            m = message_from_row(r)
            m["read"] = r["receipt"] == "read"
            messages.append(m)
        cursor = rows[-1]["id"] if rows else since
        return messages, more, redelivered, cursor

    def inbox(self, agent_id, since, limit, unread, wait, auth, client_gone=None):
        agent = self.get_agent(agent_id)
        auth.act_as(agent)
        start = since if since is not None else agent["cursor"]
        waiter = self.hub.subscribe(agent_id, "poll") if wait > 0 else None
        self.touch(agent_id)
        try:
            deadline = time.monotonic() + wait
            while True:
                if waiter is not None:
                    waiter.event.clear()
                agent = self.get_agent(agent_id)
                messages, more, redelivered, cursor = self.visible_messages_for(agent, start, limit, unread)
                if messages or waiter is None or self.hub.stopping:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                waiter.event.wait(remaining)
        finally:
            if waiter is not None:
                self.hub.unsubscribe(waiter)
                self.touch(agent_id)
        if waiter is not None and client_gone is not None and client_gone():
            return None  # nobody to hand it to: keep it for the next poll
        self.record_delivery(agent, messages, redelivered, cursor)
        return {"messages": messages, "cursor": cursor, "more": more}

    def record_delivery(self, agent, messages, redelivered, cursor):
        if not messages and not redelivered and cursor <= agent["cursor"]:
            return
        ts = now_ms()
        with self.tx() as t:
            if messages:
                t.c.executemany(
                    "INSERT INTO receipts(message_id, agent_id, state, delivered_at) VALUES (?,?,'delivered',?) "
                    "ON CONFLICT(message_id, agent_id) DO UPDATE SET state = CASE WHEN state = 'read' THEN 'read' "
                    "ELSE 'delivered' END, delivered_at = COALESCE(delivered_at, excluded.delivered_at)",
                    [(m["id"], agent["id"], ts) for m in messages],
                )
            if redelivered:
                t.c.executemany("DELETE FROM redeliveries WHERE agent_id = ? AND message_id = ?",
                                [(agent["id"], mid) for mid in redelivered])
            current = self.agents.get(agent["id"])
            if current is not None and cursor > current["cursor"]:
                self._set_agent(t, current, {"cursor": cursor}, event=None)

    def cursor(self):
        return {"cursor": self.db.query_one("SELECT COALESCE(MAX(id), 0) FROM messages")[0]}

    def mark_read(self, message_id, body, auth):
        f = Fields(body)
        agent = self.get_agent(f.string("agentId", required=True, max_len=128))
        auth.act_as(agent)
        ts = now_ms()
        with self.tx() as t:
            row = self.get_message_row(t.c, message_id)
            if not self.visible_to(agent, row, self.receipt_state(t.c, message_id, agent["id"])):
                raise ApiError(403, "not_addressed", "Message %d is not addressed to %s." % (message_id, agent["id"]))
            t.execute(
                "INSERT INTO receipts(message_id, agent_id, state, delivered_at, read_at) VALUES (?,?,'read',?,?) "
                "ON CONFLICT(message_id, agent_id) DO UPDATE SET state = 'read', read_at = COALESCE(read_at, excluded.read_at), "
                "delivered_at = COALESCE(delivered_at, excluded.delivered_at)",
                (message_id, agent["id"], ts, ts),
            )
            t.emit("message.read", {"messageId": message_id, "agentId": agent["id"]}, agent_id=agent["id"],
                   audience={row["from_agent"]})
        self.touch(agent["id"])
        return {"ok": True, "messageId": message_id, "agentId": agent["id"], "readAt": ts}

    def mark_read_upto(self, agent_id, body, auth):
        agent = self.get_agent(agent_id)
        auth.act_as(agent)
        up_to = Fields(body).integer("upTo", required=True)
        vis, params = self._visibility_sql(agent)
        ts = now_ms()
        with self.tx() as t:
            ids = [r[0] for r in t.execute(
                "SELECT m.id FROM messages m LEFT JOIN receipts r ON r.message_id = m.id AND r.agent_id = ? WHERE " + vis +
                " AND m.id <= ? AND (m.id > ? OR m.claimable = 1 OR r.state IS NOT NULL) AND (r.state IS NULL OR r.state NOT IN "
                "('held','rejected','read'))",
                [agent["id"]] + params + [up_to, agent["floor"]],
            )]
            t.c.executemany(
                "INSERT INTO receipts(message_id, agent_id, state, delivered_at, read_at) VALUES (?,?,'read',?,?) "
                "ON CONFLICT(message_id, agent_id) DO UPDATE SET state = 'read', read_at = excluded.read_at, "
                "delivered_at = COALESCE(delivered_at, excluded.delivered_at)",
                [(i, agent["id"], ts, ts) for i in ids],
            )
            if ids:
                t.emit("message.read", {"agentId": agent["id"], "upTo": up_to, "count": len(ids)}, agent_id=agent["id"])
        self.touch(agent["id"])
        return {"count": len(ids)}

    def claim_message(self, message_id, body, auth):
        f = Fields(body)
        agent = self.get_agent(f.string("agentId", required=True, max_len=128))
        auth.act_as(agent)
        self.check_fence(agent, f.string("instanceId", max_len=128), f.integer("epoch"))
        with self.tx() as t:
            row = self.get_message_row(t.c, message_id)
            if not row["claimable"]:
                raise ApiError(400, "not_claimable", "Message %d is not claimable work." % message_id)
            if agent["approvalMode"] == "read-only":
                raise ApiError(403, "read_only", "%s is read-only and may not claim work." % agent["id"])
            if not self.visible_to(agent, row, self.receipt_state(t.c, message_id, agent["id"])):
                raise ApiError(403, "not_addressed", "Message %d (to %s) is not addressed to %s." % (message_id, row["to_target"], agent["id"]))
            task = t.execute("SELECT * FROM tasks WHERE message_id = ?", (message_id,)).fetchone()
            if row["claimed_by"] is not None and row["claimed_by"] != agent["id"]:
                raise ApiError(409, "already_claimed", "Message %d is already claimed by %s." % (message_id, row["claimed_by"]),
                               claimedBy=row["claimed_by"])
            if task is not None and task["status"] in TASK_FINAL:
                raise ApiError(409, "invalid_transition", "Task %d is %s; there is nothing left to claim." % (task["id"], task["status"]))
            if row["claimed_by"] is None:
                ts = now_ms()
                t.execute("UPDATE messages SET claimed_by = ?, claimed_at = ? WHERE id = ?", (agent["id"], ts, message_id))
                row = self.get_message_row(t.c, message_id)
                self._emit_message(t, "message.claimed", row, agentId=agent["id"])
                if task is not None and task["status"] == "open":
                    self._claim_task_row(t, task, agent["id"], ts, also_message=False)
        self.touch(agent["id"])
        return {"message": message_from_row(row)}

    def _emit_message(self, t, type, row, **extra):
        msg = message_from_row(row)
        data = {"message": msg}
        data.update(extra)
        audience = set(self.matching_agents(msg["to"], msg["channel"], msg["from"]))
        audience.add(msg["from"])
        t.emit(type, data, audience=audience)

    def release_message(self, message_id, body, auth):
        agent = self.get_agent(Fields(body).string("agentId", required=True, max_len=128))
        auth.act_as(agent)
        with self.tx() as t:
            row = self.get_message_row(t.c, message_id)
            if not row["claimable"]:
                raise ApiError(400, "not_claimable", "Message %d is not claimable work." % message_id)
            if row["claimed_by"] != agent["id"]:
                raise ApiError(409, "not_owner", "Message %d is claimed by %s, not %s." % (message_id, row["claimed_by"] or "nobody", agent["id"]),
                               claimedBy=row["claimed_by"])
            task = t.execute("SELECT * FROM tasks WHERE message_id = ?", (message_id,)).fetchone()
            if task is not None and task["status"] in TASK_FINAL:
                raise ApiError(409, "invalid_transition", "Task %d is %s; its claim cannot be released." % (task["id"], task["status"]))
            self._release_message(t, row, agent["id"])
            if task is not None and task["status"] in ("claimed", "blocked"):
                self._release_task(t, task, agent["id"], also_message=False)
            row = self.get_message_row(t.c, message_id)
        self.touch(agent["id"])
        return {"message": message_from_row(row)}

    def _release_message(self, t, row, releaser):
        """Back to the pool: every agent it reaches gets it (again) once, except the one that gave it back."""
        t.execute("UPDATE messages SET claimed_by = NULL, claimed_at = NULL WHERE id = ?", (row["id"],))
        for aid in self.matching_agents(row["to_target"], row["channel"], row["from_agent"]):
            if aid != releaser:
                t.execute("INSERT OR IGNORE INTO redeliveries(agent_id, message_id) VALUES (?,?)", (aid, row["id"]))
                t.wake.add(aid)
        self._emit_message(t, "message.released", self.get_message_row(t.c, row["id"]), agentId=releaser)

    def decide(self, message_id, body, approve, auth):
        auth.person()
        agent_id = Fields(body).string("agentId", max_len=128)
        state = "approved" if approve else "rejected"
        with self.tx() as t:
            row = self.get_message_row(t.c, message_id)
            held = [r[0] for r in t.execute(
                "SELECT agent_id FROM receipts WHERE message_id = ? AND state = 'held'", (message_id,))]
            if agent_id is not None:
                if agent_id not in held:
                    raise ApiError(409, "invalid_transition", "Message %d is not held for %s." % (message_id, agent_id))
                held = [agent_id]
            if not held:
                raise ApiError(409, "invalid_transition", "Message %d is not held for anyone." % message_id)
            msg = message_from_row(row)
            for aid in held:
                t.execute("UPDATE receipts SET state = ? WHERE message_id = ? AND agent_id = ?", (state, message_id, aid))
                if approve:
                    t.execute("INSERT OR IGNORE INTO redeliveries(agent_id, message_id) VALUES (?,?)", (aid, message_id))
                    t.wake.add(aid)
                t.emit("message." + state, {"message": msg, "agentId": aid}, agent_id=aid, audience={msg["from"]})
        return self.message_detail(message_id)

    def history(self, q):
        where, params = [], []
        if q.get("agent"):
            agent = self.agents.get(q["agent"])
            if agent is None:
                raise unknown_agent(q["agent"])
            vis, p = self._visibility_sql(agent)
            where.append("(m.from_agent = ? OR (%s))" % vis)
            params += [agent["id"]] + p
        for key, col in (("from", "m.from_agent"), ("to", "m.to_target"), ("channel", "m.channel")):
            if q.get(key):
                where.append(col + " = ?")
                params.append(q[key])
        if q.get("before") is not None:
            where.append("m.id < ?")
            params.append(q["before"])
        if q.get("q"):
            like = "%" + re.sub(r"([%_\\])", r"\\\1", q["q"]) + "%"
            where.append("(m.subject LIKE ? ESCAPE '\\' OR m.body LIKE ? ESCAPE '\\')")
            params += [like, like]
        if q.get("held"):
            where.append("m.id IN (SELECT message_id FROM receipts WHERE state = 'held')")
        sql = "SELECT m.* FROM messages m"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY m.id DESC LIMIT ?"
        with self.db.read() as c:
            rows = c.execute(sql, params + [q["limit"] + 1]).fetchall()
            more = len(rows) > q["limit"]
            messages = [message_from_row(r) for r in rows[: q["limit"]]]
            if q.get("held") and messages:
                ids = [m["id"] for m in messages]
                held = collections.defaultdict(list)
                for r in c.execute("SELECT message_id, agent_id FROM receipts WHERE state = 'held' AND message_id IN (%s) "
                                   "ORDER BY agent_id" % ",".join("?" * len(ids)), ids):
                    held[r[0]].append(r[1])
                for m in messages:
                    m["heldFor"] = held.get(m["id"], [])
        return {"messages": messages, "more": more}

    # -- tasks -------------------------------------------------------------
    def get_task_row(self, c, task_id):
        row = c.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise not_found("Task %d" % task_id)
        return row

    def _task_event(self, t, task_id, type, actor, data=None):
        t.execute("INSERT INTO task_events(task_id, type, actor, data, created_at) VALUES (?,?,?,?,?)",
                  (task_id, type, actor, dumps(data or {}), now_ms()))

    def _task_changed(self, t, task_id, callback_event=None):
        """Publish the task's new state, and queue its callback (same transaction) when an integration owns it."""
        row = self.get_task_row(t.c, task_id)
        task = task_from_row(row)
        audience = set(self.matching_agents(task["target"], task["channel"], None))
        if task["claimedBy"]:
            audience.add(task["claimedBy"])
        t.emit("task.created" if callback_event == "task.created" else "task.updated", {"task": task}, audience=audience)
        integ = self.integrations.get(row["integration"]) if row["integration"] else None
        if callback_event and integ and integ.get("callbackUrl"):
            ts = now_ms()
            body = {"event": callback_event, "task": task, "integration": integ["name"]}
            t.execute("INSERT INTO callbacks(task_id, integration, event, body, status, attempts, next_attempt_at, created_at) "
                      "VALUES (?,?,?,?,'pending',0,?,?)", (task_id, integ["name"], callback_event, dumps(body), ts, ts))
            t.callbacks = True
        return task

    def create_task(self, body, auth):
        f = Fields(body)
        sender = f.string("from", max_len=128)
        if sender is not None:
            agent = self.get_agent(sender)
            auth.act_as(agent)
            if agent["approvalMode"] == "read-only":
                raise ApiError(403, "read_only", "%s is read-only and may not hand out work." % sender)
        else:
            auth.person()
        source = ("agent:" + sender) if sender else "api"
        return self._create_or_count(f, source, None, sender or "system")

    def _task_fields(self, f, target=None, channel=None):
        title = f.string("title", required=True, max_len=1024)
        target = target or f.string("target", required=True, max_len=200)
        kind, _ = parse_target(target, "target")
        if kind == "agent" and target not in self.agents:
            raise unknown_agent(target)
        if channel is None:
            channel = f.string("channel", max_len=64)
        if channel is not None and not WORD_RE.match(channel):
            raise invalid("channel", "may hold only letters, digits and . _ : @ / -")
        severity = f.string("severity", max_len=32)
        return {
            "title": title,
            "body": f.string("body", max_len=self.config.max_body_bytes, empty=True),
            "target": target,
            "channel": channel,
            "severity": severity,
            "dedupeKey": f.string("dedupeKey", max_len=256),
            "externalUrl": f.string("externalUrl", max_len=2048),
            "metadata": f.obj("metadata", default={}),
        }

    def _create_or_count(self, f, source, integration, actor, fields=None):
        fields = fields or self._task_fields(f)
        with self.tx() as t:
            if fields["dedupeKey"] is not None:
                row = t.execute("SELECT * FROM tasks WHERE source = ? AND dedupe_key = ? AND status IN ('open','claimed','blocked')",
                                (source, fields["dedupeKey"])).fetchone()
                if row is not None:
                    ts = now_ms()
                    t.execute("UPDATE tasks SET occurrence_count = occurrence_count + 1, last_seen_at = ?, updated_at = ? "
                              "WHERE id = ?", (ts, ts, row["id"]))
                    self._task_event(t, row["id"], "occurrence", actor, {"occurrenceCount": row["occurrence_count"] + 1})
                    return self._task_changed(t, row["id"]), False
            ts = now_ms()
            cur = t.execute(
                "INSERT INTO tasks(title, body, status, target, channel, severity, dedupe_key, source, integration, external_url, "
                "metadata, occurrence_count, first_seen_at, last_seen_at, created_at, updated_at) "
                "VALUES (?,?,'open',?,?,?,?,?,?,?,?,1,?,?,?,?)",
                (fields["title"], fields["body"], fields["target"], fields["channel"], fields["severity"], fields["dedupeKey"],
                 source, integration, fields["externalUrl"], dumps(fields["metadata"]), ts, ts, ts, ts),
            )
            task_id = cur.lastrowid
            sender = actor if actor in self.agents else "system"
            payload = {"taskId": task_id, "severity": fields["severity"], "source": source,
                       "externalUrl": fields["externalUrl"], "dedupeKey": fields["dedupeKey"]}
            result, _ = self._send(sender, fields["target"], fields["body"] or fields["title"], subject=fields["title"],
                                   kind="task", channel=fields["channel"], claimable=True, payload=payload, t=t)
            t.execute("UPDATE tasks SET message_id = ? WHERE id = ?", (result["message"]["id"], task_id))
            self._task_event(t, task_id, "created", actor, {"target": fields["target"], "messageId": result["message"]["id"]})
            return self._task_changed(t, task_id, "task.created"), True

    def list_tasks(self, q):
        where, params = [], []
        for key, col in (("status", "status"), ("target", "target"), ("channel", "channel"), ("claimedBy", "claimed_by")):
            if q.get(key):
                where.append(col + " = ?")
                params.append(q[key])
        sql = "SELECT * FROM tasks" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        return {"tasks": [task_from_row(r) for r in self.db.query(sql, params + [q["limit"]])]}

    def task_events(self, task_id):
        with self.db.read() as c:
            self.get_task_row(c, task_id)
            rows = c.execute("SELECT * FROM task_events WHERE task_id = ? ORDER BY id", (task_id,)).fetchall()
        return [
            {"id": r["id"], "taskId": r["task_id"], "type": r["type"], "actor": r["actor"], "data": loads_or(r["data"], {}),
             "createdAt": r["created_at"]}
            for r in rows
        ]

    def task_detail(self, task_id):
        with self.db.read() as c:
            task = task_from_row(self.get_task_row(c, task_id))
        return {"task": task, "events": self.task_events(task_id)}

    def claim_task(self, task_id, body, auth):
        f = Fields(body)
        agent = self.get_agent(f.string("agentId", required=True, max_len=128))
        auth.act_as(agent)
        self.check_fence(agent, f.string("instanceId", max_len=128), f.integer("epoch"))
        with self.tx() as t:
            row = self.get_task_row(t.c, task_id)
            if agent["approvalMode"] == "read-only":
                raise ApiError(403, "read_only", "%s is read-only and may not claim work." % agent["id"])
            if not fanout_reaches(agent, row["target"], row["channel"], None):
                raise ApiError(403, "not_addressed", "Task %d (for %s) is not addressed to %s." % (task_id, row["target"], agent["id"]))
            if row["status"] in TASK_FINAL:
                raise ApiError(409, "invalid_transition", "Task %d is %s; there is nothing left to claim." % (task_id, row["status"]))
            if row["claimed_by"] is not None and row["claimed_by"] != agent["id"]:
                raise ApiError(409, "already_claimed", "Task %d is already claimed by %s." % (task_id, row["claimed_by"]),
                               claimedBy=row["claimed_by"])
            if row["claimed_by"] is None:
                task = self._claim_task_row(t, row, agent["id"], now_ms(), also_message=True)
            else:
                task = task_from_row(row)
        self.touch(agent["id"])
        return {"task": task}

    def _claim_task_row(self, t, row, agent_id, ts, also_message):
        t.execute("UPDATE tasks SET status = 'claimed', claimed_by = ?, claimed_at = ?, updated_at = ? WHERE id = ?",
                  (agent_id, ts, ts, row["id"]))
        if also_message and row["message_id"]:
            msg = t.execute("SELECT * FROM messages WHERE id = ?", (row["message_id"],)).fetchone()
            if msg is not None and msg["claimed_by"] is None:
                t.execute("UPDATE messages SET claimed_by = ?, claimed_at = ? WHERE id = ?", (agent_id, ts, msg["id"]))
                self._emit_message(t, "message.claimed", self.get_message_row(t.c, msg["id"]), agentId=agent_id)
        self._task_event(t, row["id"], "claimed", agent_id)
        return self._task_changed(t, row["id"], "task.claimed")

    def _release_task(self, t, row, agent_id, also_message=True):
        ts = now_ms()
        t.execute("UPDATE tasks SET status = 'open', claimed_by = NULL, claimed_at = NULL, updated_at = ? WHERE id = ?",
                  (ts, row["id"]))
        if also_message and row["message_id"]:
            msg = t.execute("SELECT * FROM messages WHERE id = ?", (row["message_id"],)).fetchone()
            if msg is not None and msg["claimed_by"] is not None:
                self._release_message(t, msg, agent_id)
        self._task_event(t, row["id"], "released", agent_id, {"from": row["status"]})
        return self._task_changed(t, row["id"], "task.status")

    def update_task(self, task_id, body, auth):
        f = Fields(body)
        actor_id = f.string("agentId", max_len=128)
        status = f.choice("status", TASK_STATUSES)
        has_progress, has_result = f.has("progress"), f.has("result")
        progress = f.any_json("progress", max_bytes=16 * 1024)
        result = f.any_json("result", max_bytes=self.config.max_body_bytes)
        if status is None and not has_progress and not has_result:
            raise invalid("status", "send at least one of status, progress or result")
        agent = None
        if actor_id is not None:
            agent = self.get_agent(actor_id)
            auth.act_as(agent)
        else:
            auth.person()
        with self.tx() as t:
            row = self.get_task_row(t.c, task_id)
            old = row["status"]
            new = status or old
            task_transition(old, new)
            if agent is not None and row["claimed_by"] not in (None, agent["id"]):
                raise ApiError(409, "not_owner", "Task %d is claimed by %s, not %s." % (task_id, row["claimed_by"], agent["id"]),
                               claimedBy=row["claimed_by"])
            if new == "claimed" and old != "claimed" and row["claimed_by"] is None:
                raise ApiError(409, "invalid_transition", "Use POST /api/tasks/%d/claim to claim a task." % task_id)
            actor = actor_id or "human"
            ts = now_ms()
            if new == "open" and old != "open":
                self._release_task(t, row, row["claimed_by"] or actor)
            elif new != old:
                t.execute("UPDATE tasks SET status = ?, updated_at = ? WHERE id = ?", (new, ts, task_id))
                self._task_event(t, task_id, "status", actor, {"from": old, "to": new})
                if new in TASK_FINAL and row["message_id"]:
                    # the announcing message stops being open work
                    t.execute("UPDATE messages SET claimed_by = COALESCE(claimed_by, ?), claimed_at = COALESCE(claimed_at, ?) "
                              "WHERE id = ?", (actor, ts, row["message_id"]))
            if has_progress:
                t.execute("UPDATE tasks SET progress = ?, updated_at = ? WHERE id = ?", (dumps(progress), ts, task_id))
                self._task_event(t, task_id, "progress", actor, {"progress": progress})
            if has_result:
                t.execute("UPDATE tasks SET result = ?, updated_at = ? WHERE id = ?", (dumps(result), ts, task_id))
            task = self._task_changed(t, task_id, "task.status")
        if agent is not None:
            self.touch(agent["id"])
        return {"task": task}

    # -- integrations ------------------------------------------------------
    def integration_for_token(self, token):
        found = None
        for integ in self.integrations.values():
            if hmac.compare_digest(integ["token"].encode(), token.encode()):
                found = integ
        return found

    def rate_check(self, integ):
        limit = self.config.integration_rate_limit
        now = time.monotonic()
        with self.rate_lock:
            window = self.rate[integ["name"]]
            while window and window[0] <= now - 60:
                window.popleft()
            if len(window) >= limit:
                retry = max(1, int(window[0] + 60 - now + 0.999))
                raise ApiError(429, "rate_limited", "Integration %s sent more than %d events in 60 s; retry in %d s."
                               % (integ["name"], limit, retry), headers={"Retry-After": str(retry)})
            window.append(now)

    def integration_event(self, integ, body):
        self.rate_check(integ)
        if "tasks:create" not in integ["scopes"]:
            raise ApiError(403, "scope", "Integration %s lacks the scope tasks:create." % integ["name"])
        f = Fields(body)
        target = f.string("target", max_len=200) or integ["targets"][0]
        if target not in integ["targets"]:
            raise ApiError(403, "scope", "Integration %s may not target %r (allowed: %s)." % (integ["name"], target, ", ".join(integ["targets"])))
        channel = f.string("channel", max_len=64)
        if channel is None:
            channel = integ["channels"][0] if integ["channels"] else None
        elif channel not in integ["channels"]:
            raise ApiError(403, "scope", "Integration %s may not use channel %r (allowed: %s)."
                           % (integ["name"], channel, ", ".join(integ["channels"]) or "none"))
        status = f.choice("status", ("firing", "resolved"), default="firing")
        f.string("dedupeKey", required=True, max_len=256)
        source = "integration:" + integ["name"]
        if status == "resolved":
            key = f.string("dedupeKey", required=True, max_len=256)
            f.string("title", max_len=1024)
            with self.tx() as t:
                row = t.execute("SELECT * FROM tasks WHERE source = ? AND dedupe_key = ? AND status IN ('open','claimed','blocked')",
                                (source, key)).fetchone()
                if row is None:
                    return {"task": None}, 200
                ts = now_ms()
                t.execute("UPDATE tasks SET status = 'done', updated_at = ?, last_seen_at = ? WHERE id = ?", (ts, ts, row["id"]))
                if row["message_id"]:
                    t.execute("UPDATE messages SET claimed_by = COALESCE(claimed_by, 'system'), claimed_at = COALESCE(claimed_at, ?) "
                              "WHERE id = ?", (ts, row["message_id"]))
                self._task_event(t, row["id"], "resolved", source, {"from": row["status"], "to": "done"})
                task = self._task_changed(t, row["id"], "task.status")
            return {"task": task}, 200
        fields = self._task_fields(f, target=target, channel=channel)
        task, created = self._create_or_count(f, source, integ["name"], source, fields=fields)
        return {"task": task, "created": created}, (201 if created else 200)

    def list_callbacks(self, q):
        where, params = [], []
        if q.get("taskId") is not None:
            where.append("task_id = ?")
            params.append(q["taskId"])
        if q.get("status"):
            where.append("status = ?")
            params.append(q["status"])
        sql = "SELECT * FROM callbacks" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        return {"callbacks": [callback_from_row(r) for r in self.db.query(sql, params + [q["limit"]])]}

    # -- background workers ------------------------------------------------
    def start_workers(self):
        workers = [("sweeper", self.sweep_loop)]
        for integ in self.integrations.values():
            if integ.get("callbackUrl"):
                workers.append(("callbacks-" + integ["name"], lambda i=integ: self.callback_loop(i)))
        for name, fn in workers:
            th = threading.Thread(target=self._guarded, args=(fn,), name=name, daemon=True)
            th.start()
            self.threads.append(th)

    def _guarded(self, fn):
        """Run a worker forever: a storage fault pauses it, never kills it."""
        while not self.stopping.is_set():
            try:
                fn()
                return
            except StorageUnavailable as e:
                log("worker paused: %s" % e)
            except Exception:
                log("worker error:\n" + traceback.format_exc())
            self.stopping.wait(1.0)

    def callback_loop(self, integ):
        while not self.stopping.is_set():
            rows = self.db.query(
                "SELECT * FROM callbacks c WHERE integration = ? AND status = 'pending' AND id = "
                "(SELECT MIN(id) FROM callbacks d WHERE d.task_id = c.task_id AND d.status = 'pending') ORDER BY next_attempt_at, id LIMIT 50",
                (integ["name"],),
            )
            now = now_ms()
            due = [r for r in rows if r["next_attempt_at"] <= now]
            if not due:
                delay = (min(r["next_attempt_at"] for r in rows) - now) / 1000.0 if rows else 30.0
                with self.callback_cv:
                    self.callback_cv.wait(max(0.01, min(delay, 30.0)))
                continue
            for row in due:
                if self.stopping.is_set():
                    return
                self.deliver_callback(integ, row)

    def deliver_callback(self, integ, row):
        attempt = row["attempts"] + 1
        body = json.loads(row["body"])
        body["attempt"] = attempt
        raw = dumps(body).encode("utf-8")
        secret = (integ.get("callbackSecret") or integ["token"]).encode("utf-8")
        sig = hmac.new(secret, raw, hashlib.sha256).hexdigest()
        req = urllib.request.Request(integ["callbackUrl"], data=raw, method="POST", headers={
            "Content-Type": "application/json",
            "User-Agent": "agent-relay/" + __version__,
            "X-Agent-Relay-Event": row["event"],
            "X-Agent-Relay-Signature": "sha256=" + sig,
            "X-Agent-Relay-Delivery": str(row["id"]),
        })
        error = None
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read(65536)
        except urllib.error.HTTPError as e:
            error = "HTTP %d from the receiver" % e.code
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            error = "delivery failed: %s" % (getattr(e, "reason", None) or e)
        ts = now_ms()
        with self.tx() as t:
            if error is None:
                t.execute("UPDATE callbacks SET status = 'delivered', attempts = ?, delivered_at = ?, last_error = NULL WHERE id = ?",
                          (attempt, ts, row["id"]))
                kind = "callback.delivered"
            elif attempt >= self.config.callback_max_attempts:
                t.execute("UPDATE callbacks SET status = 'failed', attempts = ?, last_error = ? WHERE id = ?", (attempt, error, row["id"]))
                kind = "callback.failed"
            else:
                delay = min(1000 * 2 ** (attempt - 1), 300000)
                t.execute("UPDATE callbacks SET attempts = ?, last_error = ?, next_attempt_at = ? WHERE id = ?",
                          (attempt, error, ts + delay, row["id"]))
                kind = None
            if kind:
                t.emit(kind, {"callback": callback_from_row(t.execute("SELECT * FROM callbacks WHERE id = ?", (row["id"],)).fetchone())})

    def sweep_interval(self):
        return min(max(self.config.stale_ttl_ms / 4000.0, 0.1), 5.0)

    RETENTION_EVERY_S = 600  # rows expire after days: a pass every ten minutes keeps each one small

    def sweep_loop(self):
        next_retention = 0.0  # the first retention pass runs with the first sweep, seconds after start
        while not self.stopping.wait(self.sweep_interval()):
            self.sweep_presence()
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + self.RETENTION_EVERY_S
                self.apply_retention()

    def flush_presence(self):
        """Write the lastSeen values kept in memory (activity is not a write of its own)."""
        dirty, self.dirty_seen = self.dirty_seen, set()
        rows = [(self.agents[a]["lastSeen"], a) for a in dirty if a in self.agents]
        if rows:
            with self.tx() as t:
                t.c.executemany("UPDATE agents SET last_seen = ? WHERE id = ?", rows)

    def sweep_presence(self, now=None):
        """Silent agents go offline (their work back to the pool); long-offline ones are removed."""
        now = now or now_ms()
        for aid in list(self.agents):
            if self.hub.listening(aid):
                a = self.agents.get(aid)
                if a is not None:
                    a["lastSeen"] = now
                    self.dirty_seen.add(aid)
        self.flush_presence()
        ttl, prune = self.config.stale_ttl_ms, self.config.offline_prune_ms
        for agent in list(self.agents.values()):
            if agent["system"]:
                continue
            if agent["status"] != "offline" and now - agent["lastSeen"] > ttl and not self.hub.listening(agent["id"]):
                with self.tx() as t:
                    current = self.agents.get(agent["id"])
                    if current is None or current["status"] == "offline" or now_ms() - current["lastSeen"] <= ttl:
                        continue
                    self.release_claims_of(t, agent["id"])
                    self._set_agent(t, current, {"status": "offline", "offlineSince": now}, event="agent.offline")
            elif agent["status"] == "offline" and now - (agent["offlineSince"] or agent["lastSeen"]) > prune:
                with self.tx() as t:
                    current = self.agents.get(agent["id"])
                    if current is None or current["status"] != "offline":
                        continue  # gone already, or back online since the snapshot above
                    t.execute("DELETE FROM agents WHERE id = ?", (agent["id"],))
                    t.execute("DELETE FROM redeliveries WHERE agent_id = ?", (agent["id"],))
                    self._uncache(agent["id"])
                    t.emit("agent.removed", {"agent": self.card(current)}, agent_id=agent["id"])

    RETENTION_BATCH = 500

    def apply_retention(self, now=None):
        """Delete old rows in small batches; open work and held messages stay. Returns counts."""
        if not self.config.retention_days:
            return {}
        cutoff = (now or now_ms()) - self.config.retention_days * 86400000
        steps = {
            "messages": (
                "SELECT m.id FROM messages m WHERE m.created_at < ? "
                "AND NOT (m.claimable = 1 AND NOT EXISTS (SELECT 1 FROM tasks k WHERE k.message_id = m.id "
                "AND k.status IN ('done','failed','canceled'))) "
                "AND NOT EXISTS (SELECT 1 FROM receipts r WHERE r.message_id = m.id AND r.state = 'held') ORDER BY m.id LIMIT ?",
                ("DELETE FROM receipts WHERE message_id = ?", "DELETE FROM redeliveries WHERE message_id = ?",
                 "DELETE FROM messages WHERE id = ?"),
            ),
            "tasks": (
                "SELECT id FROM tasks WHERE status IN ('done','failed','canceled') AND updated_at < ? ORDER BY id LIMIT ?",
                ("DELETE FROM task_events WHERE task_id = ?", "DELETE FROM tasks WHERE id = ?"),
            ),
            "events": ("SELECT id FROM events WHERE created_at < ? ORDER BY id LIMIT ?", ("DELETE FROM events WHERE id = ?",)),
            "callbacks": (
                "SELECT id FROM callbacks WHERE status = 'delivered' AND created_at < ? ORDER BY id LIMIT ?",
                ("DELETE FROM callbacks WHERE id = ?",),
            ),
        }
        counts = {}
        for name, (select_sql, deletes) in steps.items():
            counts[name] = 0
            while not self.stopping.is_set():
                with self.tx() as t:
                    ids = [(r[0],) for r in t.execute(select_sql, (cutoff, self.RETENTION_BATCH))]
                    for d in deletes:
                        t.c.executemany(d, ids)
                counts[name] += len(ids)
                if len(ids) < self.RETENTION_BATCH:
                    break
                self.stopping.wait(0.01)  # let waiting requests take the write lock between batches
        return counts

    # -- health and stats --------------------------------------------------
    def stats(self):
        agents = {"total": 0, "online": 0, "idle": 0, "busy": 0, "offline": 0, "listening": 0}
        for a in list(self.agents.values()):
            if a["system"]:
                continue
            agents["total"] += 1
            agents[a["status"]] = agents.get(a["status"], 0) + 1
            if self.hub.listening(a["id"]):
                agents["listening"] += 1
        day_ago = now_ms() - 86400000
        with self.db.read() as c:
            total = c.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            recent = c.execute("SELECT COUNT(*) FROM messages WHERE created_at >= ?", (day_ago,)).fetchone()[0]
            tasks = {s: 0 for s in TASK_STATUSES}
            for r in c.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status"):
                tasks[r[0]] = r[1]
            cbs = {"pending": 0, "failed": 0, "delivered": 0}
            for r in c.execute("SELECT status, COUNT(*) FROM callbacks GROUP BY status"):
                cbs[r[0]] = r[1]
            held = c.execute("SELECT COUNT(DISTINCT message_id) FROM receipts WHERE state = 'held'").fetchone()[0]
        polls, streams = self.hub.counts()
        return {
            "agents": agents,
            "messages": {"total": total, "last24h": recent, "held": held},
            "tasks": tasks,
            "callbacks": {"pending": cbs["pending"], "failed": cbs["failed"]},
            "longPolls": polls,
            "streams": streams,
        }

    def stop(self):
        self.stopping.set()
        self.hub.stop()
        with self.callback_cv:
            self.callback_cv.notify_all()

    def close(self):
        try:
            self.flush_presence()
        except (StorageUnavailable, sqlite3.Error):
            pass
        self.db.close()


def log(text):
    sys.stderr.write("[agent-relay] %s\n" % text)
    sys.stderr.flush()

# ============================================================================
# HTTP layer: auth, the route table, request parsing, handlers, errors
# ============================================================================


class Auth:
    """Who a request speaks for: the shared token, the admin token, an agent's key."""

    def __init__(self, relay, headers, admin):
        self.relay = relay
        self.admin = admin
        self.agent_key = headers.get("X-Agent-Relay-Agent-Key")
        self.agent_id = None

    @property
    def keys_on(self):
        return self.relay.config.agent_keys

    def act_as(self, agent, person_may=False):
        """The request acts as `agent`: with agent keys on, it must carry that agent's key."""
        self.agent_id = agent["id"]
        if not self.keys_on or self.admin:
            return
        if agent["system"]:
            raise ApiError(403, "forbidden", "Acting as %r is a person's act: it needs the admin token "
                           "(X-Agent-Relay-Admin-Token)." % agent["id"])
        if agent["keyHash"] is None:
            return  # registered before keys were on: its next registration gets a key
        given = self.agent_key or ""
        if hmac.compare_digest(hashlib.sha256(given.encode()).hexdigest(), agent["keyHash"]):
            return
        hint = " or the admin token" if person_may else ""
        raise ApiError(403, "forbidden", "This call acts as agent %s: send its key in X-Agent-Relay-Agent-Key "
                       "(the agentKey it got when it registered)%s." % (agent["id"], hint))

    def person(self):
        if self.keys_on and not self.admin:
            raise ApiError(403, "forbidden", "Only a person may do this: it needs the admin token "
                           "(X-Agent-Relay-Admin-Token), which agents are never given.")


class Route:
    def __init__(self, method, path, handler, summary, query=None, body=None, auth="token", ok=200, stream=False):
        self.method = method
        self.path = path
        self.handler = handler
        self.summary = summary
        self.query = query or {}
        self.body = body
        self.auth = auth
        self.ok = ok
        self.stream = stream
        self.regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")


S, I, B, O, A, L = "string", "integer", "boolean", "object", "array", "any"
_MSG_BODY = {"from": (S, True), "to": (S, True), "body": (S, True), "subject": (S,), "kind": (S,), "channel": (S,),
             "claimable": (B,), "replyTo": (I,), "idempotencyKey": (S,), "payload": (O,), "meta": (O,)}
_AGENT_BODY = {"id": (S,), "session": (S,), "name": (S,), "label": (S,), "machine": (S,), "rig": (S,), "project": (S,),
               "tags": (A,), "capabilities": (A,), "channels": (A,), "status": (S,), "ready": (B,), "approvalMode": (S,),
               "instanceId": (S,), "meta": (O,)}
_CLAIM_BODY = {"agentId": (S, True), "instanceId": (S,), "epoch": (I,)}

ROUTES = [
    Route("GET", "/api/health", "health", "Liveness and version; needs no token.", auth="public"),
    Route("GET", "/api/stats", "stats", "Counts of agents, messages, tasks, callbacks, long-polls and streams."),
    Route("GET", "/api/spec", "spec", "This OpenAPI 3 document."),
    Route("GET", "/api/cursor", "cursor", "The newest message id, for a client that wants to skip history."),
    Route("POST", "/api/agents", "register", "Register or update an agent (201 created, 200 updated); body is the card.",
          body=_AGENT_BODY, ok=201),
    Route("GET", "/api/agents", "list_agents", "Agents, newest lastSeen first.",
          query={"status": S, "tag": S, "cap": S, "label": S}),
    Route("GET", "/api/agents/{id}", "get_agent", "One agent's card."),
    Route("PATCH", "/api/agents/{id}", "patch_agent", "Change label, tags, capabilities, channels, status, ready, approvalMode, meta.",
          body={"label": (S,), "tags": (A,), "capabilities": (A,), "channels": (A,), "status": (S,), "ready": (B,),
                "approvalMode": (S,), "meta": (O,), "instanceId": (S,), "epoch": (I,)}),
    Route("DELETE", "/api/agents/{id}", "delete_agent", "Session end: offline, claims released; ?purge=true deletes it.",
          query={"purge": B}),
    Route("POST", "/api/agents/{id}/heartbeat", "heartbeat", "Keep an agent online (fenced by instanceId/epoch).",
          body={"instanceId": (S,), "epoch": (I,), "status": (S,)}),
    Route("GET", "/api/agents/{id}/inbox", "inbox", "Messages visible to the agent after `since` (or its cursor); `wait` long-polls.",
          query={"since": I, "wait": I, "limit": I, "unread": B}),
    Route("POST", "/api/agents/{id}/read", "read_upto", "Mark every visible message up to `upTo` read.", body={"upTo": (I, True)}),
    Route("POST", "/api/messages", "send", "Send a message to an agent, tag:X, cap:X, label:X or broadcast.", body=_MSG_BODY, ok=201),
    Route("GET", "/api/messages", "history", "History, newest first.",
          query={"agent": S, "from": S, "to": S, "channel": S, "before": I, "limit": I, "q": S, "held": B}),
    Route("GET", "/api/messages/{id}", "get_message", "A message with its receipts."),
    Route("GET", "/api/messages/{id}/thread", "thread", "The message's whole thread, oldest first."),
    Route("POST", "/api/messages/{id}/read", "read_message", "Mark a message read for one agent.", body={"agentId": (S, True)}),
    Route("POST", "/api/messages/{id}/claim", "claim_message", "Claim claimable work: one winner, 409 for the rest.", body=_CLAIM_BODY),
    Route("POST", "/api/messages/{id}/release", "release_message", "Give a claim back to the pool.", body={"agentId": (S, True)}),
    Route("POST", "/api/messages/{id}/approve", "approve", "A person approves a held message.", body={"agentId": (S,)}),
    Route("POST", "/api/messages/{id}/reject", "reject", "A person rejects a held message.", body={"agentId": (S,)}),
    Route("POST", "/api/tasks", "create_task", "Create a task (or count an occurrence of an active one with the same dedupeKey).",
          body={"title": (S, True), "target": (S, True), "body": (S,), "channel": (S,), "severity": (S,), "dedupeKey": (S,),
                "externalUrl": (S,), "metadata": (O,), "from": (S,)}, ok=201),
    Route("GET", "/api/tasks", "list_tasks", "Tasks, newest first.",
          query={"status": S, "target": S, "channel": S, "claimedBy": S, "limit": I}),
    Route("GET", "/api/tasks/{id}", "get_task", "A task with its events."),
    Route("POST", "/api/tasks/{id}/claim", "claim_task", "Claim a task: one winner, 409 for the rest.", body=_CLAIM_BODY),
    Route("PATCH", "/api/tasks/{id}/status", "task_status", "Change a task's status, progress or result.",
          body={"agentId": (S,), "status": (S,), "progress": (L,), "result": (L,)}),
    Route("GET", "/api/tasks/{id}/events", "task_events", "A task's events, oldest first."),
    Route("POST", "/api/integrations/events", "integration_event", "Integration ingress (integration token).",
          body={"dedupeKey": (S, True), "title": (S,), "body": (S,), "target": (S,), "channel": (S,), "status": (S,),
                "severity": (S,), "externalUrl": (S,), "metadata": (O,)}, auth="integration", ok=201),
    Route("GET", "/api/callbacks", "callbacks", "Callback deliveries.", query={"taskId": I, "status": S, "limit": I}),
    Route("GET", "/api/events", "events", "Server-Sent Events: the live stream (Last-Event-ID or ?since= replays).",
          query={"since": I, "agentId": S, "types": S}, stream=True),
]


def openapi_spec():
    """The OpenAPI 3 document, built from the route table so the two cannot drift apart."""
    paths = {}
    for r in ROUTES:
        op = {"summary": r.summary, "operationId": r.handler, "responses": {}}
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in r.regex.groupindex]
        params += [{"name": n, "in": "query", "required": False, "schema": {"type": t}} for n, t in r.query.items()]
        if r.stream:
            params.append({"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "integer"}})
        if params:
            op["parameters"] = params
        if r.body is not None:
            props = {n: ({} if spec[0] == L else {"type": spec[0]}) for n, spec in r.body.items()}
            required = [n for n, spec in r.body.items() if len(spec) > 1 and spec[1]]
            schema = {"type": "object", "properties": props}
            if required:
                schema["required"] = required
            op["requestBody"] = {"required": bool(required), "content": {"application/json": {"schema": schema}}}
        ok = {"description": "OK"}
        if r.stream:
            ok["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
        else:
            ok["content"] = {"application/json": {"schema": {"type": "object"}}}
        op["responses"][str(r.ok)] = ok
        if r.ok == 201:
            op["responses"]["200"] = {"description": "Updated, or a duplicate", "content": ok["content"]}
        op["responses"]["default"] = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if r.auth != "public":
            op["security"] = [{"bearer": []}, {"relayToken": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "Agent Relay", "version": __version__, "description": "A message bus for AI coding agents."},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "relayToken": {"type": "apiKey", "in": "header", "name": "X-Agent-Relay-Token"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "object", "required": ["code", "message"],
                                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
                }
            },
        },
    }


class Request:
    """What a handler needs of one HTTP request."""

    def __init__(self, handler, method, path, query, params, auth):
        self.handler = handler
        self.method = method
        self.path = path
        self.query = query
        self.params = params
        self.auth = auth
        self.body = {}

    def q(self, name, max_len=256):
        v = self.query.get(name)
        if v is None or v == "":
            return None
        if len(v) > max_len:
            raise invalid(name, "is longer than %d characters" % max_len)
        return v

    def qint(self, name, lo=0, hi=MAX_INT, default=None):
        v = self.q(name, 32)
        if v is None:
            return default
        try:
            n = int(v)
        except ValueError:
            raise invalid(name, "must be a whole number, not %r" % v)
        if n < lo or n > hi:
            raise invalid(name, "must be between %d and %d" % (lo, hi))
        return n

    def qbool(self, name, default=False):
        v = self.q(name, 8)
        if v is None:
            return default
        if v.lower() in ("1", "true", "yes"):
            return True
        if v.lower() in ("0", "false", "no"):
            return False
        raise invalid(name, "must be true or false")

    def id(self, kind="Message"):
        raw = self.params["id"]
        if not raw.isdigit() or len(raw) > 18:
            raise not_found("%s %r" % (kind, raw))
        return int(raw)

    def agent_id(self):
        return urllib.parse.unquote(self.params["id"])


class Api:
    """Route handlers, grouped by resource. Each returns (status, body) or raises ApiError."""

    def __init__(self, relay):
        self.relay = relay
        self._spec = None

    # -- health, stats, spec -----------------------------------------------
    def health(self, req):
        return 200, {"ok": True, "version": __version__, "uptimeMs": int((time.time() - self.relay.started) * 1000)}

    def stats(self, req):
        return 200, self.relay.stats()

    def spec(self, req):
        if self._spec is None:
            self._spec = openapi_spec()
        return 200, self._spec

    def cursor(self, req):
        return 200, self.relay.cursor()

    # -- agents ------------------------------------------------------------
    def register(self, req):
        card, created = self.relay.register(req.body, req.auth)
        return (201 if created else 200), card

    def list_agents(self, req):
        status = req.q("status", 16)
        if status is not None and status not in STATUSES:
            raise invalid("status", "must be one of %s" % ", ".join(STATUSES))
        return 200, {"agents": self.relay.list_agents(status, req.q("tag", 64), req.q("cap", 64), req.q("label", 64))}

    def get_agent(self, req):
        return 200, self.relay.card(self.relay.get_agent(req.agent_id()))

    def patch_agent(self, req):
        return 200, self.relay.patch_agent(req.agent_id(), req.body, req.auth)

    def delete_agent(self, req):
        return 200, self.relay.end_session(req.agent_id(), req.qbool("purge"), req.auth)

    def heartbeat(self, req):
        return 200, self.relay.heartbeat(req.agent_id(), req.body, req.auth)

    def inbox(self, req):
        since = req.qint("since")
        wait = req.qint("wait", 0, 60, 0)
        limit = req.qint("limit", 1, 500, 100)
        unread = req.qbool("unread")
        out = self.relay.inbox(req.agent_id(), since, limit, unread, wait, req.auth, client_gone=req.handler.client_gone)
        if out is None:
            return None, None
        return 200, out

    def read_upto(self, req):
        return 200, self.relay.mark_read_upto(req.agent_id(), req.body, req.auth)

    # -- messages ----------------------------------------------------------
    def send(self, req):
        out, created = self.relay.send(req.body, req.auth)
        return (201 if created else 200), out

    def history(self, req):
        q = {k: req.q(k, 200) for k in ("agent", "from", "to", "channel", "q")}
        q["before"] = req.qint("before")
        q["limit"] = req.qint("limit", 1, 500, 50)
        q["held"] = req.qbool("held")
        return 200, self.relay.history(q)

    def get_message(self, req):
        return 200, self.relay.message_detail(req.id())

    def thread(self, req):
        return 200, self.relay.thread(req.id())

    def read_message(self, req):
        return 200, self.relay.mark_read(req.id(), req.body, req.auth)

    def claim_message(self, req):
        return 200, self.relay.claim_message(req.id(), req.body, req.auth)

    def release_message(self, req):
        return 200, self.relay.release_message(req.id(), req.body, req.auth)

    def approve(self, req):
        return 200, self.relay.decide(req.id(), req.body, True, req.auth)

    def reject(self, req):
        return 200, self.relay.decide(req.id(), req.body, False, req.auth)

    # -- tasks and integrations --------------------------------------------
    def create_task(self, req):
        task, created = self.relay.create_task(req.body, req.auth)
        return (201 if created else 200), {"task": task, "created": created}

    def list_tasks(self, req):
        q = {k: req.q(k, 200) for k in ("target", "channel", "claimedBy")}
        q["status"] = req.q("status", 16)
        if q["status"] is not None and q["status"] not in TASK_STATUSES:
            raise invalid("status", "must be one of %s" % ", ".join(TASK_STATUSES))
        q["limit"] = req.qint("limit", 1, 500, 100)
        return 200, self.relay.list_tasks(q)

    def get_task(self, req):
        return 200, self.relay.task_detail(req.id("Task"))

    def claim_task(self, req):
        return 200, self.relay.claim_task(req.id("Task"), req.body, req.auth)

    def task_status(self, req):
        return 200, self.relay.update_task(req.id("Task"), req.body, req.auth)

    def task_events(self, req):
        return 200, {"events": self.relay.task_events(req.id("Task"))}

    def integration_event(self, req):
        body, status = self.relay.integration_event(req.auth.integration, req.body)
        return status, body

    def callbacks(self, req):
        status = req.q("status", 16)
        if status is not None and status not in ("pending", "delivered", "failed"):
            raise invalid("status", "must be one of pending, delivered, failed")
        return 200, self.relay.list_callbacks({"taskId": req.qint("taskId"), "status": status, "limit": req.qint("limit", 1, 500, 100)})

    # -- the live stream ---------------------------------------------------
    def events(self, req):
        relay = self.relay
        agent_id = req.q("agentId", 128)
        if agent_id is not None:
            req.auth.act_as(relay.get_agent(agent_id))
        types = set(_parse_list(req.q("types", 1024) or "")) or None
        last = req.handler.headers.get("Last-Event-ID")
        if last is not None and last.strip():
            try:
                since = int(last.strip())
            except ValueError:
                raise invalid("Last-Event-ID", "must be an event id (a whole number)")
        else:
            since = req.qint("since")
        if since is None:
            since = relay.hub.head
        waiter = relay.hub.subscribe(agent_id, "stream")
        h = req.handler
        try:
            h.send_head(200, {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                              "X-Accel-Buffering": "no", "Connection": "close"})
            h.close_connection = True
            h.wfile.write(b"retry: 2000\n: connected\n\n")
            if agent_id:
                relay.touch(agent_id)
            ping = relay.config.sse_ping_ms / 1000.0
            while not relay.hub.stopping:
                waiter.event.clear()
                batch = relay.hub.after(since)
                if batch is None:
                    batch = self._stored_events(since)
                frames = []
                for ev in batch:
                    since = ev.id
                    if types is not None and ev.type not in types:
                        continue
                    if agent_id is not None and not ev.concerns(agent_id):
                        continue
                    frames.append(ev.frame())
                if frames:
                    h.wfile.write(b"".join(frames))
                if batch:
                    continue
                if not waiter.event.wait(ping):
                    h.wfile.write(b": ping\n\n")
        except (OSError, ValueError):
            pass  # the client went away
        finally:
            relay.hub.unsubscribe(waiter)
            if agent_id:
                relay.touch(agent_id)
        return None, None

    def _stored_events(self, since):
        rows = self.relay.db.query("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT 500", (since,))
        out = []
        for r in rows:
            aud = frozenset(a for a in (r["audience"] or "").split(",") if a) or None
            out.append(Event(r["id"], r["type"], r["agent_id"], aud, r["data"], r["created_at"]))
        return out


STATUS_TEXT = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized",
               403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
               411: "Length Required", 413: "Payload Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
               429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
               501: "Not Implemented", 503: "Service Unavailable"}
WRITE_METHODS = ("POST", "PATCH", "DELETE", "PUT")
SURROGATE_RE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _reject_constant(name):
    raise ValueError("%s is not allowed in JSON" % name)


def parse_json_body(raw):
    """Bytes to a JSON object, or ApiError 400 invalid_json naming the problem."""
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_json", "The body is not valid UTF-8 (byte %d)." % e.start)
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "invalid_json", "The body's JSON is nested too deeply.")
    except ValueError as e:
        raise ApiError(400, "invalid_json", "The body is not valid JSON: %s." % e)
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "The body must be a JSON object, not %s." % type(data).__name__)
    if "\x00" in text or SURROGATE_RE.search(text):
        _check_strings(data)
    return data


def _check_strings(value, depth=0):
    """Strings the database cannot hold faithfully (lone surrogates) are refused; NUL is stored as sent."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "invalid_json", "The body holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text.")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, depth + 1)
            _check_strings(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, depth + 1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "agent-relay/" + __version__
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 30  # seconds a client may take to send a request; an idle keep-alive connection closes after it

    # set by make_server
    relay = None
    api = None

    def log_message(self, format, *args):
        pass  # no access log: request lines are not worth a write per request (and must never show a token)

    def handle_one_request(self):
        th = threading.current_thread()
        try:
            th.relay_idle = True  # waiting for a request on a kept-alive connection: nothing to finish at stop
            try:
                self.raw_requestline = self.rfile.readline(65537)
            finally:
                th.relay_idle = False
            if len(self.raw_requestline) > 65536:
                self.requestline = ""
                self.request_version = "HTTP/1.1"
                self.command = ""
                self.close_connection = True
                self.send_json(414, ApiError(414, "invalid_field", "The request line is longer than 64 KiB.").body())
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self.dispatch()
        except (socket.timeout, ConnectionError, OSError):
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """Errors found while parsing the request line and headers, in the relay's envelope."""
        self.close_connection = True
        err = ApiError(code, "invalid_request" if code != 431 else "payload_too_large", message or STATUS_TEXT.get(code, "Error"))
        try:
            self.send_json(code, err.body())
        except OSError:
            pass

    # -- writing -----------------------------------------------------------
    def send_head(self, status, headers):
        lines = ["HTTP/1.1 %d %s" % (status, STATUS_TEXT.get(status, "Status")), "Server: " + self.server_version]
        for k, v in headers.items():
            lines.append("%s: %s" % (k, v))
        if self.close_connection or headers.get("Connection") == "close":
            if "Connection" not in headers:
                lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send_bytes(self, status, body, headers):
        lines = ["HTTP/1.1 %d %s" % (status, STATUS_TEXT.get(status, "Status")), "Server: " + self.server_version,
                 "Content-Length: %d" % len(body)]
        for k, v in headers.items():
            lines.append("%s: %s" % (k, v))
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + body if self.command != "HEAD" else head)

    def send_json(self, status, obj, headers=None):
        h = {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store"}
        if headers:
            h.update(headers)
        self.send_bytes(status, dumps(obj).encode("utf-8"), h)

    def client_gone(self):
        """True when the client has hung up (checked before handing it a long-poll answer)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- reading -----------------------------------------------------------
    def read_body(self):
        limit = self.relay.config.max_body_bytes
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks, size = [], 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    n = int(line.split(b";")[0].strip() or b"x", 16)
                except ValueError:
                    self.close_connection = True
                    raise ApiError(400, "invalid_request", "The chunked body is malformed.")
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                size += n
                if size > limit:
                    self.close_connection = True
                    raise ApiError(413, "payload_too_large", "The body is larger than %d bytes (AGENT_RELAY_MAX_BODY_BYTES)." % limit)
                chunks.append(self.rfile.read(n))
                self.rfile.readline(8)
            return b"".join(chunks)
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(400, "invalid_request", "Content-Length %r is not a number." % length)
        if n > limit:
            self.close_connection = True
            raise ApiError(413, "payload_too_large", "The body is %d bytes; the relay takes at most %d (AGENT_RELAY_MAX_BODY_BYTES)." % (n, limit))
        data = self.rfile.read(n)
        if len(data) < n:
            self.close_connection = True
            raise ApiError(400, "invalid_request", "The body ended after %d of %d bytes." % (len(data), n))
        return data

    # -- the request pipeline ----------------------------------------------
    def dispatch(self):
        relay = self.relay
        method = self.command
        split = urllib.parse.urlsplit(self.path)
        path = split.path
        # a body still on the wire when the request is refused (host, token, origin) must not be read as the next request
        self._body_read = self.headers.get("Content-Length") in (None, "", "0") and "chunked" not in (
            self.headers.get("Transfer-Encoding") or "").lower()
        try:
            try:
                self.check_host()
                if path == "/api" or path.startswith("/api/"):
                    self.dispatch_api(method, path, split.query)
                elif method in ("GET", "HEAD") and path in ("/", "/index.html", "/dashboard"):
                    self.serve_dashboard()
                elif method in ("GET", "HEAD") and path == "/favicon.ico":
                    self.send_bytes(204, b"", {"Cache-Control": "max-age=86400"})
                else:
                    raise ApiError(404, "not_found", "Nothing is served at %s; the API lives under /api/ (see /api/spec)." % path[:200])
            except StorageUnavailable as e:
                raise ApiError(503, "unavailable", str(e), headers={"Retry-After": "5"})
            except sqlite3.OperationalError as e:
                problem = storage_problem(e)
                if not problem:
                    raise
                raise ApiError(503, "unavailable", problem, headers={"Retry-After": "5"})
        except ApiError as e:
            if e.status in (401,):
                e.headers.setdefault("WWW-Authenticate", 'Bearer realm="agent-relay"')
            self.discard_body_if_unread()
            self.send_json(e.status, e.body(), e.headers)
        except OSError:
            self.close_connection = True  # the client hung up or stalled
        except Exception:
            self.internal_error()

    def internal_error(self):
        log("internal error on %s %s:\n%s" % (self.command, urllib.parse.urlsplit(self.path).path, traceback.format_exc()))
        self.close_connection = True
        try:
            self.send_json(500, {"error": {"code": "internal", "message": "The relay hit an unexpected error; it is logged on the relay's side."}})
        except OSError:
            pass

    def discard_body_if_unread(self):
        if getattr(self, "_body_read", True) is False and not self.close_connection:
            # the body of a rejected request is still on the wire: drop the connection rather than read it
            self.close_connection = True

    def check_host(self):
        cfg = self.relay.config
        if not cfg.loopback:
            return
        host = self.headers.get("Host")
        if host is None:
            return
        name = host.strip().lower()
        if name.startswith("["):
            name = name[: name.find("]") + 1] if "]" in name else name
        elif ":" in name:
            name = name.rsplit(":", 1)[0]
        allowed = {"localhost", "127.0.0.1", "[::1]"} | {h.lower() for h in cfg.allowed_hosts}
        if name not in allowed:
            raise ApiError(403, "forbidden", "Host %r is not this relay's name (DNS rebinding guard); add it to "
                           "AGENT_RELAY_ALLOWED_HOSTS if it is yours." % host[:100])

    def check_origin(self):
        origin = self.headers.get("Origin")
        if origin is None:
            return
        host = self.headers.get("Host") or ""
        if origin.lower() not in ("http://" + host.lower(), "https://" + host.lower()):
            raise ApiError(403, "forbidden", "A write from origin %r is refused (cross-site request); only the relay's own "
                           "page may write from a browser." % origin[:100])

    def authenticate(self, route):
        """Returns Auth; raises 401/403. The admin token also opens every route."""
        relay = self.relay
        cfg = relay.config
        given = None
        bearer = self.headers.get("Authorization") or ""
        if bearer[:7].lower() == "bearer ":
            given = bearer[7:].strip()
        if not given:
            given = (self.headers.get("X-Agent-Relay-Token") or "").strip() or None
        admin_given = (self.headers.get("X-Agent-Relay-Admin-Token") or "").strip() or None
        is_admin = bool(cfg.admin_token) and any(
            t is not None and hmac.compare_digest(t.encode(), cfg.admin_token.encode()) for t in (given, admin_given))
        if route is not None and route.auth == "integration":
            integ = relay.integration_for_token(given) if given else None
            if integ is None:
                raise ApiError(401, "unauthorized", "This route needs an integration's token (Authorization: Bearer <token>).")
            auth = Auth(relay, self.headers, False)
            auth.integration = integ
            return auth
        if route is not None and route.auth == "public":
            return Auth(relay, self.headers, is_admin)
        if cfg.token and not is_admin:
            if given is None or not hmac.compare_digest(given.encode(), cfg.token.encode()):
                if given is not None and relay.integration_for_token(given) is not None:
                    raise ApiError(403, "forbidden", "An integration token opens only POST /api/integrations/events.")
                if "token=" in (urllib.parse.urlsplit(self.path).query or ""):
                    raise ApiError(401, "unauthorized", "Tokens are not accepted in URLs; send Authorization: Bearer <token>.")
                raise ApiError(401, "unauthorized", "A valid token is needed: Authorization: Bearer <token> or X-Agent-Relay-Token.")
        elif given is not None and relay.integration_for_token(given) is not None and not is_admin:
            raise ApiError(403, "forbidden", "An integration token opens only POST /api/integrations/events.")
        return Auth(relay, self.headers, is_admin)

    def dispatch_api(self, method, path, query_string):
        route, params, allowed = None, None, []
        for r in ROUTES:
            m = r.regex.match(path)
            if m:
                allowed.append(r.method)
                if r.method == method or (method == "HEAD" and r.method == "GET" and not r.stream):
                    route, params = r, m.groupdict()
                    break
        auth = self.authenticate(route)
        if route is None:
            self._body_read = False
            if allowed:
                raise ApiError(405, "method_not_allowed", "%s is not allowed on %s (allowed: %s)." % (method, path, ", ".join(sorted(set(allowed)))),
                               headers={"Allow": ", ".join(sorted(set(allowed)))})
            raise ApiError(404, "not_found", "No route %s %s; see /api/spec for the routes." % (method, path[:200]))
        query = {}
        for k, v in urllib.parse.parse_qsl(query_string, keep_blank_values=True):
            query[k] = v
        if "token" in query or "access_token" in query:
            raise ApiError(400, "invalid_field", "token: tokens are not accepted in URLs (they end up in logs); "
                           "send Authorization: Bearer <token>.", field="token")
        req = Request(self, method, path, query, params, auth)
        if method in WRITE_METHODS:
            self.check_origin()
            self._body_read = False
            raw = self.read_body()
            self._body_read = True
            if raw.strip():
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if ctype != "application/json":
                    raise ApiError(415, "unsupported_media_type", "Send the body as Content-Type: application/json (got %r)." % (ctype or "none"))
            req.body = parse_json_body(raw)
        status, body = getattr(self.api, route.handler)(req)
        if status is None:
            return
        self.send_json(status, body)

    # -- the page ----------------------------------------------------------
    def serve_dashboard(self):
        page = dashboard_assets()
        if self.headers.get("If-None-Match") == page["etag"]:
            self.send_bytes(304, b"", {"ETag": page["etag"], "Cache-Control": "no-cache"})
            return
        headers = {"Content-Type": "text/html; charset=utf-8", "ETag": page["etag"], "Cache-Control": "no-cache",
                   "Vary": "Accept-Encoding", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                   "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                              "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                              "connect-src 'self'; frame-ancestors 'none'"}
        if "gzip" in (self.headers.get("Accept-Encoding") or "").lower():
            headers["Content-Encoding"] = "gzip"
            self.send_bytes(200, page["gzip"], headers)
        else:
            self.send_bytes(200, page["html"], headers)


for _m in ("GET", "POST", "PATCH", "DELETE", "PUT", "HEAD", "OPTIONS", "TRACE", "CONNECT"):
    setattr(Handler, "do_" + _m, Handler.dispatch)


class RelayServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, addr, handler):
        self.active = set()
        self.active_lock = threading.Lock()
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        ThreadingHTTPServer.__init__(self, addr, handler)

    def process_request_thread(self, request, client_address):
        th = threading.current_thread()
        with self.active_lock:
            self.active.add(th)
        try:
            ThreadingHTTPServer.process_request_thread(self, request, client_address)
        finally:
            with self.active_lock:
                self.active.discard(th)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, OSError)):
            return  # a client that hangs up is normal
        log("connection error:\n" + traceback.format_exc())

    def wait_for_requests(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.active_lock:
                threads = [t for t in self.active if not getattr(t, "relay_idle", False)]
            if not threads:
                return True
            threads[0].join(max(0.0, min(0.2, deadline - time.monotonic())))
        return False


def make_server(config, relay=None):
    relay = relay or Relay(config)
    handler = type("RelayHandler", (Handler,), {"relay": relay, "api": Api(relay)})
    try:
        server = RelayServer((config.host, config.port), handler)
    except OSError as e:
        relay.close()
        raise ConfigError("PORT: cannot listen on %s:%d (%s)" % (config.host, config.port, e.strerror or e))
    return server, relay

# ============================================================================
# The embedded dashboard: a copy of dashboard.html, so that this file alone serves it.
# Edit dashboard.html, then refresh the copy with: python3 tests/refresh_dashboard.py
# ============================================================================

_DASHBOARD = {}


def dashboard_assets():
    if not _DASHBOARD:
        gz = base64.b64decode("".join(DASHBOARD_GZIP_B64))
        html = gzip.decompress(gz)
        _DASHBOARD.update(gzip=gz, html=html, etag='"%s"' % hashlib.sha256(html).hexdigest()[:20])
    return _DASHBOARD


# BEGIN EMBEDDED DASHBOARD
DASHBOARD_GZIP_B64 = [
    "H4sIAAAAAAACA8V9y5LbSJLgXV8Ryp5pANUkkvmSVExlalUq1bSmVVW9SvXMrqk0bSAJJtFJAiwAzFS2Js3q1Jc9rNnMmvVl99q/",
    "MPfZP6kvWX/FCwRIplRmK+uuJOLh4eHh4eHh7hHx9OGkGNe3y1TN6sX8/MFT/KPmSX55tpfme5iQJhP4s0jrRI1nSVml9dneqp72",
    "n+zp5DxZpGd711l6syzKek+Ni7xOcyh2k03q2dkkvc7GaZ8+eirLszpL5v1qnMzTs4MGkHExL0rIm6WL1AE0zy5ntZok5VWjfJlO",
    "07JMS6dsXvRNKhSus3qenj+/hDz1Jp0nt0/3OenB03mWX6kynZ/tZVB7T82g3tneJKmTYQ+rVvUtltv/QvXhn6oRKfr5qf/UF/sP",
    "hmVR1OrjAwWQRpdD9avpyfTR9MkpfC6TPJ1jCv0zKf1DTPtymkxHmFanH2pIOBgfHh4NMGGxqtMJpDx69Hjw5OSUIRflJC0hMT1M",
    "T9IEiyXjMdAAko5OHh2Nv7RJ/aqYYnr6JE25iQmMP9UeD46+PBwxSE7UhaeTdMxwiyvEBiofp/xp4J1MT9Ixpt0kZQ4JyZNHo8FA",
    "J1hI06P0QNBeVbeQ9Dg5ORw/PpUEU3CQCgmK6RS+nyRfHnw5lm/TaDodTI8YWplMslU1VAeD5QcsVs2SSXEzVAN1sPygDuH/5eUo",
    "CQ8e9dThcU8dD3oqHpxEXHlR5MVQrTL6US2TcdpTF998Cx/9N+nlap6UPfVtms+LnnpR5FUxT6qe2nudjdIyqbMiV1h0r6dM9dMH",
    "dw/+yyKdZIkKl8ShVd9l9yHxd0SsYZnEsMnB8cHjg7HLJsABg8PHPpscHh4+Pjpw2ARG5TEPgmaTL58khyOikMcoh+nR8fHAY5TH",
    "aXI4HawzyuHx0eA48RhlOniSPE41UJ9VjpLD48NDwyon0/H0ydhnlYPJ0RF3RVglfTIaHE+brHKUHA0OBwZ1ZpbRky8TxtJllsP0",
    "8DF3ZwOzHEL/jp5oeJo98iKnntzBgH2hPqpR8aFfZX/OchgGJhdQDRjq7gEKyx6kTW6h2CIpLzPAfYA5nAZARsn46rIsVjmQ/jop",
    "QxzN6FTRwOsUHCpIA3GU9mcpijrg2fiYpvK0wKE4OF5+2MckVd1Wdbror7Ke6ifL5Tztcwrw3kV6WaTqD6+A6d4Uo6IGztz7bTq/",
    "TutsnKjv0lUKOc9LEL49VSV51a/SMptiI8V1Wk7nxU3/w1DNsskkzZFZR6u6LnKU2MtVDVXSeTqGv4htUqYJdJmRy/IZAKpNp8z3",
    "3YN3DO09lJ1k1RKkL5NXPcwWuFYkORWLiTehkEcWSow4HyaRtNefJotsfmsKQQ6UoRwYJJhFB4fxyZKGJ74pkyVUM93D76FK8tsb",
    "wBCk1Q2MZn8EfQG+pD99TMGqRujj8peWny31GUxcF0viimVRZSgkhqqCwbm6PVWQQ6zz536WT1IYh5PTFt6hiU4CyjAijNFiSAIN",
    "ZFA20UxG2UCYZTKZEOeiEFQHj4AyMLSISL8sbtxxmc5ToFoCS23ez4CjQHDipE/LU3WJZGMpiqWEjvjfU2D7D7y0Q4mTAZUxM0El",
    "q7qgkRiVST7RI3gjPP7oZOCP3CNbu19yGYZwMwOM+iRGkYG4ZQALy3bu9iHLaRJt6wq108IyhlhHSCvsi6W0Xky+/PJLLLo+Nlqu",
    "NGe3ZuNNfRgOR+m0KFOaAqTHDNXeHtRhwj7BFrVkoI8GUieDv+9AKTJtvEPFpl/VSZ2iQnWd7uG0bKl01dqN4mojKKcHbSA76pYp",
    "JoFYAarvvYfld62Em98K26wPTYQxY6dmNerbmt/YxQ2tAQvPOpB3Fsom+py1EeRGhNz6WKtan+trc9lOjg2zGviPZiUvdAR7tyk4",
    "SmAJgTxpp2PGKa2RdIm09Sn5pH1CilbUvjrca4pSH0fN9UmWbRf4sREsUCSD1a2frxawGI6Hqk5GqDRiQmWAxrAHKltANwdvVfVH",
    "SUlKRue4PHLGZVuHHfhmpYPRK1b1Z690iyTLY4HlsMVlmcHCiv8Fui0gDQgNKK0WOQzgIsuhYyHo3wdTxIrXm0cegxxs40u72mgt",
    "G8CawgMsHBEFXfy2InQCCDmfjwm/O56U844pNclKlBm4vDNEr0cOVjSDgP7fJSUuxtW4TFNsHjUkrtnD9QDUl4r3FNOsrOoYyWz6",
    "aAlCKxPvH5rIyaJCjKdgI7ZclsV1MkeZoGcb9upX4wLUsiq1yYeUvEirKrlMneJHlJ7grtpJPaZU0KGubNrJKSnSFVMkpknZKrBE",
    "t9k6/5uzn3P5S6TDB6PLcyZ/edrQcdtQMHZ9VNbuoxk96VCMSI8xGtpAlFKnjdmhVolkrp54DH3aoi4R463yulHxsFOmbZKL9xe1",
    "ov0YOg648yimeID7KbBy2SnPWgSTnb8WGEzI+rZrP+DCOPKwQRFINJodxdVq1KDRkdsaUgwafNRJN5/0AwfskGZhfzzL5hOz7+tr",
    "Bd6RqNUimc8BuxLmyGdI1HiZzectS+xoXoyvfHIcNPRYHNg2fVGGsW29a92zbtNtPWKdCJ8i2nHVLwhbUK7ke1J4Xynqj2U6sUks",
    "nWg/eG/tVEBkk7nTRrFMc/sFH0gcm3C5SoA4DgKzdD75VF1TQKApwgIcz5Ns0dEhY7RowsQMD+Y0yeYumjT+bgLsYCdI7ls36U8w",
    "L6GQgTKGrXk2RhuATtEz9pPVU4GDRADCfrKWPsuWn8blA/W4hccf7apMbhCQVjbBekH/B9buNCdIJ3bRtDsUY9wp1znZnLYtglvW",
    "T0OGxx6pjp2N7XhVVjgQyyLjxWxNWDI6wxn22CDV98aPLYORKQsdT0Zz4vUC5EpWAw3iE1ACdGuTdJqs5rWuEC/LDKh828o1BvjG",
    "liX1V2QzF6iXRbFmT2IZoSh/lEw26dxYhLwDdiTIKujhyCntOBmCHzLfIFSyo71DZ8vZHu4dcMPrplVpUo5nzdRlUlVolcJ0a3qD",
    "4bOa7d83NZn7qlCP11bRL8X20cll0p3htBivKouZ/iZeoN/966zKRiSOQWOtkTn8DOSUVY38z9RyETb0lBK4EFVpTT1DHObJKJ3H",
    "04wF9n108aM1E1CnJtDUEs36Lurv5+6YYqNG77ZbKtNlmtQh7nb6UxC9Pb0/OTyCmc17qMgz2t1JGzsJloam4OsTg21bbY9YwEH3",
    "GZMTF9c+2Up3V8Jb91YCithkzfqIOh1Cpc2PX3OTiNdcjPJDZBpy/xrljhtr1KHWbfUsMGK1Q+7p9dKpEwMtxumsmE/ScqN6rDt5",
    "PDDWAHRmwqpaAwnHDm3YCryrhaQxHI41dccVrmOEEIsYxa2Tf/JIKDbPKti9gmbTIdE1d8egyey282DAZiKb/e1nTmSYjcCQnzqT",
    "azORD07WJvITxzS+tqWcpul95Z/eaS2qy8+WCk+s7W5XySBNx0CB+e1Gc4C7vXpkke5TEMCOJs1jvQ3qYMpdud9tOr6ZFZssgp6Y",
    "2SRPLMS62OSscovWsJ2wW895Ot3qKcGqsHfF3UCrIHTJTGvjNjzE6+m1tyzTPrd4b5dbs31YOtC0Zdyhj9KFA/V2aF1LiExCLN6i",
    "eLsWbdvAcavEQrfYjPZQyJUZmbuE75nCh1ucbFLsYNDaniNvtJntcxUHa65ryht3ikuppr/vF5VMthnXP4xTXo/gYxK6ZcrTDAaS",
    "dqEeglMKevhsj2QTYkzciSuDWe2hCEke3q62TP9ta/LWTdYT5uH72RA3zblpUS7uYVw72glecdW6pLZtBMezdHzV6eix86y1iy0A",
    "zWQgc/GvlbVJf+psoDY/cRnEuv8/1sF7asjHDrp9CmNrFeabxp2qtrr+u9dOmWg7rpLdtg3T9rmCOZlvWu3WtAX2f2lpctxO5a5x",
    "8maDiXFxG3lkZIlYogeWmaEHU8vLgsu5ylwSipnKrFeDdo+8ay7RHN9hWbGWMV1wyzL3ZLsebvtgoxqLqzRXi2ICiHzWYkQg+thl",
    "wM8GuEyzDymsM1lO+/aBTxSOv0O/33FPHWL83fHJ+i6jrQswcf60qupsets3ERO6dw2foQmpORS9k/r6S7qgeENhm6WRcO0zos1I",
    "0hEzV9uarV3gH9xgRYzcwa09kwuoxP+LD08ip0PkTGr6jtzAGlNy2V3waKPuSyPcyYRr40G8mOYNfeTpvsTVPt2X2GJUJSXSGJbp",
    "8TypqrM9UJz2zoFuTyfZtZOG4oPS/RyKL9rzw3whWwqSsMkmHM7RZ4f6nqKAijoFpJs5AhTTpNh6OIgqizka7bjKuc35+ae/QReh",
    "RWmcw+ioeQzbIG9Eo3EnXfenht9sAOT68IXi/mzvIq0xEhnjlpNbnr1752/xz9N9LkpU070nImEbFAPSaFfSpE35wsAFtpic7REl",
    "FWZkGKhW7bkEdaoZ7J6zKYt9Pmof8KuT+d7505HBoc/WLnELtSDUKHD+80//Dj0732+BwdC7QUjrAkHb6xiwN0Zr/fEwZvsDDfp6",
    "UzbTtGOS7tGGNkH0D49nbc14+aYlY7iA1Hs0VifVVdXGiM1c0xB+KcrY3IxtA51otBD5TWNyW6OUbprDr3v0BzYSc5TmxrnX1sJ6",
    "IdOcyVKStWsnLUx2zrV0uFlkM2pSxmDG3xad9nnN4UEtkHWGg71OYvFF8Ud7ohCdC3QWzGl5/uDBUwyX0dU5amZNKsNyYeQCa606",
    "h9ZTJpdR75uiT6f3pa4rgKDro1u3zEwa8hGwERVAelgGfbhQ57n+gJ4dnnsDSsEUDRT7nHg+ELo7Swk0vDTUdCMemiAk0RB22YY4",
    "qTTNmig9OolEmQ2EHIAUN7GGCid2QOTc8++Keoa74axSN0mG6xjoBaXZlcXucrovPQf+2DbqJHGbbbNw3jDeXOAeg20q8PqzeZi5",
    "8KePMdffaYB1/516bcPr5Ow2toICpwgK3xV6gSvTS1yBynSibtP6E4cOt+UNPDFpw7BR9u6Dpov/M/zlAfN6PjsyY7AagYaDa4/q",
    "GlNestaGdHa004hy7fvOWK7VMpxOxk6jKc03B5OS441EeYFxJeSLMopAF4XGuuhmMrV31anc0t9m7k6ddiqt9Xy81q0OHjbr4aes",
    "SGIjXNsHsOWwm811id053alxAfqFSio1Wy2SvIXr0SpneyEIujCwQAfKnIUmW0yZp7hhKabTPZWjBM+gTqrb8XHWplC/JZva2prN",
    "loEzoP0Nl1O6LjbBgtxzV+8SULJ98vdCdpeEp6auWhAHnSofp/NNDeoi5/xXUaK7iRIM3AFq8pmxrO95SLPDWUpReALu0ZwSUIbi",
    "J5QTDuJ1opNWmIHTDOVGeZnWoKjTfnxPOb5hWSIAYg/kyOXwQw903CX+Iczwx6gsksk4wdlcLYG5yb4LyIJOkPqd2ac6W/v3Ypbk",
    "GNsbMkLJPLpPf8dcu6PTJtfrYxpfxmoCo1bcVvfuRXNY27p0IQ6z1i5t6ZA427rEi+S6+DQRbMPoWxaILhrG3+LCR5NKR9Oc5RHy",
    "n0sQ9irR4vbnn/6mwhd1Of/NSzSoqQqEVhXh7NRtbUK7ZX6gG2bDBKFBA/AuQSltVHxocIleGbr4xOSfO6tISC4GXM+iNmb29nfk",
    "KtouiGD8FlntCSIJZGtwAZCuc4VBixUuCPeSOdYP5LckSa1NSd6GLV9nS0VDuHYYz/xMzzTW2tLTfYRuF9AEw1KqWvQhT65hRclu",
    "L88RJJ3F76HzanWj0T1je+lWCkyR3bUCt4pM680bF1Nh49bFHUAOR9nbIlNoz9Ql2CQokRBgeGxca5DIz+L1yR8XX+JUuDqNbhVs",
    "MXUYYF2A3NksxneTkReE8j069GN7Z35s4IzCT2W50mEUgDvJ0k78dt9TmqHdaROC4T6Nei1quZ+3k1Ju0Wiq5Lsq4k/30WCEhiOn",
    "BesZ2rNmcEpss4O7GVdZjgKBjNyOnumpyVLe1G/RkJ10Fk2TLJkXlzKPCQC0Uq7SNmME1iXrdptuLZTQdghb9vyNtc/TrH4gTGDK",
    "zTKcxG9nWSW2/ByGtYJVmOrE6lWNxpirdElMV2M50NluqrQMKjUvxslcVXVRwqjEhk88TjeRww5uTMl14kiGz++ctj4hu+mwNuji",
    "LLJCcYs67+DaqsC7Oecv6G9z9bzfQk0Aq+Q6bWuI0s8v4L9+I9YKK8uY3oY+rcZltqzxzpgH6gvluKMAejUbFUk5GZL7Zgnjxvaa",
    "P9Lox8tb0LPKa9jCJ7Xa29+LEcA/JXk2nyfqHy96sItDXRfUhTQfZ2mFdzgs0n5RZpfAHgijzq5T9Yc3r8nDcUv1vyF3d5qMZ0qv",
    "enNQ+yt1k9Uz9Q8v36r9ZJntx3F8ar/Sa7IihReITtm/oNXhC/WSknsKI6S4/jStx7MwUlVBXWJPcl0CueYV8mwitydEqgYWqtQK",
    "2p0lBAwV+ks8u4LXAtygN6tP0AhQMp3SoRWNM+AySUew6I0h7WAwUIsqou69WWFIa5Lfsu2yBuAYWwU0nJbFwvh7SoUHHC75XpZK",
    "0YQDMqJ9DLbiKNYRWIg/XrDvEj1XKO3zYpJWEdA+xVBdKPzbt9++pqYvNGogKZDGqzqbZzWNy/Pfv1K/wTkyQ2JNy7QC6sMEmgC2",
    "JezAcJiqGsi46CEkcXuS960nOPeMwO3pYLEeBcr0bJwMXjxS1IjM/oNgVRHMbFwHp+TbP2v/Z/HsLAHgxtCxWv2dOlNhNonU2bma",
    "FOPVAjCLQTN7OU/x51e3ryaYTe19ob5a4XE4UFxSzo7VBeADo0Ln5IDgQCkcG4ewp8DqUAZmFnJ9CT1Ia03rJd40NTEkR6ymwADE",
    "wuk8hE1tDyZyscSzBnF8lcEGhU5FMOo5oG5QHgOp61SwxpoRX6xSqpBLvwOyXr9XxVR9Tyt7DOVKIFFIDah//Vf18S6K5DqebKrC",
    "ayCeylfzOebhx5kiyRjRQdssX8lNOFj2irIDkj9BpPKYfn0HcxdwvOZyMF9StzCSiMq6LHkmBA2vo/ZaKL+gltuxCfRs0tq16wjh",
    "YxUgOpR7b+FP1hvAQ+hlXf0zzPowKHJo5de/JgELgLn/gR4dwjuZTEhcvCZPaFoihHk2TsNDmEwe+DyG9p9rNghxJAgersbqmQoC",
    "NbT9jvhaHm/wxtg5HP94CiIwfJVP8YaxW2+8xu54jbvHK8dQGxANUCED2Li8APDvgFcBlTFg0uCptzA8mBsKhuPIolim9arMFd2k",
    "w5jC/MQZdU0TyuGhll5yBdrh2BrPyxLWiayiv5j4DGg1VO/emwrLpJ69mtgqsFIAdn948+oFypAc2R+QcJvgPdoLZElbLaj6AUgw",
    "LhrXxeviJi1fAKOEEYVNgo4Q7r/7l6T/50H/y/77fZiKQT9AQWCmKKxHb7NFGtYyLXEUHoIsRrap1EPo+iDSJApoxgenZvZiD74G",
    "8sZ5cQPLS199t1qMgIlqPt9NsLLqGxznNJxEFtDPP/27AyYBMN8CReJkVEExWDB1AgX9hAlIebwXgIDOMaxCQ6/UU3ViwWJgC8ZS",
    "B27+I+gAjk4FlAoqyjLzBfOPHg2kBDU5nRdFCRn7VBGqLNarPHl03FGHgUGtma3VUkwAQLkJlZMOTNQ50BvYpcYsWGIK5LcAVmgc",
    "5ho5FCX4c/UU48rPeR2lFT0bX4EsvkrTJS6puJCFOFa3WsizHsCKE6zJnpRGWC9BUtPpMFSqXAFdgMxiTuA5AHxhRtSOduR0AoR+",
    "gCCDnkzswNHXgqG00dPJFSRBI8/0tHKAYt+DHsFAmzgClbJ5ekOM55YG/n918b1AwbqIL9cmTX9z1deop6ctte96Zo5QfVtNCmHn",
    "71xqjq+wdBUyGR0JWKMENJLpxxWMzwXd1VWUz+dAtXdCkfeBEYpc8RrHAFd0K38N9URG140lSOMsQj/AnuP4DXUHjJB2cJ9X/5DW",
    "IV5tB2IdDw3IkNIm5kL2MIDGqzpdYDEQ0kGAB3vGCaqEYRrZOpzhAb9A4LisGPi0Rkc+/ErDpwWIp5BXoEwXxXUqODRbB41KNltA",
    "7CnwuY9ENQNJhTpND3RvLI+/Y96wAtUeFvmpVzytcemQGnRqRNfxyY0iWA6VOE08fChpDsi0LAkkGRAcenHE+DOCRL9j0SxRTEjK",
    "mBe4QIUoD5w0kBYRiYqAJ43XolbJw2neQ40c2mQhqpsOQTFLaEH5CNuvNCmRc4oVqGCAOvUOyCBJIZWb5lyH4EFj2J6sU3OQQbhC",
    "YUNQEqfb70HHz2BRCktKcqCVBCDarAlbNX27Kvz2+9+9/O6Pv3v53wGFgFR02tRR2F2g19LnX3/7qqXQ88kiy/2S3CiGyXK4kYgF",
    "DKiEHlV4TeNH3k4NWVEBtR+hyBcLDz7Yv70khnOkZYWKAlCUlXW9c8NwpSVIeJL4rHjXMzQy4AmQqpjjdvRjAVOG9YQeifoes8hd",
    "rJ6jT57CRGTzB2xxPDiAlYiQgN9HPVxIUB8gtRMKjFNaJpLqNh8rw0yw7wwXaT0rQIKjFsO3Kvaknrd08H6pIvo9H4/TZQ2siVch",
    "ZmPa4O3/qQItFLuqazBuZyKHzFhGQiuTYwbQqBlUM9JNxs9h3GDD/We+jAdG+SvgaqAZLaNY1LaJSxmhqHslMNARB3tBQDkv+ihS",
    "cEEDbRIEBV6LC4QPnH29dANRYTikOgWwVQ+0KBe47wKRGv23oJYH74kHm0SxuxLqeGQr/7c+2Sr6xLF9Ytk+8yxCotJSGfoV09mv",
    "M/WPF99/F1e0tmXT25BSebOklWAUCMBI+KklPw5cgjwpTMijjWCbQpdV8rS+IN4LWWNnLETCfFR4o6jwPbPoECOj6QpfmVPEq0M6",
    "5jIhsqc1bqQDs8WGtBfFCvaueYHIJmKEYKtMgHJe98bigrsTozZia4r1GNtRvTTrzkLHSbaHGN7OFWqQuURC2uuCVJSVv7n2uPAJ",
    "DxxAhFdcRT4lEC1LCCzSMm+5EXd+4E6UGrGbOvyMee2ghb6g3WOAJWyWA4FLKlxGNKVpxaF1JHJozalmDbpTztDM6nr5R5xLLuam",
    "pk3EhY6UhN++fft75VewE+ahJzss1aQcdgtklc7l/KaEoOnG4gPa45FMqiuaGaCO0gSh9ZjkhBmNLmlm2Ab4yar+a0gdsTpMs/Al",
    "UlZW9TZcrcwiXFmgteBKGYQrT/174epvaVtnXQez4XA4OkNLpxqqCisebFEoyhFpUMR2+4T3fhajot9QZeRAyxfqApQkxxbJxx1C",
    "vE4twf0gqvqwS3mjlzYsiTbeCZfvoakQdNobXLHYyDxPJ/6uxlAUXRO4uFZvZCW2G11c3mNZ2vWYaWo7WTGCoK7Sj2d+5pK1GzVs",
    "TY5xVRWtaQNKRhAbtIyK8Q5LvzdsIMpULMt+GARGvkmSne0atbM2NeyjLo+7BRgYAuN2gVZFRlUA9UwVRyjppdkQSVgYS/wd8LNx",
    "FQWRNmMJQamKW4z2aVDM1625AVB7iSWZA0jZdTw3XmvosFmDEjrkRmBvzdGMScZLSkI6CvMarvcT7eDRmvVvZDkmPiEQWaXYcSI+",
    "ITKKWyyhPDkWrtJbtpvCnmOTv+iHNYdRQG0Npa17up9awEUeuYlyUXydzFfIBQFRkfYvjYFzpEyzMl0RE1p7jygsMMpA+5wLB659",
    "QHjJEzfjeVGlqLSFhIurReJmwuXKbhSt3kGILPWUaeFrrQLQ/tO2qGSTuoybzAzDbXcNQ7vNgD0qVWf525i4DAb1MkKNpjivJh83",
    "F0diWxXQxUaoLtL8q6QMg+fCazDuyBnEtgrdDLVhmVj9Ab5//ul/k/j5+af/g0XoDJ4CJTEwwmdppIrtlUsiGZIbPSSyY4mrJdmM",
    "B3gzK55Xfgm6WRhOeasYRtGpb2ZAHZIGm6muBxI9dMBQaybpgF2DsCaGKds9mXzpNQhZ8oF9zVdVhTIM1mjSyukxaBsLXVYsEA4D",
    "MjU8XuclphW3MfQcdVSW8BYMyIuoTQKuQwDhMClucrd7hBV0D7J42F9W4wQ2C5HfwGkDTTz7sxFJ3suFDg19Foz1Bszwq1rTj9e1",
    "Klffp70YcorDoIiodquhnSui2wXQT3FBzrUwYm35LtIGTrPu0wKfWAZnHSBcocdpdCuiGmGoZIrcnFhtgOTMsm7YOrG/L9ilGToa",
    "Tcvy6DH4clXNwjKy+guvHhN6CkCt0EdJyPA2bahk7wITuVhhyAw6T8mWgEtTRSjhgg3FvoahtwQ3eNodzGpp9ZXVEhUsqUWWqAaA",
    "Jtm1RvGQaz5srUrSxq35IslbtlhkLipv+eBk0JzTtrq2kmnbGXCnPc5ES4m2iW0y+qz5YzfZfvb31UvXdT5LKrqaF13oaRkbIDDk",
    "i6S8qqy/epKV9S0NT7nKaf1eIDT2XSu8agNUo0QAieGFS96AxENlFQ0lsM4jyALBpD+uUpSRwDno/BYHUWFMIXfatsRNs2qGi45x",
    "9QD8XJapZlZymZCu5WQgH03nwJ9oUyvN2mYHRvc9jmN8ikf8PPTTyuqcnceIEsoP+LYLqYUe+S05hjxK7yHdfGu4N++RKRxsxNGJ",
    "ylEoBIp8WylB1Xb09T4aJzL2BVLfAVDqwnu+rgE7Q/ZMFvZ+l4HKr6lRQrhh5TKZIVayE1CGJgYG4xzsEw0KUw2TtFmVZ5+uYbON",
    "5YHlqfT8HWa+D9vs2Zp5yhRf4kAezUqFU5f2VhXZuJ2WJilG+9jGaEdBKLo5UbOPSIVNE9KJhtgyFS8uXuqoAJDRM5xcdIGa2DKH",
    "KpsMYdeJS9RQTEA9FQwDDKBAz0gVWz8stYYG66SqX020qWhcl3P9G6PV6OWYAe6orlJrNWEgF2/fvHz+7R9fff365R+/vQBgj08G",
    "ePUGIJoXgCCGNIQo7hAhmOroQ+sn2Fv20JMWNS/Q9mteI3jgeQhIz6Vz567eOmb1wzmuznrW2GyCqAr5DuAvZ/lblo9EdFD+8U9A",
    "N4zL0XVI886xBz3lPpUA2e4nF8D1ZygapGiKgbp7R62/R0uE4HHnOoe9ZdpMAx6YGIchUs5HnIyAQ+1mQLJwWEw5/Ajb5hznvy6K",
    "pes5Oz31XWGAEmh6RhvhSt+jd8PRQHQh0t9p/2EMMtvVmYcPm8Ylgayd47K4edsbDc1VL1gA4D/purAqtD04teg4YQ1cfq10I+EZ",
    "e5NhWxI2cr5Qhz26bn+AJkr4y2ANsi5TaMchI95qH3BGjG0EvudmrfFwED8+gV0yu+5h3hfINF+oQXwSGWVVNcBqUX7XxRE8uO7M",
    "Ak6TNfA58htOmLIAnU/kvMOQUAz/nG72SeCs42C6PtfdySnxOa4HZ3KwZNP+dcfS/xoy+qTI9199TdZ9r8bpblb7wIkURI+8dW9U",
    "2WWegBilicsf9/Z5RF3OX1qaAt8KvmbP9dZBLIEGzZg1+NaVEJDEV1TIqatbognoaLpsb0d59lCD/KWacjvVPqXNTCOJzVrHui+i",
    "sRmClegmBcUU10pYY3krJoGXuAXKcANxk9w+sDKQtNEz25HLtH5DiTwDRMFM0URbylRBXfxrTnELpdc0F9CbQNEW4pJ59x7fEUut",
    "e1Kz22g1JUtRj5+4kO1DT+FF7muKWVLi6h22uZaxPPRdqq05mN3VpNdYw8nhjDadUnbxNLYkWhpLhsbjI1tpoHO4K7hzfD20P8A/",
    "oSfksVzE1x7qZNMa/kMq/OZMUzjmv6E0ogUnu3mM2GPITDXYiwGISHb68DPGFztfAJDndQjCG+fI4MM0nUIZpjiW4ci8A7z3TWgv",
    "uz69zqx13zg5NQQ6UxHuv/uh/CF/v28wY9wy9VQNcOYgRu+y97yA/lCSWT+jLwQyT/NL2Mr21UGkaUQ8DBQdEhuP8Iga2oRqhe00",
    "cKEts9shUNwyB5NmfzO0u7YgREmQd6CTyUp3CAvfQeSAg8n0GloM+W2D9Npk3VmXSXPyE+PBHCxKs5OflMVyCUmibLfwsvUouprQ",
    "RslijaIBxjljLJi7d2pibvQvJiHF9RDQfTWaJ/mV4ru58bYnbNKoQ+l1jHM5gr0qq3K0qmAyPSiLDjpx0ATYDimo8Z8K0C+QqJqY",
    "ujjZiXUx3HW9py9swbccWevrnYP3u4GM1zAwBlrsgSj/at/RwD1lGivHdEHY99MQa1s5w/eKw1pPDPyMWWzINQyPjY2fRNu7dXGK",
    "6nQKj5GrfOOnwVoB1ro+WxPNrHygZzghg4Vp2YUKlnRUxYsndIpLXPBHMwZkdhJTrENjNtjcdUDJJjQ9GDlDrx8GAPkpBnP6eodB",
    "yWE8n00Qc9heJDfMf52OdEmEgr67nGrew2GO7XlhzORDiTEmzlgPOA0VGrItydbKUIOJjcQQviYRH8gEzOUGFTJP4ENOclwDbUZ8",
    "aIJ3ZjJDPageYhq4DdezCOpjAYiiOQnQwFez78Jx69O4S2W7oVlg1sL1A8C+JXAJQpdQiCV/A8pYrEFKrtlTHspdVPWA6duQugA2",
    "gdgiJmezzcE9cbE99ouKXcim+iNdTfUNbGkwpbJWAXfnjlkhxqJSSOLf4SGJxha85QABxVJSBLMbC47829i+oN2GGvd2L6Xdei6z",
    "kCKEgFSkpTv0YlXWKLIkDlx/lvQY51vMXnycSJV+oYCCe3rEWFVsrhyRVIroi2mUdNJ4RGn2ei1KF42WqBSs3/iGNoWYf0adRelm",
    "NypJv1oKmkvYqJT5ainpXq2GYUEkw+B3S1F7NRoUrGP80VJq7aYx3O6MTETApgp83xeX59/aFdN931gQ8ZkSdMwAOS4vSZLhKW+A",
    "I2G5Fpw6VwMPpk/8CMUrJMhxmZgvmT3jiGu51k8fDjDDRGHl//kfrHbbXFJgdB4+Z+Tk0etGOg+2Ok3AnOIh6hB/M5Z4V50GJYOk",
    "W9IvMdlsSbF48qtKTglJidztPukFi5h+PDTnOCRhCLvwZlals2g7zvYELVdiT6aoM4Kvp6sLh/zfv4UESm2YxCUnZ6ngMxgWB2bI",
    "PXqaG/p2YaBcM85m0SqCYqtQ5XJWquL85O0hPnVBtkYbYIRB9ma/2CIN+dKvXcWhrPG+PGx4ltw7vtC35EQIYoOC/lBJvDRVK2OJ",
    "0vIt9ZugMhKgpeLhubqPRyaZfiHdD9ST174jcUOyzyyZoxOqOlWgb6TlTUYueXGmBRU/u6hC2JujvwhF2QXqIrS1w1OTeg89n5Py",
    "WyHiWkvgXyLtI3nOIvyqKGBbwrzjjFssx5MAki4Zcrj3wyQWxPHl2jHeI79WxhSRGA70db6lix++5wsDQsfLYNsU7mD/iE0mJjEq",
    "rCE/knZS0LDB7gUSR3hAkeQDXxyA4IrSIKAZqWGtdrOIx9qaNjsUpu+o+CCBAvZyt0A/T6lPUb2Qo5EU9d6gbLxIltz1F0k5sV5/",
    "5/a6tWAkURvWQPHWOvJiXJwr5JAXO+qwycAnCL5xhqKCtxCtx3uuNW9xkeY5Hry2gqyGJHbQ64DPpgW99jM9GMR+rfF5Bj+RMuEH",
    "PuHWBS3AWii/P0R04qe1IN1tTCVB8fpfQePIjSE+sqztm7Y3ykoln7jbXeVXOYZcOCvFgqIZpahW2L/FRKzAa5ktzUx55iHLCr0g",
    "7D5npN8ECiiALOZE2XUG7kl+EjU+YV1AchQKYMk12cEA/T4FSt2AT72jssNnnYIXGPNBcT7QPAkeC+SONC3Bg7tMX3R4JJlMpGjk",
    "xQ1LdyfZtTc0kBN0oc0CtCcXQnj2MNnXw6B1wCUInZCxojFWiohB/6DWZzBg+a4np1c7gOOTH4EupbjP+qOVC+l5T1Y3zGHMkH93",
    "jpy4/pjJqWS0Da2yuHHQap8PRV7QmZBOAmUTM7GIHpGGl1AUAC4i8ouikaEIsEJrWxubQQhOQ+Jads/eKbOCdDVgpEDA5QJzsu4z",
    "KNUxj5y9hoBythw4Kc0TVhz0aVnMlFqrglxNpWllCSzncee9sj//9X9aSFTp57/+D1ZXTGrU1iEiD+oHNMXpwGYSa6WhZ+VEBSyX",
    "orDamc/aB+WKR0RLwnakNs+MBZ8oaB8JAxiboZK/CL51clmhGDVLH+w7IckQiPN/kabGybLZFCSBcNbXSxhRtfzFmuTb9daalWTb",
    "pCmnmy1LR+qSDcc4ZnB9eI2yL0zk1sGeKc/PNnYHFBKkjSV3im7ESNQAF1o3VWlT6FqQJzfLxvU7V2XBVUHHEPL69/Nf/o0f6TxV",
    "fEUe3gU1X5UUSQjq+++fv33xW/WRsEdvJgdaShRh1bjNwhIKqSzEesnkejl3jhW06cFOLPJ6thPzq0+l4fVAvDLSb2IH8dLRrRMb",
    "VYW+rhPYa5KwCKFPbiKzgyfjKi2YrMdjRRMRbkuwfmBG+uVcq8ZkCqRaTn03KJwSKjrnHNqjWEXeoovjjRAVHriUQFUcJCdY1Xrm",
    "LDGVBmVjpkWzlS44HVoL/EX4xlZOC2Gzw85JHoJjXs11G+zYyxJvNXaz+0h3vv3Bkr5HAU543adg4rsM9bbXwcvY/ZzNIGdgJzAe",
    "FUhJ5xy8TIF/ava6xLi8vzVORDbVNgow4+A6RSG4XRtqJ4pFs0njLIfTh2dr1PbVz1MPzrrhw9Wce7CXbfCpHjKXTwWYDn1pnYiO",
    "B6s5mWkLGa3tQdnZ1bExvrOTYCfp6HrtGhKyUx7yvJEAA6G/Mdu3xpFvBiQR3SYqu7sDKEtN9LuLhonl/lrueMQXgfTDc0SlCu8s",
    "qvjaW771Vl9669x5G1FsLh2roZM0bJugmo3I7tYBcHaDUIOcldRg5cbQUuONFEKk8iNtvbscErzLobkXd08wkkptzIF47Q1586xC",
    "LuxtlZTIhuPWRE9MpMBRMm9GjSqusuFUHXP8BPTIVB2bqoyYTDbuoyml081pEEeOEukCMyoB3eVEV/mIrSijVjM+9Uw2Ma0xQkGM",
    "y8W+vI8rcoqzXYD7iBrbkGKjop4ui8j7ZblTqHJR2bEPmzvi15hzDWYorDOP3otlxr+2NIjajDwIVg+9mEbeM+BrY85gALQwUxGQ",
    "rjBbfAPQ5laQgjsD3WzPNU6erRbdRXXZas79AErnBEW7OzHM5e/6VgIbm52mk/+KV5iEeLXMN3yDafPgFoL6w5vXfNHn75MyWVQh",
    "NrrAUJHgYDAItHwBxlyDY0ygl7x4AFHd60sb53l66kevzI+d532odqSWeNVIaAwNnGpL/WhK/Ai5Pzbvi+JVXZP9Ga3rsDTpG2Ra",
    "AlzRIK3vj/VEEyNMSsXDh+HmXqKW3N1HR8lvNazbQdNCutu07l912mZc1yXua15vgcy2Js2a2mLdbvXW1R2DtCWr2OnxfA7F7RCk",
    "Bd8LVYujH/38uKQgNYJKyF/Fopqywd1DxYZ28EDZo3CrzVTmhZSeWkSgq5iuEKJurUy3Vo1u0VVhTDSDhZ2IDUP+giSHxAeYUg5p",
    "zNMTYi7HNfkbUJqIAux86HM4Gd/TnNd4SSSGQcC4ogMeVV36ViU+0hrCGog6Fx0vTvF64Kin9Du8kkHwGpdMMcjQ9tLyP77tZxbg",
    "b0EeNhfbBS62fk3h20XzZjiuQAoPqZcLeSr4le/+M4lD+MgmzrR/yNjQEQ8AAzsASUBRAAk9vscNi0vGJWdEvMAvGutnQfu4d+/X",
    "rjJEUIuKrvxjQLpji4pXMtyPj2h4xbXHhk1zy9rIUSNkzuMAIe8Ce+QTzRxMBrofEo+wA6YoRBbVu8F7rgwoMu4fFWGFYMyYDhmc",
    "z224zGMp0pRwB2qulQKwUN6GCL539pZIFGyr0btRzDCgeCI/3U091Ghx87QKUvLJGk5zZ7BelL27ltsX5ZrXZAbzch6tVd3o0vFa",
    "bfPn+Fc3B3SF0uVO7hyNUVh7N2iy40LAYm7M42ePZdJ9VfrUieF8vFIMhtuEsccy4BppbwkmV5wjFbW2QNOE4HiMyE61NmOX/3B3",
    "ixVjrYB2HjwkHDB+xWBKupPwpOn/Qg6r+1OD4uYaXfQOuNKmUpA2zhRjcjEpuh/6RZPuHjBEY4PRFMPr7rAjbYZjbWPVBX6bTVI9",
    "D7Fgjh6knHjjgO4Bo5dQ2I+ki+luc/NbTyz7gdJ5cfM9jzQ6P+X1XR3zbFJQT5GSrp1CkqIWLsE9hnAJb0zXi8jhNJeXTCf8maaR",
    "/FQCNYB715o2xqrnNtYYLm3tkL80ybw7/cLAffIeD2bznaXcrltNMoDCa7eSQrYnBDw+z6o32D8vngITfhE2RtyFfGh7ppb0RQ7w",
    "cytnkZGWaoWLtQsiE3xVnmaH49SqLslFKr1qjF+Lc9QpKGTp2/I2oll7cCRFuwkX292ESIJFWifb3HE3s6KDgHi9tfGPLWL8jDr9",
    "Oz//5d+2+FnqrnYgw7ZSF7aNhfYObPS+tQOVmjz+v9IWYwNxzdEnAao2VJWsAVC6DrpaR8dRR+sIwekUfra0aB+Peca71a+SyWWK",
    "i4JfstONutY711kqnraFXCM8eV73hN54wakut4j1SxPPOtlISnT0Vefa7kpKo8dd0PEQUAdoyrJw6TxUtBmallh8fSEKmEZciUfn",
    "j3ZmL3SQ3le3ckdOt7ew6kvZLubj3P5I5I8OCBzZ4ESnuSiSi3I2NSjhoJ2tcZCGaYw+/Z7jzSViovAUz8sCQ7j1PZsi/9ZjwUGE",
    "HZ6YoM7GLn9dnmonzmXRqPLj9uKbrUXaErvVWGQK0tk+YIW3RVsotSvqhSxUL5Y6FIOZTdxDlZREt/+fWZuh+ARIhKmhKzSFAPZx",
    "Nefeorpo5GrBFXmOLCu4zFWNZuLi5RgOAD0fBYDWhbtLQBP7/1KmQ33tWXMSP2tMa76+auiwss7RCoDTlry6t7bl4DWZHlQolC/B",
    "KEiWqGuTDR31VqT5QmDznif3ITL3pidXFJCjlIe+a+T1MZFdehRsw0/vatYPC4MGJZvC0D0rhb87bgpyWLGVtYxhUa7RXCeJOc7j",
    "WLe8t7y0cautgL4VwJi/+Hh50bDDrcN7MStwTibiSMGHNZT/jODPP/2NXSr0g43g+Fgcer+1ER/vffIsdNQ8HScVY+I2PBqv0YnZ",
    "pwnWWJ1JiCATDvV0B2QLoa5z4FrPybMN880MjdZuzjbMf8cATF5fPQcBp9g2Jr90KS0rqJRtRX7pUm6jds2I6RUetBNSZaOiWKcx",
    "tdCYKcZZhJXs9GkUcyJX67xBI5gCErpa522u6nY39fcXNubaOQMEWLTBMu7RLrvxGp9sMQzbpwTE0itnUioWCRNtGLVnUoSj8CAZ",
    "oUT2VCjHCZGzu9886/DBHCs3Kx0IAVsQA4w2If/5H6YxLKx/Uzk5aWFti3I5t8lBQSynL9wbuqMOIevfxbdxwVkr0sKBXoyFK6vd",
    "c+hh+9Gvht7zgluxl7a5z9luvrfNkc1R20qwywVrDvYdpPtc9zoqAZiM53d/l95KPBLu/35HduDGCnNqrizbpGmhE2LIT0Sj43L9",
    "HeitKhhCsA47gjQUPzb8fH6dZHOEqC8VNiePhtacbm/Def7i7at/ekmQUBumW3NEiR6qg54+VDNUhx1HOOh5711PcBCGz8jdd4bO",
    "vsbRNqR36V8LcYxUb6SdmCgcQ4rY77sftdEoZazvnjhwnhJ3VmAbx0G97DrH3Cb2mgAbvjIZtx0cZRs6qeX41n6sk6DdlUa52mf2",
    "Pd6+e3lZppfIbMhH5LDQDCWnYvG9HXQGFVO6Yo0upcdDpTamG88SNhCwhwI6OMVwrXDLCXILXTltrjB2VYTRLY5Q02NEi+qIhqb5",
    "7hB1H/J0/+WnPfHoPUP0cNzhVpKdxJh69cpzGzFK7DbCexH4s+InL4zLSJLJZSQOo7FR+S3R7EHMM6niHr4xvNnu4bMqcVHWXFq/",
    "7iP79LqSU+tR0xfjud3xSKk5N5HlWng8UwPFwgJHetRZwLsBHoD1sQJMb+O+Wi0nbFTB1JG1seDnwHF0JX7JpFnSSuK1aKCmsCIP",
    "kaVLk00bB6kiEzGCk2y7ywiKOQ4jrrXRW1RXrovITmd2DTXqdAoGUDq+K1jCxKRjUOfowmG619gULHL3Ulhvr+U13FMGsTZH1LIs",
    "QEpU1ct56FxOuXSPSi/N9RTakO3cuCtX10uZnAY58F4WWjYewFmOzSNKi+QD3uZgrsCCdaUHoM6B5wDCUj0ly/9SfUGXOA7VMvKf",
    "Ith4SgCp0Nfdo/jmWzpMg1dqAMmGGSly/ek8/XB6CdurR8sPp8k8u8z7+Gh1NRynrElsNhfjPZg61DsL+MIYbucmm9QzCleCHsd1",
    "8U32IZ2E/FLU32OsDAxNW07TbXCPTpK9S3/xAtUYIP2kwLPmOxJLbaNZRk0Locivi9UCX/AEyes+LwZfdKwd/hpnY4NNrNPOeXsF",
    "H4xI8V6QEjWUARoD8KQ0/LT3E+EJiJfyyAEryM2lgHFR+buxSC68Wit0P1n8/AYkGC8prjoSyMFvWkRi01rkNcxrhM10NzpLvD8B",
    "yjSe+cvNKc7wHT5ySNL4WoLZ+N1DTqINBY7SlR/RT/phLofHUSRoREEPNDdfQ7I+6Y5ywlAzOL0P75jVyXGuMAZ35vyZJQdQkw2G",
    "PCcCR0ENevc8aIUPUfSYhHJBDTBvk/mqZJr+oZyHK+dCsv1/wTcrqmfDH/Z/2HeNdCtjnFs5t5Q4TneS6b7LfUUXy+lmYAw/wLjl",
    "yRy+mn6upnkdxUSbyxiv87DEZO1iKMfaKUJcP9/ASXKUbLP3Ctva5TBZK7VNG+3I+ufaHJSs6wR0H+CtrL7d6AZoaVeqdbYs+W7b",
    "ukrT66Mfa4uL8XhVwmoN6zaux3hG/qCJV2trtmLlHK50U0mA/t+/OvcYNNq6pysKm7VWidrzR3lV9aIBEvYyy/vzdFoP8cHngKch",
    "P+rnq06158iiDoonK9rCR/w0Q8eQcKYdD/reCrKbNcUZuiYf2hsnI6jbOiVELisaP1FjzJuOJW5vtEH0+V4p72YK9ELtcoIZRIt4",
    "vtzJUqzKcdqCnmTsRAou604MSojWWNDR4OpYfxhsmqt3y76EdjCWP01VFI3ch4RvmyzT6RBTe8ZYHfyRLiujK2vndNUkWiLwdu0C",
    "CsNONi27+IwiFYiGFCHz81/+GnS8wri+MyL5jZGhOL2M9YUeM57hZcpJJTcr0/yji+fpfRr84sjIymrSdrdLep8bGWUjNRtRcw/D",
    "TgW+7XInTlwmt2Q+cD9k82nsxbz3RTyauzk8JeBw/gHQivZVsPdqSXe3Zl6goT2vgEY3078NGyLBRl+9djKInFitjVKhZeiRbH3J",
    "2y2WY7vQ8X3YvU8MD1iTWo6jjfQ0EmKmKsVl3F+G+9EHRA1faG+PQHBE+LYQgy1BBs1IgqiNMTbueZk3WiIjHQBmH+oWdraiG2+2",
    "0betbTKttl1Oo+vtat00sf94P88Z2uZ+zcarwzVTZ/PWGt1Ut72QbhP61AD7NvjB+rVIW8Lr22LMqQrfnvQNoOAOow5Bvqna4p0p",
    "hJsuQ/JOUfG9DcZCZyFHBIktZLo7HPRmDg2+mjiHbUyPu4USAlwvv5FXCYe2S1ksgTWnOkUNo+qLnrvuj2q7LMo2595w4lFA995h",
    "0+77OdA7Yy7iWDsyLHC339TBJe8ZIHtZFJPOVtM+FGHxylMvdVmUn029X3OjpK01hmQb40fAAv+i5IyCqOXYMcc/ua/kMH6uG5Sh",
    "tp8H3t3N6h4HNnEblMg49OzdJibQ1BMqO2Gm34axZ3q3OmWVX9q4R5wbON1LLTuujuRrmgXFbfGiPAoacBromFHqza6VSxncXfbh",
    "ZlZtmBhbVI6eHZ1fbCde8SVwxKv0K/q8GMaGitK9wTHCoD1oVaszWzYiBspaSOqn72J9Dci2sNvWVat8RE2+/GAnMnBgHl2WpJeb",
    "3eI976Ft3TOg0+B2z6hO2ycntFMmmn6i2rsqZLOKNaJzRt3albxYE8vFrfYm1FOTpe8fdO4FtJnWOe4dmrQFjFdTe6QdwFb989W6",
    "0wcP7MNzpw+8UE7+NBEOpw/wEXo05UPFsAZBg1d9V7iRoQeOYBv5+7IYpQqPrJIbVD/7RCFQMCqFfrUMDe01PzrJrzfys2T8wDYC",
    "cvypaMW6tY9YZTXdSIDvdCfyLCXe14RcHz+wr/dogeu+NPpx7ZUB82QBP7AS0zXMOlK1/X0QZAP4/9P9alxmy/ocfiGf4d9ZvZif",
    "P/h/AEfqZ5TSAAA=",
]
# END EMBEDDED DASHBOARD


# ============================================================================
# Serving
# ============================================================================


def display_url(host, port):
    if ":" in host:
        host = "[%s]" % host
    return "http://%s:%d" % (host, port)


def serve(config):
    """Run the relay until SIGTERM or Ctrl-C; open long-polls are answered and the database is closed."""
    server, relay = make_server(config)
    relay.start_workers()
    host, port = server.server_address[:2]
    say("Agent Relay %s listening on %s" % (__version__, display_url(host, port)))
    say("database: %s" % (config.db if config.db == ":memory:" else os.path.abspath(config.db)))
    if not config.token:
        say("auth: none (loopback only); set AGENT_RELAY_TOKEN to require a token")
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_signal)
    th = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="http", daemon=True)
    th.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        say("stopping: answering open long-polls and streams")
        relay.stop()
        server.shutdown()
        server.server_close()
        server.wait_for_requests(5.0)
        relay.close()
        say("stopped")
    return 0


def add_setting_flags(parser):
    for attr, var, flag, _parse, default, help_text in SETTINGS:
        shown = "" if default in (None, [], False) else " (default %s)" % default
        parser.add_argument(flag, dest=attr, default=None, metavar=var, help="%s; variable %s%s" % (help_text, var, shown))


def cmd_serve(args):
    flags = {attr: getattr(args, attr, None) for attr, *_rest in SETTINGS}
    config = Config.from_sources(os.environ, flags)
    return serve(config)


# ============================================================================
# Command line: `python3 agent_relay.py [command]`; no command serves the relay
# ============================================================================

# COMMANDS and @command live with the small helpers, so that sections above this one can register commands.


def build_parser():
    parser = argparse.ArgumentParser(
        prog="agent-relay",
        description="Agent Relay: a message bus for AI coding agents. With no command, serves the relay.",
    )
    parser.add_argument("--version", action="version", version="agent-relay " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="command")
    p = sub.add_parser("serve", help="serve the relay (the default)")
    add_setting_flags(p)
    p.set_defaults(func=cmd_serve)
    for name, (fn, configure, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if configure:
            configure(p)
        p.set_defaults(func=fn)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["serve"] + list(argv)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as e:
        sys.stderr.write("agent-relay: %s\n" % e)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
