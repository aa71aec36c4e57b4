"""The engine's boundary: plain, picklable data that crosses between gateway and engine.

Nothing here holds a tensor, a socket or a pydantic model, so the engine can later run
in another process or on another machine without the gateway changing (see
``engine.client``). The gateway builds an :class:`UpscaleRequest` from a validated task
and receives, keyed by ``request_id``, any number of :class:`Progress` items followed by
exactly one terminal item: an :class:`UpscaleResult` or an :class:`EngineError` (or,
from an engine that completes requests where it runs, a :class:`Finished`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "EngineError",
    "EngineOutput",
    "ErrorCode",
    "Finished",
    "OutputFormat",
    "Progress",
    "UpscaleRequest",
    "UpscaleResult",
]


class OutputFormat(enum.StrEnum):
    """Encodings the engine can produce. PNG and WEBP keep an input's alpha channel."""

    JPG = "JPG"
    PNG = "PNG"
    WEBP = "WEBP"

    @property
    def media_type(self) -> str:
        return {"JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}[self.value]

    @property
    def extension(self) -> str:
        return self.value.lower()


class ErrorCode(enum.StrEnum):
    """Why a request ended without a result. Values are Runware-style error codes."""

    INVALID_IMAGE = "invalidImage"  # undecodable, animated, or otherwise unusable bytes
    IMAGE_TOO_LARGE = "invalidImageSize"  # over the configured pixel limit
    IMAGE_TOO_SMALL = "invalidImageDimensions"  # a side under the minimum
    ABORTED = "taskAborted"  # cancelled by the gateway (client gone, shutdown)
    OVERLOADED = "rateLimitExceeded"  # engine queue full
    INTERNAL = "internalError"  # a fault of the server; message hides details
    # Remote engines only (a cluster's queue on Redis):
    UNAVAILABLE = "serviceUnavailable"  # the queue could not be reached for too long
    LOST = "taskLost"  # the queue lost the task's state (Redis restarted empty)
    RETRIES_EXHAUSTED = "taskRetriesExhausted"  # its workers died on it --max-deliveries times


@dataclass(frozen=True, slots=True)
class UpscaleRequest:
    """One 2x upscale. ``image`` is encoded bytes in any format Pillow reads."""

    request_id: str
    image: bytes
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 1.0
    clip_skip: int = 0
    seed: int = 0
    output_format: OutputFormat = OutputFormat.JPG
    output_quality: int = 95
    # Emit Progress items for this request (the engine skips the work otherwise).
    want_progress: bool = False
    # Emit one Progress when its last denoising step is done (its rows leave the UNet),
    # even without want_progress: how a cluster worker knows its capacity freed up.
    want_denoised: bool = False
    # For engines that run requests elsewhere (a cluster): the UUID under which
    # ``image`` is already in the shared image store (it travels by reference), and
    # what the completing side needs to turn the output into the task's answer (opaque
    # to the engine; the in-process engine ignores both).
    image_uuid: str = ""
    context: bytes = b""


@dataclass(frozen=True, slots=True)
class Progress:
    """``step`` of ``total_steps`` denoising steps are done (0 < step ≤ total_steps)."""

    request_id: str
    step: int
    total_steps: int

    @property
    def percent(self) -> int:
        return int(100 * self.step / self.total_steps)


@dataclass(frozen=True, slots=True)
class UpscaleResult:
    """The finished image, encoded as asked, exactly 2·W × 2·H of the input."""

    request_id: str
    image: bytes
    output_format: OutputFormat
    width: int
    height: int
    seed: int
    # This request's share of engine time in seconds: its fraction of every batched
    # UNet call it rode in, plus its own encode and decode. The basis of ``cost``.
    engine_seconds: float
    # How many UNet calls this request rode in, and the most rows it shared one with.
    unet_calls: int = 0
    max_batch_rows: int = 0


@dataclass(frozen=True, slots=True)
class EngineError:
    """A request that ended without a result. ``message`` is safe to show a client."""

    request_id: str
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class Finished:
    """Terminal, from an engine that completes requests where it runs (a cluster
    worker): the request's result or error was recorded and delivered there, so the
    submitting side has nothing left to do but forget it."""

    request_id: str


EngineOutput = Progress | UpscaleResult | EngineError | Finished
