// Agent Relay's HTTP API as TypeScript types, generated from the relay's OpenAPI document (GET /api/spec)
// by scripts/gen-types.mjs. Do not edit: run `npm run gen` after the relay's routes change; the test suite
// fails while this file and a live relay's spec differ.

// -- components/schemas ---------------------------------------------------------------------------------
/** An agent's card. */
export interface Agent {
  id: string;
  name: string;
  label: string | null;
  machine: string | null;
  rig: string | null;
  project: string | null;
  tags: string[];
  capabilities: string[];
  channels: string[];
  status: "online" | "idle" | "busy" | "offline";
  ready: boolean;
  approvalMode: "open" | "guarded" | "read-only";
  instanceId: string | null;
  epoch: number;
  meta: Record<string, unknown>;
  /** It holds an open long-poll, stream or MCP session now. */
  listening: boolean;
  /** Epoch milliseconds. */
  lastSeen: number;
  /** Epoch milliseconds. */
  createdAt: number;
  /** A built-in agent (human, system). */
  system: boolean;
  /** Only in the answer to the registration that made it (agent keys on): keep it, it is not shown again. */
  agentKey?: string;
}

export interface Message {
  id: number;
  from: string;
  to: string;
  subject: string | null;
  body: string;
  kind: string;
  channel: string | null;
  claimable: boolean;
  claimedBy: string | null;
  /** Epoch milliseconds. */
  claimedAt: number | null;
  replyTo: number | null;
  threadId: number;
  idempotencyKey: string | null;
  payload: Record<string, unknown>;
  meta: Record<string, unknown>;
  /** Epoch milliseconds. */
  createdAt: number;
  /** In an inbox only: whether this agent marked it read. */
  read?: boolean;
  /** In history with held=true only: the agents it waits for a person's approval for. */
  heldFor?: string[];
}

export interface Receipt {
  agentId: string;
  state: "held" | "approved" | "rejected" | "delivered" | "read";
  /** Epoch milliseconds. */
  deliveredAt: number | null;
  /** Epoch milliseconds. */
  readAt: number | null;
}

export interface Task {
  id: number;
  title: string;
  body: string | null;
  status: "open" | "claimed" | "blocked" | "done" | "failed" | "canceled";
  target: string;
  channel: string | null;
  severity: string | null;
  dedupeKey: string | null;
  /** api, agent:<id> or integration:<name>: a dedupeKey is scoped to it. */
  source: string;
  externalUrl: string | null;
  metadata: Record<string, unknown>;
  claimedBy: string | null;
  /** Epoch milliseconds. */
  claimedAt: number | null;
  /** What the last status update reported (any JSON), or null. */
  progress: unknown;
  /** The outcome reported (any JSON), or null. */
  result: unknown;
  occurrenceCount: number;
  /** Epoch milliseconds. */
  firstSeenAt: number;
  /** Epoch milliseconds. */
  lastSeenAt: number;
  /** Epoch milliseconds. */
  createdAt: number;
  /** Epoch milliseconds. */
  updatedAt: number;
  messageId: number | null;
}

export interface TaskEvent {
  id: number;
  taskId: number;
  type: "created" | "occurrence" | "claimed" | "released" | "status" | "progress" | "resolved";
  actor: string;
  data: Record<string, unknown>;
  /** Epoch milliseconds. */
  createdAt: number;
}

export interface Callback {
  id: number;
  taskId: number;
  integration: string;
  event: "task.created" | "task.claimed" | "task.status";
  status: "pending" | "delivered" | "failed";
  attempts: number;
  /** Epoch milliseconds. */
  nextAttemptAt: number | null;
  lastError: string | null;
  /** Epoch milliseconds. */
  createdAt: number;
  /** Epoch milliseconds. */
  deliveredAt: number | null;
}

/** An advisory lease: an agent says it is editing these paths of a working copy (its scope). */
export interface Lease {
  id: number;
  agentId: string;
  scope: string;
  paths: string[];
  reason: string | null;
  exclusive: boolean;
  /** Epoch milliseconds. */
  createdAt: number;
  /** Epoch milliseconds. */
  expiresAt: number;
  /** Epoch milliseconds. */
  releasedAt: number | null;
}

/** Every error, in the relay's envelope. */
export interface ErrorEnvelope {
  error: {
    code: string;
    /** A sentence a person can act on. */
    message: string;
    /** invalid_field: the field at fault. */
    field?: string;
    /** already_claimed, not_owner: who holds the work. */
    claimedBy?: string | null;
    /** superseded: the agent's current epoch. */
    epoch?: number;
    /** not_owner of a lease: its holder. */
    heldBy?: string;
    /** lease_conflict: each lease in the way, the holder's pattern and the caller's. */
    conflicts?: {
      leaseId: number;
      agentId: string;
      path: string;
      requested: string;
      /** Epoch milliseconds. */
      expiresAt: number;
    }[];
  };
}

/** An agent registered for the first time. */
export interface EventAgentRegistered {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "agent.registered";
  data: {
    agent: Agent;
  };
}

/** An agent's card changed: it registered again, was edited, or its status moved. */
export interface EventAgentUpdated {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "agent.updated";
  data: {
    agent: Agent;
  };
}

/** An agent's session ended, or it was silent for STALE_TTL_MS; its claims went back. */
export interface EventAgentOffline {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "agent.offline";
  data: {
    agent: Agent;
  };
}

/** An agent was purged, or pruned after OFFLINE_PRUNE_MS offline. */
export interface EventAgentRemoved {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "agent.removed";
  data: {
    agent: Agent;
  };
}

/** A message was sent; to the agents it reaches (not those it is held for) and its sender. */
export interface EventMessageCreated {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "message.created";
  data: {
    message: Message;
  };
}

/** A message waits for a person's approval before it reaches the guarded agent agentId; to its sender. */
export interface EventMessageHeld {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "message.held";
  data: {
    message: Message;
    agentId: string;
  };
}

/** A person approved a held message for agentId. */
export interface EventMessageApproved {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "message.approved";
  data: {
    message: Message;
    agentId: string;
  };
}

/** A person rejected a held message for agentId; to its sender only. */
export interface EventMessageRejected {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "message.rejected";
  data: {
    message: Message;
    agentId: string;
  };
}

