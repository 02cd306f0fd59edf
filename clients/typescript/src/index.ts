// agent-relay-client: a typed client of Agent Relay's HTTP API. It needs nothing but the fetch API (Node 18+,
// Deno, Bun, browsers); its types are generated from the relay's OpenAPI document (src/types.ts).
import { operations } from "./types.js";
import type {
  AcquireLeaseAnswer,
  AcquireLeaseBody,
  Agent,
  ApproveAnswer,
  ApproveBody,
  CallbacksAnswer,
  CallbacksQuery,
  ClaimMessageAnswer,
  ClaimMessageBody,
  ClaimTaskAnswer,
  ClaimTaskBody,
  CreateTaskAnswer,
  CreateTaskBody,
  CursorAnswer,
  DeleteAgentQuery,
  ErrorCode,
  ErrorEnvelope,
  EventType,
  GetMessageAnswer,
  GetTaskAnswer,
  HealthAnswer,
  HeartbeatAnswer,
  HeartbeatBody,
  HistoryAnswer,
  HistoryQuery,
  InboxAnswer,
  InboxQuery,
  IntegrationEventAnswer,
  IntegrationEventBody,
  ListAgentsAnswer,
  ListAgentsQuery,
  ListLeasesAnswer,
  ListLeasesQuery,
  ListTasksAnswer,
  ListTasksQuery,
  OperationId,
  Operations,
  PatchAgentBody,
  ReadMessageAnswer,
  ReadUptoAnswer,
  RegisterBody,
  RejectAnswer,
  RejectBody,
  ReleaseLeaseAnswer,
  ReleaseLeaseQuery,
  ReleaseMessageAnswer,
  ReleaseMessageBody,
  RelayEvent,
  RenewLeaseAnswer,
  RenewLeaseBody,
  SearchAnswer,
  SearchQuery,
  SendAnswer,
  SendBody,
  SpecAnswer,
  StatsAnswer,
  TaskEventsAnswer,
  TaskStatusAnswer,
  TaskStatusBody,
  ThreadAnswer,
  WaitMessageAnswer,
  WaitMessageQuery,
} from "./types.js";

export * from "./types.js";

/** Where a client finds the relay when nothing says otherwise (the relay's default port). */
export const DEFAULT_URL = "http://localhost:4850";

export interface RelayClientOptions {
  /** The relay's address, such as http://127.0.0.1:4850; a path behind a proxy is kept. Default http://localhost:4850. */
  baseUrl?: string;
  /** The relay's token (AGENT_RELAY_TOKEN), sent as Authorization: Bearer; or an integration's token. */
  token?: string;
  /** The person's token (AGENT_RELAY_ADMIN_TOKEN), sent as X-Agent-Relay-Admin-Token: what a person's acts need. */
  adminToken?: string;
  /** The agent's key (agent keys on), sent as X-Agent-Relay-Agent-Key. register() keeps the key a new agent gets. */
  agentKey?: string;
  /** The fetch to use (default: the global one). */
  fetch?: typeof fetch;
}

/** What every call takes besides its arguments. */
export interface CallOptions {
  /** Aborts the call (a long-poll too: the relay sees the client gone and keeps its messages for the next look). */
  signal?: AbortSignal;
}

/** The codes of failures the client sees before or around the relay's own answer. */
export type ClientErrorCode = "unreachable" | "bad_response" | "invalid_url" | `http_${number}`;

/**
 * Every failure of a call: the relay's error envelope ({"error": {"code", "message", ...}}), or `unreachable`
 * (status 0) when no answer came. Act on `code`; show `message` to a person.
 */
export class RelayError extends Error {
  override readonly name = "RelayError";
  /** The HTTP status; 0 when the relay could not be reached. */
  readonly status: number;
  /** The relay's error code (invalid_field, already_claimed, ...), or one of ClientErrorCode. */
  readonly code: ErrorCode | ClientErrorCode | (string & {});
  /** invalid_field: the field at fault (the message names it too). */
  readonly field: string | undefined;
  /** The envelope's other keys: claimedBy (already_claimed, not_owner), epoch (superseded), heldBy, conflicts. */
  readonly details: Readonly<Omit<ErrorEnvelope["error"], "code" | "message">>;
  /** Seconds to wait before trying again (Retry-After: 429 rate_limited, 503 unavailable). */
  readonly retryAfter: number | undefined;

