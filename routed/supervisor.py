"""One place that starts, names and watches every long-running task of the agent.

    supervisor.spawn("policy", loop, required=True)            # loop(liveness) -> Awaitable[None]

A task that raises (or returns while the agent is not stopping) is logged with its traceback and then,
per task:
- `on_failure="restart"`: started again after the shared backoff (reset once a run lasted `stable_after`);
  meanwhile it is reported "restarting" (the agent is not ready, and /healthz fails if the task is required);
- `on_failure="fatal"`: the supervisor records the reason and sets `fatal`; the agent then stops and exits
  non-zero, so its own supervisor (kubelet, the lab) restarts the whole process.
A restarting task that fails `restart_budget` times in a row (without one run lasting `stable_after`) is
escalated to fatal: a fresh process is then the better retry.

Every task start passes the failpoint `task.<name>` (routed/failpoints.py), so tests can kill any task.

Liveness: each task gets a `Liveness`; work that may hang (an iptables-restore, an API call) runs inside
`liveness.busy("what")`. A task busy for longer than its `stall_after` counts as stuck, which fails /healthz
like a dead task, so Kubernetes restarts a wedged agent instead of leaving it "alive" forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from routed import failpoints
from routed.api_types import TaskStatus
from routed.backoff import Backoff

log = logging.getLogger(__name__)

OnFailure = Literal["restart", "fatal"]
TaskState = Literal["running", "restarting", "failed", "stopped"]
DEFAULT_STALL_AFTER = 300.0
DEFAULT_RESTART_BUDGET = 10
STABLE_AFTER = 30.0


class Liveness:
    """Progress stamp of one task."""

    def __init__(self, stall_after: float) -> None:
        self.stall_after = stall_after
        self.what = ""
        self.since = 0.0

    @contextlib.contextmanager
    def busy(self, what: str) -> Iterator[None]:
        previous, previous_since = self.what, self.since
        self.what, self.since = what, time.monotonic()
        try:
            yield
        finally:
            self.what, self.since = previous, previous_since

    def busy_seconds(self, now: float | None = None) -> float:
        return (now or time.monotonic()) - self.since if self.what else 0.0

    def stuck(self) -> str:
        """Why the task counts as stuck ("" when it does not)."""
        seconds = self.busy_seconds()
        if self.what and seconds > self.stall_after:
            return f"busy with {self.what} for {seconds:.0f}s (limit {self.stall_after:.0f}s)"
        return ""


TaskBody = Callable[[Liveness], Awaitable[None]]


@dataclass
class _Task:
    name: str
    body: TaskBody
    on_failure: OnFailure
    required: bool
    liveness: Liveness
    backoff: Backoff
    restart_budget: int | None
    retiring: bool = False  # its owner is stopping it: ending now is not a failure
    state: TaskState = "running"
    restarts: int = 0
    last_error: str = ""
    runner: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, backoff: Callable[[], Backoff] | None = None, stable_after: float = STABLE_AFTER) -> None:
        self._backoff = backoff or (lambda: Backoff(base=0.5, cap=30.0))
        self.stable_after = stable_after
        self._tasks: dict[str, _Task] = {}
        self._stopping = False
        self.fatal = asyncio.Event()
        self.fatal_reason = ""

    def spawn(self, name: str, body: TaskBody, *, on_failure: OnFailure = "restart", required: bool = True,
              stall_after: float = DEFAULT_STALL_AFTER,
              restart_budget: int | None = DEFAULT_RESTART_BUDGET) -> Liveness:
        """Start `body(liveness)` as task `name`. `restart_budget` (required tasks only; None: unlimited) is how
        many failures in a row are retried in-process before the failure becomes fatal."""
        if name in self._tasks and self._tasks[name].state in ("running", "restarting"):
            raise ValueError(f"task {name!r} is already supervised")
        task = _Task(name, body, on_failure, required, Liveness(stall_after), self._backoff(),
                     restart_budget if required else None)
        self._tasks[name] = task
        task.runner = asyncio.get_running_loop().create_task(self._keep(task), name=name)
        return task.liveness

    async def _keep(self, task: _Task) -> None:
        while not (self._stopping or task.retiring):
            task.state = "running"
            started = time.monotonic()
            try:
                failpoints.hit(f"task.{task.name}")
                await task.body(task.liveness)
                if self._stopping or task.retiring:
                    break
                raise RuntimeError("returned although the agent is not stopping")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping or task.retiring:
                    break
                task.last_error = f"{type(exc).__name__}: {exc}"
                log.error("task %s died: %s", task.name, task.last_error, exc_info=exc)
            if time.monotonic() - started > self.stable_after:
                task.backoff.reset()
            task.liveness.what = ""  # whatever it was doing ended with it
            exhausted = task.restart_budget is not None and task.backoff.attempts >= task.restart_budget
            if task.on_failure == "fatal" or exhausted:
                task.state = "failed"
                self.fatal_reason = f"task {task.name} died" + (
                    f" {task.backoff.attempts + 1} times in a row" if exhausted else "") + f": {task.last_error}"
                log.critical("%s: the agent stops", self.fatal_reason)
                self.fatal.set()
                return
            task.state = "restarting"
            delay = task.backoff.next_delay()
            log.warning("task %s restarts in %.1fs", task.name, delay)
            await asyncio.sleep(delay)
            task.restarts += 1
        task.state = "stopped"

    async def stop(self) -> None:
        """Cancel every task and wait for them to end (in reverse order of spawning)."""
        self._stopping = True
        for task in reversed(list(self._tasks.values())):
            await self._cancel(task)

    def retire(self, name: str) -> None:
        """The task's owner is shutting it down: from now on its end is expected (no restart, no error)."""
        task = self._tasks.get(name)
        if task is not None:
            task.retiring = True

    async def stop_task(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            await self._cancel(task)

    @staticmethod
    async def _cancel(task: _Task) -> None:
        task.retiring = True
        runner = task.runner
        # Python 3.11's wait_for can swallow a cancellation that races with its inner future: cancel again
        # until the runner has ended (it checks `retiring` on every round, so this ends quickly).
        while runner is not None and not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({runner}, timeout=1.0)
        task.state = "stopped"

    # -- what the agent reports ------------------------------------------------------------------------
    def _problem(self, task: _Task) -> str:
        if task.state == "restarting":
            return f"task {task.name} restarting after: {task.last_error}"
        if task.state == "failed":
            return f"task {task.name} failed: {task.last_error}"
        stuck = task.liveness.stuck()
        return f"task {task.name} stuck: {stuck}" if stuck else ""

    def liveness(self) -> tuple[bool, list[str]]:
        """For /healthz: every required task is running and none is stuck."""
        problems = [p for t in self._tasks.values() if t.required and (p := self._problem(t))]
        return not problems, problems

    def readiness(self) -> list[str]:
        """Reasons for not-ready: any task dead, restarting or stuck."""
        return [p for t in self._tasks.values() if t.state != "stopped" and (p := self._problem(t))]

    def status(self) -> list[TaskStatus]:
        return [
            TaskStatus(name=t.name, state=t.state, required=t.required, onFailure=t.on_failure,
                       restarts=t.restarts, lastError=t.last_error, busy=t.liveness.what,
                       busySeconds=round(t.liveness.busy_seconds(), 3))
            for t in self._tasks.values()
        ]
