// hybrid-cluster's client for browsers (and Node.js): an ES module, no dependency, no build
// step. Every node serves it at `GET /cluster/client.js`; the README's protocol section has
// an example.
//
// It speaks the demo protocol of the node server (`hybrid_cluster::protocol`): JSON text
// frames, `{"op":…,"id":…}` requests answered by `{"type":"ack","id":…}` or
// `{"type":"error","id":…,"code":…,"message":…}`.
//
// Where it connects, in order:
// 1. it asks the node of the given URL `GET /cluster/placement` which node has room, and goes
//    there (when that fails it connects to the given URL; a 503 makes it wait as told);
// 2. a node that cannot take it answers in-band: a `{"type":"redirect","url":…}` frame and a
//    close 4000 (it follows, up to `maxRedirects` hops), or `{"type":"unavailable",
//    "retry_after_ms":…}` and a close 4001 (it waits that long, plus jitter);
// 3. once welcomed, a drained node closes it with 1012 and a JSON reason
//    `{"reconnect":URL,"node":ID}`: it goes there after a small random delay, so that the
//    clients of a drained node do not all arrive at once; a lost connection is retried with
//    exponential backoff and full jitter;
// 4. with sessions (nodes run with `--sessions`), every reconnection resumes the session with
//    its token and the last `seq` handed out (`?resume=…&last=…`): the frames missed come
//    first, none twice, and the groups come back; a connection closed with 4002 (its session
//    resumed elsewhere) stays closed;
// 5. a connection closed with 4003 (an operator disconnected its user) or 1008 (it kept
//    sending past its rate limit) stays closed too.
//
// Identity: put the token in the URL (`ws://…/ws?token=JWT`); the query string follows the
// client from node to node.

/** Close code of an in-band redirect: the reason (JSON) may carry the `url` to go to. */
export const CLOSE_REDIRECT = 4000;
/** Close code of an in-band "no node has room": the reason (JSON) may carry `retry_after_ms`. */
export const CLOSE_UNAVAILABLE = 4001;
/** Close code of a node that drains (service restart): the reason (JSON) names a node. */
export const CLOSE_DRAIN = 1012;
/** Close code of a connection whose session another connection resumed: it stays closed. */
export const CLOSE_SESSION_MOVED = 4002;
/** Close code of a connection whose user an operator disconnected: it stays closed. */
export const CLOSE_USER_DISCONNECTED = 4003;
/** Close code of a connection that kept sending past its rate limit: it stays closed. */
export const CLOSE_POLICY = 1008;

/** A connection that lasted this long resets the backoff when lost. */
const STABLE_AFTER_MS = 5000;

/** The longest wait a timer can take (a longer one would fire at once). */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** Node URLs remembered to try when the usual ones fail, at most. */
const MAX_KNOWN_NODES = 16;

/** The WebSocket `readyState` of an open socket (the same in browsers, `ws` and undici). */
const OPEN = 1;

/**
 * The options of {@link connect}; every one has a default.
 *
 * @typedef {object} ConnectOptions
 * @property {boolean} [placement=true] Ask `/cluster/placement` before each fresh connection.
 * @property {number} [minDelayMs=250] The first backoff step after a failure.
 * @property {number} [maxDelayMs=30000] The backoff's ceiling.
 * @property {number} [maxAttempts=Infinity] Failed attempts in a row (refused, unreachable,
 *   unavailable, too many redirects) after which the client gives up and closes.
 * @property {number} [maxRedirects=5] In-band redirects followed in a row before the attempt
 *   counts as failed (a loop between nodes that disagree ends there).
 * @property {number} [drainDelayMs=1000] After a drain close, the client waits a random delay
 *   below this before it reconnects.
 * @property {number} [retryJitterMs=1000] Added at random to a server's `retry_after_ms`.
 * @property {number} [connectTimeoutMs=10000] How long an attempt may take until welcomed
 *   (and the question to `/cluster/placement` until answered).
 * @property {number} [requestTimeoutMs=30000] How long a request may wait for its ack or
 *   error: past it, it rejects with `timeout` (its outcome unknown) and the connection,
 *   presumed dead without a close, is closed and made again.
 * @property {Function} [WebSocket] The WebSocket constructor (default: the global one; in
 *   Node.js without one, pass `ws`'s `WebSocket`).
 * @property {Function} [fetch] The fetch function (default: the global one).
 * @property {Object<string, Function>} [on] Listeners attached before the first attempt, by
 *   event name (`connect` resolves only once welcomed: this is how to see `reconnecting`
 *   before that, or the first `welcome` as an event).
 */

