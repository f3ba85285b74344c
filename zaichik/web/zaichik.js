// zaichik.js: the zaichik client for browsers (and any JavaScript with a
// WebSocket), over the broker's --websocket-port (subprotocol zaichik.v1:
// one frame body per binary message).  One ES module, no dependencies, no
// build step; types in zaichik.d.ts.  Served by the broker's HTTP side at
// /zaichik.js.
//
//   import { connect } from "http://broker:9102/zaichik.js";
//   const client = await connect("ws://broker:8890/", { clientId: "page-1", token: "..." });
//   await client.publish("news", "hello");
//   const sub = await client.subscribe("news", { callback: (m) => console.log(m.text) });
//
// It follows the Python clients (zaichik/client/core.py): request ids and
// replies, subscriptions with callbacks or async iteration, commits and
// groups, and reconnection with resume: after a lost connection it dials
// again with a backoff, says HELLO again and renews each subscription where
// it left off (after the durable commit with a client id, else after the
// last commit or from the first message it received), handing out no
// message twice.  Requests sent on the lost connection fail with a
// ConnectionLostError; requests made while reconnecting wait and are sent
// once connected.  Offsets and timestamps are Numbers (exact below 2**53).

export const Start = Object.freeze({ DEFAULT: 0, LATEST: 1, OFFSET: 2, EARLIEST: 3 });

export const ErrorCode = Object.freeze({
  BAD_FRAME: 1, UNKNOWN_OPCODE: 2, FRAME_TOO_LARGE: 3, BAD_TOPIC: 4, TOPIC_EXISTS: 5,
  NOT_SUBSCRIBED: 6, BAD_OFFSET: 7, UNSUPPORTED_VERSION: 8, NOT_AUTHORIZED: 9,
  ALREADY_SUBSCRIBED: 10, LIMIT: 11, PROTOCOL: 12, INTERNAL: 13,
});
const CODE_NAMES = Object.fromEntries(Object.entries(ErrorCode).map(([k, v]) => [v, k]));
// After these the broker closes the connection; after the fatal ones the client does not reconnect.
const CLOSING = new Set([ErrorCode.FRAME_TOO_LARGE, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.NOT_AUTHORIZED]);
const FATAL = new Set([ErrorCode.UNSUPPORTED_VERSION, ErrorCode.NOT_AUTHORIZED]);

export const SUBPROTOCOL = "zaichik.v1";

/** An ERROR from the broker: `code` is the protocol's number, `codeName` its name. */
export class ZaichikError extends Error {
  constructor(code, message) {
    super(`${CODE_NAMES[code] || code}: ${message}`);
    this.name = "ZaichikError";
    this.code = code;
    this.codeName = CODE_NAMES[code] || String(code);
    this.detail = message;
  }
}

/** The connection was lost (or closed) before the answer came. */
export class ConnectionLostError extends Error {
  constructor(message = "connection lost") {
    super(message);
    this.name = "ConnectionLostError";
  }
}

// --- the codec (docs: ../shared/spec/protocol-v1.md; zaichik/codec.py) ------------

const OP = {
  HELLO: 0x01, CREATE_TOPIC: 0x02, SUBSCRIBE: 0x03, UNSUBSCRIBE: 0x04, PUBLISH: 0x05, COMMIT: 0x06,
  CLOSE: 0x07, PING: 0x08, LIST_TOPICS: 0x09, PUBLISH_BATCH: 0x0a, SUBSCRIBE_GROUP: 0x0b, ACK: 0x0c,
  OK: 0x80, ERROR: 0x81, MESSAGE: 0x82, PUBLISHED: 0x83, TOPICS: 0x84, PUBLISHED_BATCH: 0x85,
};
const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

function bytesOf(value) {
  if (value === undefined || value === null) return new Uint8Array(0);
  if (typeof value === "string") return encoder.encode(value);
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  throw new TypeError("a value or key is a string, a Uint8Array or an ArrayBuffer");
}

class Writer {
  constructor() { this.parts = []; this.size = 0; }
  bytes(b) { this.parts.push(b); this.size += b.length; return this; }
  int(n, width) {
    const b = new Uint8Array(width);
    const view = new DataView(b.buffer);
    if (width === 1) view.setUint8(0, n);
    else if (width === 2) view.setUint16(0, n);
    else if (width === 4) view.setUint32(0, n);
    else view.setBigUint64(0, BigInt(n));
    return this.bytes(b);
  }
  string(s) { const b = encoder.encode(s); return this.int(b.length, 2).bytes(b); }
  key(k) { const b = bytesOf(k); return this.int(b.length, 2).bytes(b); }
  blob(v) { const b = bytesOf(v); return this.int(b.length, 4).bytes(b); }
  done() {
    const out = new Uint8Array(this.size);
    let at = 0;
    for (const p of this.parts) { out.set(p, at); at += p.length; }
    return out;
  }
}

