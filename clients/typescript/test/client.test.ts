// RelayClient against the live relay: registration, sending, the inbox and its kept cursor, long-polls, claims,
// tasks, leases, search and errors.
import assert from "node:assert/strict";
import { test } from "node:test";

import { RelayClient, RelayError } from "../src/index.js";
import type { Agent, Message } from "../src/index.js";
import { client, live, relayToken, relayUrl, unique, until } from "./relay.js";

/** The RelayError a call fails with (the test fails when it succeeds or fails otherwise). */
async function failure(call: Promise<unknown>): Promise<RelayError> {
  try {
    await call;
  } catch (err) {
    if (err instanceof RelayError) return err;
    throw err;
  }
  assert.fail("the call succeeded; a RelayError was expected");
}

test("register makes the card, again updates it (a new instance raises the epoch); get, list, patch, heartbeat, end of session", live, async () => {
  const c = client();
  const id = unique("ts-reg");
  const card: Agent = await c.register({ id, tags: ["ts", "backend"], capabilities: ["review"], label: "ts-reviewer", instanceId: "one" });
  assert.equal(card.id, id);
  assert.deepEqual(card.tags, ["ts", "backend"]);
  assert.equal(card.status, "online");
  assert.equal(card.epoch, 1);
  const again = await c.register({ id, instanceId: "two" });
  assert.equal(again.epoch, 2, "a new instanceId increments the epoch");

  assert.equal((await c.getAgent(id)).label, "ts-reviewer");
  const listed = await c.listAgents({ tag: "ts" });
  assert.ok(listed.agents.some((a) => a.id === id));

  const patched = await c.patchAgent(id, { status: "busy", meta: { note: "from the TypeScript client" } });
  assert.equal(patched.status, "busy");
  assert.equal(patched.meta.note, "from the TypeScript client");

  const beat = await c.heartbeat(id, { instanceId: "two", status: "idle" });
  assert.equal(beat.ok, true);
  assert.equal(beat.agent.status, "idle");
  const stale = await failure(c.heartbeat(id, { instanceId: "one" }));
  assert.equal(stale.status, 409);
  assert.equal(stale.code, "superseded");
  assert.equal(stale.details.epoch, 2);

  const ended = await c.endSession(id);
  assert.equal(ended.status, "offline");
  await c.endSession(id, { purge: true });
  const gone = await failure(c.getAgent(id));
  assert.equal(gone.status, 404);
});

test("send, then the inbox without since follows the relay's kept cursor: each message once", live, async () => {
  const c = client();
  const [a, b] = [unique("ts-a"), unique("ts-b")];
  await c.register({ id: a });
  await c.register({ id: b });

  const sent = await c.send({ from: a, to: b, body: "first", subject: "hello" });
  assert.equal(sent.message.body, "first");
  assert.deepEqual(sent.matched, [b]);
  assert.deepEqual(sent.held, []);

  const one = await c.inbox(b);
  assert.deepEqual(one.messages.map((m) => m.id), [sent.message.id]);
  assert.equal(one.cursor, sent.message.id);

  const none = await c.inbox(b);
  assert.deepEqual(none.messages, [], "a second look without since does not hand the same message over again");

  const second = await c.send({ from: a, to: b, body: "second", replyTo: sent.message.id });
  const two = await c.inbox(b);
  assert.deepEqual(two.messages.map((m) => m.body), ["second"]);
  assert.equal(two.messages[0]!.threadId, sent.message.id);

  const again = await c.inbox(b, { since: 0 });
  assert.deepEqual(again.messages.map((m) => m.id), [sent.message.id, second.message.id], "an explicit since reads again");

  const thread = await c.thread(second.message.id);
  assert.deepEqual(thread.messages.map((m) => m.body), ["first", "second"]);
  const history = await c.history({ agent: b });
  assert.deepEqual(history.messages.map((m) => m.id), [second.message.id, sent.message.id], "history is newest first");

  const read = await c.markRead(sent.message.id, b);
  assert.equal(read.agentId, b);
  assert.equal((await c.readUpTo(b, second.message.id)).count, 1);
  const unread = await c.inbox(b, { since: 0, unread: true });
  assert.deepEqual(unread.messages, []);
  const got = await c.getMessage(sent.message.id);
  assert.deepEqual(got.receipts.map((r) => [r.agentId, r.state]), [[b, "read"]]);
});

