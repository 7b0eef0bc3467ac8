from __future__ import annotations

import asyncio
import threading

import pytest

from routed.api import ApiError, ApiServer, call


def test_round_trip_errors_and_unknown_methods(tmp_path):
    path = str(tmp_path / "agent.sock")
    ready = threading.Event()
    stop: list[asyncio.AbstractEventLoop] = []

    async def echo(params):
        return {"echo": params}

    async def fails(params):
        raise ApiError(7, "bad config", "field x")

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
        with pytest.raises(ApiError) as err:
            call(path, "fails")
        assert (err.value.code, err.value.msg, err.value.details) == (7, "bad config", "field x")
        with pytest.raises(ApiError) as err:
            call(path, "crashes")
        assert err.value.code == 999 and "boom" in err.value.msg
        with pytest.raises(ApiError) as err:
            call(path, "nope")
        assert err.value.code == 104
    finally:
        main.done = True  # type: ignore[attr-defined]
        thread.join(5)
