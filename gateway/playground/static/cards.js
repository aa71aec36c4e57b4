// Rendering: one card per task, and the live panel. Text goes in with textContent and
// URLs through properties, never innerHTML: nothing the server or a file name says can
// become markup.

/** createElement with properties (or attributes), a `data` object for data-*, and children. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "data") Object.assign(node.dataset, value);
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function stem(name) {
  const dot = name.lastIndexOf(".");
  return (dot > 0 ? name.slice(0, dot) : name) || "image";
}

/**
 * Where to load a result from. An `imageURL` of this gateway's image store is loaded
 * from the origin that served the page (the server's configured public URL may name
 * another host, e.g. 127.0.0.1 for a page opened as localhost, which the CSP and the
 * download attribute would refuse); any other http(s) URL is used as given.
 */
export function imageSource(imageURL, base) {
  let url;
  try {
    url = new URL(imageURL, base);
  } catch {
    return null;
  }
  const stored = url.pathname.match(/\/images\/([0-9a-fA-F-]{36}\.[a-z]{3,4})$/);
  if (stored) return new URL(`images/${stored[1]}`, base).href;
  return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
}

export class View {
  constructor(root, base) {
    this.root = root; // the cards' container
    this.base = base; // the gateway's base URL (where /v1, /images and /stats are)
    this.cards = new Map(); // taskUUID → {card, parts…}
    this.onCountChange = () => {};
  }

  addCard(task, file) {
    const status = el("span", { className: "status" }, "queued");
    const progress = el("progress", { max: 100, value: 0, data: { testid: "task-progress" } });
    progress.setAttribute("aria-label", `progress of ${task.name}`);
    const figure = el("div", { className: "figure" });
    const before = file.type.startsWith("image/") ? URL.createObjectURL(file) : null;
    const preview = before ? el("img", { className: "preview", src: before, alt: `original: ${task.name}` }) : null;
    figure.append(preview ?? el("p", { className: "muted small" }, `${file.type || "unknown type"}: no preview`));
    const error = el("p", { className: "error", hidden: true, role: "alert", data: { testid: "task-error" } });
    const meta = el("dl", { className: "meta" });
    const card = el(
      "article",
      { className: "card", data: { testid: "task-card", taskUuid: task.uuid, status: "queued" } },
      el("header", {}, el("h3", { className: "name", title: task.name }, task.name), status),
      figure,
      progress,
      error,
      meta,
    );
    this.root.append(card);
    this.cards.set(task.uuid, { card, status, progress, figure, error, meta, before, preview, name: task.name });
    this.onCountChange(this.cards.size);
  }

  setStatus(parts, status, words) {
    parts.card.dataset.status = status;
    parts.status.textContent = words;
  }

  progress(task, percent) {
    const parts = this.cards.get(task.uuid);
    parts.progress.value = percent;
    this.setStatus(parts, "running", `upscaling ${percent}%`);
  }

  done(task, item, seconds) {
    const parts = this.cards.get(task.uuid);
    const source = imageSource(item.imageURL, this.base);
    if (!source) return this.error(task, "The result came without a usable imageURL.");
    parts.progress.value = 100;
    parts.progress.hidden = true;
    this.setStatus(parts, "done", "done");
    const result = el("img", { className: "after", src: source, alt: `upscaled: ${parts.name}` });
    result.dataset.testid = "result-image";
    parts.figure.replaceChildren(parts.before ? this.compare(parts, result) : result);
    const ext = source.slice(source.lastIndexOf(".") + 1);
    const download = el(
      "a",
      { className: "download", href: source, download: `${stem(parts.name)}-2x.${ext}`, data: { testid: "download" } },
      `Download 2× (${ext.toUpperCase()})`,
    );
    parts.card.append(download);
    const size = this.row(parts.meta, "Size", "…");
    this.row(parts.meta, "Seed", String(item.seed ?? "—"));
    this.row(parts.meta, "Time", `${seconds.toFixed(1)} s`);
    this.row(parts.meta, "Cost", typeof item.cost === "number" ? `$${item.cost.toPrecision(2)}` : "—");
    result.addEventListener("load", () => {
      result.closest(".stage")?.style.setProperty("--aspect", String(result.naturalWidth / result.naturalHeight));
      const input = parts.preview?.naturalWidth ? `${parts.preview.naturalWidth}×${parts.preview.naturalHeight}` : "?";
      size.textContent = `${input} → ${result.naturalWidth}×${result.naturalHeight}`;
    });
    result.addEventListener("error", () => {
      size.textContent = "the image could not be loaded (expired?)";
    });
  }

  /** The result with the original over it, same display size, cut at a slider's value. */
  compare(parts, result) {
    const original = el("img", { className: "before", src: parts.before, alt: "" });
    const clip = el("div", { className: "before-clip" }, original);
    const divider = el("div", { className: "divider" });
    const slider = el("input", { type: "range", min: 0, max: 100, value: 50, className: "slider" });
    slider.setAttribute("aria-label", `compare ${parts.name}: original on the left, upscaled on the right`);
    const show = () => {
      clip.style.clipPath = `inset(0 ${100 - slider.value}% 0 0)`;
      divider.style.left = `${slider.value}%`;
    };
    slider.addEventListener("input", show);
    show();
    const stage = el(
      "div",
      { className: "stage" },
      result,
      clip,
      divider,
      el("span", { className: "tag left" }, "original"),
      el("span", { className: "tag right" }, "2×"),
    );
    return el("div", { className: "compare" }, stage, slider);
  }

  error(task, message) {
    const parts = this.cards.get(task.uuid);
    parts.progress.hidden = true;
    parts.error.textContent = message;
    parts.error.hidden = false;
    this.setStatus(parts, "error", "failed");
  }

  row(dl, term, value) {
    const dd = el("dd", {}, value);
    dl.append(el("dt", {}, term), dd);
    return dd;
  }

  setInFlight(count) {
    document.getElementById("stat-mine").textContent = String(count);
  }
}
