// The live panel's server figures: GET /stats every few seconds (no key: it holds no
// secrets). Counters are totals since start, so rates are differences between two reads
// a window apart: throughput = Δ(succeeded + failed) / Δt, rows per UNet call =
// Δunet_rows / Δunet_calls (how full the batches were lately).

const EVERY_MS = 2_000;
const WINDOW = 5; // reads: rates over about the last 10 s

/** Throughput (tasks/s) and rows per UNet call between two /stats reads (null: no data). */
export function rates(older, newer) {
  const dt = newer.monotonic_s - older.monotonic_s;
  if (!(dt > 0)) return { throughput: null, rowsPerCall: null };
  const finished = (s) => s.engine.succeeded + s.engine.failed;
  const calls = newer.engine.unet_calls - older.engine.unet_calls;
  return {
    throughput: (finished(newer) - finished(older)) / dt,
    rowsPerCall: calls > 0 ? (newer.engine.unet_rows - older.engine.unet_rows) / calls : null,
  };
}

export function pollStats(url, show) {
  const reads = [];
  async function tick() {
    if (!document.hidden) {
      try {
        const response = await fetch(url, { cache: "no-store", credentials: "omit" });
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        reads.push(await response.json());
        if (reads.length > WINDOW) reads.shift();
        show(reads.at(-1), rates(reads[0], reads.at(-1)));
      } catch (error) {
        show(null, null, error);
      }
    }
    setTimeout(tick, EVERY_MS);
  }
  tick();
}
