// Agent keys (a relay with AGENT_RELAY_AGENT_KEYS=1): register() keeps the new agent's key and sends it as
// X-Agent-Relay-Agent-Key; a person's acts take the admin token. Runs when AGENT_RELAY_ADMIN_TOKEN names it.
import assert from "node:assert/strict";
import { test } from "node:test";

import { RelayError } from "../src/index.js";
import { client, live, unique } from "./relay.js";

const adminToken = process.env.AGENT_RELAY_ADMIN_TOKEN || undefined;

test("agent keys: each client acts as the agent it registered, a person's act needs the admin token",
  { ...live, skip: adminToken ? false : "set AGENT_RELAY_ADMIN_TOKEN to a relay with agent keys on" }, async () => {
    const [alice, bob] = [client(), client()];
    const [a, b] = [unique("keys-a"), unique("keys-b")];
    const card = await alice.register({ id: a, approvalMode: "guarded" });
    assert.equal(typeof card.agentKey, "string");
    assert.equal(alice.agentKey, card.agentKey, "the client keeps the key it was given");
    await bob.register({ id: b });
    assert.notEqual(bob.agentKey, alice.agentKey);

    const refused = await bob.send({ from: a, to: b, body: "posing as alice" }).catch((e: unknown) => e);
    assert.ok(refused instanceof RelayError, String(refused));
    assert.equal(refused.status, 403);
    assert.equal(refused.code, "forbidden");

    const held = await bob.send({ from: b, to: a, body: "for a guarded agent" });
    assert.deepEqual(held.held, [a], "a guarded agent's messages wait for a person");
    const notAPerson = await alice.approve(held.message.id).catch((e: unknown) => e);
    assert.ok(notAPerson instanceof RelayError && notAPerson.status === 403, String(notAPerson));

    const person = client({ adminToken });
    const approved = await person.approve(held.message.id, { agentId: a });
    assert.deepEqual(approved.receipts.map((r) => [r.agentId, r.state]), [[a, "approved"]]);
    assert.deepEqual((await alice.inbox(a)).messages.map((m) => m.id), [held.message.id]);
  });
