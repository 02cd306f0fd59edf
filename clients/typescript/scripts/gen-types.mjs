#!/usr/bin/env node
// Writes src/types.ts from the relay's OpenAPI document (GET /api/spec): the named components (Agent, Message,
// Task, Lease, Event.<type>, ...) as interfaces, and for each operation its path parameters, query, headers,
// body and answer, with a table of every operation's method and path. Plain Node 18+, no dependencies.
//
//   node scripts/gen-types.mjs                      start ../../agent_relay.py (python3, port 0, a temporary
//                                                   database), read its spec, write src/types.ts
//   node scripts/gen-types.mjs --spec URL|FILE      a running relay (AGENT_RELAY_TOKEN if it has one) or a saved spec
//   node scripts/gen-types.mjs --check [--spec ...] write nothing; exit 1 when src/types.ts is not what the spec gives
//
// The output depends only on the spec's paths and components (never on info or security, which say how one relay
// is configured), so every relay of a version gives the same file.
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const PACKAGE = resolve(HERE, "..");
export const TYPES_FILE = join(PACKAGE, "src", "types.ts");
const RELAY_PY = resolve(PACKAGE, "..", "..", "agent_relay.py");

// -- names ---------------------------------------------------------------------------------------------------------

/** "Event.message.created" -> "EventMessageCreated", "claim_message" -> "ClaimMessage". */
export function pascal(name) {
  return name
    .split(/[^A-Za-z0-9]+/)
    .filter(Boolean)
    .map((w) => w[0].toUpperCase() + w.slice(1))
    .join("");
}

const IDENT = /^[A-Za-z_$][A-Za-z0-9_$]*$/;
const key = (k) => (IDENT.test(k) ? k : JSON.stringify(k));
const lit = (v) => JSON.stringify(v);

// Components whose names JavaScript or the DOM already give a meaning; the rest keep their spec names.
const RENAMED = { Error: "ErrorEnvelope", Event: "RelayEvent" };
const GLOBALS = new Set(["Array", "Boolean", "Date", "Error", "Event", "Function", "Headers", "Map", "Number", "Object",
  "Promise", "Record", "Request", "Response", "Set", "String", "Symbol", "URL"]);

/** The TypeScript name of components/schemas/<name>. */
export function componentName(name) {
  const t = RENAMED[name] || pascal(name);
  if (GLOBALS.has(t)) throw new Error(`gen-types: components/schemas/${name} would shadow the global ${t}: add it to RENAMED`);
  return t;
}

function refName(ref) {
  const m = /^#\/components\/schemas\/(.+)$/.exec(ref);
  if (!m) throw new Error("gen-types: a $ref outside components/schemas: " + ref);
  return componentName(m[1]);
}

