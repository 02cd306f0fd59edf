"""Helpers for driving the real Claude Code and Codex CLIs offline (tests/test_real_claude.py, test_real_codex.py).

The CLIs come from npm, pinned in tests/cli/package.json (tests/run.sh runs `npm ci` there). Each run gets a
throwaway HOME; the model is tests/scripted_model.py on loopback; every other outbound connection goes to a
proxy address on loopback that refuses connections (a port we hold bound and never listen on), so nothing leaves
the machine.
"""
import json
import os
import queue
import shutil
import socket
import subprocess
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RELAY_PY = os.path.join(ROOT, "agent_relay.py")
CLI_DIR = os.path.join(HERE, "cli")
NODE_BIN = os.path.join(CLI_DIR, "node_modules", ".bin")
PLUGIN_DIR = os.path.join(ROOT, "integrations", "claude-code")
CODEX_DIR = os.path.join(ROOT, "integrations", "codex")


def pinned_versions():
    with open(os.path.join(CLI_DIR, "package.json"), encoding="utf-8") as f:
        return json.load(f)["dependencies"]


def claude_bin():
    """The installed `claude` (the npm package's bin is the native binary its postinstall put there)."""
    path = os.path.join(NODE_BIN, "claude")
    return path if os.path.exists(path) else None


def codex_bin():
    path = os.path.join(NODE_BIN, "codex")
    return path if os.path.exists(path) else None


def installed_version(package):
    try:
        with open(os.path.join(CLI_DIR, "node_modules", package, "package.json"), encoding="utf-8") as f:
            return json.load(f).get("version")
    except (OSError, ValueError):
        return None


def cli_ready(package):
    """(ok, why): the package is installed at the version package.json pins."""
    want = pinned_versions()[package]
    have = installed_version(package)
    if have is None:
        return False, "%s is not installed in tests/cli (bash tests/run.sh runs npm ci there)" % package
    if have != want:
        return False, "tests/cli has %s %s, package.json pins %s (run npm ci in tests/cli)" % (package, have, want)
    return True, ""


class RefusingProxy:
    """A loopback port that refuses every connection: bound, never listening, held until close()."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port

    def close(self):
        self.sock.close()


# Variables of the caller's own tools and sessions that must not reach a CLI under test.
_DROP_PREFIXES = ("ANTHROPIC_", "CLAUDE", "OPENAI_", "CODEX_", "AGENT_RELAY_", "OTEL_")
_DROP_NAMES = ("DISABLE_TELEMETRY", "DO_NOT_TRACK", "DISABLE_AUTOUPDATER", "DISABLE_ERROR_REPORTING", "TMUX",
               "TMUX_PANE", "NO_PROXY", "no_proxy")


def offline_env(home, proxy, **extra):
    """os.environ less the caller's agent variables, with a throwaway HOME and every proxy variable pointing at
    the refusing port (loopback exempt)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_DROP_PREFIXES) and k not in _DROP_NAMES and not k.lower().endswith("_proxy")}
    env.update({
        "HOME": home,
        "XDG_CONFIG_HOME": os.path.join(home, ".config"),
        "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
        "XDG_CACHE_HOME": os.path.join(home, ".cache"),
        "XDG_STATE_HOME": os.path.join(home, ".local", "state"),
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
    })
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = proxy.url
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def run(cmd, env, cwd, timeout=60, input_text=None):
    """Runs a CLI with no terminal; returns the CompletedProcess (text)."""
    return subprocess.run(cmd, env=env, cwd=cwd, input=input_text, stdin=None if input_text is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, universal_newlines=True)


def describe_proc(p):
    return "exit %s\n--- stdout ---\n%s\n--- stderr ---\n%s" % (p.returncode, (p.stdout or "")[-4000:], (p.stderr or "")[-4000:])


def agents_by_host(relay, host):
    """Relay agents whose card says meta.host == host (claude-code, codex)."""
    r = relay.get("/api/agents")
    assert r.status == 200, r
    return [a for a in r.json["agents"] if (a.get("meta") or {}).get("host") == host]