test("a long-poll waits, and a send wakes it with the message", live, async () => {
  const c = client();
  const [a, b] = [unique("ts-a"), unique("ts-b")];
  await c.register({ id: a });
  await c.register({ id: b });
  await c.inbox(b); // the cursor is now past everything

  const poll = c.inbox(b, { wait: 30 });
  await until("the long-poll to be held by the relay", async () => (await c.getAgent(b)).listening);
  const sent = await c.send({ from: a, to: b, body: "wake up" });
  const answer = await poll;
  assert.deepEqual(answer.messages.map((m: Message) => m.id), [sent.message.id]);
  assert.equal(sent.listening, 1, "the send saw its recipient listening");
});

test("an aborted long-poll leaves its message for the next look", live, async () => {
  const c = client();
  const [a, b] = [unique("ts-a"), unique("ts-b")];
  await c.register({ id: a });
  await c.register({ id: b });
  await c.inbox(b);

  const stop = new AbortController();
  const poll = c.inbox(b, { wait: 30 }, { signal: stop.signal });
  await until("the long-poll to be held", async () => (await c.getAgent(b)).listening);
  stop.abort();
  await assert.rejects(poll, (err: unknown) => (err as Error).name === "AbortError");
  await until("the relay to see the client gone", async () => !(await c.getAgent(b)).listening);

  const sent = await c.send({ from: a, to: b, body: "still here" });
  assert.deepEqual((await c.inbox(b)).messages.map((m) => m.id), [sent.message.id]);
});

test("claims: one winner, the loser gets RelayError 409 already_claimed", live, async () => {
  const c = client();
  const tag = unique("ts-pool");
  const [boss, w1, w2] = [unique("ts-boss"), unique("ts-w1"), unique("ts-w2")];
  await c.register({ id: boss });
  await c.register({ id: w1, tags: [tag] });
  await c.register({ id: w2, tags: [tag] });
  const work = await c.send({ from: boss, to: "tag:" + tag, body: "take me", claimable: true });
  assert.deepEqual([...work.matched].sort(), [w1, w2].sort());

  const results = await Promise.allSettled([
    c.claimMessage(work.message.id, { agentId: w1 }),
    c.claimMessage(work.message.id, { agentId: w2 }),
  ]);
  const won = results.filter((r) => r.status === "fulfilled");
  const lost = results.filter((r): r is PromiseRejectedResult => r.status === "rejected");
  assert.equal(won.length, 1, "exactly one claim wins");
  assert.equal(lost.length, 1);
  const err = lost[0]!.reason;
  assert.ok(err instanceof RelayError, String(err));
  assert.equal(err.status, 409);
  assert.equal(err.code, "already_claimed");
  const winner = results[0]!.status === "fulfilled" ? w1 : w2;
  assert.equal(err.details.claimedBy, winner);

  const released = await c.releaseMessage(work.message.id, { agentId: winner });
  assert.equal(released.message.claimedBy, null);
  const loser = winner === w1 ? w2 : w1;
  const claimed = await c.claimMessage(work.message.id, { agentId: loser });
  assert.equal(claimed.message.claimedBy, loser);
});

