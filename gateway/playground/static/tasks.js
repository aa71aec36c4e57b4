// The page's upscale tasks: files in, one task each, results (or errors) out to the view.
//
// Each file becomes a task (its own taskUUID) sent as soon as the socket is authenticated,
// at most WINDOW at a time. Items and errors arrive by taskUUID from the transport; a task
// ends with exactly one result or one error, and anything after that is ignored.
//
// After a reconnect: a resumed session replays what finished meanwhile and streams the
// rest, so nothing is resent except tasks the server may never have seen (no item yet).
// A fresh session (the server restarted, or the session expired) resends every unfinished
// task with the same taskUUID; if the server still knows one (conflictTaskUUID), the page
// polls it with getResponse instead.

export const WINDOW = 32; // tasks in flight per page (the server allows 64 per connection)
export const MAX_FILE_BYTES = 20 * 2 ** 20; // its base64 must fit in the server's 32 MiB frame
const MAX_SENDS = 3; // a task whose sending keeps killing the connection stops being resent
const RESEND_AFTER_RESUME_MS = 300; // let the session's replay arrive first
const MODEL = "runware:502@1";

/** A version 4 UUID (crypto.randomUUID exists only in secure contexts, not on plain http://host). */
export function uuid4() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** The task the server gets, from a file's base64 and the settings form's values. */
export function upscaleTask(taskUUID, base64, form) {
  const settings = {};
  for (const name of ["positivePrompt", "negativePrompt"]) {
    if (form[name]) settings[name] = form[name];
  }
  for (const name of ["seed", "steps", "CFGScale", "clipSkip"]) {
    if (form[name] !== "" && form[name] !== undefined) settings[name] = Number(form[name]);
  }
  return {
    taskType: "upscale",
    taskUUID,
    model: MODEL,
    inputImage: base64,
    upscaleFactor: 2,
    outputType: "URL",
    outputFormat: form.outputFormat || "PNG",
    outputQuality: Number(form.outputQuality || 95),
    includeCost: true,
    includeProgress: true,
    settings,
  };
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.addEventListener("load", () => resolve(reader.result.slice(reader.result.indexOf(",") + 1)));
    reader.addEventListener("error", () => reject(reader.error));
    reader.readAsDataURL(file);
  });
}

/** An error object from the server, in words. */
export function errorWords(error) {
  const where = error.parameter ? ` (${error.parameter})` : "";
  return `${error.message || "the task failed"}${where} [${error.code}]`;
}

export class TaskList {
  constructor(transport, view) {
    this.transport = transport;
    this.view = view;
    this.tasks = new Map(); // taskUUID → task
    this.waiting = []; // read, not yet sent
    this.sent = new Set(); // sent, not yet answered
    transport.addEventListener("authenticated", (e) => this.onAuthenticated(e.detail));
    transport.addEventListener("item", (e) => this.onItem(e.detail));
    transport.addEventListener("task-error", (e) => this.onError(e.detail));
  }

  add(files, form) {
    for (const file of files) this.addFile(file, form);
  }

  async addFile(file, form) {
    const task = { uuid: uuid4(), name: file.name, sends: 0, seen: false, ended: false };
    this.tasks.set(task.uuid, task);
    this.view.addCard(task, file);
    if (file.size === 0) return this.fail(task, "The file is empty.");
    if (file.size > MAX_FILE_BYTES) {
      const mib = (file.size / 2 ** 20).toFixed(1);
      return this.fail(task, `The file is ${mib} MiB; this page sends at most ${MAX_FILE_BYTES / 2 ** 20} MiB.`);
    }
    try {
      task.payload = upscaleTask(task.uuid, await readBase64(file), form);
    } catch (error) {
      return this.fail(task, `The file could not be read: ${error?.message ?? error}.`);
    }
    this.waiting.push(task);
    this.pump();
  }

  /** Send what waits, while the socket is up and the window has room. */
  pump() {
    while (this.waiting.length && this.sent.size < WINDOW && this.transport.connected) {
      const task = this.waiting.shift();
      if (task.sends >= MAX_SENDS) {
        this.fail(task, `The connection dropped each of the ${MAX_SENDS} times this task was sent.`);
        continue;
      }
      if (!this.transport.send([task.payload])) {
        this.waiting.unshift(task);
        break;
      }
      task.sends += 1;
      task.sentAt ??= performance.now();
      this.sent.add(task);
    }
    this.view.setInFlight(this.sent.size + this.waiting.length);
  }

  onAuthenticated({ resumed }) {
    const resend = () => {
      const again = [...this.sent].filter((task) => !task.ended && (!resumed || !task.seen));
      for (const task of this.sent) {
        if (task.polling && !again.includes(task)) this.poll(task);
      }
      for (const task of again) {
        this.sent.delete(task);
        task.resent = true;
      }
      this.waiting.unshift(...again);
      this.pump();
    };
    if (resumed) setTimeout(resend, RESEND_AFTER_RESUME_MS);
    else resend();
    this.pump();
  }

  onItem(item) {
    const task = this.tasks.get(item.taskUUID);
    if (!task || task.ended) return; // another tab's task, or an answer already had
    task.seen = true;
    switch (item.status) {
      case "processing":
        this.view.progress(task, Number(item.progress) || 0);
        if (task.polling) this.pollLater(task);
        break;
      case "success":
        this.end(task);
        this.view.done(task, item, (performance.now() - task.sentAt) / 1000);
        break;
      default:
        console.info("ignoring an item with status", item.status);
    }
  }

  onError(error) {
    const task = this.tasks.get(error.taskUUID);
    if (!task || task.ended) return;
    if (error.code === "conflictTaskUUID" && task.resent) {
      // The server already has it, but its answer may go to a session we lost: ask.
      task.seen = true;
      task.polling = true;
      task.pollDelay = 1000;
      this.poll(task);
      return;
    }
    if (error.code === "invalidTaskUUID" && error.taskType === "getResponse") {
      return this.fail(task, "The server no longer knows this task (it restarted, or the record expired).");
    }
    this.fail(task, errorWords(error));
  }

  poll(task) {
    task.pollTimer = null;
    if (task.ended) return;
    this.transport.send([{ taskType: "getResponse", taskUUID: task.uuid }]);
  }

  pollLater(task) {
    if (task.pollTimer) return;
    task.pollTimer = setTimeout(() => this.poll(task), task.pollDelay);
    task.pollDelay = Math.min(10_000, task.pollDelay * 1.5);
  }

  fail(task, message) {
    this.end(task);
    this.view.error(task, message);
  }

  end(task) {
    task.ended = true;
    clearTimeout(task.pollTimer);
    this.sent.delete(task);
    this.pump();
  }
}
