"""A scripted model endpoint on loopback for driving the real Claude Code and Codex CLIs offline.

`ScriptedModel(policy)` is a small stdlib HTTP server on 127.0.0.1 (port 0) that speaks enough of two APIs for
one CLI turn each:

- the Anthropic Messages API (Claude Code, through ANTHROPIC_BASE_URL): POST /v1/messages, streamed as SSE
  (message_start, content_block_start / _delta / _stop, message_delta, message_stop) or answered as one JSON
  message; POST /v1/messages/count_tokens; text and tool_use blocks;
- the OpenAI Responses API (Codex, through a `[model_providers.X]` with wire_api = "responses"): POST /v1/responses
  or /responses, streamed as SSE (response.created, response.output_item.added / .done,
  response.output_text.delta, response.completed), with function_call items for tool calls; GET /models and
  /v1/models answer an empty list.

Anything else is answered 404 with a JSON error, and recorded like everything else.

The answer to each model request comes from `policy(request)`: the `ModelRequest` shows the conversation as the
CLI sent it (messages or input items, with tool results and the context hooks added) and the tools it offered;
the policy returns a string (text), a `Text`, or a `ToolCall`. `relay_reply_policy()` is the policy the relay
tests use: answer the first relay line `[msg:N] from X: ...` not answered yet with the shell tool running
`agent_relay.py reply`, else say "ok".
"""
import json
import re
import shlex
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# -- what a policy returns --------------------------------------------------------


class Text:
    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return "Text(%r)" % self.text


class ToolCall:
    """A call of one of the tools the CLI offered. `arguments` is the tool's input object. `namespace` names the
    Responses API namespace tool it belongs to (Codex offers an MCP server's tools as one, `mcp__<server>`)."""

    def __init__(self, name, arguments, namespace=None):
        self.name = name
        self.arguments = arguments
        self.namespace = namespace

    def __repr__(self):
        if self.namespace:
            return "ToolCall(%r, %r, namespace=%r)" % (self.name, self.arguments, self.namespace)
        return "ToolCall(%r, %r)" % (self.name, self.arguments)


# -- what a policy sees -----------------------------------------------------------