/**
 * How an attempt ended: whether it was welcomed (and lasted, `stable`), and what the close
 * asked for: a `redirect`, a `drain` (to the URL its reason names, if any), or a wait
 * (`unavailableMs`); none of them for a lost connection or a failed attempt.
 *
 * @typedef {object} Outcome
 * @property {boolean} welcomed
 * @property {boolean} [stable]
 * @property {URL} [redirect]
 * @property {{url: URL | null}} [drain]
 * @property {{code: string, message: string}} [ended]
 * @property {number} [unavailableMs]
 */

/** @type {Required<Omit<ConnectOptions, "WebSocket" | "fetch" | "on">>} */
const DEFAULTS = {
  placement: true,
  minDelayMs: 250,
  maxDelayMs: 30000,
  maxAttempts: Infinity,
  maxRedirects: 5,
  drainDelayMs: 1000,
  retryJitterMs: 1000,
  connectTimeoutMs: 10000,
  requestTimeoutMs: 30000,
};

/**
 * `options` over the defaults: an option given as `undefined` keeps its default, and a
 * number must be one (finite or `Infinity`, not negative).
 *
 * @param {ConnectOptions} options
 */
function withDefaults(options) {
  const settled = { ...DEFAULTS };
  for (const [name, value] of Object.entries(options)) {
    if (value === undefined) continue;
    if (typeof DEFAULTS[name] === "number" && !(typeof value === "number" && value >= 0)) {
      throw new TypeError(`option ${name} must be a number of at least 0, not ${value}`);
    }
    settled[name] = value;
  }
  return settled;
}

/**
 * Connects to the cluster through the node at `url` (`ws://` or `wss://`), and resolves once
 * a node welcomed the client. Rejects when the client gives up first (see `maxAttempts`) or
 * is closed.
 *
 * @param {string} url The WebSocket URL of any node (or of a load balancer in front of them).
 * @param {ConnectOptions} [options]
 * @returns {Promise<ClusterClient>}
 */
export async function connect(url, options = {}) {
  // Inside the async function, a bad URL or a missing WebSocket rejects rather than throws.
  const client = new ClusterClient(url, options);
  await client.ready;
  return client;
}

/**
 * An error of a request (`code` is the server's: `bad_request`, `not_found`, `unreachable`,
 * `internal`), or of the client itself: `disconnected` (the connection was lost before the
 * answer, or there was none), `timeout` (no answer within `requestTimeoutMs`), `closed` (the
 * client was closed), `gave_up`, `moved` (its session was resumed by another connection),
 * `user_disconnected` (an operator disconnected its user), `policy` (closed for sending past
 * its rate limit; a refused request alone rejects with the server's `rate_limited`).
 */
export class ClusterError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = "ClusterError";
    /** @type {string} */
    this.code = code;
  }
}

/**
 * A client of the cluster that keeps itself connected. Events (`on(name, listener)`):
 * - `frame`: every JSON frame the server sends (welcome, messages, acks, errors…);
 * - `welcome`: each (re)connection, with the welcome frame (`connection_id`, `node_id`);
 * - `reconnecting`: before each wait, with `{ delayMs, attempt, reason }` (`reason`:
 *   `drain`, `lost`, `failed`, `unavailable`);
 * - `close`: once, when the client gives up or is closed, with `{ code, message }` (`code`
 *   `gave_up`, `closed`, `moved`, `user_disconnected` or `policy`, as the errors of the
 *   requests it rejects).
 */
export class ClusterClient {
  /** @type {Promise<void>} Resolves on the first welcome. */
  ready;
  /**
   * The latest welcome frame.
   *
   * @type {{type: "welcome", connection_id: string, node_id: string} | null}
   */
  welcome = null;

  #home;
  #options;
  #WebSocket;
  #fetch;
  #listeners = new Map();
  /** @type {Map<number, {resolve: Function, reject: Function}>} Requests awaiting their answer. */
  #pending = new Map();
  #nextId = 1;
  /** @type {any} The socket of the current attempt. */
  #socket = null;
  #welcomed = false;
  #closed = false;
  /** @type {Function | null} Ends the current wait early (on close). */
  #wake = null;
  #settleReady;
  /** @type {URL[]} Nodes learned of (welcomes, placements, redirects, drains), newest last. */
  #known = [];
  /** @type {string | null} The session token of the latest welcome (nodes with sessions). */
  #session = null;
  /** The `seq` of the last numbered frame handed to the application. */
  #lastSeq = 0;

