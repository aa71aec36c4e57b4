"""A simulated model, for benchmarks only: ``--model sim:FIXED_MS,PER_ROW_MS``.

The real engine (scheduler, threads, queues, codecs) around a runner whose UNet call
sleeps for a modelled time (``FIXED_MS + PER_ROW_MS × rows``) instead of computing, and
whose "decode" is the input resized 2× (nearest). It lets a 2-core machine show how a
cluster scales with GPU-like step costs that the CPUs do not limit. Its outputs are not
upscales: it is refused unless named explicitly, and says so wherever it runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import sampler
from .runner import PreparedInput
from .scheduler import ScheduledBatch

__all__ = ["SIM_PREFIX", "SimRunner", "parse_sim"]

logger = logging.getLogger(__name__)

SIM_PREFIX = "sim:"


def parse_sim(model: str) -> tuple[float, float]:
    """``sim:FIXED_MS,PER_ROW_MS`` → (fixed, per row) in milliseconds."""
    try:
        fixed, per_row = (float(part) for part in model.removeprefix(SIM_PREFIX).split(","))
    except ValueError:
        raise ValueError(
            f"--model {model!r}: a simulated model is sim:FIXED_MS,PER_ROW_MS, e.g. sim:40,2"
        ) from None
    if fixed < 0 or per_row < 0:
        raise ValueError(f"--model {model!r}: the modelled times must not be negative")
    return fixed, per_row


@dataclass(slots=True)
class _SimState:
    prepared: PreparedInput


class SimRunner:
    """:class:`~engine.runner.ModelRunner`'s interface, with modelled UNet time."""

    def __init__(self, fixed_ms: float, per_row_ms: float) -> None:
        self.fixed_ms = fixed_ms
        self.per_row_ms = per_row_ms
        self.device = torch.device("cpu")
        self.states: dict[str, _SimState] = {}
        logger.warning(
            "SIMULATED ENGINE (benchmarks only): each UNet call sleeps %g ms + %g ms per row; "
            "outputs are the inputs resized 2x, not upscales",
            fixed_ms,
            per_row_ms,
        )

    def prepare(self, requests, inputs: list[PreparedInput]) -> None:
        for request, prepared in zip(requests, inputs):
            request.rows = sampler.guidance_mode(
                request.api.prompt, request.api.negative_prompt, request.api.cfg_scale
            ).rows
            self.states[request.request_id] = _SimState(prepared)

    def step(self, batch: ScheduledBatch) -> None:
        time.sleep((self.fixed_ms + self.per_row_ms * batch.rows) / 1000)

    def decode(self, requests) -> list[np.ndarray]:
        images = []
        for request in requests:
            prepared = self.states[request.request_id].prepared
            pixels = prepared.pixels[: prepared.height, : prepared.width]
            images.append(pixels.repeat(2, axis=0).repeat(2, axis=1))
        return images

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)
