"""The one interface every part of the agent implements, and the local API handler type they serve.

The agent (routed/agent.py) only wires components: it starts them in order, registers the API methods each
serves, asks each whether it is ready, aggregates their status, and marks them dirty on the periodic resync.
Long-running work is never started with `create_task` directly: a component spawns it on the supervisor it
was given (routed/supervisor.py), which names it, watches it and restarts it or ends the agent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

ApiHandler = Callable[[dict[str, Any]], Awaitable[Any]]


class Component(Protocol):
    name: str

    async def start(self) -> None:
        """Bring the component up; long-running work goes to the supervisor. Raising fails the agent's start."""

    async def stop(self) -> None:
        """Release what `start` took; the kernel state it programmed stays (pods keep working)."""

    def ready(self) -> tuple[bool, str]:
        """(ready, why not) — shown in /readyz and `routed status`."""

    def status(self) -> Mapping[str, Any]:
        """The component's part of `routed status` (a TypedDict of routed/api_types.py)."""

    def api_methods(self) -> dict[str, ApiHandler]:
        """Local API methods served by this component: name -> handler."""

    def resync(self) -> None:
        """Periodic resync: treat everything as dirty, so drift made by someone else is repaired."""
