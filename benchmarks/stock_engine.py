"""The baseline that ComfyUI- and A1111-style queues amount to: diffusers' stock
``StableDiffusionLatentUpscalePipeline``, one request at a time, in arrival order.

It implements the gateway's ``EngineClient`` interface, so the baseline speaks exactly
the same protocol through the same server code, and only the serving strategy differs.
For benchmarks only.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterable

import torch

from engine import codecs
from engine.api import EngineError, ErrorCode, Progress, UpscaleRequest, UpscaleResult
from engine.client import EngineOverloaded, EngineUnavailable, QueuedOutputs
from engine.config import EngineConfig
from engine.loader import load_pipeline

__all__ = ["StockPipelineClient"]


class StockPipelineClient(QueuedOutputs):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self._config = config
        self._jobs: queue.SimpleQueue[UpscaleRequest | None] = queue.SimpleQueue()
        self._aborted: set[str] = set()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._pipe = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        loaded = await loop.run_in_executor(None, load_pipeline, self._config)
        self._pipe = loaded.pipeline
        self._emit = lambda out: loop.call_soon_threadsafe(self._outputs.put_nowait, out)
        self._thread = threading.Thread(target=self._run, name="stock-pipeline", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: UpscaleRequest) -> None:
        if not self.ready:
            raise EngineUnavailable("engine is not running")
        if self._pending >= self._config.max_queue:
            raise EngineOverloaded("queue is full")
        self._pending += 1
        self._jobs.put(request)

    async def abort(self, request_ids: Iterable[str]) -> None:
        self._aborted.update(request_ids)

    async def close(self) -> None:
        self._jobs.put(None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._outputs.put_nowait(None)

    def _run(self) -> None:
        while (request := self._jobs.get()) is not None:
            if request.request_id in self._aborted:
                self._emit(EngineError(request.request_id, ErrorCode.ABORTED, "task was cancelled"))
            else:
                self._emit(self._upscale(request))
            self._pending -= 1

    def _upscale(self, request: UpscaleRequest):
        started = time.perf_counter()
        try:
            decoded = codecs.decode_image(request.image, max_pixels=self._config.max_input_pixels)
        except codecs.ImageError as exc:
            return EngineError(request.request_id, exc.code, str(exc))

        def progress(step: int, *_):
            if request.want_progress:
                self._emit(Progress(request.request_id, step + 1, request.steps))

        image = self._pipe(
            prompt=request.prompt,
            image=decoded.rgb,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg_scale,
            negative_prompt=request.negative_prompt or None,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            callback=progress,
        ).images[0]
        out = codecs.DecodedImage(image, None)
        data = codecs.encode_image(out, request.output_format, request.output_quality)
        return UpscaleResult(
            request_id=request.request_id,
            image=data,
            output_format=request.output_format,
            width=out.width,
            height=out.height,
            seed=request.seed,
            engine_seconds=time.perf_counter() - started,
        )