def agent(relay, agent_id):
    r = relay.get("/api/agents/%s" % agent_id)
    return r.json if r.status == 200 else None


def replies_to(relay, peer, message_id):
    """Messages in peer's history that answer message_id."""
    r = relay.get("/api/messages", query={"agent": peer, "limit": 100})
    assert r.status == 200, r
    return [m for m in r.json["messages"] if m.get("replyTo") == message_id]


def print_timing(label, sent, reply, started_at, landed_at):
    """Prints (never asserts) the time from the peer's send to the reply landing in the peer's inbox."""
    print("\n[timing] %s: peer's send -> reply in the peer's inbox: %d ms by the relay's clock (msg %s at %s, "
          "reply msg %s at %s); %.2f s by the test's clock" % (
              label, reply["createdAt"] - sent["createdAt"], sent["id"], sent["createdAt"], reply["id"],
              reply["createdAt"], landed_at - started_at))


# -- Claude Code ---------------------------------------------------------------------------------------------------


class ClaudeHome:
    """A throwaway HOME for Claude Code, pointed at the scripted model and the relay."""

    API_KEY = "sk-ant-api03-scripted-model-test-key-0000000000"

    def __init__(self, tmp, model_url, relay_url, proxy, **extra_env):
        self.home = os.path.join(str(tmp), "home")
        self.project = os.path.join(str(tmp), "project")
        os.makedirs(self.home)
        os.makedirs(self.project)
        self.env = offline_env(self.home, proxy, ANTHROPIC_BASE_URL=model_url, ANTHROPIC_API_KEY=self.API_KEY,
                               AGENT_RELAY_URL=relay_url, **extra_env)
        self.bin = claude_bin()

    def claude(self, *args, timeout=60, input_text=None):
        return run([self.bin] + list(args), self.env, self.project, timeout=timeout, input_text=input_text)

    def accept_first_run_dialogs(self, **extra):
        """~/.claude.json fields an interactive session reads so that it opens straight at the prompt: onboarding
        done (theme picker), the API key approved (its last 20 characters), the project folder trusted (the trust
        dialog; Claude Code starts no plugin monitor in an untrusted folder)."""
        config = {
            "hasCompletedOnboarding": True,
            "lastOnboardingVersion": installed_version("@anthropic-ai/claude-code"),
            "theme": "dark",
            "customApiKeyResponses": {"approved": [self.API_KEY[-20:]], "rejected": []},
            "projects": {self.project: {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True,
                                        "allowedTools": []}},
        }
        config.update(extra)
        path = os.path.join(self.home, ".claude.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1)
        return path

    def install_plugin_from_marketplace(self, source=ROOT):
        """What the README tells people (/plugin marketplace add, /plugin install), as the CLI's own commands."""
        out = []
        for args in (("plugin", "marketplace", "add", source), ("plugin", "install", "agent-relay@agent-relay")):
            p = self.claude(*args, timeout=60)
            out.append(p)
            assert p.returncode == 0, "claude %s failed:\n%s" % (" ".join(args), describe_proc(p))
        return out


class Tmux:
    """A private tmux server (its own socket) running one program in a terminal, for interactive CLIs:
    send-keys to type, capture-pane to read the screen. The server and the program get `env`."""

    def __init__(self, socket_path, command, env, cwd, width=160, height=50):
        self.socket = socket_path
        self.env = env
        subprocess.run(["tmux", "-S", socket_path, "-f", os.devnull, "new-session", "-d", "-s", "cli", "-x", str(width),
                        "-y", str(height), "-c", cwd, command], env=env, cwd=cwd, check=True, timeout=20,
                       stdin=subprocess.DEVNULL)
        subprocess.run(["tmux", "-S", socket_path, "set-option", "-t", "cli", "remain-on-exit", "on"], env=env,
                       check=False, timeout=20, stdin=subprocess.DEVNULL)

    def _tmux(self, *args):
        return subprocess.run(["tmux", "-S", self.socket] + list(args), env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=20, stdin=subprocess.DEVNULL)

    def screen(self):
        return self._tmux("capture-pane", "-p", "-t", "cli").stdout

    def send_keys(self, *keys):
        self._tmux("send-keys", "-t", "cli", *keys)

    def pane_dead(self):
        out = self._tmux("display-message", "-p", "-t", "cli", "#{pane_dead}").stdout.strip()
        return out in ("1", "")

    def pane_pid(self):
        out = self._tmux("display-message", "-p", "-t", "cli", "#{pane_pid}").stdout.strip()
        return int(out) if out.isdigit() else None

    def close(self):
        self._tmux("kill-server")


def process_tree_has(root_pid, needle):
    """True when a process under root_pid (or it) has `needle` in its command line (Linux /proc)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read().decode("utf-8", "replace")
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                if needle.encode() in f.read():
                    return True
        except OSError:
            pass
        todo.extend(children.get(pid, []))
    return False


def processes_with(needle, home):
    """Pids of processes whose command line holds `needle` and whose HOME is `home` (Linux /proc)."""
    found = []
    want = ("HOME=%s" % home).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                if needle.encode() not in f.read():
                    continue
            with open("/proc/%s/environ" % name, "rb") as f:
                if want in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


# -- Codex -----------------------------------------------------------------------------------------------------------


class AppServer:
    """`codex app-server` over stdio: newline-delimited JSON-RPC requests, responses and notifications."""

    def __init__(self, bin_path, env, cwd):
        self.proc = subprocess.Popen([bin_path, "app-server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=cwd)
        self.next_id = 1
        self.responses = {}
        self.notifications = queue.Queue()
        self.seen = []
        self.requests_from_server = []
        self.stderr = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                msg = json.loads(line.decode("utf-8"))
            except ValueError:
                continue
            if "id" in msg and ("result" in msg or "error" in msg):
                with self._cv:
                    self.responses[msg["id"]] = msg
                    self._cv.notify_all()
            elif "id" in msg and "method" in msg:
                self.requests_from_server.append(msg)  # approvals and the like: this harness never grants any
                self._send({"id": msg["id"], "error": {"code": -32601, "message": "not handled by the test client"}})
            else:
                self.seen.append(msg)
                self.notifications.put(msg)
        with self._cv:
            self._cv.notify_all()

    def _read_err(self):
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace").rstrip("\n"))

    def _send(self, msg):
        self.proc.stdin.write((json.dumps(msg) + "\n").encode("utf-8"))
        self.proc.stdin.flush()

    def request(self, method, params=None, timeout=30):
        rid = self.next_id
        self.next_id += 1
        self._send({"id": rid, "method": method, "params": params or {}})
        deadline = time.time() + timeout
        with self._cv:
            while rid not in self.responses:
                left = deadline - time.time()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError("app-server gave no answer to %s in %ss; stderr:\n%s"
                                         % (method, timeout, "\n".join(self.stderr[-30:])))
                self._cv.wait(min(left, 0.2))
            msg = self.responses.pop(rid)
        if "error" in msg:
            raise AssertionError("app-server %s failed: %s" % (method, msg["error"]))
        return msg["result"]

    def notify(self, method, params=None):
        msg = {"method": method}
        if params is not None:
            msg["params"] = params
        self._send(msg)

    def initialize(self):
        out = self.request("initialize", {"clientInfo": {"name": "agent-relay-tests", "title": "Agent Relay tests",
                                                         "version": "0"}})
        self.notify("initialized")
        return out

    def wait_notification(self, method, predicate=None, timeout=30):
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError("no %s notification in %ss; got: %s" % (
                    method, timeout, [m.get("method") for m in self.seen][-40:]))
            try:
                msg = self.notifications.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if msg.get("method") == method and (predicate is None or predicate(msg.get("params") or {})):
                return msg

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


def toml_str(s):
    return json.dumps(s)  # a TOML basic string is a JSON string for everything we write


class CodexHome:
    """A throwaway HOME and CODEX_HOME set up as integrations/codex/README.md says: hooks.json, the config.toml
    snippet and AGENTS.md snippet in ~/.codex, `agent-relay` on PATH (install.sh's one file), plus a model provider
    pointing at the scripted model."""

    API_KEY_VAR = "SCRIPTED_MODEL_API_KEY"

    def __init__(self, tmp, model_url, relay_url, proxy, **extra_env):
        self.home = os.path.join(str(tmp), "home")
        self.project = os.path.join(str(tmp), "project")
        self.codex_home = os.path.join(self.home, ".codex")
        self.bin_dir = os.path.join(self.home, ".local", "bin")
        for d in (self.project, self.codex_home, self.bin_dir):
            os.makedirs(d)
        # install.sh puts the one file at ~/.local/bin/agent-relay
        shutil.copyfile(RELAY_PY, os.path.join(self.bin_dir, "agent-relay"))
        os.chmod(os.path.join(self.bin_dir, "agent-relay"), 0o755)
        shutil.copyfile(os.path.join(CODEX_DIR, "hooks.json"), os.path.join(self.codex_home, "hooks.json"))
        shutil.copyfile(os.path.join(CODEX_DIR, "AGENTS.md.snippet"), os.path.join(self.codex_home, "AGENTS.md"))
        self.model_url = model_url
        self.trust = {}
        self.write_config()
        env = offline_env(self.home, proxy, CODEX_HOME=self.codex_home, AGENT_RELAY_URL=relay_url, **extra_env)
        env[self.API_KEY_VAR] = "sk-scripted"
        env["PATH"] = self.bin_dir + os.pathsep + env.get("PATH", "")
        self.env = env
        self.bin = codex_bin()

    def write_config(self):
        with open(os.path.join(CODEX_DIR, "config.toml.snippet"), encoding="utf-8") as f:
            snippet = f.read()
        lines = [
            "# model and provider: the scripted model on loopback",
            'model = "scripted-model"',
            'model_provider = "scripted"',
            "",
            "# integrations/codex/config.toml.snippet, as the README says",
            snippet,
            "",
            "[model_providers.scripted]",
            'name = "Scripted model"',
            "base_url = %s" % toml_str(self.model_url + "/v1"),
            "env_key = %s" % toml_str(self.API_KEY_VAR),
            'wire_api = "responses"',
            "",
        ]
        for key, digest in sorted(self.trust.items()):
            lines += ["[hooks.state.%s]" % toml_str(key), "trusted_hash = %s" % toml_str(digest), ""]
        with open(os.path.join(self.codex_home, "config.toml"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))

    def app_server(self):
        server = AppServer(self.bin, self.env, self.project)
        server.initialize()
        return server

    def list_hooks(self):
        server = self.app_server()
        try:
            out = server.request("hooks/list", {"cwds": [self.project]})
        finally:
            server.close()
        hooks = []
        for entry in out.get("data") or []:
            assert not entry.get("errors"), entry
            hooks.extend(entry.get("hooks") or [])
        return hooks

    def trust_hooks(self):
        """Records trust for every hook as /hooks does: [hooks.state."<key>"] trusted_hash = "<currentHash>" in
        config.toml, with the key and hash that `hooks/list` reports. Returns the hooks as listed afterwards."""
        for hook in self.list_hooks():
            self.trust[hook["key"]] = hook["currentHash"]
        self.write_config()
        return self.list_hooks()

    def exec(self, prompt, *args, resume=None, timeout=60):
        """`codex exec` (or `codex exec resume ID`) in the project folder, with the sandbox the README's snippet
        configures (workspace-write, network on) and no approval prompts (exec never asks)."""
        # `exec resume` has no --sandbox flag; -c sandbox_mode works for both
        common = ["--skip-git-repo-check", "--json", "-c", 'sandbox_mode="workspace-write"'] + list(args)
        cmd = [self.bin, "exec"] + common
        if resume:
            cmd = [self.bin, "exec", "resume"] + common + [resume]
        return run(cmd + [prompt], self.env, self.project, timeout=timeout)


def exec_events(p):
    """The JSON events `codex exec --json` printed."""
    out = []
    for line in (p.stdout or "").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def exec_thread_id(p):
    for e in exec_events(p):
        if e.get("type") == "thread.started":
            return e.get("thread_id")
    return None
