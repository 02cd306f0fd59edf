// events(): the relay's Server-Sent Events stream as an async iterator, resuming with Last-Event-ID.
import assert from "node:assert/strict";
import { test } from "node:test";

import { RelayError } from "../src/index.js";
import type { RelayEvent } from "../src/index.js";
import { client, live, unique, until } from "./relay.js";

/** A fetch that records each request's Last-Event-ID and can drop each connection, as a network failure does. */
function droppingFetch() {
  const connections: { lastEventId: string | null; drop: () => void }[] = [];
  const wrapped: typeof fetch = (input, init) => {
    const wire = new AbortController();
    init?.signal?.addEventListener("abort", () => wire.abort(), { once: true });
    connections.push({ lastEventId: new Headers(init?.headers).get("Last-Event-ID"), drop: () => wire.abort() });
    return fetch(input, { ...init, signal: wire.signal });
  };
  return { connections, fetch: wrapped };
}

async function next(events: AsyncIterator<RelayEvent>): Promise<RelayEvent> {
  const step = await events.next();
  if (step.done) assert.fail("the stream ended");
  return step.value;
}

function messageId(event: RelayEvent): number {
  assert.equal(event.event, "message.created");
  return event.event === "message.created" ? event.data.message.id : -1;
}

test("a dropped stream resumes with Last-Event-ID: no event lost, none repeated", live, async () => {
  const c = client();
  const [a, b] = [unique("sse-a"), unique("sse-b")];
  await c.register({ id: a });
  await c.register({ id: b });
  const wire = droppingFetch();
  const stop = new AbortController();
  const events = client({ fetch: wire.fetch })
    .events({ agentId: b, types: ["message.created"], since: 0, signal: stop.signal, retryMs: 50 })
    [Symbol.asyncIterator]();

  const sent: number[] = [];
  const send = async (body: string) => sent.push((await c.send({ from: a, to: b, body })).message.id);
  await send("one");
  await send("two");
  const seen = [await next(events), await next(events)];
  assert.deepEqual(seen.map(messageId), sent);

  wire.connections[0]!.drop(); // the network fails under the open stream
  await send("three, sent while the stream is down");
  await send("four, sent while the stream is down");
  seen.push(await next(events), await next(events));
  await send("five, live again");
  seen.push(await next(events));

  assert.deepEqual(seen.map(messageId), sent, "every message once, in order");
  assert.equal(wire.connections.length, 2, "one reconnection");
  assert.equal(wire.connections[0]!.lastEventId, null);
  assert.equal(wire.connections[1]!.lastEventId, String(seen[1]!.id), "it resumed after the last event it saw");
  const ids = seen.map((e) => e.id);
  assert.deepEqual([...ids].sort((x, y) => x - y), ids, "event ids only go up");

  stop.abort();
  assert.equal((await events.next()).done, true, "aborting the signal ends the iteration");
});

test("lastEventId resumes a new stream after a given event; break closes it", live, async () => {
  const c = client();
  const [a, b] = [unique("sse-a"), unique("sse-b")];
  await c.register({ id: a });
  await c.register({ id: b });
  const bodies = ["alpha", "beta", "gamma"];
  for (const body of bodies) await c.send({ from: a, to: b, body });

  const first: RelayEvent[] = [];
  for await (const event of c.events({ agentId: b, types: "message.created", since: 0 })) {
    first.push(event);
    if (first.length === 1) break;
  }
  await until("the relay to see the stream closed by break", async () => !(await c.getAgent(b)).listening);

  const rest: string[] = [];
  for await (const event of c.events({ agentId: b, types: ["message.created"], lastEventId: first[0]!.id })) {
    if (event.event === "message.created") rest.push(event.data.message.body);
    if (rest.length === 2) break;
  }
  assert.deepEqual(rest, ["beta", "gamma"]);
});

test("a stream the relay refuses throws its RelayError", live, async () => {
  const events = client().events({ agentId: unique("nobody") });
  const err = await events.next().then(
    () => assert.fail("the stream opened"),
    (e: unknown) => e,
  );
  assert.ok(err instanceof RelayError, String(err));
  assert.equal(err.status, 404);
  assert.equal(err.code, "unknown_agent");
});