def _texts_of(content):
    """Every string inside a message content (str, list of blocks, nested tool_result content)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    out = []
    if isinstance(content, list):
        for block in content:
            out.extend(_texts_of(block))
    elif isinstance(content, dict):
        for key in ("text", "content", "output", "input_text"):
            if key in content:
                out.extend(_texts_of(content[key]))
    return out


class ModelRequest:
    """One model request from a CLI, normalised for a policy.

    api: "anthropic" or "openai"; body: the JSON as sent; tools: the names of the tools offered; namespaces (openai):
    for each namespace tool offered, the names of its functions;
    entries: the conversation in order as (role, kind, text) where kind is "text", "tool_call" (text = the
    call's arguments as JSON) or "tool_result"; system: the system prompt / instructions text.
    """

    def __init__(self, api, path, headers, body):
        self.api = api
        self.path = path
        self.headers = headers
        self.body = body if isinstance(body, dict) else {}
        self.entries = []
        self.tools = {}
        self.namespaces = {}
        if api == "anthropic":
            self._read_anthropic()
        else:
            self._read_openai()

    def _read_anthropic(self):
        b = self.body
        self.system = "\n".join(_texts_of(b.get("system")))
        for t in b.get("tools") or []:
            if isinstance(t, dict) and t.get("name"):
                self.tools[t["name"]] = t
        for m in b.get("messages") or []:
            role = m.get("role")
            content = m.get("content")
            if isinstance(content, str):
                self.entries.append((role, "text", content))
                continue
            for block in content or []:
                kind = block.get("type")
                if kind == "text":
                    self.entries.append((role, "text", block.get("text") or ""))
                elif kind == "tool_use":
                    self.entries.append((role, "tool_call", json.dumps(block.get("input"))))
                elif kind == "tool_result":
                    self.entries.append((role, "tool_result", "\n".join(_texts_of(block.get("content")))))

    def _read_openai(self):
        b = self.body
        self.system = "\n".join(_texts_of(b.get("instructions")))
        for t in b.get("tools") or []:
            if isinstance(t, dict):
                name = t.get("name") or (t.get("function") or {}).get("name") or t.get("type")
                if name:
                    self.tools[name] = t
                if t.get("type") == "namespace" and name:
                    self.namespaces[name] = {f.get("name"): f for f in t.get("tools") or [] if isinstance(f, dict)}
        items = b.get("input")
        if isinstance(items, str):
            items = [{"type": "message", "role": "user", "content": items}]
        for item in items or []:
            kind = item.get("type") or ("message" if "role" in item else None)
            if kind == "message":
                self.entries.append((item.get("role"), "text", "\n".join(_texts_of(item.get("content")))))
            elif kind in ("function_call", "custom_tool_call", "local_shell_call"):
                self.entries.append(("assistant", "tool_call", item.get("arguments") or item.get("input")
                                     or json.dumps(item.get("action"))))
            elif kind in ("function_call_output", "custom_tool_call_output", "local_shell_call_output"):
                self.entries.append(("tool", "tool_result", "\n".join(_texts_of(item.get("output")))))

    @property
    def model(self):
        return self.body.get("model")

    def all_text(self):
        """The whole conversation (and system prompt) as one string."""
        return "\n".join([self.system] + [e[2] for e in self.entries if isinstance(e[2], str)])

    def tool_calls(self):
        return [e[2] for e in self.entries if e[1] == "tool_call"]

    def tool_results(self):
        return [e[2] for e in self.entries if e[1] == "tool_result"]

    def __repr__(self):
        return "<ModelRequest %s %s tools=%s entries=%d>" % (self.api, self.path, sorted(self.tools), len(self.entries))


# -- SSE encoders ---------------------------------------------------------------


def _sse(event, data):
    return ("event: %s\ndata: %s\n\n" % (event, json.dumps(data))).encode("utf-8")


def _anthropic_blocks(answer):
    if isinstance(answer, ToolCall):
        return [{"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:24], "name": answer.name,
                 "input": answer.arguments}], "tool_use"
    return [{"type": "text", "text": answer.text}], "end_turn"


def anthropic_message(answer, model):
    blocks, stop = _anthropic_blocks(answer)
    return {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "model": model,
            "content": blocks, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5}}


def anthropic_stream(answer, model):
    blocks, stop = _anthropic_blocks(answer)
    msg = {"id": "msg_" + uuid.uuid4().hex[:24], "type": "message", "role": "assistant", "model": model,
           "content": [], "stop_reason": None, "stop_sequence": None,
           "usage": {"input_tokens": 10, "output_tokens": 1, "cache_creation_input_tokens": 0,
                     "cache_read_input_tokens": 0}}
    out = [_sse("message_start", {"type": "message_start", "message": msg})]
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            out.append(_sse("content_block_start", {"type": "content_block_start", "index": i,
                                                    "content_block": {"type": "text", "text": ""}}))
            out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                    "delta": {"type": "text_delta", "text": block["text"]}}))
        else:
            out.append(_sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}}))
            out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"])}}))
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(_sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                      "usage": {"output_tokens": 5}}))
    out.append(_sse("message_stop", {"type": "message_stop"}))
    return b"".join(out)


def openai_item(answer):
    if isinstance(answer, ToolCall):
        item = {"type": "function_call", "id": "fc_" + uuid.uuid4().hex[:24], "call_id": "call_" + uuid.uuid4().hex[:24],
                "name": answer.name, "arguments": json.dumps(answer.arguments), "status": "completed"}
        if answer.namespace:
            item["namespace"] = answer.namespace
        return item
    return {"type": "message", "id": "msg_" + uuid.uuid4().hex[:24], "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": answer.text, "annotations": []}]}


def openai_stream(answer, model):
    rid = "resp_" + uuid.uuid4().hex[:24]
    created = int(time.time())
    base = {"id": rid, "object": "response", "created_at": created, "model": model, "output": []}
    item = openai_item(answer)
    out = [_sse("response.created", {"type": "response.created", "sequence_number": 0,
                                     "response": dict(base, status="in_progress")})]
    seq = 1
    if item["type"] == "message":
        added = dict(item, status="in_progress", content=[])
        out.append(_sse("response.output_item.added", {"type": "response.output_item.added", "sequence_number": seq,
                                                       "output_index": 0, "item": added}))
        seq += 1
        out.append(_sse("response.content_part.added", {
            "type": "response.content_part.added", "sequence_number": seq, "item_id": item["id"], "output_index": 0,
            "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}))
        seq += 1
        text = item["content"][0]["text"]
        out.append(_sse("response.output_text.delta", {"type": "response.output_text.delta", "sequence_number": seq,
                                                       "item_id": item["id"], "output_index": 0, "content_index": 0,
                                                       "delta": text}))
        seq += 1
        out.append(_sse("response.output_text.done", {"type": "response.output_text.done", "sequence_number": seq,
                                                      "item_id": item["id"], "output_index": 0, "content_index": 0,
                                                      "text": text}))
        seq += 1
    else:
        out.append(_sse("response.output_item.added", {"type": "response.output_item.added", "sequence_number": seq,
                                                       "output_index": 0, "item": dict(item, arguments="")}))
        seq += 1
        out.append(_sse("response.function_call_arguments.delta", {
            "type": "response.function_call_arguments.delta", "sequence_number": seq, "item_id": item["id"],
            "output_index": 0, "delta": item["arguments"]}))
        seq += 1
    out.append(_sse("response.output_item.done", {"type": "response.output_item.done", "sequence_number": seq,
                                                  "output_index": 0, "item": item}))
    seq += 1
    usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}
    out.append(_sse("response.completed", {"type": "response.completed", "sequence_number": seq,
                                           "response": dict(base, status="completed", output=[item], usage=usage)}))
    return b"".join(out)


# -- the server ------------------------------------------------------------------


class Recorded:
    """One HTTP request as it came in, plus the policy's answer (for model requests)."""

    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.at = time.time()
        self.model_request = None
        self.answer = None
        self.status = None

    def __repr__(self):
        return "<%s %s -> %s %r>" % (self.method, self.path, self.status, self.answer)


class ScriptedModel:
    """The scripted endpoint. `url` is http://127.0.0.1:PORT; `requests` records everything that came in."""

    def __init__(self, policy, log=None):
        self.policy = policy
        self.requests = []
        self.errors = []
        self.log = log
        self._lock = threading.Lock()
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                pass

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                if self.headers.get("Content-Encoding", "").lower() == "zstd":
                    return raw
                try:
                    return json.loads(raw.decode("utf-8")) if raw else None
                except ValueError:
                    return raw

            def do_GET(self):
                model._handle(self, None)

            def do_HEAD(self):
                model._handle(self, None)

            def do_POST(self):
                model._handle(self, self._body())

            do_PUT = do_POST
            do_PATCH = do_POST
            do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = None

    @property
    def port(self):
        return self.server.server_address[1]

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def start(self):
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- views for assertions --------------------------------------------------
    def model_requests(self, api=None):
        with self._lock:
            return [r for r in self.requests if r.model_request is not None and (api is None or r.model_request.api == api)]

    def paths(self):
        with self._lock:
            return ["%s %s -> %s" % (r.method, r.path, r.status) for r in self.requests]

    def describe(self, limit=4000):
        """What came in, for a failure message."""
        lines = []
        for r in list(self.requests):
            lines.append("%s %s -> %s %r" % (r.method, r.path, r.status, r.answer))
            if r.model_request is not None:
                mr = r.model_request
                lines.append("    tools=%s" % sorted(mr.tools)[:40])
                for role, kind, text in mr.entries[-6:]:
                    lines.append("    %s/%s: %s" % (role, kind, (text or "")[:300].replace("\n", " | ")))
        for e in self.errors:
            lines.append("policy error: %s" % e)
        text = "\n".join(lines)
        return text[-limit:]

    # -- handling ----------------------------------------------------------------
    def _send(self, h, status, body, content_type="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode("utf-8")
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        if content_type == "text/event-stream":
            h.send_header("Cache-Control", "no-cache")
        h.send_header("request-id", "req_" + uuid.uuid4().hex[:16])
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
        return status

    def _answer(self, req):
        try:
            answer = self.policy(req)
        except Exception as e:  # the test sees this in describe(); the CLI gets a harmless text
            self.errors.append("%s: %s" % (e.__class__.__name__, e))
            answer = Text("policy error")
        if answer is None:
            answer = Text("ok")
        if isinstance(answer, str):
            answer = Text(answer)
        return answer

    def _handle(self, h, body):
        path = h.path.split("?", 1)[0]
        rec = Recorded(h.command, h.path, dict(h.headers.items()), body)
        with self._lock:
            self.requests.append(rec)
        if self.log:
            self.log("%s %s" % (h.command, h.path))
        try:
            rec.status = self._route(h, path, body, rec)
        except (BrokenPipeError, ConnectionResetError):
            rec.status = -1

    def _route(self, h, path, body, rec):
        if h.command == "POST" and path.endswith("/messages/count_tokens"):
            return self._send(h, 200, {"input_tokens": 100})
        if h.command == "POST" and path.endswith("/v1/messages"):
            req = ModelRequest("anthropic", path, rec.headers, body)
            rec.model_request = req
            answer = rec.answer = self._answer(req)
            model = req.model or "scripted"
            if isinstance(body, dict) and body.get("stream"):
                return self._send(h, 200, anthropic_stream(answer, model), "text/event-stream")
            return self._send(h, 200, anthropic_message(answer, model))
        if h.command == "POST" and (path.endswith("/responses") or path.endswith("/v1/responses")):
            req = ModelRequest("openai", path, rec.headers, body)
            rec.model_request = req
            answer = rec.answer = self._answer(req)
            model = req.model or "scripted"
            if isinstance(body, dict) and body.get("stream") is False:
                item = openai_item(answer)
                return self._send(h, 200, {"id": "resp_" + uuid.uuid4().hex[:24], "object": "response",
                                           "status": "completed", "model": model, "output": [item],
                                           "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}})
            return self._send(h, 200, openai_stream(answer, model), "text/event-stream")
        if h.command in ("GET", "HEAD") and (path.endswith("/models") or path.endswith("/v1/models")):
            return self._send(h, 200, {"object": "list", "data": [], "models": []})
        return self._send(h, 404, {"type": "error", "error": {"type": "not_found_error", "message": "scripted model: no %s" % path}})


# -- policies -------------------------------------------------------------------

# A relay line as the hooks write it (at the start of a line) or as Claude Code hands on a monitor's line
# (`<event>[msg:N] from X: ...</event>`): `[msg:N] from X: ...` or `[msg:N] from X (claimable, to tag:Y): ...`.
# The session-start text's example sits mid-line and is no message.
RELAY_LINE = re.compile(r"(?m)(?:^|<event>)\s*\[msg:(\d+)\] from (\S+?)(?: \([^)\n]*\))?: ")
AGENT_IN_INTRO = re.compile(r'as agent "([^"]+)"')


def relay_message_ids(text):
    """The ids of the relay lines in a text."""
    return {int(m.group(1)) for m in RELAY_LINE.finditer(text or "")}


SHELL_TOOLS = ("Bash", "exec_command", "shell", "shell_command", "local_shell")


def shell_call(req, command):
    """A ToolCall running `command` (a string) with the shell tool the CLI offered, in that tool's argument shape."""
    for name in SHELL_TOOLS:
        if name not in req.tools:
            continue
        if name == "Bash":
            return ToolCall(name, {"command": command, "description": "Answer the relay message"})
        if name == "exec_command":
            return ToolCall(name, {"cmd": command})
        if name == "shell_command":
            return ToolCall(name, {"command": command})
        if name == "shell":
            return ToolCall(name, {"command": ["bash", "-lc", command]})
    return None


def relay_reply_policy(relay_py, reply_text="got it", agent=None, python="python3"):
    """When the conversation holds a relay line `[msg:N] from X: ...` that no earlier tool call answered, run the
    shell tool with `python3 <relay_py> reply --from <agent> N "<reply_text>"`; otherwise answer "ok".

    The agent id is `agent`, else the one the session-start context names (`as agent "..."`). A request that
    offers no shell tool (titles, summaries, side questions) gets "ok".
    """

    def policy(req):
        text = req.all_text()
        me = agent
        if me is None:
            found = AGENT_IN_INTRO.findall(text)
            me = found[-1] if found else None
        calls = "\n".join(c for c in req.tool_calls() if isinstance(c, str))
        for m in RELAY_LINE.finditer(text):
            mid = m.group(1)
            if me is None or re.search(r"reply --from \S+ %s\b" % mid, calls):
                continue
            command = " ".join(w for w in (python, shlex.quote(relay_py)) if w)
            command += " reply --from %s %s %s" % (shlex.quote(me), mid, shlex.quote(reply_text))
            call = shell_call(req, command)
            if call is not None:
                return call
        return Text("ok")

    return policy


def act_then_reply(command, relay_py, reply_text="got it", python="python3"):
    """Like relay_reply_policy, but the first relay line (not the session-start example) is first acted on with
    the shell tool running `command` (what a peer asked for), and only then answered."""
    reply = relay_reply_policy(relay_py, reply_text, python=python)
    state = {"acted": False}

    def policy(req):
        if not state["acted"] and relay_message_ids(req.all_text()) and shell_call(req, command) is not None:
            state["acted"] = True
            return shell_call(req, command)
        return reply(req)

    policy.state = state
    return policy


if __name__ == "__main__":  # a manual look: python3 tests/scripted_model.py, then point a CLI at the printed URL
    with ScriptedModel(lambda req: Text("ok"), log=lambda s: print(s, file=sys.stderr)) as m:
        print(m.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
