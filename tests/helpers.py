"""Shared test helpers: polling with a deadline (never bare sleep), root checks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def run_and_expect(fn: Callable[[], T], expected: Callable[[T], bool], timeout: float = 10.0,
                   interval: float = 0.1) -> T:
    """Call fn until expected(result) holds or the deadline passes; return the last result (assert on it)."""
    deadline = time.monotonic() + timeout
    result = fn()
    while not expected(result) and time.monotonic() < deadline:
        time.sleep(interval)
        result = fn()
    return result
