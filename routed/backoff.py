"""The one retry policy: exponential backoff with a cap and jitter, for asyncio code, threads and scripts.

    backoff = Backoff(base=0.5, cap=30.0)
    while not done:
        try: work(); backoff.reset()
        except SomeError: await backoff.sleep()      # or backoff.wait(stop_event) in a thread

Delays are base, 2·base, 4·base, ... up to cap, each multiplied by a random factor in [1 - jitter, 1 + jitter]
(never above cap), so many agents retrying the same API server do not synchronise. Written here rather than
taken from tenacity/backoff: those wrap a call in a decorator, while every user here is a loop that also waits
on a stop or wake event between attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 30.0
    jitter: float = 0.2  # fraction of the delay
    factor: float = 2.0
    attempts: int = field(default=0, init=False)  # failures since the last reset

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"backoff needs 0 < base <= cap (base={self.base}, cap={self.cap})")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter}")

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        delay = min(self.cap, self.base * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        if self.jitter:
            delay *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return min(self.cap, delay)

    def reset(self) -> None:
        self.attempts = 0

    async def sleep(self, wake: asyncio.Event | None = None) -> bool:
        """Wait the next delay; return True early when `wake` is set (a stop, or new work)."""
        delay = self.next_delay()
        if wake is None:
            await asyncio.sleep(delay)
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), delay)
            return True
        return False

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Thread version of `sleep`: True when `stop` was set during the wait."""
        delay = self.next_delay()
        if stop is None:
            time.sleep(delay)
            return False
        return stop.wait(delay)