test("tasks: create (deduplicated), claim (one winner), status, events", live, async () => {
  const c = client();
  const tag = unique("ts-oncall");
  const [boss, w1, w2] = [unique("ts-boss"), unique("ts-w1"), unique("ts-w2")];
  await c.register({ id: boss });
  await c.register({ id: w1, tags: [tag] });
  await c.register({ id: w2, tags: [tag] });
  const key = unique("disk");

  const made = await c.createTask({ title: "Disk 94% full", target: "tag:" + tag, dedupeKey: key, severity: "critical", from: boss });
  assert.equal(made.task.source, "agent:" + boss);
  assert.equal(made.created, true);
  assert.equal(made.task.status, "open");
  const repeat = await c.createTask({ title: "Disk 95% full", target: "tag:" + tag, dedupeKey: key, from: boss });
  assert.equal(repeat.created, false);
  assert.equal(repeat.task.id, made.task.id);
  assert.equal(repeat.task.occurrenceCount, 2);
  assert.ok((await c.listTasks({ target: "tag:" + tag })).tasks.some((t) => t.id === made.task.id));

  const claimed = await c.claimTask(made.task.id, { agentId: w2 });
  assert.equal(claimed.task.status, "claimed");
  assert.equal(claimed.task.claimedBy, w2);
  const late = await failure(c.claimTask(made.task.id, { agentId: w1 }));
  assert.equal(late.status, 409);
  assert.equal(late.code, "already_claimed");

  const progress = await c.updateTaskStatus(made.task.id, { agentId: w2, progress: { step: "cleaning" } });
  assert.deepEqual(progress.task.progress, { step: "cleaning" });
  const notMine = await failure(c.updateTaskStatus(made.task.id, { agentId: w1, status: "done" }));
  assert.equal(notMine.code, "not_owner");
  const done = await c.updateTaskStatus(made.task.id, { agentId: w2, status: "done", result: { freed: "40 GB" } });
  assert.equal(done.task.status, "done");
  const final = await failure(c.updateTaskStatus(made.task.id, { agentId: w2, status: "open" }));
  assert.equal(final.code, "invalid_transition");

  const { task, events } = await c.getTask(made.task.id);
  assert.deepEqual(task.result, { freed: "40 GB" });
  const kinds = events.map((e) => e.type);
  assert.deepEqual(kinds.filter((k) => k !== "progress"), ["created", "occurrence", "claimed", "status"]);
  assert.deepEqual((await c.taskEvents(made.task.id)).events.map((e) => e.id), events.map((e) => e.id));
});

test("errors: 400 invalid_field names the field, 404 unknown_agent, unreachable", live, async () => {
  const c = client();
  const a = unique("ts-a");
  await c.register({ id: a });

  const badBody = await failure(c.send({ from: a, to: a, body: "x", kind: "no spaces allowed" }));
  assert.equal(badBody.status, 400);
  assert.equal(badBody.code, "invalid_field");
  assert.equal(badBody.field, "kind");
  assert.match(badBody.message, /^kind: /);

  const badQuery = await failure(c.inbox(a, { wait: 61 }));
  assert.equal(badQuery.code, "invalid_field");
  assert.equal(badQuery.field, "wait");

  const unknown = await failure(c.send({ from: unique("nobody"), to: a, body: "x" }));
  assert.equal(unknown.status, 404);
  assert.equal(unknown.code, "unknown_agent");

  const down = await failure(new RelayClient({ baseUrl: "http://127.0.0.1:9" }).health());
  assert.equal(down.status, 0);
  assert.equal(down.code, "unreachable");
  assert.ok(down.message.includes("127.0.0.1:9"));
});

test("the token: health needs none, everything else does", { ...live, skip: relayToken ? false : "the relay has no token" }, async () => {
  const anonymous = new RelayClient({ baseUrl: relayUrl });
  assert.equal((await anonymous.health()).ok, true);
  const refused = await failure(anonymous.stats());
  assert.equal(refused.status, 401);
  assert.equal(refused.code, "unauthorized");
  const wrong = await failure(new RelayClient({ baseUrl: relayUrl, token: "not-the-token" }).stats());
  assert.equal(wrong.status, 401);
  assert.ok((await client().stats()).agents.total >= 0);
});

