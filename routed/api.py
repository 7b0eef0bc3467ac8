"""The agent's local API: one JSON request per line on a unix socket, one JSON response line back.

Request:  {"method": "cni.add", "params": {...}}
Response: {"result": <any>}  or  {"error": {"code": <int>, "msg": <str>, "details": <str>}}

Errors are routed.errors.RoutedError, mapped here once: `{code, msg, details}` with the codes of
routed.errors.Code (the CNI spec's where a CNI call is answered, 100+ for routed's own). Used by `routed-cni` (which has its own stdlib client, see cni/plugin.py)
and by the `routed` CLI (the client below).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

from routed.component import ApiHandler
from routed.errors import Code, RoutedError
from routed.supervisor import Liveness

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 * 1024 * 1024


class ApiServer:
    def __init__(self, path: str) -> None:
        self.path = path
        self._handlers: dict[str, ApiHandler] = {}
        self._server: asyncio.base_events.Server | None = None

    def register(self, method: str, handler: ApiHandler) -> None:
        self._handlers[method] = handler

    def register_unavailable(self, methods: Iterable[str], why: str) -> None:
        """Methods of a component that is disabled here: answered with NOT_RUNNING and the reason."""

        async def unavailable(params: dict[str, Any]) -> Any:
            raise RoutedError(why, code=Code.NOT_RUNNING)

        for method in methods:
            self._handlers[method] = unavailable

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        tmp_path = self.path + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        # Bind under a temporary name, then rename: a client never sees a socket nobody listens on.
        self._server = await asyncio.start_unix_server(self._serve, path=tmp_path, limit=MAX_REQUEST_BYTES)
        os.chmod(tmp_path, 0o600)
        os.replace(tmp_path, self.path)
        log.info("local API listening on %s", self.path)

    async def serve(self, liveness: Liveness) -> None:
        """The supervised task `api` (fatal: an agent nobody can reach must be restarted)."""
        if self._server is None:
            raise RuntimeError("the local API is not bound")
        await self._server.serve_forever()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            response = await self._dispatch(line)
            writer.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("API client went away: %s", exc)
        except ValueError as exc:  # line over the limit
            log.warning("API request rejected: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            method = request["method"]
            params = request.get("params") or {}
            if not isinstance(params, dict):
                raise TypeError("params must be an object")
        except (ValueError, KeyError, TypeError) as exc:
            return {"error": RoutedError("malformed API request", str(exc), code=Code.MALFORMED_REQUEST).to_json()}
        handler = self._handlers.get(method)
        if handler is None:
            return {"error": RoutedError(f"unknown method {method!r}", code=Code.UNKNOWN_METHOD).to_json()}
        try:
            return {"result": await handler(params)}
        except RoutedError as exc:
            return {"error": exc.to_json()}
        except Exception as exc:
            log.exception("API method %s failed", method)
            return {"error": RoutedError(f"{method} failed: {exc}", type(exc).__name__).to_json()}


def call(path: str, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """Blocking client for the CLI and tests. Raises RoutedError on an error response, OSError if unreachable."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"method": method, "params": params or {}}).encode() + b"\n")
        chunks: list[bytes] = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    if not chunks:
        raise RoutedError("agent closed the connection without answering", code=Code.NO_ANSWER)
    response = json.loads(b"".join(chunks))
    if "error" in response:
        raise RoutedError.from_json(response["error"])
    return response.get("result")
