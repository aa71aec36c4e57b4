// Drives @runware/sdk-js (npm), unmodified but for its URL.
// usage: node sdk_js.mjs URL API_KEY INPUT_PNG OUT_DIR
// Run from the npm folder that holds node_modules/@runware/sdk-js (the test copies it there).
// Writes every output image into OUT_DIR and prints one JSON line naming the files.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Runware } from "@runware/sdk-js";

const [url, apiKey, path, outDir] = process.argv.slice(2);
const timer = setTimeout(() => {
  console.error("timed out");
  process.exit(3);
}, 240000);
const MODEL = "runware:502@1";
const dataUri = "data:image/png;base64," + readFileSync(path).toString("base64");

async function save(name, image, ext) {
  let bytes;
  if (image.imageBase64Data) bytes = Buffer.from(image.imageBase64Data, "base64");
  else if (image.imageDataURI) bytes = Buffer.from(image.imageDataURI.split(",", 2)[1], "base64");
  else bytes = Buffer.from(await (await fetch(image.imageURL)).arrayBuffer());
  const file = join(outDir, `${name}.${ext}`);
  writeFileSync(file, bytes);
  return file;
}

const upscale = (inputImage, extra = {}) => ({
  inputImage,
  upscaleFactor: 2,
  model: MODEL,
  outputType: "base64Data",
  outputFormat: "PNG",
  settings: { steps: 2, seed: 7 },
  ...extra,
});

const summary = {};
const runware = new Runware({ apiKey, url });

// upscaleGan: taskType "upscale" with a top-level inputImage (a data URI here), sync.
let image = await runware.upscaleGan(upscale(dataUri, { includeCost: true }));
summary.upscale = { file: await save("upscale", image, "png"), cost: image.cost, taskType: image.taskType };

// No model at all, as Runware's own sdk-js tests call it: the loaded model serves it.
const { model: _unused, ...modelless } = upscale(dataUri);
image = await runware.upscaleGan(modelless);
summary["no-model"] = { file: await save("no-model", image, "png"), taskType: image.taskType };

// imageUpload, then the alias upscale() by the stored UUID, URL output (JPG).
const uploaded = await runware.imageUpload({ image: dataUri });
summary.upload = { imageUUID: uploaded.imageUUID, imageURL: uploaded.imageURL };
image = await runware.upscale(upscale(uploaded.imageUUID, { outputType: "URL", outputFormat: "JPG" }));
summary["uuid-URL"] = { file: await save("uuid-URL", image, "jpg"), inputImageUUID: image.inputImageUUID };

// dataURI output, WEBP.
image = await runware.upscaleGan(upscale(dataUri, { outputType: "dataURI", outputFormat: "WEBP" }));
summary["dataURI-webp"] = { file: await save("dataURI-webp", image, "webp") };

// Async delivery: an acknowledgement, then getResponse polling inside the SDK.
image = await runware.upscaleGan(upscale(dataUri, { outputType: "URL", deliveryMethod: "async" }));
summary.async = { file: await save("async", image, "png"), status: image.status };

// Several at once: each result must reach its own request.
const many = await Promise.all([0, 1, 2].map(() => runware.upscaleGan(upscale(dataUri))));
summary.concurrent = await Promise.all(many.map((img, i) => save(`concurrent-${i}`, img, "png")));

// A request fault: the SDK rejects with {error: {code, ...}}.
try {
  await runware.upscaleGan(upscale(dataUri, { upscaleFactor: 4 }));
  summary.error = "no error";
} catch (err) {
  summary.error = err?.error ?? String(err);
}
await runware.disconnect();

// A wrong key: only the code "invalidApiKey" makes this SDK give up at once.
const started = Date.now();
const bad = new Runware({ apiKey: "not-the-key", url, shouldReconnect: false });
try {
  await bad.upscaleGan(upscale(dataUri));
  summary.badKey = "no error";
} catch (err) {
  summary.badKey = err?.error ?? String(err);
}
summary.badKeySeconds = (Date.now() - started) / 1000;
await bad.disconnect();

console.log(JSON.stringify(summary));
clearTimeout(timer);
process.exit(0);
