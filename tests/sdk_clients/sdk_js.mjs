// Drives @runware/sdk-js (npm), unmodified but for its URL.
// usage: node sdk_js.mjs URL API_KEY INPUT_PNG  → prints {"upscale": [w, h]}
import { readFileSync } from "node:fs";
import { Runware } from "@runware/sdk-js";

const [url, apiKey, path] = process.argv.slice(2);
const timer = setTimeout(() => { console.error("timed out"); process.exit(3); }, 240000);
const dataUri = "data:image/png;base64," + readFileSync(path).toString("base64");
const runware = new Runware({ apiKey, url });
const image = await runware.upscaleGan({
  inputImage: dataUri,
  upscaleFactor: 2,
  model: "runware:502@1",
  outputType: "base64Data",
  outputFormat: "PNG",
  settings: { steps: 2 },
});
const png = Buffer.from(image.imageBase64Data, "base64");
// PNG: width and height are big-endian at bytes 16..24.
console.log(JSON.stringify({ upscale: [png.readUInt32BE(16), png.readUInt32BE(20)], imageUUID: image.imageUUID }));
clearTimeout(timer);
await runware.disconnect?.();
process.exit(0);