class Reader {
  constructor(data) { this.data = data; this.view = new DataView(data.buffer, data.byteOffset, data.byteLength); this.at = 0; }
  need(n) { if (this.at + n > this.data.length) throw new Error("truncated frame"); }
  u8() { this.need(1); return this.view.getUint8(this.at++); }
  u16() { this.need(2); const v = this.view.getUint16(this.at); this.at += 2; return v; }
  u32() { this.need(4); const v = this.view.getUint32(this.at); this.at += 4; return v; }
  u64() { this.need(8); const v = this.view.getBigUint64(this.at); this.at += 8; return Number(v); }
  raw(n) { this.need(n); const b = this.data.slice(this.at, this.at + n); this.at += n; return b; }
  string() { return decoder.decode(this.raw(this.u16())); }
  key() { const n = this.u16(); return n ? this.raw(n) : null; }
  blob() { return this.raw(this.u32()); }
}

/** A message delivered to a subscription. */
export class Message {
  constructor(topic, offset, timestamp, key, value) {
    this.topic = topic; this.offset = offset; this.timestamp = timestamp; this.key = key; this.value = value;
  }
  /** The value decoded as UTF-8. */
  get text() { return new TextDecoder().decode(this.value); }
  /** The key decoded as UTF-8, or null. */
  get keyText() { return this.key === null ? null : new TextDecoder().decode(this.key); }
}

function decodeReply(data) {
  const r = new Reader(data);
  const op = r.u8();
  switch (op) {
    case OP.OK: return { op, rid: r.u32() };
    case OP.ERROR: return { op, rid: r.u32(), code: r.u16(), message: r.string() };
    case OP.MESSAGE: return { op, message: new Message(r.string(), r.u64(), r.u64(), r.key(), r.blob()) };
    case OP.PUBLISHED: return { op, rid: r.u32(), result: { offset: r.u64(), duplicate: r.u8() === 1 } };
    case OP.PUBLISHED_BATCH: {
      const rid = r.u32();
      const results = [];
      for (let n = r.u32(); n > 0; n--) results.push({ offset: r.u64(), duplicate: r.u8() === 1 });
      return { op, rid, result: results };
    }
    case OP.TOPICS: {
      const rid = r.u32();
      const topics = [];
      for (let n = r.u32(); n > 0; n--) {
        topics.push({ name: r.string(), retentionTtl: r.u64(), compactionWindow: r.u64(), nextOffset: r.u64(),
                      retained: r.u64(), subscribers: r.u32() });
      }
      return { op, rid, result: topics };
    }
    default: throw new Error(`unknown reply opcode ${op}`);
  }
}

// --- subscriptions -------------------------------------------------------------------

const PLAIN = "plain", GROUP = "group", PATTERN = "pattern";

/** A subscription's topic is a pattern (protocol 1.1): a `*` segment, or a last `>` segment. */
export function isPattern(topic) {
  const segments = topic.split(".");
  return segments.includes("*") || segments[segments.length - 1] === ">";
}

/** Does `pattern` match the topic `name`?  (As the broker's index decides.) */
export function patternMatches(pattern, name) {
  let want = pattern.split(".");
  let got = name.split(".");
  if (want[want.length - 1] === ">") {
    if (got.length < want.length) return false;
    want = want.slice(0, -1);
    got = got.slice(0, want.length);
  } else if (got.length !== want.length) {
    return false;
  }
  return want.every((w, i) => w === "*" || w === got[i]);
}

/**
 * One subscription: messages go to its callback, or wait for async iteration
 * (`for await (const m of sub)`).  It lives across reconnections until
 * unsubscribed or the client is closed.
 */
export class Subscription {
  constructor(client, topic, options, kind, group) {
    this.client = client;
    this.topic = topic;
    this.kind = kind;
    this.group = group || null;
    this.start = options.start ?? (kind === GROUP ? Start.EARLIEST : Start.DEFAULT);
    this.offset = options.offset ?? 0;
    this.maxInflight = options.maxInflight ?? 0;
    this.ackTimeout = options.ackTimeout ?? 0;
    this.callback = options.callback || null;
    this.active = false;
    this.ended = false;
    this.error = null;
    this.firstReceived = null;
    this.lastReceived = null;
    this.committed = null;
    this.lastByTopic = new Map();  // a pattern's last offset handed out, per topic
    this.committedByTopic = new Map();
    this._queue = [];
    this._waiters = [];
  }

