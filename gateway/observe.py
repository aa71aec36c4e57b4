"""A task's end, observed once: counted in the metrics and written as its log line.

:class:`TaskEnds` is what the two places where tasks end call — the gateway core
(``Gateway.finish``, and refusals at admission) and a cluster worker (``_finish``) —
so both count and log the same way::

    ends = TaskEnds(metrics)        # metrics: a Metrics, or None (--no-metrics)
    ends.watch(engine)              # at start: the engine's timings, for the log lines
    ends.ended(uuid, "imageUpscale", session_id, code=None, deliver_async=False,
               total=0.41, before_engine=0.002)
"""

from __future__ import annotations

from . import logs
from .metrics import Metrics

__all__ = ["TaskEnds"]


class TaskEnds:
    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self._stages: logs.EngineStages | None = None

    def watch(self, engine) -> None:
        """Keep ``engine``'s per-request timings for the task lines, when those are
        written at all (``--log-format json``, or DEBUG) and the engine reports them."""
        observers = getattr(engine, "observers", None)
        if observers is not None and logs.task_lines_enabled():
            self._stages = logs.EngineStages()
            observers.add(self._stages.observe)

    def ended(
        self,
        task_uuid: str,
        task_type: str,
        session_id: str | None,
        *,
        code: str | None,
        deliver_async: bool,
        total: float,
        timed: bool = True,
        before_engine: float | None = None,
        queued: float | None = None,
    ) -> None:
        """Task ``task_uuid`` got its terminal item (``code`` None: success), ``total``
        seconds after it was received. ``timed``: it was accepted, so its latency counts
        (a refusal at admission is counted, not timed); ``before_engine``: seconds until
        it reached the engine, of which ``queued`` on the cluster's queue."""
        if self.metrics is not None:
            seconds = total if timed else None
            self.metrics.task_ended(task_type, code, deliver_async=deliver_async, seconds=seconds)
        done = self._stages.pop(task_uuid) if self._stages is not None else None
        if not logs.task_lines_enabled():
            return
        stages = logs.stage_seconds(total, before_engine=before_engine, done=done, queued=queued)
        logs.task_ended(
            task_uuid,
            task_type,
            code=code,
            deliver_async=deliver_async,
            session_id=session_id,
            seconds=stages,
        )
