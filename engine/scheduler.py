"""Which requests ride in the next UNet call. Decides only; owns no tensors.

The algorithm (continuous mode, step-level batching):

Requests that are denoising are grouped by latent shape, since only rows of one H×W
can share a UNet call (MODEL.md). Each tick serves one group, chosen by the policy:

- ``deadline`` (default): each request, as it joins, gets the tick at which it would
  finish if it took a step every tick (join tick + its steps); the group holding the
  earliest such deadline goes next. Short jobs that arrive together with long ones
  finish first; work that arrived earlier goes before work that arrived later once
  their deadlines say so, so no group starves and the latency tail stays short; and
  later requests of the running group still join it at once.
- ``round-robin``: the groups that have work take turns, so a short job of one shape
  never waits behind a long job of another: its latency grows with the number of
  active groups, not with their jobs' lengths; but every job then shares the device
  with every group, which stretches the tail under load.

Within the group, requests are taken earliest deadline first (round-robin:
least-recently-stepped first, then oldest first) until the row budget is full; a guided
request takes two rows. New requests join a group at any tick boundary and finished
ones leave at once.

Static mode is what generic servers do (Triton's dynamic batcher, Ray Serve's
``@serve.batch``): wait up to ``static_delay`` for same-shape requests, freeze a
batch, and run it to completion before the next batch starts; nobody joins late, and
the batch's results go out together when it is done, as a batched call returns them
all at once. (Rows that have taken their last step leave the UNet calls meanwhile.)
It exists to be compared against (benchmarks/), sharing all other code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .request import Request, RequestStatus

__all__ = ["ScheduledBatch", "Scheduler"]

Shape = tuple[int, int]
POLICIES = ("deadline", "round-robin")
GROW_AFTER = 200  # full calls without running out of memory before a shrunk row budget doubles


@dataclass(frozen=True, slots=True)
class ScheduledBatch:
    """One UNet call: these requests (all of ``shape``), ``rows`` rows in total."""

    shape: Shape
    requests: tuple[Request, ...]
    rows: int
    tick: int


class Scheduler:
    def __init__(
        self,
        max_rows: int,
        *,
        mode: str = "continuous",
        policy: str = "deadline",
        static_delay: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("continuous", "static"):
            raise ValueError(f"unknown batching mode {mode!r}: use 'continuous' or 'static'")
        if policy not in POLICIES:
            raise ValueError(f"unknown group policy {policy!r}: use one of {', '.join(POLICIES)}")
        self.max_rows = max_rows
        self.ceiling = max_rows  # the configured budget, which max_rows returns to after a shrink
        self._calm = 0  # full calls that succeeded since the budget last changed
        self.mode = mode
        self.policy = policy
        self.static_delay = static_delay
        self._clock = clock
        self._groups: dict[Shape, list[Request]] = {}  # insertion order = round-robin order
        self._last_shape: Shape | None = None
        self._frozen: list[Request] | None = None  # static mode: the batch running to completion
        self._held: list[Request] = []  # static mode: finished members of the frozen batch
        self._released: list[Request] = []  # finished, results may go out
        self._tick = 0

    # Membership

    def add(self, request: Request) -> None:
        """A prepared request joins its shape group; it can ride in the next call."""
        request.status = RequestStatus.DENOISING
        request.deadline = self._tick + request.total_steps
        self._groups.setdefault(request.shape, []).append(request)

    def remove(self, request: Request) -> None:
        """Take a request out (finished, aborted or failed); a no-op if it is not here."""
        group = self._groups.get(request.shape)
        if group and request in group:
            group.remove(request)
            if not group:
                del self._groups[request.shape]
        if self._frozen is not None and request in self._frozen:
            self._frozen.remove(request)
            if not self._frozen:
                self._frozen = None
                self._released += self._held
                self._held = []

    def finish(self, requests: Iterable[Request]) -> None:
        """``requests`` took their last step and leave. Their results may go out at
        once, or in static mode when the frozen batch is done (:meth:`take_released`)."""
        for request in requests:
            (self._held if self._frozen is not None else self._released).append(request)
            self.remove(request)

    def take_released(self) -> list[Request]:
        """The finished requests whose results may go out now, each returned once."""
        released, self._released = self._released, []
        return released

    def __len__(self) -> int:
        return sum(len(g) for g in self._groups.values())

    @property
    def has_work(self) -> bool:
        return bool(self._groups)

    # Decisions

    def schedule(self) -> ScheduledBatch | None:
        """The next UNet call, or None if nothing should run now (see :meth:`wait_time`)."""
        if not self._groups:
            return None
        picked = self._schedule_static() if self.mode == "static" else self._schedule_continuous()
        if not picked:
            return None
        self._tick += 1
        for request in picked:
            request.last_tick = self._tick
        return ScheduledBatch(picked[0].shape, tuple(picked), sum(r.rows for r in picked), self._tick)

    def wait_time(self) -> float | None:
        """Seconds until :meth:`schedule` may return a batch without new input; None if
        only new input can help (idle)."""
        if not self._groups:
            return None
        if self.mode == "static" and self._frozen is None:
            oldest = min((g[0] for g in self._groups.values()), key=lambda r: r.arrival)
            return max(0.0, oldest.arrival + self.static_delay - self._clock())
        return 0.0

    def _next_shape(self) -> Shape:
        if self.policy == "deadline":
            return min(self._groups, key=lambda shape: min(r.deadline for r in self._groups[shape]))
        shapes = list(self._groups)
        if self._last_shape in shapes:
            return shapes[(shapes.index(self._last_shape) + 1) % len(shapes)]
        return shapes[0]

    def _schedule_continuous(self) -> list[Request]:
        shape = self._next_shape()
        self._last_shape = shape
        if self.policy == "deadline":
            group = sorted(self._groups[shape], key=lambda r: (r.deadline, r.arrival))
        else:
            group = sorted(self._groups[shape], key=lambda r: (r.last_tick, r.arrival))
        return self._fill(group)

    def _fill(self, candidates: list[Request]) -> list[Request]:
        picked: list[Request] = []
        rows = 0
        for request in candidates:
            if rows + request.rows <= self.max_rows or not picked:
                picked.append(request)
                rows += request.rows
            if rows >= self.max_rows:
                break
        return picked

    def _schedule_static(self) -> list[Request]:
        if self._frozen is None:
            oldest = min((g[0] for g in self._groups.values()), key=lambda r: r.arrival)
            group = self._groups[oldest.shape]
            rows = sum(r.rows for r in group)
            if rows < self.max_rows and self._clock() < oldest.arrival + self.static_delay:
                return []
            self._frozen = self._fill(sorted(group, key=lambda r: r.arrival))
        return list(self._frozen)

    def shrink(self) -> int:
        """Halve the row budget after an out-of-memory error; returns the new budget."""
        self.max_rows = max(1, self.max_rows // 2)
        self._calm = 0
        return self.max_rows

    def settle(self, rows: int) -> int | None:
        """Note a call of ``rows`` rows that ran without running out of memory. Only a
        call that filled the budget says the budget fits: after ``GROW_AFTER`` of them
        in a row under a shrunk budget, it doubles again, up to the configured one, so
        memory that a passing peak took (another process, a large VAE batch) is used
        again. Returns the new budget when it grew."""
        if self.max_rows >= self.ceiling or rows < self.max_rows:
            return None
        self._calm += 1
        if self._calm < GROW_AFTER:
            return None
        self._calm = 0
        self.max_rows = min(self.ceiling, self.max_rows * 2)
        return self.max_rows
