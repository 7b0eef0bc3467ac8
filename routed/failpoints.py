"""Failpoints: named places where a test can make the real agent fail, as etcd's gofail does.

Set before the agent starts: `ROUTED_FAILPOINTS="policy.apply=3,bgp.update=2"` makes the first three policy
applies and the first two BGP updates raise `InjectedFault`; `name=*` fails every time. Unset (production),
`hit()` is one dictionary lookup. The points are listed in HACKING.md.
"""

from __future__ import annotations

import logging
import os
import threading

from routed.errors import Code, RoutedError

log = logging.getLogger(__name__)

ENV = "ROUTED_FAILPOINTS"
ALWAYS = -1



class InjectedFault(RoutedError):
    """A failpoint fired (tests only)."""

    code = Code.INJECTED_FAULT


_lock = threading.Lock()
_remaining: dict[str, int] = {}


def parse(spec: str) -> dict[str, int]:
    """"a=3,b=*" -> {"a": 3, "b": ALWAYS}."""
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, count = item.partition("=")
        if not sep or not name:
            raise ValueError(f"{ENV}: {item!r} is not NAME=COUNT or NAME=*")
        points[name] = ALWAYS if count == "*" else int(count)
    return points


def configure(spec: str) -> None:
    with _lock:
        _remaining.clear()
        _remaining.update(parse(spec))
    if _remaining:
        log.warning("failpoints armed: %s", spec)


def hit(name: str) -> None:
    """Raise InjectedFault if the failpoint `name` is armed (and count it down)."""
    if not _remaining:
        return
    with _lock:
        left = _remaining.get(name, 0)
        if left == 0:
            return
        if left > 0:
            _remaining[name] = left - 1
    raise InjectedFault(f"failpoint {name} fired", f"{ENV}; {'always' if left < 0 else f'{left - 1} left'}")


configure(os.environ.get(ENV, ""))
