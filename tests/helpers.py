"""The one polling helper of the tests, after FRR's topotests: poll with a deadline, never a bare sleep.

    ok, last = run_and_expect(lambda: lab.agent_status("node1"), {"ready": True, "bgp": {"synced": True}}, 30)
    assert ok, last                          # or: run_and_expect(...).check("node1 ready") -> last value

`expected` is either a predicate (value -> bool) or a JSON value compared as a *subset* (json_cmp): every key
of an expected dict must be in the actual dict with a matching value (extra keys are fine), every item of an
expected list must match a distinct item of the actual list (any order), anything else must be equal.
The failure message of `.check()` is the JSON diff of the last value, so a failing test says what differed.

`holds_for(fn, expected, seconds)` is the negative check: the expectation keeps holding for the whole period
(e.g. "no packet gets through for 2 s", "the session is never reset").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple


def json_cmp(actual: Any, expected: Any, path: str = "$") -> list[str]:
    """Differences between `actual` and the subset `expected` ([] when it matches)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {_short(actual)}"]
        diffs: list[str] = []
        for key, want in expected.items():
            if key not in actual:
                diffs.append(f"{path}.{key}: missing (expected {_short(want)})")
            else:
                diffs += json_cmp(actual[key], want, f"{path}.{key}")
        return diffs
    if isinstance(expected, list | tuple):
        if not isinstance(actual, list | tuple):
            return [f"{path}: expected a list, got {_short(actual)}"]
        unused = list(range(len(actual)))
        diffs = []
        for i, want in enumerate(expected):
            match = next((j for j in unused if not json_cmp(actual[j], want)), None)
            if match is None:
                diffs.append(f"{path}[{i}]: no item matches {_short(want)}")
            else:
                unused.remove(match)
        return diffs
    if actual != expected:
        return [f"{path}: expected {_short(expected)}, got {_short(actual)}"]
    return []


def _short(value: Any, limit: int = 300) -> str:
    try:
        text = json.dumps(value, default=str, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class Outcome(NamedTuple):
    ok: bool
    last: Any
    diff: str = ""  # why the last value did not match ("" when ok)

    def check(self, what: str = "") -> Any:
        """Fail the test with the diff unless ok; return the last value."""
        if not self.ok:
            raise AssertionError(f"{what or 'expectation'}: {self.diff}")
        return self.last


def _evaluate(value: Any, expected: Any) -> str:
    if callable(expected):
        return "" if expected(value) else f"predicate false for {_short(value, 2000)}"
    return "; ".join(json_cmp(value, expected))


def run_and_expect(fn: Callable[[], Any], expected: Any, timeout: float = 10.0, interval: float = 0.1,
                   ignore: tuple[type[BaseException], ...] = ()) -> Outcome:
    """Call `fn` until its value meets `expected` or `timeout` seconds passed; exceptions in `ignore` count as
    "not yet" (a daemon whose socket is not up). Returns (ok, last value, diff)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last = fn()
            diff = _evaluate(last, expected)
        except ignore as exc:
            last, diff = exc, f"raised {type(exc).__name__}: {exc}"
        if not diff:
            return Outcome(True, last)
        if time.monotonic() >= deadline:
            return Outcome(False, last, f"after {timeout}s: {diff}")
        time.sleep(interval)


def holds_for(fn: Callable[[], Any], expected: Any, seconds: float, interval: float = 0.1) -> Outcome:
    """Check that `fn` keeps meeting `expected` for `seconds`; stops at the first value that does not."""
    deadline = time.monotonic() + seconds
    while True:
        last = fn()
        diff = _evaluate(last, expected)
        if diff:
            return Outcome(False, last, f"stopped holding after {seconds - (deadline - time.monotonic()):.1f}s: {diff}")
        if time.monotonic() >= deadline:
            return Outcome(True, last)
        time.sleep(interval)


def apply_objects(lab: Any, tmp_path: Any, name: str, *objects: dict[str, Any]) -> str:
    """Write objects to tmp_path/name as one YAML file and `lab.apply` it; returns the path (for `lab.delete`)."""
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(objects))
    lab.apply(str(path))
    return str(path)