  constructor(status: number, code: string, message: string, details: Omit<ErrorEnvelope["error"], "code" | "message"> = {},
    retryAfter?: number, options?: { cause?: unknown }) {
    super(message, options);
    this.status = status;
    this.code = code;
    this.details = details;
    this.field = typeof details.field === "string" ? details.field : undefined;
    this.retryAfter = retryAfter;
  }
}

/** Options of events(): which events, from where, and how to stop. */
export interface EventsOptions extends CallOptions {
  /** Only what this agent would see (its narrowed stream); marks it listening while the stream is open. */
  agentId?: string;
  /** Only these event types. */
  types?: readonly EventType[] | string;
  /** Replay the events after this id first (?since=). */
  since?: number;
  /** Resume after this event id (sent as Last-Event-ID, which beats since). */
  lastEventId?: number | string;
  /** Open the stream again when it drops, resuming after the last event seen. Default true. */
  reconnect?: boolean;
  /** Milliseconds to wait before reconnecting. Default: what the relay's `retry:` line says (2000). */
  retryMs?: number;
}

/** Where an event stream stands: what it asks for, the last event id seen, the reconnection time it was given. */
interface StreamState {
  url: string;
  lastEventId: string | undefined;
  retryMs: number;
}

type Call<Op extends OperationId> = {
  params?: Operations[Op]["params"];
  query?: Operations[Op]["query"];
  body?: Operations[Op]["body"];
};

/** The names of RelayClient's methods. */
export type RelayClientMethod = {
  [K in keyof RelayClient]: RelayClient[K] extends (...args: never[]) => unknown ? K : never;
}[keyof RelayClient];

/** The client of one relay. Each method is one operation of the relay's spec and returns its answer as declared. */
export class RelayClient {
  readonly baseUrl: string;
  token: string | undefined;
  adminToken: string | undefined;
  agentKey: string | undefined;
  private readonly fetchImpl: typeof fetch;

  constructor(options: RelayClientOptions = {}) {
    const raw = (options.baseUrl || DEFAULT_URL).trim();
    let url: URL;
    try {
      url = new URL(raw.includes("://") ? raw : "http://" + raw);
    } catch (err) {
      throw new RelayError(0, "invalid_url", `${raw} is not an http(s) URL such as ${DEFAULT_URL}.`, {}, undefined, { cause: err });
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") {
      throw new RelayError(0, "invalid_url", `${raw} is not an http(s) URL such as ${DEFAULT_URL}.`);
    }
    this.baseUrl = (url.origin + url.pathname).replace(/\/+$/, "");
    this.token = options.token || undefined;
    this.adminToken = options.adminToken || undefined;
    this.agentKey = options.agentKey || undefined;
    const f = options.fetch || globalThis.fetch;
    if (typeof f !== "function") throw new TypeError("agent-relay-client needs fetch (Node 18 or newer), or options.fetch");
    this.fetchImpl = f;
  }

  /** A client from the variables the relay's own clients read: AGENT_RELAY_URL, AGENT_RELAY_TOKEN, AGENT_RELAY_AGENT_KEY. */
  static fromEnv(env: Record<string, string | undefined>, options: RelayClientOptions = {}): RelayClient {
    return new RelayClient({
      baseUrl: env.AGENT_RELAY_URL,
      token: env.AGENT_RELAY_TOKEN,
      agentKey: env.AGENT_RELAY_AGENT_KEY,
      ...options,
    });
  }

  // -- the relay ---------------------------------------------------------------------------------------------------

  /** Liveness and version; needs no token. */
  health(opts?: CallOptions): Promise<HealthAnswer> {
    return this.call("health", {}, opts);
  }