/** agentId claimed claimable work. */
export interface EventMessageClaimed {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "message.claimed";
  data: {
    message: Message;
    agentId: string;
  };
}

/** agentId gave claimed work back to the pool. */
export interface EventMessageReleased {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "message.released";
  data: {
    message: Message;
    agentId: string;
  };
}

/** agentId read a message (a read up to an id is one of these per message it marks); to its sender. */
export interface EventMessageRead {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "message.read";
  data: {
    messageId: number;
    agentId: string;
  };
}

/** The message reached agentId for the first time (its inbox, or its narrowed stream); to its sender. */
export interface EventMessageDelivered {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "message.delivered";
  data: {
    messageId: number;
    agentId: string;
    /** Epoch milliseconds. */
    deliveredAt: number;
  };
}

/** agentId replied to the message (replyId) where its sender may see it; to the sender and agentId. */
export interface EventMessageReplied {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "message.replied";
  data: {
    messageId: number;
    agentId: string;
    replyId: number;
  };
}

/** A task was created. */
export interface EventTaskCreated {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "task.created";
  data: {
    task: Task;
  };
}

/** A task changed: claimed, released, its status, progress or result, an occurrence. */
export interface EventTaskUpdated {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "task.updated";
  data: {
    task: Task;
  };
}

/** An integration's callback was delivered. */
export interface EventCallbackDelivered {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "callback.delivered";
  data: {
    callback: Callback;
  };
}

/** An integration's callback failed for good. */
export interface EventCallbackFailed {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "callback.failed";
  data: {
    callback: Callback;
  };
}

/** An agent took a lease; to it, the agents working in the scope and those holding leases there. */
export interface EventLeaseAcquired {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "lease.acquired";
  data: {
    lease: Lease;
  };
}

/** A lease ended: released, its time up, or its holder offline or removed. */
export interface EventLeaseReleased {
  /** The event's id: the stream's cursor (Last-Event-ID). */
  id: number;
  event: "lease.released";
  data: {
    lease: Lease;
    cause: "released" | "expired" | "offline" | "removed";
  };
}

/** One event of GET /api/events, as the fields of its SSE block (id, event, data). */
export type RelayEvent = EventAgentRegistered | EventAgentUpdated | EventAgentOffline | EventAgentRemoved | EventMessageCreated | EventMessageHeld | EventMessageApproved | EventMessageRejected | EventMessageClaimed | EventMessageReleased | EventMessageRead | EventMessageDelivered | EventMessageReplied | EventTaskCreated | EventTaskUpdated | EventCallbackDelivered | EventCallbackFailed | EventLeaseAcquired | EventLeaseReleased;

/** A JSON-RPC 2.0 message from the client: a request, a notification or a response (MCP, Streamable HTTP). */
export interface JsonRpcRequest {
  jsonrpc: "2.0";
  id?: number | string;
  method?: string;
  params?: Record<string, unknown>;
  result?: unknown;
  error?: Record<string, unknown>;
  [key: string]: unknown;
}

/** A JSON-RPC 2.0 answer. */
export interface JsonRpcResponse {
  jsonrpc: "2.0";
  id: number | string | null;
  result?: unknown;
  error?: {
    code: number;
    message: string;
    data?: unknown;
  };
}

/** The type of each event of the stream (GET /api/events). */
export type EventType = "agent.registered" | "agent.updated" | "agent.offline" | "agent.removed" | "message.created" | "message.held" | "message.approved" | "message.rejected" | "message.claimed" | "message.released" | "message.read" | "message.delivered" | "message.replied" | "task.created" | "task.updated" | "callback.delivered" | "callback.failed" | "lease.acquired" | "lease.released";

/** The event of each type. */
export interface EventOfType {
  "agent.registered": EventAgentRegistered;
  "agent.updated": EventAgentUpdated;
  "agent.offline": EventAgentOffline;
  "agent.removed": EventAgentRemoved;
  "message.created": EventMessageCreated;
  "message.held": EventMessageHeld;
  "message.approved": EventMessageApproved;
  "message.rejected": EventMessageRejected;
  "message.claimed": EventMessageClaimed;
  "message.released": EventMessageReleased;
  "message.read": EventMessageRead;
  "message.delivered": EventMessageDelivered;
  "message.replied": EventMessageReplied;
  "task.created": EventTaskCreated;
  "task.updated": EventTaskUpdated;
  "callback.delivered": EventCallbackDelivered;
  "callback.failed": EventCallbackFailed;
  "lease.acquired": EventLeaseAcquired;
  "lease.released": EventLeaseReleased;
}

// -- operations -----------------------------------------------------------------------------------------
/** The answer of GET /api/health: Liveness and version; needs no token. */
export interface HealthAnswer {
  ok: true;
  version: string;
  uptimeMs: number;
  /** The search engine: fts5, or like. */
  search: "fts5" | "like";
}

/** The answer of GET /api/stats: Counts of agents, messages, tasks, callbacks, long-polls and streams. */
export interface StatsAnswer {
  agents: {
    total: number;
    online: number;
    idle: number;
    busy: number;
    offline: number;
    listening: number;
  };
  messages: {
    total: number;
    last24h: number;
    held: number;
  };
  tasks: {
    open: number;
    claimed: number;
    blocked: number;
    done: number;
    failed: number;
    canceled: number;
  };
  callbacks: {
    pending: number;
    failed: number;
  };
  leases: {
    active: number;
  };
  longPolls: number;
  streams: number;
}

/** The answer of GET /api/spec: This OpenAPI 3 document. */
export type SpecAnswer = Record<string, unknown>;

/** The answer of GET /api/cursor: The newest message id, for a client that wants to skip history. */
export interface CursorAnswer {
  cursor: number;
}

