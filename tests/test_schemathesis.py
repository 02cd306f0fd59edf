"""schemathesis against the live relay, with all of its checks, on a relay without a token and on one with a token.

schemathesis (pinned in tests/requirements.txt) reads /api/spec and generates requests for every operation: valid
ones, which must be accepted, and invalid ones (each constraint of the spec broken in turn), which must be refused;
without the token, with a wrong one; methods the spec does not list; and sequences (create, then read or claim what
was created). Each answer must have a declared status and content type, fit the declared schema and headers, and
never be a 5xx. The run is bounded (examples per operation, a time limit per request); its seed is fixed so that a
failure reproduces (AGENT_RELAY_SCHEMATHESIS_SEED picks another).

What is not checked, and why, is EXCLUDED below: nothing else is left out.
"""
import importlib.util
import os
import subprocess
import sys
import sysconfig

import pytest

from conftest import need

SEED = int(os.environ.get("AGENT_RELAY_SCHEMATHESIS_SEED", "4850"))
MAX_EXAMPLES = 20  # per operation and phase
TOKEN = "st-shared-token-0123456789abcdef"
INTEG_TOKEN = "st-integration-token-0123456789"
INTEGRATIONS = ('[{"name": "st", "token": "%s", "scopes": ["tasks:create"], "targets": ["tag:oncall", "broadcast"], '
                '"channels": ["alerts"]}]' % INTEG_TOKEN)

# Each exclusion: the [[operations]] entry of schemathesis' configuration that makes it, and why it is needed.
EXCLUDED = [
    ('include-operation-id = "events"\nenabled = false',
     "GET /api/events is a live stream: it answers as events happen, so a generated request waits for events that "
     "may never come, until its time is up. Its events are checked against components/schemas/Event by "
     "tests/test_stream.py, and its refusals (a bad since, Last-Event-ID or agentId) by tests/test_fuzz.py."),
    ('include-operation-id = "mcp_get"\nenabled = false',
     "GET /api/mcp is MCP's stream of server messages: with a session that initialize handed out (the stateful phase "
     "finds one) it stays open until the session ends, so a request never completes. Without a session it is 400 or "
     "404 at once, which tests/test_fuzz.py checks against the spec; tests/test_mcp.py drives the stream."),
    ('include-operation-id = "inbox"\nparameters = { "query.wait" = 0 }',
     "The inbox's wait is fixed to 0: a long-poll with a generated wait of up to 60 s waits that long when no message "
     "comes, as the contract says, which only slows the run. Refused waits (-1, 61, x) are in tests/test_core_errors.py."),
    ('include-operation-id = "wait_message"\nparameters = { "query.timeout" = 0 }',
     "The message wait's timeout is fixed to 0, as the inbox's wait is: a generated timeout of up to 60 s waits that "
     "long for a delivery that no generated request makes. Waits that end by a delivery, a read or a reply, and "
     "refused timeouts, are in tests/test_delivery_truth.py."),
    ('include-operation-id = ["acquire_lease", "list_leases"]\nphases.coverage.enabled = false',
     "A lease path's pattern states lease_pattern's whole rule with lookarounds (no .. segment, ** only as a whole "
     "segment, nothing absolute), which schemathesis' generator can only meet by generating and filtering: its "
     "coverage phase spends minutes per lease operation for a handful of cases. The fuzzing and stateful phases "
     "still send these operations generated paths, and tests/test_leases.py holds the pattern to lease_pattern and "
     "checks each refused path's 400."),
    ('include-operation-id = "search"\nchecks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404"]',
     "A search's q holds at most 16 distinct words and phrases (API.md), counted after its quotes and stars are read: "
     "a rule of the query language, which no pattern of the spec states; more is 400 invalid_field naming q, as "
     "tests/test_search.py checks."),
    ('include-operation-id = "mcp_post"\nchecks.positive_data_acceptance.enabled = false\n'
     'checks.negative_data_rejection.enabled = false',
     "POST /api/mcp speaks JSON-RPC in MCP's terms, which an HTTP status does not follow: a well-formed message is "
     "refused (400) unless it is initialize or carries the Mcp-Session-Id that initialize handed out, a rule about "
     "the session that one request's schema cannot state; a malformed request is answered with a JSON-RPC error in "
     "the body, in a 200 when it has an id; and a notification outside a session is taken (202) and dropped unread, "
     "whatever it holds. Its answers are still checked against the spec, and tests/test_mcp.py drives the protocol."),
    ('include-path-regex = "^/api/agents/\\\\{id\\\\}"\nchecks.use_after_free.enabled = false',
     "DELETE /api/agents/{id} ends the agent's session: its card stays, offline, and is still read (API.md); only "
     "?purge=true deletes it, after which tests/test_client.py finds the agent gone (404). "
     "schemathesis takes any DELETE for a deletion."),
    ('include-operation-id = ["read_message", "claim_message", "release_message", "claim_task", "task_status"]\n'
     'checks.ensure_resource_availability.enabled = false',
     "These name an agent in the body (agentId) besides the message or task in the path; an agent that does not "
     "exist is 404 unknown_agent (API.md), which schemathesis takes for the resource it just created gone. The "
     "path's own 404 (not_found) is in tests/test_core_errors.py."),
    ('include-operation-id = ["claim_message", "release_message"]\n'
     'checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]',
     "Claiming or releasing a message that is not claimable work is 400 not_claimable (API.md), whatever the request: "
     "it is a rule about the stored message, not about the request's shape."),
]


