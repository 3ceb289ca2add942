"""Errors the engine raises for requests it refuses; each leaves the engine healthy."""
from __future__ import annotations


class QueueFullError(RuntimeError):
    """add_request refused: SchedulerConfig.max_waiting_requests requests are waiting already
    (a server answers 503 and the client retries later)."""
