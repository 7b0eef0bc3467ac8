"""HTTP /healthz, /readyz and /metrics for the agent (asyncio, no extra threads).

/healthz (liveness) fails when a task the agent cannot work without is dead, restarting or stuck (see
routed/supervisor.py), so Kubernetes restarts the pod; since it is served by the event loop itself, a blocked
loop fails it too (the probe times out). /readyz fails until every component is ready and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, list[str]]]


class HealthServer:
    def __init__(self, listen: str, liveness: Check, readiness: Check, registry: CollectorRegistry) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port)
        self.liveness = liveness
        self.readiness = readiness
        self.registry = registry
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        log.info("health and metrics on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            live, reasons = self.liveness()
            body = ("ok\n" if live else "unhealthy: " + "; ".join(reasons) + "\n").encode()
            return (200 if live else 503), "text/plain", body
        if path == "/readyz":
            ready, reasons = self.readiness()
            body = ("ok\n" if ready else "not ready: " + "; ".join(reasons) + "\n").encode()
            return (200 if ready else 503), "text/plain", body
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return 404, "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await asyncio.wait_for(reader.readline(), 5)).decode("latin-1")
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else "/"
            status, content_type, body = self._respond(path)
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError) as exc:
            log.debug("health client: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
