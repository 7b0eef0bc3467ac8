"""Runs a PolicyController inside a test namespace (`ip netns exec NS python -m tests.netns.policy_harness`).

Server mode (default): length-prefixed pickled (method, args) requests on stdin, pickled results on stdout.
`--once FILE`: one sync of the pickled PolicyInputs in FILE, then exit (the kill -9 test kills it midway).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import subprocess
import sys
from typing import Any

from routed.config import PolicyOptions
from routed.netns import ns_cmd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(REPO, ".venv", "bin", "python")


def _read(stream: Any) -> Any:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack("!I", head)
    return pickle.loads(stream.read(size))


def _write(stream: Any, obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("!I", len(data)) + data)
    stream.flush()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from policy.controller import PolicyController

    options = PolicyOptions(**json.loads(sys.argv[1]))
    if len(sys.argv) > 3 and sys.argv[2] == "--once":
        with open(sys.argv[3], "rb") as f:
            inputs = pickle.load(f)
        report = PolicyController(options, "node").sync(inputs)
        sys.exit(0 if report.ok else 1)
    ctl = PolicyController(options, "node")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        msg = _read(stdin)
        if msg is None:
            return
        method, args = msg
        try:
            target: Any = ctl
            for part in method.split("."):  # "engine.set_pod": the controller's engine
                target = getattr(target, part)
            _write(stdout, ("ok", target(*args)))
        except Exception as exc:  # reported to the test
            _write(stdout, ("err", repr(exc)))


class RemoteController:
    """A PolicyController living in a child process inside namespace `ns`."""

    def __init__(self, ns: str, **options: Any) -> None:
        cmd = ns_cmd(ns, [PYTHON, "-m", "tests.netns.policy_harness", json.dumps(options)])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)

    def call(self, method: str, *args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        _write(self.proc.stdin, (method, args))
        result = _read(self.proc.stdout)
        if result is None:
            raise RuntimeError("policy harness died")
        status, value = result
        if status != "ok":
            raise RuntimeError(f"{method} failed in harness: {value}")
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def once_cmd(ns: str, inputs_file: str, **options: Any) -> list[str]:
    return ns_cmd(ns, [PYTHON, "-m", "tests.netns.policy_harness", json.dumps(options), "--once", inputs_file])


if __name__ == "__main__":
    main()