/** The body of POST /api/agents: Register or update an agent (201 created, 200 updated); body is the card. */
export type RegisterBody = {
  /** Without it, the id is derived from machine, rig, project and session (or instanceId). */
  id?: string | null;
  /** A session id to derive the id from. */
  session?: string | null;
  name?: string | null;
  /** label:X reaches it. */
  label?: string | null;
  machine?: string | null;
  rig?: string | null;
  project?: string | null;
  /** tag:X reaches it. */
  tags?: string[] | string | null;
  /** cap:X reaches it. */
  capabilities?: string[] | string | null;
  /** The channels of fan-out messages it sees (default ["all"]). */
  channels?: string[] | string | null;
  /** online, idle or busy (offline is the relay's to set). */
  status?: "online" | "idle" | "busy" | null;
  ready?: boolean | null;
  /** open, guarded (another agent's messages wait for a person) or read-only. */
  approvalMode?: "open" | "guarded" | "read-only" | null;
  /** A new one increments the epoch. */
  instanceId?: string | null;
  /** The client's own data; meta.approvalMode is taken as approvalMode when that is not sent. */
  meta?: {
    /** open, guarded (another agent's messages wait for a person) or read-only. */
    approvalMode?: "open" | "guarded" | "read-only" | null;
    [key: string]: unknown;
  } | null;
} & ({ id: string } | { session: string } | { instanceId: string });

/** The answer of POST /api/agents: Register or update an agent (201 created, 200 updated); body is the card. */
export type RegisterAnswer = Agent;

/** The query parameters of GET /api/agents: Agents, newest lastSeen first. */
export interface ListAgentsQuery {
  status?: "online" | "idle" | "busy" | "offline" | "";
  tag?: string;
  cap?: string;
  label?: string;
}

/** The answer of GET /api/agents: Agents, newest lastSeen first. */
export interface ListAgentsAnswer {
  agents: Agent[];
}

/** The path parameters of GET /api/agents/{id}: One agent's card. */
export interface GetAgentParams {
  /** The agent's id (percent-encoded). */
  id: string;
}

/** The answer of GET /api/agents/{id}: One agent's card. */
export type GetAgentAnswer = Agent;

/** The path parameters of PATCH /api/agents/{id}: Change label, tags, capabilities, channels, status, ready, approvalMode, meta. */
export interface PatchAgentParams {
  /** The agent's id (percent-encoded). */
  id: string;
}

/** The body of PATCH /api/agents/{id}: Change label, tags, capabilities, channels, status, ready, approvalMode, meta. */
export interface PatchAgentBody {
  /** null clears it. */
  label?: string | null;
  /** null clears them. */
  tags?: string[] | string | null;
  /** null clears them. */
  capabilities?: string[] | string | null;
  channels?: string[] | string;
  /** online, idle or busy (offline is the relay's to set). */
  status?: "online" | "idle" | "busy" | null;
  ready?: boolean | null;
  /** open, guarded (another agent's messages wait for a person) or read-only. */
  approvalMode?: "open" | "guarded" | "read-only" | null;
  /** Merged into the card's meta; a key set to null is removed. */
  meta?: {
    /** open, guarded (another agent's messages wait for a person) or read-only. */
    approvalMode?: "open" | "guarded" | "read-only" | null;
    [key: string]: unknown;
  } | null;
  /** The agent's running instance; when it is not the registered one: 409 superseded. */
  instanceId?: string | null;
  /** The agent's epoch; when it is not the current one: 409 superseded. */
  epoch?: number | null;
}

/** The answer of PATCH /api/agents/{id}: Change label, tags, capabilities, channels, status, ready, approvalMode, meta. */
export type PatchAgentAnswer = Agent;

/** The path parameters of DELETE /api/agents/{id}: Session end: offline, claims released; ?purge=true deletes it. */
export interface DeleteAgentParams {
  /** The agent's id (percent-encoded). */
  id: string;
}

/** The query parameters of DELETE /api/agents/{id}: Session end: offline, claims released; ?purge=true deletes it. */
export interface DeleteAgentQuery {
  /**
   * Delete it instead. true or false (also 1, 0, yes, no).
   * @default false
   */
  purge?: boolean;
}

/** The answer of DELETE /api/agents/{id}: Session end: offline, claims released; ?purge=true deletes it. */
export type DeleteAgentAnswer = Agent;

/** The path parameters of POST /api/agents/{id}/heartbeat: Keep an agent online (fenced by instanceId/epoch). */
export interface HeartbeatParams {
  /** The agent's id (percent-encoded). */
  id: string;
}

/** The body of POST /api/agents/{id}/heartbeat: Keep an agent online (fenced by instanceId/epoch). */
export interface HeartbeatBody {
  /** The agent's running instance; when it is not the registered one: 409 superseded. */
  instanceId?: string | null;
  /** The agent's epoch; when it is not the current one: 409 superseded. */
  epoch?: number | null;
  /** online, idle or busy (offline is the relay's to set). */
  status?: "online" | "idle" | "busy" | null;
}

/** The answer of POST /api/agents/{id}/heartbeat: Keep an agent online (fenced by instanceId/epoch). */
export interface HeartbeatAnswer {
  ok: true;
  agent: Agent;
}

/** The path parameters of GET /api/agents/{id}/inbox: Messages visible to the agent after `since` (or its cursor); `wait` long-polls. */
export interface InboxParams {
  /** The agent's id (percent-encoded). */
  id: string;
}

/** The query parameters of GET /api/agents/{id}/inbox: Messages visible to the agent after `since` (or its cursor); `wait` long-polls. */
export interface InboxQuery {
  /** Messages after this id; without it, the cursor the relay kept for the agent. */
  since?: number;
  /**
   * Seconds to wait for a message when there is none.
   * @default 0
   */
  wait?: number;
  /**
   * At most this many.
   * @default 100
   */
  limit?: number;
  /**
   * Only messages it has not marked read. true or false (also 1, 0, yes, no).
   * @default false
   */
  unread?: boolean;
}

/** The answer of GET /api/agents/{id}/inbox: Messages visible to the agent after `since` (or its cursor); `wait` long-polls. */
export interface InboxAnswer {
  messages: Message[];
  cursor: number;
  more: boolean;
}

/** The path parameters of POST /api/agents/{id}/read: Mark every visible message up to `upTo` read. */
export interface ReadUptoParams {
  /** The agent's id (percent-encoded). */
  id: string;
}

/** The body of POST /api/agents/{id}/read: Mark every visible message up to `upTo` read. */
export interface ReadUptoBody {
  upTo: number;
}

/** The answer of POST /api/agents/{id}/read: Mark every visible message up to `upTo` read. */
export interface ReadUptoAnswer {
  count: number;
}

