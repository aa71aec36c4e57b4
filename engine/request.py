"""The engine's internal view of a request: plain data with an ordered status.

Tensors live in the runner (``engine.runner.RowState``); the scheduler reads only
what is here. Like vLLM's ``RequestStatus``, the order means something: every status
greater than ``DECODING`` is finished.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .api import UpscaleRequest

__all__ = ["Request", "RequestStatus"]


class RequestStatus(enum.IntEnum):
    WAITING = 0  # admitted; its image is being decoded on the codec pool
    PREPARING = 1  # decoded; waits for text and VAE encoding on the model thread
    DENOISING = 2  # in a shape group, taking UNet steps
    DECODING = 3  # all steps done; VAE decode and image encode under way
    FINISHED_OK = 4
    FINISHED_ERROR = 5
    FINISHED_ABORTED = 6

    @property
    def finished(self) -> bool:
        return self > RequestStatus.DECODING


@dataclass(eq=False)
class Request:
    """One request inside the engine. ``shape`` is the padded latent (h, w) of the
    *input*; the denoised latent is twice that."""

    api: UpscaleRequest
    arrival: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    shape: tuple[int, int] = (0, 0)
    rows: int = 1  # UNet rows per step: 2 with classifier-free guidance
    step_index: int = 0  # steps done
    last_tick: int = -1  # the tick this request last took a step in (fairness)
    deadline: int = 0  # the tick it would finish at if it stepped every tick from joining
    # Accounting, reported with the result.
    engine_seconds: float = 0.0
    unet_calls: int = 0
    max_batch_rows: int = 0
    first_step_at: float | None = None  # time.monotonic() of its first UNet step
    denoised_at: float | None = None  # ... and of its last

    @property
    def request_id(self) -> str:
        return self.api.request_id

    @property
    def total_steps(self) -> int:
        return self.api.steps

    @property
    def done_denoising(self) -> bool:
        return self.step_index >= self.api.steps