  /** Counts of agents, messages, tasks, callbacks, leases, long-polls and streams. */
  stats(opts?: CallOptions): Promise<StatsAnswer> {
    return this.call("stats", {}, opts);
  }

  /** The relay's OpenAPI 3.1 document. */
  spec(opts?: CallOptions): Promise<SpecAnswer> {
    return this.call("spec", {}, opts);
  }

  /** The newest message id, for a client that wants to skip history. */
  cursor(opts?: CallOptions): Promise<CursorAnswer> {
    return this.call("cursor", {}, opts);
  }

  // -- agents ------------------------------------------------------------------------------------------------------

  /**
   * Register or update an agent (its card). A new agent's answer carries its agentKey when the relay has agent
   * keys on; the client keeps it for its later calls (it is not shown again).
   */
  async register(card: RegisterBody, opts?: CallOptions): Promise<Agent> {
    const agent = await this.call("register", { body: card }, opts);
    if (agent.agentKey) this.agentKey = agent.agentKey;
    return agent;
  }

  /** Agents, newest lastSeen first. */
  listAgents(query: ListAgentsQuery = {}, opts?: CallOptions): Promise<ListAgentsAnswer> {
    return this.call("list_agents", { query }, opts);
  }

  /** One agent's card. */
  getAgent(agentId: string, opts?: CallOptions): Promise<Agent> {
    return this.call("get_agent", { params: { id: agentId } }, opts);
  }

  /** Change label, tags, capabilities, channels, status, ready, approvalMode or meta. */
  patchAgent(agentId: string, changes: PatchAgentBody, opts?: CallOptions): Promise<Agent> {
    return this.call("patch_agent", { params: { id: agentId }, body: changes }, opts);
  }

  /** Keep an agent online (fenced by instanceId and epoch: 409 superseded for a stale instance). */
  heartbeat(agentId: string, body: HeartbeatBody = {}, opts?: CallOptions): Promise<HeartbeatAnswer> {
    return this.call("heartbeat", { params: { id: agentId }, body }, opts);
  }

  /** The end of the agent's session: offline, its claims and leases released; `purge: true` deletes it. */
  endSession(agentId: string, query: DeleteAgentQuery = {}, opts?: CallOptions): Promise<Agent> {
    return this.call("delete_agent", { params: { id: agentId }, query }, opts);
  }

  /**
   * The messages visible to the agent. Without `since` the relay resumes from the cursor it kept for the agent,
   * so that each message is handed over once; with `wait` (seconds, up to 60) it answers the moment one arrives,
   * or with no messages when the time is up. `more: true`: there is more now, call again without waiting.
   */
  inbox(agentId: string, query: InboxQuery = {}, opts?: CallOptions): Promise<InboxAnswer> {
    return this.call("inbox", { params: { id: agentId }, query }, opts);
  }

  /** Mark every message visible to the agent up to `upTo` (an id) read. */
  readUpTo(agentId: string, upTo: number, opts?: CallOptions): Promise<ReadUptoAnswer> {
    return this.call("read_upto", { params: { id: agentId }, body: { upTo } }, opts);
  }

  // -- messages ----------------------------------------------------------------------------------------------------

  /** Send a message to an agent, tag:X, cap:X, label:X or broadcast. */
  send(message: SendBody, opts?: CallOptions): Promise<SendAnswer> {
    return this.call("send", { body: message }, opts);
  }

  /** History, newest first. */
  history(query: HistoryQuery = {}, opts?: CallOptions): Promise<HistoryAnswer> {
    return this.call("history", { query }, opts);
  }

  /** A message with its receipts. */
  getMessage(messageId: number, opts?: CallOptions): Promise<GetMessageAnswer> {
    return this.call("get_message", { params: { id: messageId } }, opts);
  }

  /** The message's whole thread, oldest first. */
  thread(messageId: number, opts?: CallOptions): Promise<ThreadAnswer> {
    return this.call("thread", { params: { id: messageId } }, opts);
  }

