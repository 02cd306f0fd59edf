// The client against the live relay's spec: every operation has a method (or a reasoned exclusion), and the
// operation table the client builds its requests from is the spec's.
import assert from "node:assert/strict";
import { test } from "node:test";

import { operationMethods, operations } from "../src/index.js";
import { client } from "./relay.js";

interface Spec {
  paths: Record<string, Record<string, { operationId?: string }>>;
}

test("every operation of the live spec has a client method, or is excluded for a reason", async () => {
  const c = client();
  const spec = (await c.spec()) as unknown as Spec;
  const live = new Map<string, { method: string; path: string }>();
  for (const [path, byMethod] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(byMethod)) {
      assert.ok(op.operationId, `${method.toUpperCase()} ${path} has no operationId`);
      live.set(op.operationId, { method: method.toUpperCase(), path });
    }
  }
  const table = operationMethods as Record<string, string | { excluded: string }>;
  const missing = [...live.keys()].filter((id) => !(id in table));
  assert.deepEqual(missing, [], "operations of the spec that the client neither calls nor excludes");
  const gone = Object.keys(table).filter((id) => !live.has(id));
  assert.deepEqual(gone, [], "client methods for operations the spec no longer has");
  for (const [id, entry] of Object.entries(table)) {
    if (typeof entry === "string") {
      assert.equal(typeof (c as unknown as Record<string, unknown>)[entry], "function", `${id}: RelayClient.${entry} is not a method`);
    } else {
      assert.ok(entry.excluded.length > 20, `${id}: an exclusion says why`);
    }
    assert.deepEqual((operations as Record<string, unknown>)[id], live.get(id), `${id}: the client's method and path are the spec's`);
  }
});
