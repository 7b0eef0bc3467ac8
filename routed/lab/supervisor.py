"""Keeps one `routed agent` running per lab node, as kubelet keeps a DaemonSet pod running.

Run detached by `routed lab up`: `python -m routed.lab.supervisor --lab NAME`. A crashed agent is
restarted with a short backoff; SIGTERM stops the agents (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from routed.backoff import Backoff
from routed.lab.state import LabPaths, LabState

log = logging.getLogger("routed.lab.supervisor")
RESTART_BACKOFF_MIN = 0.2
RESTART_BACKOFF_MAX = 5.0
STOP_GRACE_SECONDS = 10.0


@dataclass
class Supervised:
    node: str
    netns: str
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(base=RESTART_BACKOFF_MIN, cap=RESTART_BACKOFF_MAX))
    started_at: float = 0.0


def agent_command(paths: LabPaths, node: str, netns_name: str) -> list[str]:
    return [
        "ip", "netns", "exec", netns_name,
        sys.executable, "-m", "routed.cli", "agent", "--config", str(paths.node_config(node)),
    ]


class Supervisor:
    def __init__(self, lab: str) -> None:
        self.paths = LabPaths(lab)
        state = LabState.load(self.paths)
        self.children = [Supervised(node=n.name, netns=n.netns) for n in state.nodes]
        self.stopping = False

    def _start(self, child: Supervised) -> None:
        log_path = self.paths.node_dir(child.node) / "agent.stdout"
        with open(log_path, "ab") as out:
            child.proc = subprocess.Popen(
                agent_command(self.paths, child.node, child.netns), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        child.started_at = time.monotonic()
        self.paths.agent_pid(child.node).write_text(str(child.proc.pid))
        log.info("started agent for %s (pid %d, restarts %d)", child.node, child.proc.pid, child.restarts)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for child in self.children:
            self._start(child)
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    code = child.proc.returncode
                    if now - child.started_at > 30:
                        child.backoff.reset()
                    delay = child.backoff.next_delay()
                    log.warning("agent for %s exited with %s; restarting in %.1fs", child.node, code, delay)
                    child.proc = None
                    child.next_start = now + delay
                if child.proc is None and now >= child.next_start:
                    child.restarts += 1
                    self._start(child)
            time.sleep(0.05)
        self._stop_all()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _stop_all(self) -> None:
        running = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("all agents stopped")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lab", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    paths = LabPaths(args.lab)
    paths.supervisor_pid.write_text(str(os.getpid()))
    Supervisor(args.lab).run()


if __name__ == "__main__":
    main()
