"""The static routed-cni (cni/shim/routed-cni.c, built by scripts/bootstrap) against a fake agent socket: static
linking, VERSION with no environment and no Python, the environment check, byte-exact forwarding both ways,
and the codes and log line when the agent is unreachable."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from routed.constants import cni_shim_path

SHIM = cni_shim_path()
ADD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0",
           "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1", "CNI_PATH": "/opt/cni/bin"}


class FakeAgent:
    """Answers each connection with `self.answer(params)` (exit code, stdout bytes); records the params."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self.reply: tuple[int, bytes] = (0, b"")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(json.loads(data))
                code, out = self.reply
                answer = {"result": {"exitCode": code, "stdout": base64.b64encode(out).decode()}}
                conn.sendall(json.dumps(answer, separators=(",", ":")).encode() + b"\n")

    def env_of(self, i: int) -> dict[str, str]:
        raw = base64.b64decode(self.requests[i]["params"]["env"])
        return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if item)

    def stdin_of(self, i: int) -> bytes:
        return base64.b64decode(self.requests[i]["params"]["stdin"])


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(str(tmp_path / "agent.sock"))
    yield fake
    fake.sock.close()


def run(env: dict[str, str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([SHIM], input=stdin, env=env, capture_output=True, timeout=30)


def conf(sock: str, log: str = "", version: str = "1.0.0", **extra: Any) -> bytes:
    return json.dumps({"cniVersion": version, "name": "k8s", "type": "routed-cni", "socketPath": sock,
                       **({"logFile": log} if log else {}), **extra}).encode()


def test_the_shim_is_statically_linked() -> None:
    head = Path(SHIM).read_bytes()
    assert head[:4] == b"\x7fELF"
    out = subprocess.run(["file", SHIM], capture_output=True, text=True)
    assert out.returncode != 0 or "statically linked" in out.stdout, out.stdout
    assert b"/lib64/ld-linux" not in head and b"ld-musl" not in head  # no program interpreter


def test_version_needs_no_environment_and_no_agent() -> None:
    out = run({"CNI_COMMAND": "VERSION"}, b"")
    assert out.returncode == 0 and json.loads(out.stdout) == {
        "cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}
    out = run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"0.4.0"}')
    assert json.loads(out.stdout)["cniVersion"] == "0.4.0" and out.stderr == b""


@pytest.mark.parametrize("env,names", [
    ({}, ["CNI_COMMAND"]),
    ({"CNI_COMMAND": "FROB"}, ["CNI_COMMAND"]),
    ({"CNI_COMMAND": "ADD", "CNI_IFNAME": "eth0"}, ["CNI_CONTAINERID", "CNI_NETNS"]),
    ({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1"}, ["CNI_IFNAME"]),
])
def test_environment_is_checked_with_code_4_naming_the_variables(agent, env, names) -> None:
    out = run(env, conf(agent.path, version="0.4.0"))
    body = json.loads(out.stdout)
    assert out.returncode == 1 and body["code"] == 4 and body["cniVersion"] == "0.4.0"
    assert all(n in body["msg"] for n in names), body
    assert agent.requests == []  # never forwarded


def test_forwards_environment_and_stdin_untouched_and_prints_the_answer(agent) -> None:
    stdin = conf(agent.path, note="é \\u00e9 \"quoted\"").replace(b"}", b', "raw": "\xff\xfe"}')  # any bytes
    result = b'{"cniVersion":"1.0.0","ips":[{"address":"10.88.0.9/32"}]}\n\xff'
    agent.reply = (0, result)
    out = run({**ADD_ENV, "PATH": "/nope", "HOME": "/root"}, stdin)
    assert (out.returncode, out.stdout, out.stderr) == (0, result, b"")
    assert agent.requests[0]["method"] == "cni"
    assert agent.env_of(0) == ADD_ENV  # the CNI_* variables only, exactly
    assert agent.stdin_of(0) == stdin
    agent.reply = (1, b'{"code":111}\n')
    out = run(ADD_ENV, stdin)
    assert (out.returncode, out.stdout) == (1, b'{"code":111}\n')


@pytest.mark.parametrize("stdin", [b'{"cniVersion": "1.0.0", "name": ', b"[]", b'{"a":1,}', b'{"a":1} x', b""])
def test_stdin_that_is_not_one_json_object_is_code_6_without_the_agent(agent, stdin) -> None:
    out = run(ADD_ENV, stdin)
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 6, out
    assert agent.requests == []


@pytest.mark.parametrize("verb,code", [("ADD", 11), ("DEL", 11), ("CHECK", 11), ("GC", 11), ("STATUS", 50)])
def test_agent_unreachable_says_so_and_logs_one_line(tmp_path, verb, code) -> None:
    sock, log = str(tmp_path / "nobody.sock"), tmp_path / "logs" / "cni.log"
    log.parent.mkdir()
    out = run({**ADD_ENV, "CNI_COMMAND": verb}, conf(sock, str(log), "1.1.0"))
    body = json.loads(out.stdout)
    assert out.returncode == 1 and body["code"] == code and sock in body["msg"] and body["cniVersion"] == "1.1.0"
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and f"cmd={verb}" in lines[0] and "container=c1" in lines[0] and sock in lines[0]


def test_unwritable_log_never_fails_the_call(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = run(ADD_ENV, conf(str(tmp_path / "nobody.sock"), str(blocker / "sub" / "cni.log")))
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 11