/** The body of POST /api/messages: Send a message to an agent, tag:X, cap:X, label:X or broadcast. */
export interface SendBody {
  /** The sender: a registered agent, or human or system. */
  from: string;
  to: string;
  /** The message's text. */
  body: string;
  subject?: string | null;
  /** @default "chat" */
  kind?: string | null;
  /** The channel of a fan-out message. */
  channel?: string | null;
  /**
   * Work that exactly one agent claims.
   * @default false
   */
  claimable?: boolean | null;
  /** The message it answers (it joins that thread). */
  replyTo?: number | null;
  /** A repeat with the same key from the same sender stores nothing new. */
  idempotencyKey?: string | null;
  payload?: Record<string, unknown> | null;
  meta?: Record<string, unknown> | null;
}

/** The answer of POST /api/messages: Send a message to an agent, tag:X, cap:X, label:X or broadcast. */
export interface SendAnswer {
  message: Message;
  /** The agents the target matches now. */
  matched: string[];
  /** How many of them are not offline. */
  online: number;
  /** The matched agents it is held for (a person approves), sorted. */
  held: string[];
  /** How many matched agents hold an open long-poll or stream now. */
  listening: number;
  /** A repeated (from, idempotencyKey): the first message, nothing stored. */
  duplicate?: true;
}

/** The query parameters of GET /api/messages: History, newest first. */
export interface HistoryQuery {
  /** Sent by or visible to this agent. */
  agent?: string;
  from?: string;
  to?: string;
  channel?: string;
  /** Only ids below this. */
  before?: number;
  /** @default 50 */
  limit?: number;
  /** Text in the subject or body. */
  q?: string;
  /**
   * Only messages held for a person's approval, with heldFor. true or false (also 1, 0, yes, no).
   * @default false
   */
  held?: boolean;
}

/** The answer of GET /api/messages: History, newest first. */
export interface HistoryAnswer {
  messages: Message[];
  more: boolean;
}

/** The path parameters of GET /api/messages/{id}: A message with its receipts. */
export interface GetMessageParams {
  /** The message's id. */
  id: number;
}

/** The answer of GET /api/messages/{id}: A message with its receipts. */
export interface GetMessageAnswer {
  message: Message;
  receipts: Receipt[];
}

/** The path parameters of GET /api/messages/{id}/thread: The message's whole thread, oldest first. */
export interface ThreadParams {
  /** The message's id. */
  id: number;
}

/** The answer of GET /api/messages/{id}/thread: The message's whole thread, oldest first. */
export interface ThreadAnswer {
  threadId: number;
  messages: Message[];
}

/** The path parameters of GET /api/messages/{id}/wait: Long-poll until the message is delivered, read or replied to (one recipient, or all=1 every one), or time is up. */
export interface WaitMessageParams {
  /** The message's id. */
  id: number;
}

/** The query parameters of GET /api/messages/{id}/wait: Long-poll until the message is delivered, read or replied to (one recipient, or all=1 every one), or time is up. */
export interface WaitMessageQuery {
  /**
   * What to wait for.
   * @default "delivered"
   */
  until?: "delivered" | "read" | "replied" | "";
  /**
   * Seconds to wait; 0 looks once.
   * @default 0
   */
  timeout?: number;
  /**
   * Wait for every recipient, not the first. true or false (also 1, 0, yes, no).
   * @default false
   */
  all?: boolean;
}

/** The answer of GET /api/messages/{id}/wait: Long-poll until the message is delivered, read or replied to (one recipient, or all=1 every one), or time is up. */
export interface WaitMessageAnswer {
  /** The message got there (for one recipient, or with all=1 every one). */
  reached: boolean;
  /** false: no recipient is left that could (rejected or removed). */
  reachable: boolean;
  message: Message;
  receipts: Receipt[];
  /** Replies to it that its sender may see. */
  replies: Message[];
}

/** The path parameters of POST /api/messages/{id}/read: Mark a message read for one agent. */
export interface ReadMessageParams {
  /** The message's id. */
  id: number;
}

/** The body of POST /api/messages/{id}/read: Mark a message read for one agent. */
export interface ReadMessageBody {
  /** The agent that acts. */
  agentId: string;
}

/** The answer of POST /api/messages/{id}/read: Mark a message read for one agent. */
export interface ReadMessageAnswer {
  ok: true;
  messageId: number;
  agentId: string;
  /** Epoch milliseconds. */
  readAt: number;
}

/** The path parameters of POST /api/messages/{id}/claim: Claim claimable work: one winner, 409 for the rest. */
export interface ClaimMessageParams {
  /** The message's id. */
  id: number;
}

/** The body of POST /api/messages/{id}/claim: Claim claimable work: one winner, 409 for the rest. */
export interface ClaimMessageBody {
  /** The agent that acts. */
  agentId: string;
  /** The agent's running instance; when it is not the registered one: 409 superseded. */
  instanceId?: string | null;
  /** The agent's epoch; when it is not the current one: 409 superseded. */
  epoch?: number | null;
}

/** The answer of POST /api/messages/{id}/claim: Claim claimable work: one winner, 409 for the rest. */
export interface ClaimMessageAnswer {
  message: Message;
}

/** The path parameters of POST /api/messages/{id}/release: Give a claim back to the pool. */
export interface ReleaseMessageParams {
  /** The message's id. */
  id: number;
}

/** The body of POST /api/messages/{id}/release: Give a claim back to the pool. */
export interface ReleaseMessageBody {
  /** The agent that acts. */
  agentId: string;
}

/** The answer of POST /api/messages/{id}/release: Give a claim back to the pool. */
export interface ReleaseMessageAnswer {
  message: Message;
}

/** The path parameters of POST /api/messages/{id}/approve: A person approves a held message. */
export interface ApproveParams {
  /** The message's id. */
  id: number;
}

/** The body of POST /api/messages/{id}/approve: A person approves a held message. */
export interface ApproveBody {
  /** The guarded recipient; without it, every recipient it is held for. */
  agentId?: string | null;
}

/** The answer of POST /api/messages/{id}/approve: A person approves a held message. */
export interface ApproveAnswer {
  message: Message;
  receipts: Receipt[];
}