  /** Wait (up to `timeout` seconds) until the message is delivered, read or replied to (`until`). */
  waitForMessage(messageId: number, query: WaitMessageQuery = {}, opts?: CallOptions): Promise<WaitMessageAnswer> {
    return this.call("wait_message", { params: { id: messageId }, query }, opts);
  }

  /** Mark one message read for one agent. */
  markRead(messageId: number, agentId: string, opts?: CallOptions): Promise<ReadMessageAnswer> {
    return this.call("read_message", { params: { id: messageId }, body: { agentId } }, opts);
  }

  /** Claim claimable work: one agent wins, the others get RelayError 409 already_claimed. */
  claimMessage(messageId: number, body: ClaimMessageBody, opts?: CallOptions): Promise<ClaimMessageAnswer> {
    return this.call("claim_message", { params: { id: messageId }, body }, opts);
  }

  /** Give a claim back to the pool. */
  releaseMessage(messageId: number, body: ReleaseMessageBody, opts?: CallOptions): Promise<ReleaseMessageAnswer> {
    return this.call("release_message", { params: { id: messageId }, body }, opts);
  }

  /** A person approves a held message (for one guarded agent, or all it is held for). */
  approve(messageId: number, body: ApproveBody = {}, opts?: CallOptions): Promise<ApproveAnswer> {
    return this.call("approve", { params: { id: messageId }, body }, opts);
  }

  /** A person rejects a held message. */
  reject(messageId: number, body: RejectBody = {}, opts?: CallOptions): Promise<RejectAnswer> {
    return this.call("reject", { params: { id: messageId }, body }, opts);
  }

  // -- tasks -------------------------------------------------------------------------------------------------------

  /** Create a task (or count an occurrence of an active one with the same dedupeKey: `created: false`). */
  createTask(task: CreateTaskBody, opts?: CallOptions): Promise<CreateTaskAnswer> {
    return this.call("create_task", { body: task }, opts);
  }

  /** Tasks, newest first. */
  listTasks(query: ListTasksQuery = {}, opts?: CallOptions): Promise<ListTasksAnswer> {
    return this.call("list_tasks", { query }, opts);
  }

  /** A task with its events. */
  getTask(taskId: number, opts?: CallOptions): Promise<GetTaskAnswer> {
    return this.call("get_task", { params: { id: taskId } }, opts);
  }

  /** Claim a task (and its message): one agent wins, the others get RelayError 409 already_claimed. */
  claimTask(taskId: number, body: ClaimTaskBody, opts?: CallOptions): Promise<ClaimTaskAnswer> {
    return this.call("claim_task", { params: { id: taskId }, body }, opts);
  }

  /** Change a task's status, progress or result (its holder; without agentId, a person). */
  updateTaskStatus(taskId: number, body: TaskStatusBody, opts?: CallOptions): Promise<TaskStatusAnswer> {
    return this.call("task_status", { params: { id: taskId }, body }, opts);
  }

  /** A task's events, oldest first. */
  taskEvents(taskId: number, opts?: CallOptions): Promise<TaskEventsAnswer> {
    return this.call("task_events", { params: { id: taskId } }, opts);
  }

  /** An integration's event (a client made with the integration's token): fire or resolve a deduplicated task. */
  integrationEvent(event: IntegrationEventBody, opts?: CallOptions): Promise<IntegrationEventAnswer> {
    return this.call("integration_event", { body: event }, opts);
  }

  /** Callback deliveries to integrations. */
  callbacks(query: CallbacksQuery = {}, opts?: CallOptions): Promise<CallbacksAnswer> {
    return this.call("callbacks", { query }, opts);
  }

  // -- leases ------------------------------------------------------------------------------------------------------

  /** Lease paths (advisory): the lease, or RelayError 409 lease_conflict whose details.conflicts name the holders. */
  acquireLease(body: AcquireLeaseBody, opts?: CallOptions): Promise<AcquireLeaseAnswer> {
    return this.call("acquire_lease", { body }, opts);
  }