function doc(schema, ind) {
  const lines = [];
  if (schema && typeof schema === "object") {
    if (schema.description) lines.push(...String(schema.description).split("\n"));
    if (schema.default !== undefined) lines.push("@default " + lit(schema.default));
  }
  if (!lines.length) return "";
  const safe = lines.map((l) => l.replace(/\*\//g, "*\\/"));
  if (safe.length === 1) return `${ind}/** ${safe[0]} */\n`;
  return `${ind}/**\n${safe.map((l) => `${ind} * ${l}`).join("\n")}\n${ind} */\n`;
}

// -- schema to type --------------------------------------------------------------------------------------------------

const isEmpty = (s) => s === true || (s && typeof s === "object" && !Object.keys(s).some((k) => SHAPE.has(k)));
// The keywords that say what a value is; the rest (bounds, patterns, descriptions, x-...) do not change its type.
const SHAPE = new Set(["type", "$ref", "const", "enum", "properties", "items", "anyOf", "oneOf", "allOf", "if", "additionalProperties", "required"]);

/** Whether a type has a | or & outside braces, brackets, parentheses, strings and comments (`T[]` needs `(T)[]`). */
function needsParens(t) {
  let depth = 0;
  let quoted = false;
  for (let i = 0; i < t.length; i++) {
    const c = t[i];
    if (quoted) {
      if (c === "\\") i++;
      else if (c === '"') quoted = false;
    } else if (c === '"') quoted = true;
    else if (c === "/" && t[i + 1] === "*") i = t.indexOf("*/", i + 2) + 1; // a comment
    else if (c === "{" || c === "(" || c === "[" || c === "<") depth++;
    else if (c === "}" || c === ")" || c === "]" || c === ">") depth--;
    else if ((c === "|" || c === "&") && depth === 0) return true;
  }
  return false;
}

/** A schema that only constrains an object's keys (a branch of anyOf next to properties, or if/else). */
const isConstraint = (s) => s && typeof s === "object" && !s.type && !s.$ref && !s.anyOf && !s.oneOf && (s.required || s.properties);

function constraintType(branch, base, ind) {
  const props = {};
  for (const k of branch.required || []) {
    const own = branch.properties && branch.properties[k];
    const from = (base.properties || {})[k];
    let t;
    if (own && own.const !== undefined) t = lit(own.const);
    else if (own && !isEmpty(own)) t = type(own, ind);
    else if (from) t = type(stripNull(from), ind);
    else t = "unknown";
    props[k] = t;
  }
  for (const [k, p] of Object.entries(branch.properties || {})) {
    if (k in props || p.const === undefined) continue;
    props[k] = lit(p.const); // an if's condition on a key it does not require: present with that value
  }
  const keys = Object.keys(props);
  if (!keys.length) return "{}";
  const required = new Set(branch.required || []);
  return `{ ${keys.map((k) => `${key(k)}${required.has(k) ? "" : "?"}: ${props[k]}`).join("; ")} }`;
}

function stripNull(s) {
  if (Array.isArray(s.type) && s.type.includes("null")) {
    const rest = s.type.filter((t) => t !== "null");
    const out = { ...s, type: rest.length === 1 ? rest[0] : rest };
    if (Array.isArray(s.enum)) out.enum = s.enum.filter((v) => v !== null);
    return out;
  }
  return s;
}

function objectType(s, ind, closed) {
  const inner = ind + "  ";
  const required = new Set(s.required || []);
  let out = "";
  for (const [k, p] of Object.entries(s.properties || {})) {
    out += doc(p, inner) + `${inner}${key(k)}${required.has(k) ? "" : "?"}: ${type(p, inner)};\n`;
  }
  const extra = s.additionalProperties;
  const rest = extra && typeof extra === "object" && !isEmpty(extra) ? type(extra, inner) : extra !== false && !closed ? "unknown" : null;
  if (!out) return rest ? `Record<string, ${rest}>` : "{}";
  if (rest) out += `${inner}[key: string]: ${rest};\n`;
  return `{\n${out}${ind}}`;
}

/** Whether a schema is one object with its properties (an interface), not a union or an intersection. */
function isPlainObject(s) {
  if (!s || typeof s !== "object" || s.$ref || s.anyOf || s.oneOf || s.allOf || s.if || s.enum || s.const !== undefined) return false;
  return (s.type === "object" || (!s.type && s.properties)) && !!s.properties && Object.keys(s.properties).length > 0;
}

// What a schema of the spec may say: the keywords the relay's checker compiles (SCHEMA_KEYWORDS in agent_relay.py),
// allOf (in error answers), and annotations. Anything else stops the generator rather than giving a wrong type.
const KNOWN = new Set([...SHAPE, "then", "else", "minLength", "maxLength", "pattern", "minimum", "maximum", "minItems",
  "maxItems", "description", "title", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment", "format"]);

/** The TypeScript type of a JSON Schema. `closed`: an object of a request, whose undeclared keys the relay ignores. */
export function type(s, ind = "", closed = false) {
  if (s && typeof s === "object") {
    const unknown = Object.keys(s).filter((k) => !KNOWN.has(k) && !k.startsWith("x-"));
    if (unknown.length) throw new Error(`gen-types: a schema uses ${unknown.join(", ")}, which this generator does not turn into types`);
  }
  if (isEmpty(s)) return "unknown";
  if (s.$ref) return refName(s.$ref);
  if (s.const !== undefined) return lit(s.const);
  if (Array.isArray(s.enum)) return s.enum.map(lit).join(" | ");
  const alts = s.anyOf || s.oneOf;
  if (s.allOf) {
    return s.allOf.map((b) => wrap(type(b, ind))).join(" & ");
  }
  const hasObject = s.properties || s.type === "object";
  if (alts && hasObject && alts.every(isConstraint)) {
    const base = objectType(s, ind, closed);
    return `${base} & (${alts.map((b) => constraintType(b, s, ind)).join(" | ")})`;
  }
  if (s.if && hasObject && isConstraint(s.if) && (!s.else || isConstraint(s.else))) {
    const branches = [constraintType({ ...s.if, ...(s.then || {}) }, s, ind)];
    if (s.else) branches.push(constraintType(s.else, s, ind));
    return `${objectType(s, ind, closed)} & (${branches.join(" | ")})`;
  }
  if (s.if) throw new Error("gen-types: an if/then/else that is more than a rule on an object's keys");
  if (alts && hasObject) throw new Error("gen-types: an object whose anyOf/oneOf is more than a rule on its keys");
  if (alts) return unique(alts.map((b) => type(b, ind))).join(" | ");
  const types = Array.isArray(s.type) ? s.type : s.type ? [s.type] : s.properties ? ["object"] : [];
  if (!types.length) return "unknown";
  return unique(
    types.map((t) => {
      switch (t) {
        case "null":
          return "null";
        case "string":
          return "string";
        case "integer":
        case "number":
          return "number";
        case "boolean":
          return "boolean";
        case "array":
          return `${wrap(type(s.items || {}, ind))}[]`;
        case "object":
          return objectType(s, ind, closed);
        default:
          throw new Error("gen-types: an unknown JSON Schema type: " + t);
      }
    }),
  ).join(" | ");
}

const wrap = (t) => (needsParens(t) ? `(${t})` : t);
const unique = (xs) => xs.filter((x, i) => xs.indexOf(x) === i);

function declare(name, schema, comment, closed = false) {
  const t = type(schema, "", closed);
  const head = comment ? doc({ description: comment }, "") : "";
  if (isPlainObject(schema)) return `${head}export interface ${name} ${t}\n`;
  return `${head}export type ${name} = ${t};\n`;
}

// -- operations ------------------------------------------------------------------------------------------------------

function resolveResponse(spec, r) {
  while (r && r.$ref) {
    const m = /^#\/components\/responses\/(.+)$/.exec(r.$ref);
    if (!m) throw new Error("gen-types: a response $ref outside components/responses: " + r.$ref);
    r = spec.components.responses[m[1]];
  }
  return r || {};
}

/** The error codes an error answer declares (the enum its allOf puts on error.code). */
function errorCodes(schema) {
  const codes = [];
  const visit = (s) => {
    if (!s || typeof s !== "object") return;
    const code = s.properties && s.properties.error && s.properties.error.properties && s.properties.error.properties.code;
    if (code && Array.isArray(code.enum)) codes.push(...code.enum);
    for (const b of s.allOf || []) visit(b);
  };
  visit(schema);
  return codes;
}

function operationsOf(spec) {
  const ops = [];
  for (const [path, byMethod] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(byMethod)) {
      if (!op.operationId) throw new Error(`gen-types: ${method.toUpperCase()} ${path} has no operationId`);
      ops.push({ path, method: method.toUpperCase(), op, name: pascal(op.operationId) });
    }
  }
  return ops;
}

function paramsObject(params, where) {
  const chosen = params.filter((p) => p.in === where);
  if (!chosen.length) return null;
  return {
    type: "object",
    properties: Object.fromEntries(chosen.map((p) => [p.name, p.description ? { ...p.schema, description: p.description } : p.schema])),
    required: chosen.filter((p) => p.required).map((p) => p.name),
    additionalProperties: false,
  };
}

/** The whole of src/types.ts for an OpenAPI document, as a string. */
export function generate(spec) {
  const out = [];
  out.push(
    "// Agent Relay's HTTP API as TypeScript types, generated from the relay's OpenAPI document (GET /api/spec)\n" +
      "// by scripts/gen-types.mjs. Do not edit: run `npm run gen` after the relay's routes change; the test suite\n" +
      "// fails while this file and a live relay's spec differ.\n\n",
  );

  const names = new Map(); // type name -> what it was made from, so that two never collide
  const claim = (name, what) => {
    if (names.has(name)) throw new Error(`gen-types: the type name ${name} is made from both ${names.get(name)} and ${what}`);
    names.set(name, what);
    return name;
  };

  out.push("// -- components/schemas ---------------------------------------------------------------------------------\n");
  const schemas = spec.components.schemas;
  for (const [name, schema] of Object.entries(schemas)) {
    out.push(declare(claim(componentName(name), "components/schemas/" + name), schema, schema.description) + "\n");
  }
  const eventTypes = [];
  for (const [name, schema] of Object.entries(schemas)) {
    const ev = schema.properties && schema.properties.event;
    if (name.startsWith("Event.") && ev && ev.const !== undefined) eventTypes.push([ev.const, componentName(name)]);
  }
  if (eventTypes.length) {
    out.push(`/** The type of each event of the stream (GET /api/events). */\nexport type EventType = ${eventTypes.map(([t]) => lit(t)).join(" | ")};\n\n`);
    out.push(
      "/** The event of each type. */\nexport interface EventOfType {\n" +
        eventTypes.map(([t, n]) => `  ${lit(t)}: ${n};\n`).join("") +
        "}\n\n",
    );
    claim("EventType", "the event types");
    claim("EventOfType", "the event types");
  }

  out.push("// -- operations -----------------------------------------------------------------------------------------\n");
  const table = [];
  const allCodes = [];
  for (const { path, method, op, name } of operationsOf(spec)) {
    const about = (what) => `${what} of ${method} ${path}: ${op.summary || op.operationId}`;
    const params = op.parameters || [];
    const entry = { id: op.operationId, method, path, parts: {} };
    for (const [where, suffix, what] of [["path", "Params", "The path parameters"], ["query", "Query", "The query parameters"],
      ["header", "Headers", "The header parameters"]]) {
      const schema = paramsObject(params, where);
      if (schema) {
        entry.parts[where] = claim(name + suffix, op.operationId + " " + where);
        out.push(declare(entry.parts[where], schema, about(what), true) + "\n");
      }
    }
    const body = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
    if (body) {
      entry.parts.body = claim(name + "Body", op.operationId + " body");
      entry.bodyRequired = !!op.requestBody.required;
      out.push(declare(entry.parts.body, body.schema || {}, about("The body"), true) + "\n");
    }
    const answers = new Map(); // its type -> its schema, for each distinct 2xx JSON answer
    const codes = [];
    let stream = null;
    for (const [status, raw] of Object.entries(op.responses)) {
      const r = resolveResponse(spec, raw);
      const json = r.content && r.content["application/json"];
      if (/^2/.test(status)) {
        if (json) answers.set(type(json.schema || {}), json.schema || {});
        const sse = r.content && r.content["text/event-stream"];
        if (sse && sse["x-itemSchema"]) stream = type(sse["x-itemSchema"]);
      } else if (json) {
        codes.push(...errorCodes(json.schema));
      }
    }
    if (answers.size) {
      entry.parts.answer = claim(name + "Answer", op.operationId + " answer");
      const schemas = [...answers.values()];
      out.push(declare(entry.parts.answer, schemas.length === 1 ? schemas[0] : { anyOf: schemas }, about("The answer")) + "\n");
    }
    entry.stream = stream;
    entry.codes = unique(codes).sort();
    allCodes.push(...entry.codes);
    table.push(entry);
  }

  out.push("/** Every error code the relay declares, in any answer. */\n");
  out.push(`export type ErrorCode = ${unique(allCodes).sort().map(lit).join(" | ")};\n\n`);
  claim("ErrorCode", "the error codes");

  out.push("/** Every operation of the spec: its method and path, what it takes and what it answers. */\n");
  out.push("export interface Operations {\n");
  for (const e of table) {
    const p = e.parts;
    out.push(`  ${key(e.id)}: {\n`);
    out.push(`    method: ${lit(e.method)};\n    path: ${lit(e.path)};\n`);
    out.push(`    params: ${p.path || "{}"};\n    query: ${p.query || "{}"};\n    headers: ${p.header || "{}"};\n`);
    out.push(`    body: ${p.body ? (e.bodyRequired ? p.body : p.body + " | undefined") : "undefined"};\n`);
    out.push(`    answer: ${p.answer || "undefined"};\n`);
    if (e.stream) out.push(`    stream: ${e.stream};\n`);
    out.push(`    errors: ${e.codes.length ? e.codes.map(lit).join(" | ") : "never"};\n`);
    out.push("  };\n");
  }
  out.push("}\n\n");
  claim("Operations", "the operation table");
  out.push("/** An operation's id (its operationId in the spec). */\nexport type OperationId = keyof Operations;\n\n");
  out.push("/** The method and path of every operation, at run time. */\n");
  out.push("export const operations = {\n");
  for (const e of table) out.push(`  ${key(e.id)}: { method: ${lit(e.method)}, path: ${lit(e.path)} },\n`);
  out.push("} as const satisfies { [Op in OperationId]: { method: Operations[Op][\"method\"]; path: Operations[Op][\"path\"] } };\n");
  return out.join("");
}

// -- where the spec comes from ---------------------------------------------------------------------------------------

async function fetchSpec(url, token) {
  const target = url.replace(/\/+$/, "").replace(/\/api\/spec$/, "") + "/api/spec";
  const res = await fetch(target, { headers: token ? { Authorization: "Bearer " + token } : {} });
  if (!res.ok) throw new Error(`gen-types: ${target} answered ${res.status}: ${(await res.text()).slice(0, 300)}`);
  return res.json();
}

/** Starts the relay next to this package on port 0 with a temporary database, reads its spec, stops it. */
async function specFromSource(python = process.env.PYTHON || "python3") {
  const dir = mkdtempSync(join(tmpdir(), "agent-relay-spec-"));
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("AGENT_RELAY_")));
  const relay = spawn(python, [RELAY_PY, "serve", "--port", "0", "--db", join(dir, "relay.db")], {
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  try {
    const url = await new Promise((ok, fail) => {
      let seen = "";
      const look = (chunk) => {
        seen += chunk;
        const m = /listening on (http:\/\/\S+)/.exec(seen);
        if (m) ok(m[1]);
      };
      relay.stdout.setEncoding("utf8").on("data", look);
      relay.stderr.setEncoding("utf8").on("data", look);
      relay.on("error", fail);
      relay.on("exit", (code) => fail(new Error(`gen-types: ${python} ${RELAY_PY} serve exited (${code}):\n${seen}`)));
    });
    return await fetchSpec(url.replace(/\/$/, ""));
  } finally {
    relay.kill();
    rmSync(dir, { recursive: true, force: true });
  }
}

export async function loadSpec(source) {
  if (!source) return specFromSource();
  if (/^https?:\/\//.test(source)) return fetchSpec(source, process.env.AGENT_RELAY_TOKEN);
  return JSON.parse(readFileSync(source, "utf8"));
}

/** Where two texts first differ, as a line a person can act on; null when they are the same. */
export function firstDifference(have, want) {
  if (have === want) return null;
  const a = have.split("\n");
  const b = want.split("\n");
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    if (a[i] !== b[i]) {
      return `line ${i + 1}:\n  src/types.ts has: ${a[i] === undefined ? "(the end of the file)" : a[i]}\n  the spec gives:   ${b[i] === undefined ? "(the end of the file)" : b[i]}`;
    }
  }
  return "the two differ";
}

async function main(argv) {
  let source = null;
  let check = false;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--check") check = true;
    else if (argv[i] === "--spec") source = argv[++i];
    else throw new Error("gen-types: usage: node scripts/gen-types.mjs [--check] [--spec URL|FILE]");
  }
  const text = generate(await loadSpec(source));
  if (check) {
    let have = "";
    try {
      have = readFileSync(TYPES_FILE, "utf8");
    } catch {
      have = "";
    }
    const diff = firstDifference(have, text);
    if (diff) {
      process.stderr.write(`src/types.ts differs from the spec (${source || RELAY_PY}); run \`npm run gen\`.\nFirst difference, ${diff}\n`);
      return 1;
    }
    process.stdout.write(`src/types.ts matches the spec (${source || RELAY_PY})\n`);
    return 0;
  }
  writeFileSync(TYPES_FILE, text);
  process.stdout.write(`wrote ${TYPES_FILE}\n`);
  return 0;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err) => {
      process.stderr.write((err && err.message ? err.message : String(err)) + "\n");
      process.exit(2);
    },
  );
}
