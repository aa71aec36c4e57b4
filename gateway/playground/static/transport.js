// The WebSocket transport: connect, authenticate, ping, resume, reconnect.
//
// UI code never touches the socket: it calls connect()/disconnect()/send() and listens
// for the events this EventTarget dispatches (each a CustomEvent whose `detail` is
// plain data):
//   "state"          {state, message}   disconnected | connecting | authenticating |
//                                        connected | reconnecting | refused
//   "authenticated"  {sessionUUID, resumed}  after every successful authentication
//   "item"           a data item about a task (progress, result, getResponse answer)
//   "task-error"     an error object about a task
//   "pong"           {rtt}  milliseconds
//
// The API key goes into the authentication task on the socket and nowhere else (never a
// URL, never the console). The session id is kept in sessionStorage so a dropped socket
// (or a reload) resumes the session: results that finished meanwhile are replayed.

const SESSION_KEY = "latent-upscaler.connectionSessionUUID";
const PING_EVERY_MS = 20_000; // the server closes a socket that is silent for 120 s
const FIRST_DELAY_MS = 1_000; // reconnect: a random first delay up to this …
const BACKOFF_FACTOR = 1.618; // … then growing by this factor …
const MAX_DELAY_MS = 30_000; // … up to this, each jittered so restarts are not stampeded

/** The socket URL, built from the page's own location (works behind TLS and a path prefix). */
export function socketURL(base) {
  const url = new URL("v1", base);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

export class Transport extends EventTarget {
  constructor(url, storage = window.sessionStorage) {
    super();
    this.url = url;
    this.storage = storage;
    this.state = "disconnected";
    this.ws = null;
    this.apiKey = "";
    this.wanted = false; // the user asked to be connected
    this.retries = 0;
    this.retryTimer = null;
    this.pingTimer = null;
    this.pingSentAt = null;
  }

  get connected() {
    return this.state === "connected";
  }

  connect(apiKey) {
    this.disconnect();
    this.apiKey = apiKey;
    this.wanted = true;
    this.retries = 0;
    this.open();
  }

  disconnect(message = "Disconnected.") {
    this.wanted = false;
    clearTimeout(this.retryTimer);
    this.stopPinging();
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000, "bye");
    }
    if (this.state !== "refused") this.setState("disconnected", message);
  }

  /** Send tasks (an array) if authenticated; false if they were not sent. */
  send(tasks) {
    if (!this.connected || this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(tasks));
    return true;
  }

  open() {
    this.setState(this.retries ? "reconnecting" : "connecting", "Connecting…");
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.addEventListener("open", () => this.onOpen(ws));
    ws.addEventListener("message", (event) => this.onMessage(ws, event));
    ws.addEventListener("close", (event) => this.onClose(ws, event));
  }

  onOpen(ws) {
    if (ws !== this.ws) return;
    const task = { taskType: "authentication", apiKey: this.apiKey };
    const session = this.storage.getItem(SESSION_KEY);
    if (session) task.connectionSessionUUID = session;
    this.setState("authenticating", "Authenticating…");
    ws.send(JSON.stringify([task]));
  }

  onMessage(ws, event) {
    if (ws !== this.ws) return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      console.warn("ignoring a frame that is not JSON");
      return;
    }
    for (const item of frame.data ?? []) this.receiveItem(item);
    for (const error of frame.errors ?? []) this.receiveError(error);
  }

  receiveItem(item) {
    switch (item.taskType) {
      case "authentication":
        this.authenticated(item.connectionSessionUUID);
        break;
      case "ping":
        if (item.pong === true) this.pong();
        break;
      default:
        if (item.taskUUID) this.emit("item", item);
        else console.info("ignoring an item without taskUUID", item.taskType);
    }
  }

  receiveError(error) {
    if (error.taskType === "authentication") {
      this.refused(error);
    } else if (error.taskUUID) {
      this.emit("task-error", error);
    } else {
      // A fault of the frame as a whole (invalidJSON, …): a bug of this page, not of a task.
      console.warn("server error:", error.code, error.message);
    }
  }

  authenticated(sessionUUID) {
    const previous = this.storage.getItem(SESSION_KEY);
    this.storage.setItem(SESSION_KEY, sessionUUID);
    this.retries = 0;
    const resumed = previous === sessionUUID;
    this.setState("connected", resumed ? "Connected (session resumed)." : "Connected.");
    this.emit("authenticated", { sessionUUID, resumed });
    this.startPinging();
  }

  refused(error) {
    this.wanted = false;
    const ws = this.ws;
    this.ws = null;
    this.stopPinging();
    ws?.close(1000, "key refused");
    const words = error.code === "missingApiKey" ? "Enter an API key first." : "The server refused the API key";
    this.setState("refused", `${words}: ${error.message} (${error.code}).`);
  }

  onClose(ws, event) {
    if (ws !== this.ws) return; // a socket we already let go of
    const why = event.reason ? `: ${event.reason}` : "";
    this.lost(`code ${event.code}${why}`);
  }

  /** The socket is gone (or as good as gone): let it go and, if wanted, reconnect. */
  lost(why) {
    const ws = this.ws;
    this.ws = null;
    this.stopPinging();
    if (ws && ws.readyState < WebSocket.CLOSING) ws.close(4000, why.slice(0, 100));
    if (!this.wanted) {
      this.setState("disconnected", "Disconnected.");
      return;
    }
    const delay = this.nextDelay();
    this.setState("reconnecting", `Connection lost (${why}). Reconnecting in ${(delay / 1000).toFixed(1)} s…`);
    this.retryTimer = setTimeout(() => this.open(), delay);
  }

  nextDelay() {
    this.retries += 1;
    if (this.retries === 1) return Math.random() * FIRST_DELAY_MS;
    const delay = Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * BACKOFF_FACTOR ** (this.retries - 1));
    return delay * (0.75 + Math.random() / 2);
  }

  startPinging() {
    this.stopPinging();
    this.ping();
    this.pingTimer = setInterval(() => this.ping(), PING_EVERY_MS);
  }

  stopPinging() {
    clearInterval(this.pingTimer);
    this.pingTimer = null;
    this.pingSentAt = null;
  }

  ping() {
    if (this.pingSentAt !== null) {
      // No pong for a whole interval: the connection is dead even if the socket says not.
      this.lost("no answer to a ping");
      return;
    }
    if (this.ws?.readyState !== WebSocket.OPEN) return;
    this.pingSentAt = performance.now();
    this.ws.send(JSON.stringify([{ taskType: "ping", ping: true }]));
  }

  pong() {
    if (this.pingSentAt === null) return;
    const rtt = performance.now() - this.pingSentAt;
    this.pingSentAt = null;
    this.emit("pong", { rtt });
  }

  setState(state, message) {
    this.state = state;
    this.emit("state", { state, message });
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
