// The playground's entry point: wires the transport, the task list, the cards and the
// live panel together once. Everything talks to the server that served this page, at
// URLs built from the page's own location (so it works behind TLS and a path prefix).

import { Transport, socketURL } from "./transport.js";
import { TaskList } from "./tasks.js";
import { View } from "./cards.js";
import { pollStats } from "./stats.js";

const KEY_STORAGE = "latent-upscaler.apiKey";
const base = new URL(".", location.href); // the page is BASE/playground

const $ = (id) => document.getElementById(id);
const transport = new Transport(socketURL(base));
const view = new View($("cards"), base);
const tasks = new TaskList(transport, view);

function connectForm() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  $("connection").addEventListener("submit", (event) => {
    event.preventDefault();
    if (transport.wanted) {
      transport.disconnect();
    } else if (!key.value.trim()) {
      $("connection-message").textContent = "Enter an API key first.";
      key.focus();
    } else {
      transport.connect(key.value.trim());
    }
  });
  // Kept for this tab only once the server accepted it; never in a URL or the console.
  transport.addEventListener("authenticated", () => sessionStorage.setItem(KEY_STORAGE, transport.apiKey));
  transport.addEventListener("state", (event) => {
    const { state, message } = event.detail;
    $("connection-message").textContent = message;
    $("connection-message").dataset.state = state;
    $("stat-state").textContent = state;
    $("connect").textContent = transport.wanted ? "Disconnect" : "Connect";
    document.body.dataset.connection = state;
  });
  transport.addEventListener("pong", (event) => {
    $("stat-ping").textContent = `${event.detail.rtt.toFixed(0)} ms`;
  });
}

function settings() {
  return Object.fromEntries(new FormData($("settings")).entries());
}

function fileInputs() {
  const input = $("file-input");
  input.addEventListener("change", () => {
    tasks.add([...input.files], settings());
    input.value = ""; // the same file can be chosen again
  });
  const zone = $("drop-zone");
  document.addEventListener("dragover", (event) => {
    event.preventDefault(); // or the browser opens the dropped file instead
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) zone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer?.files.length) tasks.add([...event.dataTransfer.files], settings());
  });
  view.onCountChange = (count) => {
    $("empty").hidden = count > 0;
  };
}

function livePanel() {
  const number = (value, digits) => (value === null || value === undefined ? "—" : value.toFixed(digits));
  pollStats(new URL("stats", base), (stats, rates) => {
    if (!stats) {
      $("stat-server-tasks").textContent = "unavailable";
      return;
    }
    $("stat-server-tasks").textContent = String(stats.gateway.tasks_in_flight);
    $("stat-connections").textContent = String(stats.gateway.connections ?? "—");
    $("stat-throughput").textContent = rates.throughput === null ? "—" : `${number(rates.throughput, 2)} tasks/s`;
    $("stat-rows").textContent =
      rates.rowsPerCall === null ? `idle (mean ${number(stats.engine.mean_rows, 1)})` : number(rates.rowsPerCall, 1);
  });
}

connectForm();
fileInputs();
livePanel();