/** The path parameters of POST /api/messages/{id}/reject: A person rejects a held message. */
export interface RejectParams {
  /** The message's id. */
  id: number;
}

/** The body of POST /api/messages/{id}/reject: A person rejects a held message. */
export interface RejectBody {
  /** The guarded recipient; without it, every recipient it is held for. */
  agentId?: string | null;
}

/** The answer of POST /api/messages/{id}/reject: A person rejects a held message. */
export interface RejectAnswer {
  message: Message;
  receipts: Receipt[];
}

/** The body of POST /api/tasks: Create a task (or count an occurrence of an active one with the same dedupeKey). */
export interface CreateTaskBody {
  title: string;
  target: string;
  body?: string | null;
  /** The channel of a fan-out message. */
  channel?: string | null;
  severity?: string | null;
  /** While a task with this key (from the same source) is active: an occurrence. */
  dedupeKey?: string | null;
  externalUrl?: string | null;
  metadata?: Record<string, unknown> | null;
  /** The agent that hands out the work; without it, a person (the admin token with agent keys on). */
  from?: string | null;
}

/** The answer of POST /api/tasks: Create a task (or count an occurrence of an active one with the same dedupeKey). */
export interface CreateTaskAnswer {
  task: Task;
  created: boolean;
}

/** The query parameters of GET /api/tasks: Tasks, newest first. */
export interface ListTasksQuery {
  status?: "open" | "claimed" | "blocked" | "done" | "failed" | "canceled" | "";
  target?: string;
  channel?: string;
  claimedBy?: string;
  /**
   * At most this many.
   * @default 100
   */
  limit?: number;
}

/** The answer of GET /api/tasks: Tasks, newest first. */
export interface ListTasksAnswer {
  tasks: Task[];
}

/** The path parameters of GET /api/tasks/{id}: A task with its events. */
export interface GetTaskParams {
  /** The task's id. */
  id: number;
}

/** The answer of GET /api/tasks/{id}: A task with its events. */
export interface GetTaskAnswer {
  task: Task;
  events: TaskEvent[];
}

/** The path parameters of POST /api/tasks/{id}/claim: Claim a task: one winner, 409 for the rest. */
export interface ClaimTaskParams {
  /** The task's id. */
  id: number;
}

/** The body of POST /api/tasks/{id}/claim: Claim a task: one winner, 409 for the rest. */
export interface ClaimTaskBody {
  /** The agent that acts. */
  agentId: string;
  /** The agent's running instance; when it is not the registered one: 409 superseded. */
  instanceId?: string | null;
  /** The agent's epoch; when it is not the current one: 409 superseded. */
  epoch?: number | null;
}

/** The answer of POST /api/tasks/{id}/claim: Claim a task: one winner, 409 for the rest. */
export interface ClaimTaskAnswer {
  task: Task;
}

/** The path parameters of PATCH /api/tasks/{id}/status: Change a task's status, progress or result. */
export interface TaskStatusParams {
  /** The task's id. */
  id: number;
}

/** The body of PATCH /api/tasks/{id}/status: Change a task's status, progress or result. */
export type TaskStatusBody = {
  /** The agent that reports; without it, a person. */
  agentId?: string | null;
  /** open releases a claim; done, failed and canceled are final. */
  status?: "open" | "claimed" | "blocked" | "done" | "failed" | "canceled" | null;
  /** Any JSON: what has been done so far. */
  progress?: unknown;
  /** Any JSON: the outcome. */
  result?: unknown;
} & ({ status: string } | { progress: unknown } | { result: unknown });

/** The answer of PATCH /api/tasks/{id}/status: Change a task's status, progress or result. */
export interface TaskStatusAnswer {
  task: Task;
}

/** The path parameters of GET /api/tasks/{id}/events: A task's events, oldest first. */
export interface TaskEventsParams {
  /** The task's id. */
  id: number;
}

/** The answer of GET /api/tasks/{id}/events: A task's events, oldest first. */
export interface TaskEventsAnswer {
  events: TaskEvent[];
}

/** The body of POST /api/integrations/events: Integration ingress (integration token). */
export type IntegrationEventBody = {
  dedupeKey: string;
  /** Required unless status is resolved. */
  title?: string | null;
  body?: string | null;
  /** One of the integration's targets (default its first). */
  target?: string | null;
  /** One of the integration's channels (default its first). */
  channel?: string | null;
  /** @default "firing" */
  status?: "firing" | "resolved" | null;
  severity?: string | null;
  externalUrl?: string | null;
  metadata?: Record<string, unknown> | null;
} & ({ status: "resolved" } | { title: string });

/** The answer of POST /api/integrations/events: Integration ingress (integration token). */
export type IntegrationEventAnswer = {
  task: Task | null;
  created?: boolean;
} | {
  task: Task;
  created: boolean;
};

/** The query parameters of GET /api/callbacks: Callback deliveries. */
export interface CallbacksQuery {
  taskId?: number;
  status?: "pending" | "delivered" | "failed" | "";
  /**
   * At most this many.
   * @default 100
   */
  limit?: number;
}

/** The answer of GET /api/callbacks: Callback deliveries. */
export interface CallbacksAnswer {
  callbacks: Callback[];
}

/** The body of POST /api/leases: Lease paths (advisory): 201, or 409 lease_conflict naming the holders. */
export interface AcquireLeaseBody {
  /** The agent that acts. */
  agentId: string;
  /** Repository-relative POSIX paths or patterns (a lone string is one): an exact path, a directory (src/api/ or src/api/**) or a glob (* and ? within a segment, ** across). */
  paths: string[] | string;
  /** The working copy the paths belong to (default: the agent's project, else default). */
  scope?: string | null;
  reason?: string | null;
  /** @default 1800000 */
  ttlMs?: number | null;
  /**
   * false: shared; two shared leases do not conflict.
   * @default true
   */
  exclusive?: boolean | null;
}

/** The answer of POST /api/leases: Lease paths (advisory): 201, or 409 lease_conflict naming the holders. */
export interface AcquireLeaseAnswer {
  lease: Lease;
}

/** The query parameters of GET /api/leases: Active leases; `path` keeps those that overlap a path or pattern. */
export interface ListLeasesQuery {
  agentId?: string;
  scope?: string;
  /** Only the leases that overlap this path or pattern. */
  path?: string;
}