  /** Active leases; `path` keeps those that overlap a path or pattern. */
  listLeases(query: ListLeasesQuery = {}, opts?: CallOptions): Promise<ListLeasesAnswer> {
    return this.call("list_leases", { query }, opts);
  }

  /** Extend a lease (its holder). */
  renewLease(leaseId: number, body: RenewLeaseBody, opts?: CallOptions): Promise<RenewLeaseAnswer> {
    return this.call("renew_lease", { params: { id: leaseId }, body }, opts);
  }

  /** Release a lease: its holder (`agentId`), or without it a person. */
  releaseLease(leaseId: number, query: ReleaseLeaseQuery = {}, opts?: CallOptions): Promise<ReleaseLeaseAnswer> {
    return this.call("release_lease", { params: { id: leaseId }, query }, opts);
  }

  // -- search ------------------------------------------------------------------------------------------------------

  /** Messages and tasks by their words, best first, with snippets. */
  search(query: SearchQuery, opts?: CallOptions): Promise<SearchAnswer> {
    return this.call("search", { query }, opts);
  }

  // -- the event stream --------------------------------------------------------------------------------------------

  /**
   * The relay's events (GET /api/events, Server-Sent Events), as an async iterator. When the connection drops,
   * it reconnects with Last-Event-ID set to the last event seen, so that no event is lost or repeated. It ends
   * when `signal` aborts or the loop stops (break); an error answer (401, 403, 404 unknown_agent, ...) throws.
   */
  async *events(options: EventsOptions = {}): AsyncGenerator<RelayEvent, void, undefined> {
    const types = typeof options.types === "string" ? options.types : options.types?.join(",");
    const stream: StreamState = {
      url: this.url("events", {}, { agentId: options.agentId, types: types || undefined, since: options.since }),
      lastEventId: options.lastEventId === undefined ? undefined : String(options.lastEventId),
      retryMs: 2000,
    };
    const { signal, reconnect = true } = options;
    while (!signal?.aborted) {
      const outcome = yield* this.connect(stream, signal, reconnect);
      if (outcome === "end" || !reconnect) return;
      await sleep(options.retryMs ?? stream.retryMs, signal);
    }
  }

