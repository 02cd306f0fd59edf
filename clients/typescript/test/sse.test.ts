// The event stream parser, by the rules of Server-Sent Events, on text as it arrives in arbitrary chunks.
import assert from "node:assert/strict";
import { test } from "node:test";

import { SseParser } from "../src/index.js";

function parse(chunks: string[]) {
  const p = new SseParser();
  const blocks = chunks.flatMap((c) => p.push(c));
  return { blocks, retry: p.retry };
}

test("blocks, comments and retry as the relay writes them", () => {
  const text = 'retry: 2000\n: connected\n\nid: 7\nevent: message.created\ndata: {"a":1}\n\n: ping\n\nid: 8\nevent: task.created\ndata: {"b":2}\n\n';
  const { blocks, retry } = parse([text]);
  assert.equal(retry, 2000);
  assert.deepEqual(blocks, [
    { lastEventId: "7", event: "message.created", data: '{"a":1}' },
    { lastEventId: "8", event: "task.created", data: '{"b":2}' },
  ]);
});

test("any split into chunks gives the same blocks, with \\n, \\r\\n or \\r line ends", () => {
  const base = 'id: 1\nevent: e\ndata: {"x":"y"}\ndata: second line\n\nid: 2\ndata:no space\n\n';
  for (const end of ["\n", "\r\n", "\r"]) {
    const text = base.replace(/\n/g, end);
    const whole = parse([text]).blocks;
    assert.deepEqual(whole, [
      { lastEventId: "1", event: "e", data: '{"x":"y"}\nsecond line' },
      { lastEventId: "2", event: "message", data: "no space" },
    ]);
    for (let cut = 1; cut < text.length; cut++) {
      assert.deepEqual(parse([text.slice(0, cut), text.slice(cut)]).blocks, whole, `split at ${cut} with ${JSON.stringify(end)}`);
    }
    assert.deepEqual(parse([...text]).blocks, whole, "one character at a time");
  }
});

test("an id alone moves the last event id without an event; a block cut short is not dispatched", () => {
  const { blocks } = parse(["id: 41\n\n", "id: 42\ndata: {}\n\n", "id: 43\ndata: {"]);
  assert.deepEqual(blocks, [
    { lastEventId: "41", event: "message", data: undefined },
    { lastEventId: "42", event: "message", data: "{}" },
  ]);
});
