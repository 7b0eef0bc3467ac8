from __future__ import annotations

import asyncio
import threading

import pytest

from routed.api import ApiServer, call
from routed.errors import Code, RoutedError


def test_round_trip_errors_and_unknown_methods(tmp_path):
    path = str(tmp_path / "agent.sock")
    ready = threading.Event()
    stop: list[asyncio.AbstractEventLoop] = []

    async def echo(params):
        return {"echo": params}

    async def fails(params):
        raise RoutedError("bad config", "field x", code=Code.INVALID_CONFIG)

    async def crashes(params):
        raise RuntimeError("boom")

    async def main() -> None:
        server = ApiServer(path)
        server.register("echo", echo)
        server.register("fails", fails)
        server.register("crashes", crashes)
        await server.start()
        stop.append(asyncio.get_running_loop())
        ready.set()
        while not getattr(main, "done", False):
            await asyncio.sleep(0.02)
        await server.stop()

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    try:
        assert ready.wait(5)
        assert call(path, "echo", {"a": 1}) == {"echo": {"a": 1}}
        with pytest.raises(RoutedError) as err:
            call(path, "fails")
        assert (err.value.code, err.value.msg, err.value.details) == (Code.INVALID_CONFIG, "bad config", "field x")
        with pytest.raises(RoutedError) as err:
            call(path, "crashes")
        assert err.value.code == Code.UNEXPECTED and "boom" in err.value.msg
        with pytest.raises(RoutedError) as err:
            call(path, "nope")
        assert err.value.code == Code.UNKNOWN_METHOD
    finally:
        main.done = True  # type: ignore[attr-defined]
        thread.join(5)