def schemathesis_cmd():
    """Its command, as pip installs it beside this Python (else through the module)."""
    if importlib.util.find_spec("schemathesis") is None:
        return None
    script = os.path.join(sysconfig.get_paths()["scripts"], "schemathesis")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "schemathesis.cli"]


def run(relay, tmp_path, token=None, max_examples=MAX_EXAMPLES):
    cmd = schemathesis_cmd()
    need(cmd is not None, "schemathesis is not installed (bash tests/run.sh installs tests/requirements.txt)")
    # filter_too_much: the lease path's pattern (above) makes the generator discard most of what it draws for those
    # bodies; that is a health check of the generator, not of the relay, and every check still runs on what it sends
    head = ['suppress-health-check = ["filter_too_much"]', "[checks]\nenabled = true  # every check schemathesis has",
            '[auth.openapi.integrationToken]\nbearer = "%s"' % INTEG_TOKEN]
    if token:
        head.append('[auth.openapi.bearerToken]\nbearer = "%s"' % token)
    operations = ["[[operations]]\n" + entry for entry, _why in EXCLUDED]
    config = tmp_path / "schemathesis.toml"
    config.write_text("\n\n".join(head + operations) + "\n")
    # the checks come from the configuration file ([checks] enabled = true: all of them), where an exclusion below
    # can turn one off for one operation; --checks on the command line would override those
    # the spec as the relay serves it; read here, since with a token set /api/spec needs it too (API.md)
    spec = relay.get("/api/spec")
    assert spec.status == 200, spec
    (tmp_path / "spec.json").write_bytes(spec.body)
    args = cmd + ["--config-file", str(config), "run", str(tmp_path / "spec.json"), "--url", relay.url, "--mode", "all",
                  "--max-examples", str(max_examples), "--seed", str(SEED), "--request-timeout", "10", "--workers", "1"]
    env = dict(os.environ, NO_COLOR="1", SCHEMATHESIS_HOOKS="")
    done = subprocess.run(args, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    out = done.stdout.decode("utf-8", "replace")
    return done.returncode, out


def failures_of(out):
    start = out.find("FAILURES")
    return out[start:] if start >= 0 else out[-6000:]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("with_token", [False, True], ids=["open", "token"])
def test_schemathesis_finds_no_failure(relay_factory, tmp_path, with_token):
    env = {"AGENT_RELAY_INTEGRATIONS": INTEGRATIONS, "AGENT_RELAY_INTEGRATION_RATE_LIMIT_PER_MINUTE": "100000"}
    if with_token:
        env["AGENT_RELAY_TOKEN"] = TOKEN
    relay = relay_factory(env=env)
    relay.register("st-one", tags=["oncall"])
    relay.register("st-two", capabilities=["review"])
    code, out = run(relay, tmp_path, TOKEN if with_token else None)
    assert "Traceback" not in relay.log, relay.log[-3000:]
    assert code == 0, failures_of(out)
