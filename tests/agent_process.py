"""A real `routed agent` process inside a node namespace, for tests that look at the agent as a whole:
its log, `routed status`, /healthz and /readyz, its exit status. Configured through a config file and the
environment (failpoints: ROUTED_FAILPOINTS)."""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import yaml

from routed import api, netns

REPO = Path(__file__).resolve().parents[1]
ROUTED = str(REPO / ".venv" / "bin" / "routed")
PYTHON = str(REPO / ".venv" / "bin" / "python")
HTTP_PORT = 19099

_HTTP_GET = """
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status); print(r.read().decode(), end="")
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode(), end="")
except OSError as e:
    print(0); print(e, end="")
"""


class AgentProcess:
    def __init__(self, netns_name: str, workdir: str, node_name: str, config: dict[str, Any],
                 env: dict[str, str] | None = None) -> None:
        self.netns = netns_name
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node_name = node_name
        self.socket = str(self.dir / "agent.sock")
        self.log_path = self.dir / "agent.log"
        self.config_path = self.dir / "agent.yaml"
        full = {"node_name": node_name, "state_dir": str(self.dir / "state"), "socket_path": self.socket,
                "http_listen": f"127.0.0.1:{HTTP_PORT}", "log_file": str(self.log_path), **config}
        self.config_path.write_text(yaml.safe_dump(full))
        self.env = dict(os.environ, **(env or {}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with open(self.dir / "agent.out", "ab") as out:
            self.proc = subprocess.Popen(netns.ns_cmd(self.netns, [ROUTED, "agent", "--config", str(self.config_path)]),
                                         stdout=out, stderr=subprocess.STDOUT, env=self.env)
        return self

    def log(self) -> str:
        text = ""
        for path in (self.log_path, self.dir / "agent.out"):
            try:
                text += path.read_text()
            except OSError:
                pass
        return text

    def status(self) -> dict[str, Any]:
        return api.call(self.socket, "status", timeout=5)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ROUTED, *args, "--socket", self.socket], capture_output=True, text=True, timeout=30)

    def http(self, path: str) -> tuple[int, str]:
        out = netns.ns_run(self.netns, [PYTHON, "-c", _HTTP_GET, f"http://127.0.0.1:{HTTP_PORT}{path}"],
                           check=False, timeout=10).stdout
        code, _, body = out.partition("\n")
        return int(code or 0), body

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return stop_process(self.proc, sig, grace=20) if self.proc is not None else None


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10) -> int:
    """Signal a process we started, give it `grace` seconds, then SIGKILL; its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def manifest(*objects: dict[str, Any]) -> str:
    return yaml.safe_dump_all(list(objects))


def node_object(name: str, pod_cidr: str, address: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": address}]}}


def first_line_time(log: str) -> str:
    """The timestamp of a log's first line (the agent's start)."""
    match = re.match(r"(\S+ \S+) ", log)
    assert match, log
    return match.group(1)


def seconds_between(a: str, b: str) -> float:
    """Seconds between two logging timestamps ("2026-12-02 07:05:09,630")."""
    parsed = [datetime.datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t in (a, b)]
    return (parsed[1] - parsed[0]).total_seconds()