  /** COMMIT this topic up to and including `offset` (a group: acknowledges through it). */
  commit(offset) { return this.client.commit(this.topic, offset); }

  /** ACK one message of a group subscription. */
  ack(offset) { return this.client.ack(this.topic, offset); }

  unsubscribe() { return this.client.unsubscribe(this.topic); }

  _deliver(message) {
    if (this.kind === PLAIN) {
      if (this.firstReceived === null) this.firstReceived = message.offset;
      this.lastReceived = message.offset;
    } else if (this.kind === PATTERN) {
      this.lastByTopic.set(message.topic, message.offset);
    }
    if (this.callback) {
      try { this.callback(message, this); } catch (e) { setTimeout(() => { throw e; }); }
    } else if (this._waiters.length) {
      this._waiters.shift().resolve({ value: message, done: false });
    } else {
      this._queue.push(message);
    }
  }

  _end(error) {
    if (this.ended) return;
    this.ended = true;
    this.active = false;
    this.error = error || null;
    for (const w of this._waiters.splice(0)) {
      if (error) w.reject(error); else w.resolve({ value: undefined, done: true });
    }
  }

  /** The next message (async iteration). */
  next() {
    if (this._queue.length) return Promise.resolve({ value: this._queue.shift(), done: false });
    if (this.ended) return this.error ? Promise.reject(this.error) : Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  return() { return this.unsubscribe().catch(() => {}).then(() => ({ value: undefined, done: true })); }

  [Symbol.asyncIterator]() { return this; }

  _resumePosition(clientId) {
    if (this.kind === GROUP) return [this.start, this.offset];
    if (this.kind === PATTERN) {
      if (clientId && (this.committedByTopic.size || this.start === Start.DEFAULT)) return [Start.DEFAULT, 0];
      return [this.start, this.offset];
    }
    if (clientId && (this.committed !== null || this.start === Start.DEFAULT)) return [Start.DEFAULT, 0];
    if (this.committed !== null) return [Start.OFFSET, this.committed + 1];
    if (this.firstReceived !== null) return [Start.OFFSET, this.firstReceived];
    return [this.start, this.offset];
  }
}

// --- the client ----------------------------------------------------------------------

const CONNECTING = "connecting", READY = "ready", CLOSED = "closed";

/**
 * A client on one broker WebSocket URL (or several, tried in turn).
 * Use `connect()`.
 */
export class Client {
  constructor(urls, options = {}) {
    this.urls = Array.isArray(urls) ? urls : [urls];
    this.clientId = options.clientId || "";
    this.token = options.token || "";
    this.reconnect = options.reconnect ?? true;
    this.requestTimeout = options.requestTimeout ?? 30000;
    this.keepalive = options.keepalive ?? 60000;
    this.backoff = { initial: options.backoffInitial ?? 100, maximum: options.backoffMax ?? 5000 };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.subscriptions = new Map();
    this.state = CONNECTING;
    this.closeReason = null;
    this.onstatechange = options.onStateChange || null;
    this.onerror = options.onError || null;
    this._ws = null;
    this._nextRid = 0;
    this._waiting = new Map();
    this._backlog = [];
    this._urlIndex = 0;
    this._delay = this.backoff.initial;
    this._established = false;
    this._connectWaiter = null;
    this._lastError = null;
    this._closedWaiters = [];
    this._lastSent = 0;
    this._keepTimer = null;
  }

  _setState(state) {
    this.state = state;
    if (this.onstatechange) this.onstatechange(state, this);
  }

  _open() {
    return new Promise((resolve, reject) => {
      this._connectWaiter = { resolve, reject };
      this._dial();
    });
  }

