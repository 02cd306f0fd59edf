// What the tests share: the live relay they talk to (AGENT_RELAY_URL, and AGENT_RELAY_TOKEN when it has one;
// tests/test_typescript_client.py starts it) and a few helpers.
import { RelayClient } from "../src/index.js";
import type { RelayClientOptions } from "../src/index.js";

const url = process.env.AGENT_RELAY_URL;
if (!url) throw new Error("set AGENT_RELAY_URL to a running relay (tests/test_typescript_client.py starts one)");
export const relayUrl: string = url;
export const relayToken: string | undefined = process.env.AGENT_RELAY_TOKEN || undefined;

/** The options of a test against the relay: one that loses an event or a wake-up fails, instead of waiting for ever. */
export const live = { timeout: 60000 };

/** A client of the relay under test, with its token. */
export function client(options: RelayClientOptions = {}): RelayClient {
  return new RelayClient({ baseUrl: relayUrl, token: relayToken, ...options });
}

/** A fresh name, so that the tests of one run (and of runs against the same relay) never share an agent. */
export function unique(prefix: string): string {
  return `${prefix}-${Math.random().toString(36).slice(2, 10)}`;
}

/** Polls `probe` until it gives a truthy value (a state to wait for, never a duration asserted), or fails. */
export async function until<T>(what: string, probe: () => Promise<T>, timeoutMs = 20000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what}`);
    await new Promise((ok) => setTimeout(ok, 25));
  }
}