/** The answer of GET /api/leases: Active leases; `path` keeps those that overlap a path or pattern. */
export interface ListLeasesAnswer {
  leases: Lease[];
}

/** The path parameters of POST /api/leases/{id}/renew: Extend a lease (its holder). */
export interface RenewLeaseParams {
  /** The lease's id. */
  id: number;
}

/** The body of POST /api/leases/{id}/renew: Extend a lease (its holder). */
export interface RenewLeaseBody {
  /** The agent that acts. */
  agentId: string;
  /** For how long from now (default: as taken). */
  ttlMs?: number | null;
}

/** The answer of POST /api/leases/{id}/renew: Extend a lease (its holder). */
export interface RenewLeaseAnswer {
  lease: Lease;
}

/** The path parameters of DELETE /api/leases/{id}: Release a lease: its holder (?agentId=) or a person. */
export interface ReleaseLeaseParams {
  /** The lease's id. */
  id: number;
}

/** The query parameters of DELETE /api/leases/{id}: Release a lease: its holder (?agentId=) or a person. */
export interface ReleaseLeaseQuery {
  /** The holder (also accepted as agentId in a body). */
  agentId?: string;
}

/** The body of DELETE /api/leases/{id}: Release a lease: its holder (?agentId=) or a person. */
export interface ReleaseLeaseBody {
  agentId?: string | null;
}

/** The answer of DELETE /api/leases/{id}: Release a lease: its holder (?agentId=) or a person. */
export interface ReleaseLeaseAnswer {
  lease: Lease;
}

/** The query parameters of GET /api/search: Search message subjects and bodies and task titles and bodies, best first. */
export interface SearchQuery {
  /** Words (all must match), "a phrase", prefix*. */
  q: string;
  /** Sent by or visible to this agent. */
  agent?: string;
  from?: string;
  to?: string;
  channel?: string;
  /** Created at or after (ms since the epoch). */
  since?: number;
  /** Created at or before (ms since the epoch). */
  until?: number;
  /** @default 20 */
  limit?: number;
}

/** The answer of GET /api/search: Search message subjects and bodies and task titles and bodies, best first. */
export interface SearchAnswer {
  results: ({
    type: "message";
    message: Message;
    snippet: string;
    rank: number;
  } | {
    type: "task";
    task: Task;
    snippet: string;
    rank: number;
  })[];
  /** fts5, or like where SQLite lacks FTS5 (or AGENT_RELAY_SEARCH=like). */
  engine: "fts5" | "like";
  more: boolean;
}

/** The query parameters of GET /api/events: Server-Sent Events: the live stream (Last-Event-ID or ?since= replays). */
export interface EventsQuery {
  /** Replay the events after this id. */
  since?: number;
  /** Only what this agent's inbox sees, and events about it; marks it listening. */
  agentId?: string;
  /** Only these event types, comma-separated. */
  types?: string;
}

/** The header parameters of GET /api/events: Server-Sent Events: the live stream (Last-Event-ID or ?since= replays). */
export interface EventsHeaders {
  /** Replay after this id (beats since). */
  "Last-Event-ID"?: number;
}

/** The header parameters of POST /api/mcp: MCP (Streamable HTTP): one JSON-RPC message; a JSON answer, or SSE for one that waits. */
export interface McpPostHeaders {
  /** The session, from initialize's answer (handshake revisions). */
  "Mcp-Session-Id"?: string;
  /** The session's revision, or 2026-07-28 (stateless). */
  "MCP-Protocol-Version"?: string;
  /** The agent the session acts as (registered with rig mcp when new). */
  "X-Agent-Relay-Agent"?: string;
  /** 2026-07-28: the body's method. */
  "Mcp-Method"?: string;
  /** 2026-07-28: the tool, prompt or resource named. */
  "Mcp-Name"?: string;
}

/** The body of POST /api/mcp: MCP (Streamable HTTP): one JSON-RPC message; a JSON answer, or SSE for one that waits. */
export type McpPostBody = JsonRpcRequest | JsonRpcRequest[];

/** The answer of POST /api/mcp: MCP (Streamable HTTP): one JSON-RPC message; a JSON answer, or SSE for one that waits. */
export type McpPostAnswer = JsonRpcResponse | JsonRpcResponse[];

/** The header parameters of GET /api/mcp: MCP (Streamable HTTP): the session's stream of server messages (Mcp-Session-Id). */
export interface McpGetHeaders {
  /** The session, from initialize's answer (handshake revisions). */
  "Mcp-Session-Id": string;
  /** The session's revision, or 2026-07-28 (stateless). */
  "MCP-Protocol-Version"?: string;
  /** The agent the session acts as (registered with rig mcp when new). */
  "X-Agent-Relay-Agent"?: string;
  /** 2026-07-28: the body's method. */
  "Mcp-Method"?: string;
  /** 2026-07-28: the tool, prompt or resource named. */
  "Mcp-Name"?: string;
}

/** The header parameters of DELETE /api/mcp: MCP (Streamable HTTP): end the session (Mcp-Session-Id); its agent goes offline. */
export interface McpDeleteHeaders {
  /** The session, from initialize's answer (handshake revisions). */
  "Mcp-Session-Id": string;
  /** The session's revision, or 2026-07-28 (stateless). */
  "MCP-Protocol-Version"?: string;
  /** The agent the session acts as (registered with rig mcp when new). */
  "X-Agent-Relay-Agent"?: string;
  /** 2026-07-28: the body's method. */
  "Mcp-Method"?: string;
  /** 2026-07-28: the tool, prompt or resource named. */
  "Mcp-Name"?: string;
}

/** The answer of DELETE /api/mcp: MCP (Streamable HTTP): end the session (Mcp-Session-Id); its agent goes offline. */
export interface McpDeleteAnswer {
  ok: true;
}

/** Every error code the relay declares, in any answer. */
export type ErrorCode = "agent_offline" | "already_claimed" | "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "invalid_transition" | "lease_conflict" | "not_addressed" | "not_claimable" | "not_found" | "not_owner" | "payload_too_large" | "rate_limited" | "read_only" | "request_timeout" | "scope" | "superseded" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";

