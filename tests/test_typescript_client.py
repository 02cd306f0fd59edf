"""The TypeScript client (clients/typescript) against the real relay: its generated types are what a live relay's
/api/spec gives (scripts/gen-types.mjs --check), it compiles (tsc), and its own tests (node --test: registration,
the inbox's kept cursor, long-polls, claims, tasks, the event stream's resume, errors) pass against a relay without
a token and one with a token. tests/run.sh installs the compiler (npm ci in clients/typescript)."""
import glob
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT, need

CLIENT = os.path.join(ROOT, "clients", "typescript")
NODE = shutil.which("node")
TSC = os.path.join(CLIENT, "node_modules", "typescript", "bin", "tsc")
TOKEN = "ts-client-token-5f1c9a"
ADMIN = "ts-client-admin-8e2d47"
KEYS_TEST = "agent_keys.test.js"  # runs against a relay with agent keys on, where one client acts as one agent


def node_major():
    if not NODE:
        return 0
    out = subprocess.run([NODE, "--version"], stdout=subprocess.PIPE, universal_newlines=True, check=False).stdout
    m = re.match(r"v(\d+)\.", out.strip())
    return int(m.group(1)) if m else 0


def pinned_typescript():
    with open(os.path.join(CLIENT, "package.json"), encoding="utf-8") as f:
        return json.load(f)["devDependencies"]["typescript"]


def run(cmd, env=None, timeout=300):
    p = subprocess.run(cmd, cwd=CLIENT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=timeout, check=False)
    return p.returncode, p.stdout


@pytest.fixture(scope="module")
def built():
    """The client and its tests compiled into clients/typescript/dist by the pinned tsc."""
    need(node_major() >= 18, "Node.js 18 or newer is not installed (the client needs its fetch)")
    need(os.path.exists(TSC), "clients/typescript/node_modules has no typescript: run `npm ci` there (tests/run.sh does)")
    with open(os.path.join(CLIENT, "node_modules", "typescript", "package.json"), encoding="utf-8") as f:
        have = json.load(f)["version"]
    assert have == pinned_typescript(), "clients/typescript/node_modules holds typescript %s, package.json pins %s: run npm ci" % (
        have, pinned_typescript())
    shutil.rmtree(os.path.join(CLIENT, "dist"), ignore_errors=True)  # nothing left over from files since removed
    code, out = run([NODE, TSC, "-p", "."])
    assert code == 0, "tsc -p clients/typescript failed:\n" + out
    tests = sorted(glob.glob(os.path.join(CLIENT, "dist", "test", "*.test.js")))
    assert tests, "tsc wrote no tests into clients/typescript/dist/test"
    return tests


def node_env(relay, token):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    env["AGENT_RELAY_URL"] = relay.url
    if token:
        env["AGENT_RELAY_TOKEN"] = token
    return env


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
def test_the_generated_types_are_the_live_spec(relay_factory, built, token):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": token} if token else None)
    code, out = run([NODE, "scripts/gen-types.mjs", "--check", "--spec", relay.url], env=node_env(relay, token))
    assert code == 0, "clients/typescript/src/types.ts has drifted from the relay's /api/spec:\n" + out


def test_the_drift_check_notices_a_changed_spec(relay, built, tmp_path):
    spec = relay.get("/api/spec").json
    spec["components"]["schemas"]["Message"]["properties"]["mood"] = {"type": "string"}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    code, out = run([NODE, "scripts/gen-types.mjs", "--check", "--spec", str(path)])
    assert code == 1, out
    assert "src/types.ts differs from the spec" in out and "mood?: string;" in out, out


@pytest.mark.parametrize("token", [None, TOKEN], ids=["no-token", "token"])
def test_the_client_passes_its_tests_against_the_relay(relay_factory, built, token):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": token} if token else None)
    code, out = run([NODE, "--test"] + [t for t in built if not t.endswith(KEYS_TEST)], env=node_env(relay, token))
    assert code == 0, "node --test failed against the relay:\n" + out
    counts = {k: int(v) for k, v in re.findall(r"^# (pass|fail|skipped|cancelled) (\d+)$", out, re.M)}
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, out
    assert counts.get("pass", 0) >= 15, "node ran fewer tests than the client has:\n" + out
    # the token's own test runs only against a relay with one
    assert counts.get("skipped") == (0 if token else 1), out


def test_the_client_with_agent_keys(relay_factory, built):
    relay = relay_factory(env={"AGENT_RELAY_TOKEN": TOKEN, "AGENT_RELAY_ADMIN_TOKEN": ADMIN, "AGENT_RELAY_AGENT_KEYS": "1"})
    env = node_env(relay, TOKEN)
    env["AGENT_RELAY_ADMIN_TOKEN"] = ADMIN
    code, out = run([NODE, "--test"] + [t for t in built if t.endswith(KEYS_TEST)], env=env)
    assert code == 0, "node --test failed against a relay with agent keys:\n" + out
    assert re.search(r"^# pass 1$", out, re.M) and re.search(r"^# skipped 0$", out, re.M), out
