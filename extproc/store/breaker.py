"""A circuit breaker for one backend: after ``failures`` failures in a row it
opens and callers fail at once; after ``cool_down_s`` one probe may go
through (half-open); its success closes the breaker, its failure reopens it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    def __init__(
        self,
        failures: int = 5,
        cool_down_s: float = 1.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] = lambda is_open: None,
    ) -> None:
        self.threshold = failures
        self.cool_down_s = cool_down_s
        self._clock = clock
        self.on_change = on_change  # the owner may replace it
        self._failures = 0
        self._opened_at: float | None = None  # None: closed
        self._probe_at: float | None = None  # a half-open probe is out since then

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """May a call go out now? Closed: yes. Open: only one probe per cool-down."""
        if self._opened_at is None:
            return True
        now = self._clock()
        if now - self._opened_at < self.cool_down_s:
            return False
        # A probe that never reported (it cannot: calls are bounded) must not wedge us.
        if self._probe_at is not None and now - self._probe_at < self.cool_down_s:
            return False
        self._probe_at = now
        return True

    def success(self) -> None:
        self._failures = 0
        self._probe_at = None
        if self._opened_at is not None:
            self._opened_at = None
            self.on_change(False)

    def failure(self) -> None:
        self._failures += 1
        if self._opened_at is not None:
            if self._probe_at is not None:  # the probe failed: another cool-down
                self._opened_at = self._clock()
                self._probe_at = None
            return
        if self._failures >= self.threshold:
            self._opened_at = self._clock()
            self.on_change(True)
