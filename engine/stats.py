"""What an engine has done and holds: plain counters, read as a snapshot.

The engine's threads update an :class:`EngineStats` as they work (each field has one
writer thread, so no lock is needed for the counters); :meth:`EngineClient.stats`
returns a copy with the current request counts filled in. The gateway's JSON stats,
its metrics and the cluster's capacity checks all read this one place.

Optional *observers* receive one plain event per UNet call, VAE call and finished
request (:class:`UnetCall`, :class:`VaeCall`, :class:`RequestDone`), on the engine's
threads: they must be cheap and must not raise (a failing observer is logged and
dropped, never allowed to hurt the engine). A request's :class:`RequestDone` is
observed before its terminal output is emitted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["EngineStats", "Observer", "RequestDone", "UnetCall", "VaeCall"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UnetCall:
    """One UNet call: ``rows`` rows (a CFG request takes two) of ``requests`` requests."""

    rows: int
    requests: int
    seconds: float
    shape: tuple[int, int]  # the input's padded latent (h, w)


@dataclass(frozen=True, slots=True)
class VaeCall:
    """One batched VAE call: ``op`` is ``"encode"`` or ``"decode"``."""

    op: str
    items: int
    seconds: float


@dataclass(frozen=True, slots=True)
class RequestDone:
    """A request ended. Times are seconds from its admission (None: never reached)."""

    request_id: str
    outcome: str  # "success", or the engine's error code
    first_step: float | None  # admitted → its first UNet step (queue wait)
    denoised: float | None  # admitted → its last UNet step
    finished: float  # admitted → its terminal output


Observer = Callable[[UnetCall | VaeCall | RequestDone], None]


@dataclass(slots=True)
class EngineStats:
    """Counters since the engine started, and (in a snapshot) the requests it holds."""

    unet_calls: int = 0
    unet_rows: int = 0  # summed over calls: unet_rows / unet_calls is the mean batch
    unet_seconds: float = 0.0
    encode_calls: int = 0
    encoded: int = 0
    encode_seconds: float = 0.0
    decode_calls: int = 0
    decoded: int = 0
    decode_seconds: float = 0.0
    succeeded: int = 0
    failed: int = 0  # errors and aborts
    # Filled in by snapshots: requests held now, by stage.
    waiting: int = 0  # admitted: input being decoded, or waiting for text/VAE encoding
    denoising: int = 0
    decoding: int = 0

    @property
    def mean_rows(self) -> float:
        return self.unet_rows / self.unet_calls if self.unet_calls else 0.0

    def copy(self, **changes) -> EngineStats:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mean_rows": round(self.mean_rows, 3)}


class Observers:
    """The observers of one engine; a failing one is dropped, not retried."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def __bool__(self) -> bool:
        return bool(self._observers)

    def __call__(self, event: UnetCall | VaeCall | RequestDone) -> None:
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:
                logger.exception("an engine observer failed; it is removed")
                self._observers.remove(observer)