test("waitForMessage answers when the message is read", live, async () => {
  const c = client();
  const [a, b] = [unique("ts-a"), unique("ts-b")];
  await c.register({ id: a });
  await c.register({ id: b });
  const sent = await c.send({ from: a, to: b, body: "tell me when you read this" });
  const now = await c.waitForMessage(sent.message.id, { until: "read" });
  assert.equal(now.reached, false);
  const waiting = c.waitForMessage(sent.message.id, { until: "read", timeout: 30 });
  await c.markRead(sent.message.id, b);
  const answer = await waiting;
  assert.equal(answer.reached, true);
  assert.deepEqual(answer.receipts.map((r) => r.state), ["read"]);
});

test("leases: a conflict names the holder; renew and release", live, async () => {
  const c = client();
  const [a, b] = [unique("ts-a"), unique("ts-b")];
  const scope = unique("ts-repo");
  await c.register({ id: a });
  await c.register({ id: b });
  const { lease } = await c.acquireLease({ agentId: a, scope, paths: ["src/api/"], reason: "migrating" });
  assert.deepEqual(lease.paths, ["src/api/"]);
  const conflict = await failure(c.acquireLease({ agentId: b, scope, paths: "src/api/routes.py" }));
  assert.equal(conflict.status, 409);
  assert.equal(conflict.code, "lease_conflict");
  assert.deepEqual(conflict.details.conflicts?.map((x) => [x.agentId, x.path, x.requested]), [[a, "src/api/", "src/api/routes.py"]]);
  assert.deepEqual((await c.listLeases({ scope, path: "src/api/x.py" })).leases.map((l) => l.id), [lease.id]);
  const renewed = await c.renewLease(lease.id, { agentId: a, ttlMs: 3600000 });
  assert.ok(renewed.lease.expiresAt > lease.expiresAt, "an hour from now is later than the default half hour from then");
  const released = await c.releaseLease(lease.id, { agentId: a });
  assert.notEqual(released.lease.releasedAt, null);
  assert.deepEqual((await c.listLeases({ scope })).leases, []);
});

test("search finds a message by its words", live, async () => {
  const c = client();
  const [a, b] = [unique("ts-a"), unique("ts-b")];
  await c.register({ id: a });
  await c.register({ id: b });
  const word = "zebra" + Math.random().toString(36).slice(2, 8);
  const sent = await c.send({ from: a, to: b, body: `the ${word} migration is done` });
  const found = await c.search({ q: word });
  assert.equal(found.results.length, 1);
  const hit = found.results[0]!;
  assert.equal(hit.type, "message");
  if (hit.type === "message") assert.equal(hit.message.id, sent.message.id);
  assert.ok(hit.snippet.includes(`**${word}**`));
});

test("the base URL: a scheme is added, a path behind a proxy kept, anything but http(s) refused", () => {
  assert.equal(new RelayClient({ baseUrl: "relay.lan:4850" }).baseUrl, "http://relay.lan:4850");
  assert.equal(new RelayClient({ baseUrl: "https://example.org/relay/" }).baseUrl, "https://example.org/relay");
  assert.equal(new RelayClient().baseUrl, "http://localhost:4850");
  assert.equal(RelayClient.fromEnv({ AGENT_RELAY_URL: "http://10.0.0.2:4850", AGENT_RELAY_TOKEN: "t" }).token, "t");
  for (const bad of ["ftp://relay.lan", "http://"]) {
    let err: unknown;
    try {
      new RelayClient({ baseUrl: bad });
    } catch (e) {
      err = e;
    }
    assert.ok(err instanceof RelayError && err.code === "invalid_url", `${bad}: ${String(err)}`);
  }
});

test("health, stats, cursor", live, async () => {
  const c = RelayClient.fromEnv(process.env);
  const health = await c.health();
  assert.equal(health.ok, true);
  assert.match(health.version, /^\d+\.\d+/);
  const stats = await c.stats();
  assert.ok(stats.agents.total >= 0);
  const a = unique("ts-a");
  await c.register({ id: a });
  const sent = await c.send({ from: a, to: a, body: "to myself" });
  assert.ok((await c.cursor()).cursor >= sent.message.id);
});
