"""Helpers for driving the real engine (tiny model) synchronously in tests."""

from __future__ import annotations

import io
import queue
import time
from collections import defaultdict

import numpy as np
from PIL import Image

from engine.api import EngineError, Progress, UpscaleRequest, UpscaleResult
from engine.core import EngineCore
from engine.request import RequestStatus


def make_png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A deterministic, smooth-ish test image (random noise upscaled) as PNG bytes."""
    rng = np.random.default_rng(seed)
    channels = len(mode)
    small = rng.integers(0, 256, size=(max(1, height // 4), max(1, width // 4), channels), dtype=np.uint8)
    image = Image.fromarray(small.squeeze(-1) if channels == 1 else small, mode).resize((width, height))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_to_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


class CountingUNet:
    """Wraps the real UNet and records the latent shape and row count of every call."""

    def __init__(self, unet, fault=None):
        self.unet = unet
        self.calls: list[tuple[tuple[int, int], int]] = []
        self.fault = fault  # optional callable(kwargs) that may raise

    def __call__(self, sample, timestep, **kwargs):
        self.calls.append((tuple(sample.shape[2:]), sample.shape[0]))
        if self.fault is not None:
            self.fault(sample, timestep, **kwargs)
        return self.unet(sample, timestep, **kwargs)

    def calls_by_shape(self) -> dict[tuple[int, int], int]:
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for shape, _ in self.calls:
            counts[shape] += 1
        return dict(counts)


class Collector:
    """Collects engine outputs from the model/codec threads."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.progress: dict[str, list[int]] = defaultdict(list)
        self.terminal: dict[str, list] = defaultdict(list)

    def __call__(self, output) -> None:
        self.queue.put(output)

    def wait(self, request_ids, timeout: float = 120.0) -> dict[str, UpscaleResult | EngineError]:
        pending = set(request_ids) - set(self.terminal)
        deadline = time.monotonic() + timeout
        while pending:
            output = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(output, Progress):
                self.progress[output.request_id].append(output.step)
            else:
                self.terminal[output.request_id].append(output)
                pending.discard(output.request_id)
        return {rid: self.terminal[rid][0] for rid in request_ids}


def submit_burst(core: EngineCore, requests: list[UpscaleRequest], timeout: float = 30.0) -> None:
    """Admit all ``requests`` and wait until each is decoded, so that they reach the
    model thread together (a burst), whatever the codec pool's timing."""
    for request in requests:
        assert core.add_request(request)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with core._lock:
            waiting = [r for r in core._requests.values() if r.status is RequestStatus.WAITING]
        if not waiting:
            return
        time.sleep(0.01)
    raise TimeoutError("inputs were not decoded in time")