  /** One connection of events(): "again" when it dropped (or a passing failure kept it from opening), else "end". */
  private async *connect(stream: StreamState, signal: AbortSignal | undefined, reconnect: boolean): AsyncGenerator<RelayEvent, "again" | "end", undefined> {
    const connection = new AbortController();
    const stop = () => connection.abort();
    signal?.addEventListener("abort", stop, { once: true });
    try {
      const headers = this.headers({ Accept: "text/event-stream" });
      if (stream.lastEventId !== undefined) headers["Last-Event-ID"] = stream.lastEventId;
      let res: Response;
      try {
        res = await this.fetchImpl(stream.url, { method: "GET", headers, signal: connection.signal });
      } catch (err) {
        if (signal?.aborted) return "end";
        if (!reconnect) throw this.unreachable(err);
        return "again";
      }
      if (!res.ok) {
        const err = await this.failure(res);
        if (reconnect && (res.status >= 500 || res.status === 408)) return "again"; // the relay is busy or restarting
        throw err;
      }
      if (!res.body) throw new RelayError(res.status, "bad_response", `${stream.url} answered with no stream.`);
      const parser = new SseParser();
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        let chunk: ReadableStreamReadResult<Uint8Array>;
        try {
          chunk = await reader.read();
        } catch (err) {
          if (signal?.aborted) return "end";
          if (!reconnect) throw this.unreachable(err);
          return "again"; // the connection dropped: open it again after the last event seen
        }
        if (chunk.done) return "again";
        const blocks = parser.push(decoder.decode(chunk.value, { stream: true }));
        if (parser.retry !== undefined) stream.retryMs = parser.retry;
        for (const block of blocks) {
          stream.lastEventId = block.lastEventId;
          if (block.data === undefined) continue; // an id alone moves the cursor (the SSE rules) and is no event
          let data: unknown;
          try {
            data = JSON.parse(block.data);
          } catch (err) {
            throw new RelayError(res.status, "bad_response", `event ${block.lastEventId} carries data that is not JSON.`, {}, undefined, { cause: err });
          }
          yield { id: Number(block.lastEventId), event: block.event, data } as RelayEvent;
        }
      }
    } finally {
      signal?.removeEventListener("abort", stop);
      connection.abort(); // closes the connection, also when the loop over events stops early
    }
  }

  // -- the transport -----------------------------------------------------------------------------------------------

  private headers(extra: Record<string, string> = {}): Record<string, string> {
    const h: Record<string, string> = { Accept: "application/json" };
    if (this.token) h.Authorization = "Bearer " + this.token;
    if (this.adminToken) h["X-Agent-Relay-Admin-Token"] = this.adminToken;
    if (this.agentKey) h["X-Agent-Relay-Agent-Key"] = this.agentKey;
    return Object.assign(h, extra);
  }

  private url(op: OperationId, params: object, query: object): string {
    const values = params as Record<string, unknown>;
    const path = operations[op].path.replace(/\{([^}]+)\}/g, (_, name: string) => {
      if (values[name] === undefined || values[name] === null || values[name] === "") {
        throw new TypeError(`${op}: the path parameter ${name} is missing`);
      }
      return encodeURIComponent(String(values[name]));
    });
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v !== undefined && v !== null) q.append(k, String(v));
    }
    const qs = q.toString();
    return this.baseUrl + path + (qs ? "?" + qs : "");
  }

  /** One operation of the spec: its request built from the operation table, its answer or a RelayError. */
  private async call<Op extends OperationId>(op: Op, args: Call<Op>, opts: CallOptions = {}): Promise<Operations[Op]["answer"]> {
    const { method } = operations[op];
    const url = this.url(op, args.params || {}, args.query || {});
    const headers = this.headers();
    let body: string | undefined;
    if (args.body !== undefined || method === "POST" || method === "PATCH") {
      body = JSON.stringify(args.body ?? {});
      headers["Content-Type"] = "application/json";
    }
    let res: Response;
    try {
      res = await this.fetchImpl(url, { method, headers, body, signal: opts.signal });
    } catch (err) {
      if (opts.signal?.aborted) throw err;
      throw this.unreachable(err);
    }
    if (!res.ok) throw await this.failure(res);
    const text = await res.text();
    try {
      return JSON.parse(text) as Operations[Op]["answer"];
    } catch (err) {
      throw new RelayError(res.status, "bad_response", `${this.baseUrl} answered ${res.status} with something that is not JSON; ` +
        `is it an Agent Relay? ${text.slice(0, 200)}`, {}, undefined, { cause: err });
    }
  }

  private unreachable(err: unknown): RelayError {
    const cause = err as { cause?: { code?: string; message?: string }; message?: string };
    const reason = cause?.cause?.code || cause?.cause?.message || cause?.message || String(err);
    return new RelayError(0, "unreachable", `Cannot reach the relay at ${this.baseUrl} (${reason}). Is it running? ` +
      "Start it with `python3 agent_relay.py` (or `agent-relay`), or point the client's baseUrl at it.", {}, undefined, { cause: err });
  }

  private async failure(res: Response): Promise<RelayError> {
    const text = await res.text().catch(() => "");
    const after = res.headers.get("Retry-After");
    const retryAfter = after !== null && /^\d+$/.test(after.trim()) ? Number(after) : undefined;
    let envelope: unknown;
    try {
      envelope = JSON.parse(text);
    } catch {
      envelope = undefined;
    }
    const error = (envelope as Partial<ErrorEnvelope> | undefined)?.error;
    if (error && typeof error === "object" && typeof error.code === "string") {
      const { code, message, ...details } = error;
      return new RelayError(res.status, code, message || code, details, retryAfter);
    }
    return new RelayError(res.status, `http_${res.status}`, `${this.baseUrl} answered ${res.status}: ${text.trim().slice(0, 200) || res.statusText}`,
      {}, retryAfter);
  }
}

