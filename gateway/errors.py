"""Errors in Runware's wire format.

Every fault a client can cause or see is a :class:`TaskError`; it becomes one object
of a frame's ``errors`` array::

    {"code", "message", "parameter", "type", "taskType", "taskUUID"}

``code`` is camelCase. Request faults start with ``invalid``, ``missing``,
``conflict`` or ``unsupported`` (the SDKs classify on those prefixes);
``rateLimitExceeded`` is backpressure; ``timeout…`` a time-out; ``internalError`` a
fault of the server, whose message never carries details (they may be sensitive).
An error about a task always carries that task's ``taskUUID`` and ``taskType``:
the new SDKs fail *every* pending request on an error without one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["TaskError", "internal_error"]


@dataclass(eq=False)
class TaskError(Exception):
    code: str
    message: str
    parameter: str | None = None
    type: str | None = None
    task_type: str | None = None
    task_uuid: str | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def for_task(self, task_type: str | None, task_uuid: str | None) -> TaskError:
        """The same error, attributed to a task (fields already set are kept)."""
        return dataclasses.replace(
            self, task_type=self.task_type or task_type, task_uuid=self.task_uuid or task_uuid
        )

    def to_wire(self) -> dict:
        item: dict = {"code": self.code, "message": self.message}
        if self.parameter is not None:
            item["parameter"] = self.parameter
        if self.type is not None:
            item["type"] = self.type
        if self.task_type is not None:
            item["taskType"] = self.task_type
        if self.task_uuid is not None:
            item["taskUUID"] = self.task_uuid
        return item


def internal_error(task_type: str | None = None, task_uuid: str | None = None) -> TaskError:
    return TaskError("internalError", "internal server error", task_type=task_type, task_uuid=task_uuid)
