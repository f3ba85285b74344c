// Types for zaichik.js, the zaichik client for browsers (served at /zaichik.d.ts).

export declare const SUBPROTOCOL: "zaichik.v1";

export declare const Start: Readonly<{ DEFAULT: 0; LATEST: 1; OFFSET: 2; EARLIEST: 3 }>;
export type StartValue = 0 | 1 | 2 | 3;

export declare const ErrorCode: Readonly<{
  BAD_FRAME: 1; UNKNOWN_OPCODE: 2; FRAME_TOO_LARGE: 3; BAD_TOPIC: 4; TOPIC_EXISTS: 5;
  NOT_SUBSCRIBED: 6; BAD_OFFSET: 7; UNSUPPORTED_VERSION: 8; NOT_AUTHORIZED: 9;
  ALREADY_SUBSCRIBED: 10; LIMIT: 11; PROTOCOL: 12; INTERNAL: 13;
}>;

/** An ERROR from the broker. */
export declare class ZaichikError extends Error {
  readonly code: number;
  readonly codeName: string;
  readonly detail: string;
  constructor(code: number, message: string);
}

/** The connection was lost or closed before an answer came. */
export declare class ConnectionLostError extends Error {}

/** A value or key: a string is sent as UTF-8. */
export type Bytes = string | Uint8Array | ArrayBuffer | ArrayBufferView;

export declare class Message {
  readonly topic: string;
  readonly offset: number;
  /** Milliseconds since the Unix epoch, as the broker stored it. */
  readonly timestamp: number;
  readonly key: Uint8Array | null;
  readonly value: Uint8Array;
  /** The value decoded as UTF-8. */
  readonly text: string;
  /** The key decoded as UTF-8, or null. */
  readonly keyText: string | null;
}

export interface PublishResult {
  offset: number;
  duplicate: boolean;
}

export interface TopicInfo {
  name: string;
  retentionTtl: number;
  compactionWindow: number;
  nextOffset: number;
  retained: number;
  subscribers: number;
}

export interface SubscribeOptions {
  start?: StartValue;
  offset?: number;
  /** Messages sent and not committed at most (0: no window). */
  maxInflight?: number;
  /** Called with each message; without it, iterate the subscription. */
  callback?: (message: Message, subscription: Subscription) => void;
}

export interface GroupOptions extends SubscribeOptions {
  /** ms before an unacknowledged message goes to a member again (0: 30,000). */
  ackTimeout?: number;
}

export declare class Subscription implements AsyncIterableIterator<Message> {
  readonly topic: string;
  readonly group: string | null;
  readonly active: boolean;
  readonly ended: boolean;
  readonly error: Error | null;
  readonly committed: number | null;
  commit(offset: number): Promise<void>;
  ack(offset: number): Promise<void>;
  unsubscribe(): Promise<void>;
  next(): Promise<IteratorResult<Message>>;
  return(): Promise<IteratorResult<Message>>;
  [Symbol.asyncIterator](): AsyncIterableIterator<Message>;
}

export type ClientState = "connecting" | "ready" | "closed";

export interface ConnectOptions {
  /** A durable client id: commits outlive the connection, and resume. */
  clientId?: string;
  token?: string;
  /** Dial again after a lost connection and resume (default true). */
  reconnect?: boolean;
  /** ms before a request fails without an answer (default 30,000; 0: never). */
  requestTimeout?: number;
  /** ms without sending after which a PING is sent (default 60,000; 0: none): the broker's --idle-timeout. */
  keepalive?: number;
  backoffInitial?: number;
  backoffMax?: number;
  onStateChange?: (state: ClientState, client: Client) => void;
  /** ERROR frames that answer no request (rid 0). */
  onError?: (error: ZaichikError) => void;
  /** A WebSocket constructor (default: globalThis.WebSocket). */
  WebSocket?: typeof WebSocket;
}

export declare class Client {
  readonly state: ClientState;
  readonly clientId: string;
  readonly closeReason: Error | null;
  readonly subscriptions: Map<string, Subscription>;
  createTopic(topic: string, options?: { retentionTtl?: number; compactionWindow?: number }): Promise<void>;
  publish(topic: string, value: Bytes, key?: Bytes | null): Promise<PublishResult>;
  publishBatch(topic: string, messages: Array<Bytes | { key?: Bytes | null; value: Bytes }>): Promise<PublishResult[]>;
  /** `topic` may be a pattern (`sensors.*.temp`, `sensors.>`; protocol 1.1). */
  subscribe(topic: string, options?: SubscribeOptions): Promise<Subscription>;
  subscribeGroup(topic: string, group: string, options?: GroupOptions): Promise<Subscription>;
  unsubscribe(topic: string): Promise<void>;
  commit(topic: string, offset: number): Promise<void>;
  ack(topic: string, offset: number): Promise<void>;
  listTopics(): Promise<TopicInfo[]>;
  ping(): Promise<void>;
  close(): Promise<void>;
}

/** Is `topic` a pattern (a `*` segment, or a last `>` segment)? */
export declare function isPattern(topic: string): boolean;
/** Does `pattern` match the topic `name`? */
export declare function patternMatches(pattern: string, name: string): boolean;

/** Connect to ws://host:port/ (or wss://), or to the first of several URLs that answers. */
export declare function connect(url: string | string[], options?: ConnectOptions): Promise<Client>;
