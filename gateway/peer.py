"""``Peer``: what :class:`~gateway.delivery.Gateway` needs of whoever sent a task.

The gateway answers a task to its peer: an admission error, an async acknowledgement,
an ``imageUpload`` answer, a ``getResponse`` item. Two transports implement it:

- :class:`gateway.connection.Connection`, one WebSocket (its session is the socket's,
  so sync results and progress reach it through the gateway state's delivery);
- ``gateway.rest._Slot``, one task of one REST request (its session is transient:
  sync results reach the request through ``Gateway.watch`` on the task's record).
"""

from __future__ import annotations

from typing import Protocol

from .session import Session

__all__ = ["Peer"]


class Peer(Protocol):
    api_key: str  # the authenticated key its tasks run under
    session: Session | None  # where sync results of its tasks are delivered
    in_flight: int  # its upscale and imageUpload tasks not yet answered (the gateway counts them)
    replays_errors: bool  # see connection.py's _NO_ERROR_REPLAY_AGENTS

    def send(self, frame: bytes) -> bool:
        """Queue one server frame for this peer; False if it can no longer take it."""
        ...
