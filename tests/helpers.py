"""Shared test helpers: polling with a deadline (never bare sleep), root checks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def wait_for(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.1, what: str = "",
             ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll `check` until it returns something truthy and return that; fail the test at the deadline.

    Exceptions listed in `ignore` count as "not yet" (e.g. a daemon whose control socket is not up).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")
        time.sleep(interval)


def run_and_expect(fn: Callable[[], T], expected: Callable[[T], bool], timeout: float = 10.0,
                   interval: float = 0.1) -> T:
    """Call fn until expected(result) holds or the deadline passes; return the last result (assert on it)."""
    deadline = time.monotonic() + timeout
    result = fn()
    while not expected(result) and time.monotonic() < deadline:
        time.sleep(interval)
        result = fn()
    return result