/** Every operation of the spec: its method and path, what it takes and what it answers. */
export interface Operations {
  health: {
    method: "GET";
    path: "/api/health";
    params: {};
    query: {};
    headers: {};
    body: undefined;
    answer: HealthAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unavailable";
  };
  stats: {
    method: "GET";
    path: "/api/stats";
    params: {};
    query: {};
    headers: {};
    body: undefined;
    answer: StatsAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  spec: {
    method: "GET";
    path: "/api/spec";
    params: {};
    query: {};
    headers: {};
    body: undefined;
    answer: SpecAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  cursor: {
    method: "GET";
    path: "/api/cursor";
    params: {};
    query: {};
    headers: {};
    body: undefined;
    answer: CursorAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  register: {
    method: "POST";
    path: "/api/agents";
    params: {};
    query: {};
    headers: {};
    body: RegisterBody;
    answer: RegisterAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unsupported_media_type";
  };
  list_agents: {
    method: "GET";
    path: "/api/agents";
    params: {};
    query: ListAgentsQuery;
    headers: {};
    body: undefined;
    answer: ListAgentsAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  get_agent: {
    method: "GET";
    path: "/api/agents/{id}";
    params: GetAgentParams;
    query: {};
    headers: {};
    body: undefined;
    answer: GetAgentAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent";
  };
  patch_agent: {
    method: "PATCH";
    path: "/api/agents/{id}";
    params: PatchAgentParams;
    query: {};
    headers: {};
    body: PatchAgentBody | undefined;
    answer: PatchAgentAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "payload_too_large" | "request_timeout" | "superseded" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  delete_agent: {
    method: "DELETE";
    path: "/api/agents/{id}";
    params: DeleteAgentParams;
    query: DeleteAgentQuery;
    headers: {};
    body: undefined;
    answer: DeleteAgentAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  heartbeat: {
    method: "POST";
    path: "/api/agents/{id}/heartbeat";
    params: HeartbeatParams;
    query: {};
    headers: {};
    body: HeartbeatBody | undefined;
    answer: HeartbeatAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "payload_too_large" | "request_timeout" | "superseded" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  inbox: {
    method: "GET";
    path: "/api/agents/{id}/inbox";
    params: InboxParams;
    query: InboxQuery;
    headers: {};
    body: undefined;
    answer: InboxAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent";
  };
  read_upto: {
    method: "POST";
    path: "/api/agents/{id}/read";
    params: ReadUptoParams;
    query: {};
    headers: {};
    body: ReadUptoBody;
    answer: ReadUptoAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  send: {
    method: "POST";
    path: "/api/messages";
    params: {};
    query: {};
    headers: {};
    body: SendBody;
    answer: SendAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "not_addressed" | "not_found" | "payload_too_large" | "read_only" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  history: {
    method: "GET";
    path: "/api/messages";
    params: {};
    query: HistoryQuery;
    headers: {};
    body: undefined;
    answer: HistoryAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent";
  };
  get_message: {
    method: "GET";
    path: "/api/messages/{id}";
    params: GetMessageParams;
    query: {};
    headers: {};
    body: undefined;
    answer: GetMessageAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "not_found" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  thread: {
    method: "GET";
    path: "/api/messages/{id}/thread";
    params: ThreadParams;
    query: {};
    headers: {};
    body: undefined;
    answer: ThreadAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "not_found" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  wait_message: {
    method: "GET";
    path: "/api/messages/{id}/wait";
    params: WaitMessageParams;
    query: WaitMessageQuery;
    headers: {};
    body: undefined;
    answer: WaitMessageAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "not_found" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  read_message: {
    method: "POST";
    path: "/api/messages/{id}/read";
    params: ReadMessageParams;
    query: {};
    headers: {};
    body: ReadMessageBody;
    answer: ReadMessageAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "not_addressed" | "not_found" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  claim_message: {
    method: "POST";
    path: "/api/messages/{id}/claim";
    params: ClaimMessageParams;
    query: {};
    headers: {};
    body: ClaimMessageBody;
    answer: ClaimMessageAnswer;
    errors: "agent_offline" | "already_claimed" | "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "invalid_transition" | "not_addressed" | "not_claimable" | "not_found" | "payload_too_large" | "read_only" | "request_timeout" | "superseded" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  release_message: {
    method: "POST";
    path: "/api/messages/{id}/release";
    params: ReleaseMessageParams;
    query: {};
    headers: {};
    body: ReleaseMessageBody;
    answer: ReleaseMessageAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "invalid_transition" | "not_claimable" | "not_found" | "not_owner" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  approve: {
    method: "POST";
    path: "/api/messages/{id}/approve";
    params: ApproveParams;
    query: {};
    headers: {};
    body: ApproveBody | undefined;
    answer: ApproveAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "invalid_transition" | "not_found" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unsupported_media_type";
  };
  reject: {
    method: "POST";
    path: "/api/messages/{id}/reject";
    params: RejectParams;
    query: {};
    headers: {};
    body: RejectBody | undefined;
    answer: RejectAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "invalid_transition" | "not_found" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unsupported_media_type";
  };
  create_task: {
    method: "POST";
    path: "/api/tasks";
    params: {};
    query: {};
    headers: {};
    body: CreateTaskBody;
    answer: CreateTaskAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "payload_too_large" | "read_only" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  list_tasks: {
    method: "GET";
    path: "/api/tasks";
    params: {};
    query: ListTasksQuery;
    headers: {};
    body: undefined;
    answer: ListTasksAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  get_task: {
    method: "GET";
    path: "/api/tasks/{id}";
    params: GetTaskParams;
    query: {};
    headers: {};
    body: undefined;
    answer: GetTaskAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "not_found" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  claim_task: {
    method: "POST";
    path: "/api/tasks/{id}/claim";
    params: ClaimTaskParams;
    query: {};
    headers: {};
    body: ClaimTaskBody;
    answer: ClaimTaskAnswer;
    errors: "agent_offline" | "already_claimed" | "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "invalid_transition" | "not_addressed" | "not_found" | "payload_too_large" | "read_only" | "request_timeout" | "superseded" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  task_status: {
    method: "PATCH";
    path: "/api/tasks/{id}/status";
    params: TaskStatusParams;
    query: {};
    headers: {};
    body: TaskStatusBody;
    answer: TaskStatusAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "invalid_transition" | "not_addressed" | "not_found" | "not_owner" | "payload_too_large" | "read_only" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  task_events: {
    method: "GET";
    path: "/api/tasks/{id}/events";
    params: TaskEventsParams;
    query: {};
    headers: {};
    body: undefined;
    answer: TaskEventsAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "not_found" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  integration_event: {
    method: "POST";
    path: "/api/integrations/events";
    params: {};
    query: {};
    headers: {};
    body: IntegrationEventBody;
    answer: IntegrationEventAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "payload_too_large" | "rate_limited" | "request_timeout" | "scope" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  callbacks: {
    method: "GET";
    path: "/api/callbacks";
    params: {};
    query: CallbacksQuery;
    headers: {};
    body: undefined;
    answer: CallbacksAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  acquire_lease: {
    method: "POST";
    path: "/api/leases";
    params: {};
    query: {};
    headers: {};
    body: AcquireLeaseBody;
    answer: AcquireLeaseAnswer;
    errors: "agent_offline" | "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "lease_conflict" | "payload_too_large" | "read_only" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  list_leases: {
    method: "GET";
    path: "/api/leases";
    params: {};
    query: ListLeasesQuery;
    headers: {};
    body: undefined;
    answer: ListLeasesAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  renew_lease: {
    method: "POST";
    path: "/api/leases/{id}/renew";
    params: RenewLeaseParams;
    query: {};
    headers: {};
    body: RenewLeaseBody;
    answer: RenewLeaseAnswer;
    errors: "agent_offline" | "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "not_found" | "not_owner" | "payload_too_large" | "read_only" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  release_lease: {
    method: "DELETE";
    path: "/api/leases/{id}";
    params: ReleaseLeaseParams;
    query: ReleaseLeaseQuery;
    headers: {};
    body: ReleaseLeaseBody | undefined;
    answer: ReleaseLeaseAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "invalid_json" | "not_found" | "not_owner" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent" | "unsupported_media_type";
  };
  search: {
    method: "GET";
    path: "/api/search";
    params: {};
    query: SearchQuery;
    headers: {};
    body: undefined;
    answer: SearchAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent";
  };
  events: {
    method: "GET";
    path: "/api/events";
    params: {};
    query: EventsQuery;
    headers: EventsHeaders;
    body: undefined;
    answer: undefined;
    stream: RelayEvent;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unknown_agent";
  };
  mcp_post: {
    method: "POST";
    path: "/api/mcp";
    params: {};
    query: {};
    headers: McpPostHeaders;
    body: McpPostBody;
    answer: McpPostAnswer;
    stream: string;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unsupported_media_type";
  };
  mcp_get: {
    method: "GET";
    path: "/api/mcp";
    params: {};
    query: {};
    headers: McpGetHeaders;
    body: undefined;
    answer: undefined;
    stream: string;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable";
  };
  mcp_delete: {
    method: "DELETE";
    path: "/api/mcp";
    params: {};
    query: {};
    headers: McpDeleteHeaders;
    body: undefined;
    answer: McpDeleteAnswer;
    errors: "database_corrupt" | "database_replaced" | "forbidden" | "invalid_field" | "payload_too_large" | "request_timeout" | "unauthorized" | "unavailable" | "unsupported_media_type";
  };
}

/** An operation's id (its operationId in the spec). */
export type OperationId = keyof Operations;

/** The method and path of every operation, at run time. */
export const operations = {
  health: { method: "GET", path: "/api/health" },
  stats: { method: "GET", path: "/api/stats" },
  spec: { method: "GET", path: "/api/spec" },
  cursor: { method: "GET", path: "/api/cursor" },
  register: { method: "POST", path: "/api/agents" },
  list_agents: { method: "GET", path: "/api/agents" },
  get_agent: { method: "GET", path: "/api/agents/{id}" },
  patch_agent: { method: "PATCH", path: "/api/agents/{id}" },
  delete_agent: { method: "DELETE", path: "/api/agents/{id}" },
  heartbeat: { method: "POST", path: "/api/agents/{id}/heartbeat" },
  inbox: { method: "GET", path: "/api/agents/{id}/inbox" },
  read_upto: { method: "POST", path: "/api/agents/{id}/read" },
  send: { method: "POST", path: "/api/messages" },
  history: { method: "GET", path: "/api/messages" },
  get_message: { method: "GET", path: "/api/messages/{id}" },
  thread: { method: "GET", path: "/api/messages/{id}/thread" },
  wait_message: { method: "GET", path: "/api/messages/{id}/wait" },
  read_message: { method: "POST", path: "/api/messages/{id}/read" },
  claim_message: { method: "POST", path: "/api/messages/{id}/claim" },
  release_message: { method: "POST", path: "/api/messages/{id}/release" },
  approve: { method: "POST", path: "/api/messages/{id}/approve" },
  reject: { method: "POST", path: "/api/messages/{id}/reject" },
  create_task: { method: "POST", path: "/api/tasks" },
  list_tasks: { method: "GET", path: "/api/tasks" },
  get_task: { method: "GET", path: "/api/tasks/{id}" },
  claim_task: { method: "POST", path: "/api/tasks/{id}/claim" },
  task_status: { method: "PATCH", path: "/api/tasks/{id}/status" },
  task_events: { method: "GET", path: "/api/tasks/{id}/events" },
  integration_event: { method: "POST", path: "/api/integrations/events" },
  callbacks: { method: "GET", path: "/api/callbacks" },
  acquire_lease: { method: "POST", path: "/api/leases" },
  list_leases: { method: "GET", path: "/api/leases" },
  renew_lease: { method: "POST", path: "/api/leases/{id}/renew" },
  release_lease: { method: "DELETE", path: "/api/leases/{id}" },
  search: { method: "GET", path: "/api/search" },
  events: { method: "GET", path: "/api/events" },
  mcp_post: { method: "POST", path: "/api/mcp" },
  mcp_get: { method: "GET", path: "/api/mcp" },
  mcp_delete: { method: "DELETE", path: "/api/mcp" },
} as const satisfies { [Op in OperationId]: { method: Operations[Op]["method"]; path: Operations[Op]["path"] } };
