"""A bounded queue with a stated overflow policy and counters.

``policy="block"``: ``put`` waits for room (files, iterators: no frame is ever lost).
``policy="drop_oldest"``: ``put`` never waits; when full the oldest item is discarded and
counted in ``dropped`` (live sources: always process the newest frame).

Example:
    >>> from keepbits.runtime.queues import BoundedQueue
    >>> q = BoundedQueue(1, "drop_oldest")
    >>> q.put("a"), q.put("b")
    (True, True)
    >>> q.get(timeout=0.1), q.dropped
    ('b', 1)
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

POLICIES = ("block", "drop_oldest")


class QueueClosed(Exception):
    """``put`` on a closed queue, or ``get`` on a closed and drained one."""


class BoundedQueue:
    """Thread-safe FIFO of at most ``maxsize`` items with policy ``block`` or ``drop_oldest``."""

    def __init__(self, maxsize: int, policy: str = "block"):
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.maxsize, self.policy = maxsize, policy
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0
        self.high_water = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: Any, timeout: float | None = None) -> bool:
        """Add ``item``; False if ``block`` policy timed out. :class:`QueueClosed` once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise QueueClosed("queue is closed")
                if len(self._items) < self.maxsize:
                    break
                if self.policy == "drop_oldest":
                    self._items.popleft()
                    self.dropped += 1
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self._items.append(item)
            self.high_water = max(self.high_water, len(self._items))
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> Any:
        """Oldest item; ``TimeoutError`` after ``timeout`` s; :class:`QueueClosed` when closed and empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._closed:
                    raise QueueClosed("queue is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("no item within the timeout")
                self._cond.wait(remaining)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """Refuse new items; ``get`` still returns what is queued, then raises :class:`QueueClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