  _dial() {
    const url = this.urls[this._urlIndex % this.urls.length];
    this._urlIndex++;
    let ws;
    try {
      ws = new this.WebSocket(url, SUBPROTOCOL);
    } catch (e) {
      this._lost(e);
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    this._lastError = null;
    ws.onopen = () => this._opened(ws);
    ws.onmessage = (event) => this._received(ws, event.data);
    ws.onclose = (event) => {
      if (this._ws === ws) this._lost(new ConnectionLostError(`connection closed (${event.code})`));
    };
    ws.onerror = () => {};
  }

  _opened(ws) {
    if (this._ws !== ws) return;
    if (this.clientId || this.token) {
      this._sendNow(this._rid(), (rid) => new Writer().int(OP.HELLO, 1).int(rid, 4).int(1, 2)
        .string(this.clientId).string(this.token), () => this._ready(),
      (e) => { this._lastError = e; ws.close(); }, true);
    } else {
      this._ready();
    }
  }

  _ready() {
    this._startKeepalive();
    this._established = true;
    this._delay = this.backoff.initial;
    this._setState(READY);
    for (const sub of this.subscriptions.values()) {
      if (!sub.active && !sub.ended && sub._confirmed) this._renew(sub);
    }
    const backlog = this._backlog.splice(0);
    for (const item of backlog) this._transmit(item);
    if (this._connectWaiter) { this._connectWaiter.resolve(this); this._connectWaiter = null; }
  }

  // A PING after `keepalive` ms without sending, so that a client that only
  // listens stays inside the broker's --idle-timeout; one not answered
  // within requestTimeout means the connection is dead: it is dropped (and
  // dialled again), as the Python clients do.
  _startKeepalive() {
    clearInterval(this._keepTimer);
    if (!this.keepalive) return;
    this._lastSent = Date.now();
    this._keepTimer = setInterval(() => {
      const ws = this._ws;
      if (this.state !== READY || !ws || Date.now() - this._lastSent < this.keepalive) return;
      this._sendNow(this._rid(), (rid) => new Writer().int(OP.PING, 1).int(rid, 4), () => {},
        () => { if (this._ws === ws) this._lost(new ConnectionLostError("no answer to a keepalive PING")); }, true);
    }, Math.max(50, Math.min(this.keepalive / 4, 5000)));
  }

  _renew(sub) {
    const [start, offset] = sub._resumePosition(this.clientId);
    this._sendNow(this._rid(), (rid) => this._subscribeFrame(rid, sub, start, offset),
      () => { sub.active = true; }, (e) => { this.subscriptions.delete(sub.topic); sub._end(e); }, true);
  }

  _lost(error) {
    clearInterval(this._keepTimer);
    const ws = this._ws;
    this._ws = null;
    if (ws) { ws.onopen = ws.onmessage = ws.onclose = null; try { ws.close(); } catch (e) { /* gone already */ } }
    const reason = this._lastError && CLOSING.has(this._lastError.code) ? this._lastError : error;
    for (const pending of this._waiting.values()) {
      clearTimeout(pending.timer);
      if (!pending.internal) pending.reject(reason);
    }
    this._waiting.clear();
    for (const sub of this.subscriptions.values()) sub.active = false;
    if (this.state === CLOSED) return this._finish(null);
    const fatal = reason instanceof ZaichikError && FATAL.has(reason.code);
    if (!fatal && this.reconnect && (this._established || this._urlIndex < this.urls.length)) {
      this._setState(CONNECTING);
      const delay = this._established ? this._delay : 0;
      this._delay = Math.min(this._delay * 2, this.backoff.maximum);
      this._redial = setTimeout(() => this._dial(), delay);
      return;
    }
    if (!fatal && !this._established && this._urlIndex < this.urls.length) {
      this._dial();
      return;
    }
    this._finish(reason);
  }

  _finish(reason) {
    this._setState(CLOSED);
    this.closeReason = reason;
    for (const item of this._backlog.splice(0)) item.reject(reason || new ConnectionLostError("client closed"));
    for (const sub of this.subscriptions.values()) sub._end(reason);
    this.subscriptions.clear();
    if (this._connectWaiter) {
      this._connectWaiter.reject(reason || new ConnectionLostError("client closed"));
      this._connectWaiter = null;
    }
    for (const resolve of this._closedWaiters.splice(0)) resolve();
  }

  _rid() {
    do { this._nextRid = (this._nextRid % 0xffffffff) + 1; } while (this._waiting.has(this._nextRid));
    return this._nextRid;
  }

  _received(ws, data) {
    if (this._ws !== ws) return;
    if (typeof data === "string") return; // (the broker sends binary messages only)
    let reply;
    try {
      reply = decodeReply(new Uint8Array(data));
    } catch (e) {
      ws.close(1002, "bad frame from the broker");
      return;
    }
    if (reply.op === OP.MESSAGE) {
      const sub = this._route(reply.message);
      if (sub) sub._deliver(reply.message);
      return;
    }
    const pending = this._waiting.get(reply.rid);
    if (reply.op === OP.ERROR) {
      const error = new ZaichikError(reply.code, reply.message);
      this._lastError = error;
      if (!pending) {
        if (this.onerror) this.onerror(error);
        return;
      }
      this._waiting.delete(reply.rid);
      clearTimeout(pending.timer);
      pending.reject(error);
      return;
    }
    if (!pending) return;
    this._waiting.delete(reply.rid);
    clearTimeout(pending.timer);
    pending.resolve(reply.result);
  }

  /**
   * Which subscription a MESSAGE is for, as zaichik/client/core.py decides
   * (_attribute): the broker sends one copy per subscription that follows
   * the topic (its own, patterns, a group membership), but the frame does
   * not say whose.  Each follows the topic's consecutive offsets from where
   * it began, so: the one whose last message of the topic was offset - 1;
   * else the oldest that had nothing of it yet; else the group membership;
   * else the one that got furthest without reaching it.  None: every one had
   * it already (sent again after a reconnect).
   */
  _route(message) {
    const { topic, offset } = message;
    let fresh = null, group = null, best = null, bestLast = -1;
    for (const sub of this.subscriptions.values()) {
      if (!sub.active || sub.ended) continue;
      if (sub.topic !== topic && !(sub.kind === PATTERN && patternMatches(sub.topic, topic))) continue;
      if (sub.kind === GROUP) { group = sub; continue; }
      const last = sub.kind === PATTERN ? sub.lastByTopic.get(topic) : sub.lastReceived;
      if (last === undefined || last === null) {
        if (sub.kind === PLAIN && sub.start === Start.OFFSET && offset < sub.offset) continue;
        if (!fresh) fresh = sub;
      } else if (last === offset - 1) {
        return sub;
      } else if (last < offset && (!best || last > bestLast)) {
        best = sub; bestLast = last;
      }
    }
    return fresh || group || best;
  }

  // One request: encoded with its rid when sent (now, or after a reconnect).
  _request(make, convert = (x) => x) {
    if (this.state === CLOSED) return Promise.reject(this.closeReason || new ConnectionLostError("client closed"));
    return new Promise((resolve, reject) => {
      const item = { make, resolve: (v) => resolve(convert(v)), reject, internal: false };
      if (this.state === READY && this._ws) this._transmit(item); else this._backlog.push(item);
    });
  }

  _transmit(item) {
    this._sendNow(this._rid(), item.make, item.resolve, item.reject, item.internal);
  }

  _sendNow(rid, make, resolve, reject, internal) {
    const pending = { resolve, reject, internal, timer: null };
    if (this.requestTimeout) {
      pending.timer = setTimeout(() => {
        if (this._waiting.get(rid) !== pending) return;
        this._waiting.delete(rid);
        reject(new Error(`no answer within ${this.requestTimeout} ms`));
      }, this.requestTimeout);
    }
    this._waiting.set(rid, pending);
    this._lastSent = Date.now();
    this._ws.send(make(rid).done());
  }

  // --- the API -----------------------------------------------------------------------

  /** CREATE_TOPIC (idempotent with the same settings). Times in ms. */
  createTopic(topic, { retentionTtl = 0, compactionWindow = 0 } = {}) {
    return this._request((rid) => new Writer().int(OP.CREATE_TOPIC, 1).int(rid, 4).string(topic)
      .int(retentionTtl, 8).int(compactionWindow, 8), () => undefined);
  }

  /** PUBLISH: resolves with {offset, duplicate}. */
  publish(topic, value, key = null) {
    return this._request((rid) => new Writer().int(OP.PUBLISH, 1).int(rid, 4).string(topic).key(key).blob(value));
  }

  /** PUBLISH_BATCH: `messages` are values, or {key, value} objects; resolves with one {offset, duplicate} each. */
  publishBatch(topic, messages) {
    return this._request((rid) => {
      const w = new Writer().int(OP.PUBLISH_BATCH, 1).int(rid, 4).string(topic).int(messages.length, 4);
      for (const m of messages) {
        const entry = m !== null && typeof m === "object" && "value" in m ? m : { key: null, value: m };
        w.key(entry.key).blob(entry.value);
      }
      return w;
    });
  }

  _subscribeFrame(rid, sub, start, offset) {
    if (sub.kind === GROUP) {
      return new Writer().int(OP.SUBSCRIBE_GROUP, 1).int(rid, 4).string(sub.topic).string(sub.group).int(start, 1)
        .int(offset, 8).int(sub.maxInflight, 4).int(sub.ackTimeout, 4);
    }
    return new Writer().int(OP.SUBSCRIBE, 1).int(rid, 4).string(sub.topic).int(start, 1).int(offset, 8)
      .int(sub.maxInflight, 4);
  }

  _subscribe(sub) {
    if (this.subscriptions.has(sub.topic)) {
      return Promise.reject(new ZaichikError(ErrorCode.ALREADY_SUBSCRIBED, `already subscribed to ${sub.topic}`));
    }
    this.subscriptions.set(sub.topic, sub);
    return this._request((rid) => this._subscribeFrame(rid, sub, sub.start, sub.offset)).then(() => {
      sub.active = true;
      sub._confirmed = true;
      return sub;
    }, (error) => {
      if (this.subscriptions.get(sub.topic) === sub) this.subscriptions.delete(sub.topic);
      sub._end(error);
      throw error;
    });
  }

  /**
   * SUBSCRIBE: options {start, offset, maxInflight, callback}.  Resolves
   * with the Subscription once the broker said OK.  `topic` may be a
   * pattern (`sensors.*.temp`, `sensors.>`): messages then carry their own
   * topic, and COMMIT names it.
   */
  subscribe(topic, options = {}) {
    return this._subscribe(new Subscription(this, topic, options, isPattern(topic) ? PATTERN : PLAIN));
  }

  /** SUBSCRIBE_GROUP: options {start, offset, maxInflight, ackTimeout, callback}; ACK each message. */
  subscribeGroup(topic, group, options = {}) {
    return this._subscribe(new Subscription(this, topic, options, GROUP, group));
  }

  unsubscribe(topic) {
    const sub = this.subscriptions.get(topic);
    return this._request((rid) => new Writer().int(OP.UNSUBSCRIBE, 1).int(rid, 4).string(topic)).then(() => {
      if (sub) { this.subscriptions.delete(topic); sub._end(null); }
    });
  }

  /** COMMIT: every message of `topic` up to and including `offset` is processed. */
  commit(topic, offset) {
    return this._request((rid) => new Writer().int(OP.COMMIT, 1).int(rid, 4).string(topic).int(offset, 8))
      .then(() => {
        for (const sub of this.subscriptions.values()) {
          if (sub.topic === topic && sub.kind === PLAIN) {
            if (sub.committed === null || offset > sub.committed) sub.committed = offset;
          } else if (sub.kind === PATTERN && patternMatches(sub.topic, topic)) {
            if (!(offset <= sub.committedByTopic.get(topic))) sub.committedByTopic.set(topic, offset);
          }
        }
      });
  }

  /** ACK one message sent to this member of a group. */
  ack(topic, offset) {
    return this._request((rid) => new Writer().int(OP.ACK, 1).int(rid, 4).string(topic).int(offset, 8),
      () => undefined);
  }

  /** LIST_TOPICS: [{name, retentionTtl, compactionWindow, nextOffset, retained, subscribers}]. */
  listTopics() {
    return this._request((rid) => new Writer().int(OP.LIST_TOPICS, 1).int(rid, 4));
  }

  ping() {
    return this._request((rid) => new Writer().int(OP.PING, 1).int(rid, 4), () => undefined);
  }

  /** CLOSE: the broker answers, sends what it still owes, and closes.  No reconnection after. */
  close() {
    if (this.state === CLOSED) return Promise.resolve();
    const closed = new Promise((resolve) => this._closedWaiters.push(resolve));
    clearTimeout(this._redial);
    if (this.state === READY && this._ws) {
      const ws = this._ws;
      this._sendNow(this._rid(), (rid) => new Writer().int(OP.CLOSE, 1).int(rid, 4), () => {}, () => {}, true);
      this._setState(CLOSED);
      setTimeout(() => { if (this._ws === ws) this._lost(new ConnectionLostError("client closed")); }, 2000);
    } else {
      this._setState(CLOSED);
      this._lost(new ConnectionLostError("client closed"));
    }
    return closed;
  }
}

/**
 * Connect to a broker's WebSocket listener: `url` is `ws://host:port/` (or
 * `wss://`), or a list tried in turn.  Options: {clientId, token,
 * reconnect (default true), requestTimeout (ms), backoffInitial,
 * backoffMax (ms), onStateChange}.  Rejects with a ZaichikError (a bad
 * token: NOT_AUTHORIZED) or a ConnectionLostError.
 */
export function connect(url, options = {}) {
  return new Client(url, options)._open();
}