  /**
   * @param {string} url
   * @param {ConnectOptions} [options]
   */
  constructor(url, options = {}) {
    this.#home = new URL(url);
    this.#options = withDefaults(options);
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.#fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    if (typeof this.#WebSocket !== "function") {
      throw new TypeError("no WebSocket constructor: pass options.WebSocket");
    }
    for (const [event, listener] of Object.entries(options.on ?? {})) this.on(event, listener);
    this.ready = new Promise((resolve, reject) => {
      this.#settleReady = { resolve, reject };
    });
    // An application that never awaits `ready` must not see an unhandled rejection.
    this.ready.catch(() => {});
    this.#run();
  }

  /**
   * Listens to an event; returns a function that stops listening.
   *
   * @param {"frame" | "welcome" | "reconnecting" | "close"} event
   * @param {(value: any) => void} listener
   * @returns {() => void}
   */
  on(event, listener) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(listener);
    return () => this.off(event, listener);
  }

  /** Stops a listener. @param {string} event @param {Function} listener */
  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
  }

  /** Whether the client is connected and welcomed now. */
  get connected() {
    return this.#welcomed && this.#socket?.readyState === OPEN;
  }

  /**
   * Sends `data` (any JSON value) to the connection `to`, on any node.
   *
   * @param {string} to A connection id (another client's `welcome.connection_id`).
   * @param {any} data
   * @returns {Promise<void>} Settles on the server's ack or error.
   */
  send(to, data) {
    return this.#request({ op: "send", to, data });
  }

  /**
   * Sends `data` to every connection of the cluster, this one included.
   *
   * @param {any} data
   * @returns {Promise<void>}
   */
  broadcast(data) {
    return this.#request({ op: "broadcast", data });
  }

  /**
   * Joins `group`. Membership belongs to a connection, or to its session when the nodes run
   * with sessions: without, join again after a reconnection (on `welcome`).
   *
   * @param {string} group
   * @returns {Promise<void>}
   */
  join(group) {
    return this.#request({ op: "join", group });
  }

  /**
   * Leaves `group`.
   *
   * @param {string} group
   * @returns {Promise<void>}
   */
  leave(group) {
    return this.#request({ op: "leave", group });
  }

  /**
   * Sends `data` to every connection of `user`, on any node, once each (they get
   * `{"type":"message","from":…,"user":…,"data":…}`); rejects with `not_found` when the user
   * has no connection.
   *
   * @param {string} user
   * @param {any} data
   * @returns {Promise<void>}
   */
  sendUser(user, data) {
    return this.#request({ op: "send_user", user, data });
  }

  /**
   * Who is in `group`, across the cluster: resolves with the server's
   * `{"type":"presence","group":…,"members":[{"user":…,"connections":…},…]}`. Members of a
   * group also get `presence_join` and `presence_leave` frames (see the `frame` event).
   *
   * @param {string} group
   * @returns {Promise<any>}
   */
  presence(group) {
    return this.#request({ op: "presence", group });
  }

  /**
   * Sends `data` to every member of `group`, on any node.
   *
   * @param {string} group
   * @param {any} data
   * @returns {Promise<void>}
   */
  group(group, data) {
    return this.#request({ op: "group", group, data });
  }

  /** Closes the client for good: no reconnection; pending requests reject with `closed`. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#wake?.();
    if (this.#socket) {
      try {
        this.#socket.close(1000, "closed by the application");
      } catch {
        // A socket still connecting may refuse a close code in some implementations: it is
        // dropped all the same.
      }
    }
    this.#finish(new ClusterError("closed", "the client was closed by the application"));
  }

  /**
   * Sends one request with a fresh correlation id; settles on its ack or error.
   *
   * @param {object} op
   * @returns {Promise<void>}
   */
  #request(op) {
    if (!this.connected) {
      const why = this.#closed ? "closed" : "disconnected";
      return Promise.reject(new ClusterError(why, `not connected: the request was not sent`));
    }
    const id = this.#nextId++;
    const socket = this.#socket;
    return new Promise((resolve, reject) => {
      // An answer this late means the connection is gone without a close (a network that
      // dropped it silently): the request fails, and the socket is closed to reconnect.
      const timer = setTimeout(() => {
        if (!this.#pending.delete(id)) return;
        const late = "no answer in time: the request may or may not have been carried out";
        reject(new ClusterError("timeout", late));
        if (this.#socket === socket) socket.close();
      }, Math.min(this.#options.requestTimeoutMs, MAX_TIMER_MS));
      const settled = (settle) => (value) => {
        clearTimeout(timer);
        settle(value);
      };
      this.#pending.set(id, { resolve: settled(resolve), reject: settled(reject) });
      try {
        socket.send(JSON.stringify({ ...op, id }));
      } catch (error) {
        this.#pending.delete(id);
        clearTimeout(timer);
        reject(new ClusterError("disconnected", `the request could not be sent: ${error}`));
      }
    });
  }

  /** The connection loop: one attempt after another until welcomed, then again when lost. */
  async #run() {
    let failures = 0;
    let hops = 0;
    // The backoff's exponent: it grows with each lost or failed attempt, and goes back to 0
    // only after a connection that lasted, so that a node that welcomes and drops its clients
    // at once is not hammered.
    let step = 0;
    /** @type {URL | null} Where the last close told the client to go. */
    let next = null;
    while (!this.#closed) {
      let target = next;
      next = null;
      if (!target) {
        const placed = await this.#place(failures);
        if (this.#closed) return;
        if (placed.unavailableMs !== undefined) {
          failures += 1;
          const delayMs = placed.unavailableMs + this.#jitter(this.#options.retryJitterMs);
          if (!(await this.#pause(delayMs, failures, "unavailable"))) return;
          continue;
        }
        target = placed.url;
      }
      const outcome = await this.#attempt(target);
      if (this.#closed) return;
      if (outcome.moved) {
        // Another connection resumed this client's session: taking it back would bounce it
        // between the two.
        this.#closed = true;
        const moved = "the session was resumed on another connection";
        this.#finish(new ClusterError("moved", moved));
        return;
      }
      if (outcome.ended) {
        // The server closed it for what it is or did: coming back would only repeat it.
        this.#closed = true;
        this.#finish(new ClusterError(outcome.ended.code, outcome.ended.message));
        return;
      }
      if (outcome.welcomed) {
        failures = 0;
        hops = 0;
        if (outcome.stable) step = 0;
      }
      let delayMs;
      let reason;
      if (outcome.redirect && hops < this.#options.maxRedirects) {
        hops += 1;
        next = outcome.redirect;
        this.#learn(next);
        continue;
      } else if (outcome.drain && outcome.welcomed) {
        // The drained node chose where its clients go (spread over the other nodes): only
        // the moment is left to chance.
        next = outcome.drain.url;
        if (next) this.#learn(next);
        delayMs = this.#jitter(this.#options.drainDelayMs);
        reason = "drain";
      } else if (outcome.unavailableMs !== undefined) {
        failures += 1;
        delayMs = outcome.unavailableMs + this.#jitter(this.#options.retryJitterMs);
        reason = "unavailable";
      } else {
        failures += outcome.welcomed ? 0 : 1;
        hops = 0;
        delayMs = this.#backoff(step);
        step += 1;
        reason = outcome.welcomed ? "lost" : "failed";
      }
      if (!(await this.#pause(delayMs, failures, reason))) return;
    }
  }

  /**
   * Waits `delayMs` before the next attempt, announced as `reconnecting`; false when the
   * client gave up (too many failures) or was closed meanwhile.
   *
   * @param {number} delayMs
   * @param {number} failures
   * @param {string} reason
   * @returns {Promise<boolean>}
   */
  async #pause(delayMs, failures, reason) {
    if (failures >= this.#options.maxAttempts) {
      const message = `no node welcomed the client after ${failures} failed attempts`;
      this.#finish(new ClusterError("gave_up", message));
      return false;
    }
    delayMs = Math.min(Math.max(0, Number(delayMs) || 0), MAX_TIMER_MS);
    this.#emit("reconnecting", { delayMs, attempt: failures + 1, reason });
    await new Promise((resolve) => {
      const timer = setTimeout(resolve, delayMs);
      this.#wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
    this.#wake = null;
    return !this.#closed;
  }

  /**
   * Where to connect now: the node `/cluster/placement` names, or the home URL when the
   * question cannot be asked (or `placement` is off); `unavailableMs` when no node has room.
   *
   * After two failures in a row the home URL takes turns with every node the client learned
   * of (from welcomes, placement answers, redirects and drains), so that one dead node (the
   * home one, or the one it was on) does not keep the client away from the rest.
   *
   * @param {number} failures
   * @returns {Promise<{url?: URL, unavailableMs?: number}>}
   */
  async #place(failures) {
    // The home URL first, and again after one failure (it may name a load balancer); then
    // each node learned of in turn.
    const home = new URL(this.#home.href);
    home.search = "";
    const candidates = [this.#home, ...this.#known.filter((url) => url.href !== home.href)];
    const base = failures < 2 ? this.#home : candidates[(failures - 1) % candidates.length];
    const fallback = { url: keepQuery(new URL(base.href), this.#home) };
    if (!this.#options.placement || !this.#fetch) return fallback;
    const http = new URL("/cluster/placement", base);
    http.protocol = base.protocol === "wss:" || base.protocol === "https:" ? "https:" : "http:";
    try {
      // A node that takes the request and never answers must not hold the client.
      const signal = AbortSignal.timeout?.(this.#options.connectTimeoutMs);
      const response = await this.#fetch(http.href, { cache: "no-store", signal });
      const body = await response.json();
      if (response.status === 503) {
        return { unavailableMs: retryAfter(body) };
      }
      const placed = response.ok && typeof body?.url === "string" ? parseUrl(body.url) : null;
      if (placed) {
        this.#learn(placed);
        return { url: keepQuery(placed, this.#home) };
      }
    } catch {
      // No placement to ask (an older node, a network error, a page's CSP): the node itself
      // answers in-band.
    }
    return fallback;
  }

  /**
   * One connection, from opening to close. Resolves, once closed, with what the server said
   * to do next.
   *
   * @param {URL} target
   * @returns {Promise<Outcome>}
   */
  #attempt(target) {
    return new Promise((resolve) => {
      let socket;
      try {
        // With a session, every attempt resumes it: any node takes it over.
        const url = new URL(target.href);
        if (this.#session) {
          url.searchParams.set("resume", this.#session);
          url.searchParams.set("last", String(this.#lastSeq));
        }
        socket = new this.#WebSocket(url.href);
      } catch {
        resolve({ welcomed: false });
        return;
      }
      this.#socket = socket;
      let welcomed = false;
      let welcomedAt = 0;
      /** @type {any} An in-band redirect or unavailable frame, before the close. */
      let placement = null;
      const timer = setTimeout(() => {
        if (!welcomed) socket.close();
      }, this.#options.connectTimeoutMs);
      socket.onmessage = (event) => {
        if (typeof event.data !== "string") return;
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch {
          return;
        }
        if (typeof frame?.seq === "number") {
          // Numbered once in its session: a frame seen already (a resume that raced a
          // connection not dead yet) is not handed out twice.
          if (frame.seq <= this.#lastSeq) return;
          this.#lastSeq = frame.seq;
        }
        if (frame?.type === "resumed" && !frame.recovered) this.#lastSeq = 0;
        if (!welcomed && frame?.type === "welcome") {
          welcomed = true;
          welcomedAt = Date.now();
          clearTimeout(timer);
          this.#learn(target);
          this.#welcome(frame);
        } else if (!welcomed && (frame?.type === "redirect" || frame?.type === "unavailable")) {
          placement = frame;
        } else {
          this.#answer(frame);
        }
        this.#emit("frame", frame);
      };
      socket.onclose = (event) => {
        clearTimeout(timer);
        if (this.#socket === socket) this.#socket = null;
        this.#welcomed = false;
        const lost = "the connection was lost before the answer";
        this.#failPending(new ClusterError("disconnected", lost));
        const stable = welcomed && Date.now() - welcomedAt >= STABLE_AFTER_MS;
        let next = {};
        try {
          next = nextStep(event, placement, this.#home);
        } catch {
          // Whatever the close said, the loop must go on: as after a lost connection.
        }
        resolve({ welcomed, stable, ...next });
      };
      // An error is always followed by a close, which decides.
      socket.onerror = () => {};
    });
  }

  /**
   * Remembers a node to try when the usual ones fail (its URL without the query string).
   *
   * @param {URL} url
   */
  #learn(url) {
    const node = new URL(url.href);
    node.search = "";
    this.#known = this.#known.filter((known) => known.href !== node.href);
    this.#known.push(node);
    if (this.#known.length > MAX_KNOWN_NODES) this.#known.shift();
  }

  /**
   * A (re)connection is welcomed.
   *
   * @param {any} frame
   */
  #welcome(frame) {
    // With sessions (a node run with --sessions), the next attempt resumes this session:
    // the node then sends `resumed` and the frames missed meanwhile, and the groups come
    // back. Without, each connection is a new one: applications re-join groups on `welcome`.
    if (typeof frame.session === "string") this.#session = frame.session;
    this.welcome = frame;
    this.#welcomed = true;
    this.#emit("welcome", frame);
    this.#settleReady.resolve();
  }

  /**
   * Settles the request an ack or an error answers (a later error for an acked send, the
   * "not_found" of a connection that closed on another node, reaches only `frame`).
   *
   * @param {any} frame
   */
  #answer(frame) {
    const waiting = frame && this.#pending.get(frame.id);
    if (!waiting) return;
    if (frame.type === "ack") {
      this.#pending.delete(frame.id);
      waiting.resolve();
    } else if (frame.type === "presence") {
      this.#pending.delete(frame.id);
      waiting.resolve(frame);
    } else if (frame.type === "error") {
      this.#pending.delete(frame.id);
      waiting.reject(new ClusterError(String(frame.code), String(frame.message)));
    }
  }

  /** @param {ClusterError} error */
  #failPending(error) {
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const { reject } of pending) reject(error);
  }

  /**
   * The end: pending requests and `ready` reject with `error`, `close` is emitted once.
   *
   * @param {ClusterError} error
   */
  #finish(error) {
    this.#closed = true;
    this.#failPending(error);
    this.#settleReady.reject(error);
    this.#emit("close", { code: error.code, message: error.message });
    this.#listeners.clear();
  }

  /**
   * @param {string} event
   * @param {any} value
   */
  #emit(event, value) {
    for (const listener of [...(this.#listeners.get(event) ?? [])]) {
      try {
        listener(value);
      } catch (error) {
        // A listener's bug must not stop the client (nor a Node.js process): it is
        // reported, not swallowed.
        (globalThis.reportError ?? console.error)(error);
      }
    }
  }

  /**
   * Exponential backoff with full jitter: a random delay below `min(max, min * 2^step)`.
   *
   * @param {number} step
   */
  #backoff(step) {
    const { minDelayMs, maxDelayMs } = this.#options;
    return this.#jitter(Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(step, 30)));
  }

  /** @param {number} boundMs */
  #jitter(boundMs) {
    return Math.floor(Math.random() * boundMs);
  }
}

/**
 * What a close calls for: `redirect` (4000, with a URL), `unavailableMs` (4001), `drain`
 * (1012), or nothing (a lost connection or a failed attempt).
 *
 * @param {{code: number, reason: string}} event
 * @param {any} placement The in-band frame received before the close, if any.
 * @param {URL} home The URL given to `connect`, whose query string is kept.
 */
function nextStep(event, placement, home) {
  const reason = parseJson(event.reason);
  if (event.code === CLOSE_REDIRECT || placement?.type === "redirect") {
    const url = placement?.url ?? reason?.url;
    const parsed = typeof url === "string" ? parseUrl(url) : null;
    // A close reason may have lost the query string to its 123 bytes: the client's own goes.
    return parsed ? { redirect: keepQuery(parsed, home) } : {};
  }
  if (event.code === CLOSE_UNAVAILABLE || placement?.type === "unavailable") {
    return { unavailableMs: retryAfter(placement ?? reason) };
  }
  if (event.code === CLOSE_SESSION_MOVED) {
    return { moved: true };
  }
  if (event.code === CLOSE_USER_DISCONNECTED) {
    return { ended: { code: "user_disconnected", message: event.reason || "disconnected" } };
  }
  if (event.code === CLOSE_POLICY) {
    return { ended: { code: "policy", message: event.reason || "policy violation" } };
  }
  if (event.code === CLOSE_DRAIN) {
    const url = typeof reason?.reconnect === "string" ? parseUrl(reason.reconnect) : null;
    return { drain: { url: url && keepQuery(url, home) } };
  }
  return {};
}

/**
 * The wait a server asked for, in ms (5 s when it did not say).
 *
 * @param {any} body
 */
function retryAfter(body) {
  const ms = Number(body?.retry_after_ms);
  return Number.isFinite(ms) && ms >= 0 ? Math.min(ms, MAX_TIMER_MS) : 5000;
}

/**
 * `url`, with `home`'s query string when it has none of its own (the application's
 * parameters, a token say, follow the client from node to node).
 *
 * @param {URL} url
 * @param {URL} home
 */
function keepQuery(url, home) {
  if (!url.search && home.search) url.search = home.search;
  return url;
}

/** @param {string} text */
function parseJson(text) {
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return null;
  }
}

/** @param {string} text */
function parseUrl(text) {
  try {
    return new URL(text);
  } catch {
    return null;
  }
}
