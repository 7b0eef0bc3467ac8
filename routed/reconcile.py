"""The dirty-flag loop every reconciler of the agent runs (policy, BGP, CNI repair): desired state → kernel.

    reconciler = Reconciler("policy", apply, Backoff(base=0.1, cap=30.0))
    supervisor.spawn("policy", reconciler.run)
    reconciler.mark_dirty()          # on any relevant change, and on the periodic resync

`apply()` computes the desired state, diffs it with what is there and applies the difference. When it raises,
the failure is recorded (`last_error`, `failures`), logged, and the run is retried after the shared backoff
until one succeeds; changes arriving meanwhile are folded into that retry. What the last successful apply
wrote stays in place, so a failing apply never opens what was closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from routed.backoff import Backoff
from routed.supervisor import Liveness

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, name: str, apply: Callable[[], Awaitable[None]], backoff: Backoff) -> None:
        self.name = name
        self.apply = apply
        self.backoff = backoff
        self.dirty = asyncio.Event()
        self.failures = 0  # consecutive failed runs
        self.runs = 0  # successful runs
        self.last_error = ""
        self.last_ok: float | None = None  # unix time of the last successful run

    def mark_dirty(self) -> None:
        self.dirty.set()

    @property
    def healthy(self) -> bool:
        return self.failures == 0

    async def run_once(self, liveness: Liveness | None = None) -> bool:
        """One apply; True when it succeeded. A failure leaves the reconciler dirty."""
        self.dirty.clear()
        try:
            if liveness is None:
                await self.apply()
            else:
                with liveness.busy(f"{self.name} apply"):
                    await self.apply()
        except Exception as exc:
            self.failures += 1
            self.last_error = f"{exc}"
            log.error("%s apply failed (%d in a row), keeping the last good state: %s", self.name, self.failures,
                      exc, exc_info=self.failures == 1)
            self.dirty.set()
            return False
        if self.failures:
            log.info("%s apply succeeded after %d failures", self.name, self.failures)
        self.failures = 0
        self.last_error = ""
        self.runs += 1
        self.last_ok = time.time()
        self.backoff.reset()
        return True

    async def run(self, liveness: Liveness) -> None:
        """The supervised loop: apply whenever dirty; retry failures with backoff."""
        while True:
            await self.dirty.wait()
            if not await self.run_once(liveness):
                await asyncio.sleep(self.backoff.next_delay())