/**
 * Every operation of the relay's spec and the RelayClient method that calls it, or why the client has none.
 * The compiler holds the table to the spec's operations (src/types.ts), and a test holds it to a live relay's.
 */
export const operationMethods = {
  health: "health",
  stats: "stats",
  spec: "spec",
  cursor: "cursor",
  register: "register",
  list_agents: "listAgents",
  get_agent: "getAgent",
  patch_agent: "patchAgent",
  delete_agent: "endSession",
  heartbeat: "heartbeat",
  inbox: "inbox",
  read_upto: "readUpTo",
  send: "send",
  history: "history",
  get_message: "getMessage",
  thread: "thread",
  wait_message: "waitForMessage",
  read_message: "markRead",
  claim_message: "claimMessage",
  release_message: "releaseMessage",
  approve: "approve",
  reject: "reject",
  create_task: "createTask",
  list_tasks: "listTasks",
  get_task: "getTask",
  claim_task: "claimTask",
  task_status: "updateTaskStatus",
  task_events: "taskEvents",
  integration_event: "integrationEvent",
  callbacks: "callbacks",
  acquire_lease: "acquireLease",
  list_leases: "listLeases",
  renew_lease: "renewLease",
  release_lease: "releaseLease",
  search: "search",
  events: "events",
  mcp_post: { excluded: "MCP over Streamable HTTP is a JSON-RPC protocol of its own: use an MCP client (the relay serves it at /api/mcp)" },
  mcp_get: { excluded: "MCP over Streamable HTTP: the session's stream belongs to an MCP client" },
  mcp_delete: { excluded: "MCP over Streamable HTTP: ending a session belongs to an MCP client" },
} as const satisfies { [Op in OperationId]: RelayClientMethod | { excluded: string } };

// -- Server-Sent Events, by the rules of the HTML standard -------------------------------------------------------------

interface SseBlock {
  /** The last event id after this block (an `id:` line sets it, for this block and the ones after). */
  lastEventId: string;
  event: string;
  /** The data lines, joined with \n; undefined when the block had none (no event is dispatched). */
  data: string | undefined;
}

/** Turns the text of an event stream, in chunks as they come, into its blocks. */
export class SseParser {
  /** The reconnection time the stream asked for (`retry:`), in milliseconds. */
  retry: number | undefined;
  private lastEventId = "";
  private buffer = "";
  private data: string[] = [];
  private event = "";
  private sawField = false;
  private afterCR = false;

  push(chunk: string): SseBlock[] {
    const out: SseBlock[] = [];
    this.buffer += chunk;
    let start = 0;
    if (this.afterCR && this.buffer[0] === "\n") start = 1; // the \n of a \r\n cut between two chunks
    this.afterCR = false;
    for (;;) {
      let end = start;
      while (end < this.buffer.length && this.buffer[end] !== "\n" && this.buffer[end] !== "\r") end++;
      if (end >= this.buffer.length) break;
      const line = this.buffer.slice(start, end);
      if (this.buffer[end] === "\r") {
        if (end + 1 >= this.buffer.length) this.afterCR = true;
        start = end + (this.buffer[end + 1] === "\n" ? 2 : 1);
      } else {
        start = end + 1;
      }
      this.line(line, out);
    }
    this.buffer = this.buffer.slice(start);
    return out;
  }

  private line(line: string, out: SseBlock[]): void {
    if (line === "") {
      if (this.sawField) {
        out.push({ lastEventId: this.lastEventId, event: this.event || "message", data: this.data.length ? this.data.join("\n") : undefined });
      }
      this.data = [];
      this.event = "";
      this.sawField = false;
      return;
    }
    if (line[0] === ":") return; // a comment (: connected, : ping)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") {
      this.data.push(value);
      this.sawField = true;
    } else if (field === "event") {
      this.event = value;
    } else if (field === "id") {
      if (!value.includes("\0")) {
        this.lastEventId = value;
        this.sawField = true;
      }
    } else if (field === "retry") {
      if (/^\d+$/.test(value)) this.retry = Number(value);
    }
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}
