"""The static routed-cni (cni/shim/routed-cni.c, built by scripts/bootstrap) against a fake agent socket: static
linking, VERSION with no environment and no Python, the environment check, byte-exact forwarding both ways,
the codes and log line when the agent is unreachable, an unsupported cniVersion refused exactly as the agent
refuses it (agent up or down), hostile stdin, and a log file that is never a symlink, a hard link, a FIFO or
someone else's file."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni.exec import run_invocation
from cni.request import LATEST_VERSION, SUPPORTED_VERSIONS, VERBS_1_1, CniRequest
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
    assert out.returncode == 0 and json.loads(out.stdout) == {  # the shim's list is the agent's (cni/request.py)
        "cniVersion": LATEST_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}
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


# -- cniVersion: the shim refuses what the agent refuses, with the agent's own answer -----------------------------
async def _never_called(req: CniRequest) -> None:
    raise AssertionError(f"the agent's handler ran for {req.command}")


def agent_answer(env: dict[str, str], stdin: bytes) -> tuple[int, Any]:
    """What the agent's CNI path (cni/exec.py) answers for this invocation, before any handler runs."""
    code, out = asyncio.run(run_invocation(_never_called, env, stdin))
    return code, json.loads(out)


@pytest.mark.parametrize("verb", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
@pytest.mark.parametrize("version", ["0.1.0", "0.3.1", "2.0.0", "1.0", "x y"])
def test_an_unsupported_cni_version_is_code_1_even_with_no_agent(tmp_path, verb, version) -> None:
    stdin = conf(str(tmp_path / "nobody.sock"), str(tmp_path / "cni.log"), version)
    env = {**ADD_ENV, "CNI_COMMAND": verb}
    out = run(env, stdin)
    assert out.returncode == 1 and json.loads(out.stdout) == {
        "cniVersion": LATEST_VERSION, "code": 1, "msg": f"cniVersion {version!r} is not supported",
        "details": "supported: " + ", ".join(SUPPORTED_VERSIONS)}, out
    assert (out.returncode, json.loads(out.stdout)) == agent_answer(env, stdin)
    assert not (tmp_path / "cni.log").exists()  # not an unreachable agent: nothing to log


@pytest.mark.parametrize("verb", VERBS_1_1)
@pytest.mark.parametrize("version", [v for v in SUPPORTED_VERSIONS if v != "1.1.0"])
def test_gc_and_status_under_an_older_version_are_code_1_as_the_agent_says(tmp_path, verb, version) -> None:
    stdin, env = conf(str(tmp_path / "nobody.sock"), version=version), {**ADD_ENV, "CNI_COMMAND": verb}
    out = run(env, stdin)
    body = json.loads(out.stdout)
    assert out.returncode == 1 and body["code"] == 1 and body["cniVersion"] == version, body
    assert (out.returncode, body) == agent_answer(env, stdin)


def test_an_unsupported_version_is_never_forwarded(agent) -> None:
    agent.reply = (0, b'{"cniVersion":"1.0.0"}\n')
    out = run(ADD_ENV, conf(agent.path, version="0.1.0"))
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 1 and agent.requests == []
    out = run(ADD_ENV, conf(agent.path, version="1.0.0"))  # a supported one still goes through
    assert out.returncode == 0 and len(agent.requests) == 1


def test_a_version_the_shim_cannot_judge_goes_to_the_agent(agent) -> None:
    agent.reply = (0, b"{}\n")
    for stdin in (conf(agent.path).replace(b'"1.0.0"', b'"1.0.\\u0030"'),  # escapes: the agent decodes them
                  conf(agent.path).replace(b'"1.0.0"', b"100"),  # not a string: the agent says code 7
                  conf(agent.path).replace(b'"cniVersion": "1.0.0", ', b"")):  # absent: the same
        out = run(ADD_ENV, stdin)
        assert out.returncode == 0, (stdin, out)
    assert len(agent.requests) == 3


def test_the_last_cni_version_given_counts_as_for_the_agent(agent) -> None:
    agent.reply = (0, b"{}\n")
    stdin = conf(agent.path, version="1.0.0")
    out = run(ADD_ENV, stdin.replace(b"{", b'{"cniVersion": "0.1.0", ', 1))
    assert out.returncode == 0 and len(agent.requests) == 1
    out = run(ADD_ENV, stdin.replace(b"}", b', "cniVersion": "' + b"9" * 200 + b'"}'))
    body = json.loads(out.stdout)
    assert (out.returncode, body["code"], body["cniVersion"]) == (1, 1, LATEST_VERSION) and len(agent.requests) == 1


def test_version_still_answers_any_requested_version() -> None:
    for requested in ("0.1.0", "1.0.0"):
        out = run({"CNI_COMMAND": "VERSION"}, json.dumps({"cniVersion": requested}).encode())
        assert out.returncode == 0 and json.loads(out.stdout) == {
            "cniVersion": requested, "supportedVersions": list(SUPPORTED_VERSIONS)}


# -- hostile stdin -----------------------------------------------------------------------------------------------
def test_stdin_over_2_mib_is_code_6_without_the_agent(agent) -> None:
    stdin = conf(agent.path, pad="x" * (2 << 20))
    out = run(ADD_ENV, stdin)
    body = json.loads(out.stdout)
    assert (out.returncode, body["code"], agent.requests) == (1, 6, []), body
    out = run(ADD_ENV, conf(agent.path, pad="x" * ((2 << 20) - 200)))  # just under: forwarded
    assert len(agent.requests) == 1


def test_a_nul_byte_after_the_object_is_code_6(agent) -> None:
    out = run(ADD_ENV, conf(agent.path, version="0.1.0") + b"\0garbage")
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 6 and agent.requests == []


def _mutations(seed: bytes, rng: random.Random) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 8)):
        op, at = rng.randrange(4), rng.randrange(len(data) + 1)
        if op == 0 and data:
            del data[at % len(data)]
        elif op == 1:
            data[at:at] = bytes([rng.randrange(256)])
        elif op == 2:
            data[at:at] = rng.choice([b'"', b"\\", b"{", b"}", b"[", b"]", b":", b",", b"\0", b'"cniVersion":'])
        else:
            data[at:at] = data[: rng.randrange(len(data) + 1)]
    return bytes(data)


def test_garbage_never_crashes_the_shim(agent) -> None:
    agent.reply = (0, b"{}\n")
    rng = random.Random(17)
    seeds = [conf(agent.path, version=v) for v in ("0.1.0", "1.0.0")] + [b'{"a":[{"b":"\\"}"}]}', b"[[[[{{{{"]
    for i in range(300):
        stdin = _mutations(rng.choice(seeds), rng)
        out = run({**ADD_ENV, "CNI_COMMAND": rng.choice(["ADD", "DEL", "GC", "VERSION"])}, stdin)
        assert out.returncode in (0, 1), (i, stdin, out)  # never a signal
        if out.stdout != b"{}\n":
            json.loads(out.stdout)  # every answer of its own is one JSON document
    deep = b"[" * 1_000_000 + b"]" * 1_000_000  # depth is counted, not recursed
    out = run(ADD_ENV, b'{"a":' + deep + b"}")
    assert out.returncode in (0, 1)


# -- the log file: opened as host root, so never through a link, never someone else's ----------------------------
def unreachable(tmp_path: Path, log: Path) -> subprocess.CompletedProcess[bytes]:
    out = run(ADD_ENV, conf(str(tmp_path / "nobody.sock"), str(log)))
    assert out.returncode == 1 and json.loads(out.stdout)["code"] == 11, out
    return out


def test_the_log_is_created_0600(tmp_path) -> None:
    log = tmp_path / "cni.log"
    out = unreachable(tmp_path, log)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and log.read_text().count("\n") == 1 and out.stderr == b""
    unreachable(tmp_path, log)
    assert log.read_text().count("\n") == 2  # appended


def test_a_symlinked_log_is_not_followed(tmp_path) -> None:
    target, log = tmp_path / "host-file", tmp_path / "cni.log"
    target.write_text("untouched\n")
    log.symlink_to(target)
    out = unreachable(tmp_path, log)
    assert target.read_text() == "untouched\n" and log.is_symlink()
    assert b"not logging to" in out.stderr and b"routed agent unreachable" in out.stderr  # the line, on stderr
    dangling = tmp_path / "dangling.log"
    dangling.symlink_to(tmp_path / "would-be-created")
    unreachable(tmp_path, dangling)
    assert not (tmp_path / "would-be-created").exists()


def test_a_hard_linked_log_is_refused(tmp_path) -> None:
    target, log = tmp_path / "host-file", tmp_path / "cni.log"
    target.write_text("untouched\n")
    os.link(target, log)
    out = unreachable(tmp_path, log)
    assert target.read_text() == "untouched\n" and b"more than one link" in out.stderr


@pytest.mark.requires_root
def test_a_log_owned_by_another_user_is_refused(tmp_path) -> None:
    log = tmp_path / "cni.log"
    log.write_text("")
    os.chown(log, 1000, 1000)
    out = unreachable(tmp_path, log)
    assert log.read_text() == "" and b"not owned by root" in out.stderr


def test_a_fifo_or_a_directory_as_log_neither_blocks_nor_fails(tmp_path) -> None:
    fifo = tmp_path / "cni.log"
    os.mkfifo(fifo)
    out = unreachable(tmp_path, fifo)  # run() has a timeout: a blocking open would fail the test
    assert b"not a regular file" in out.stderr
    out = unreachable(tmp_path, tmp_path)
    assert b"not a regular file" in out.stderr
    out = unreachable(tmp_path, Path("relative.log"))
    assert b"not an absolute path" in out.stderr and not Path("relative.log").exists()


def test_control_characters_never_split_the_log_line(tmp_path) -> None:
    log = tmp_path / "cni.log"
    stdin = conf(str(tmp_path / "nobody\n.sock"), str(log)).replace(b"\\n", b"\n")  # a raw newline in the string
    out = run({**ADD_ENV, "CNI_CONTAINERID": "c1\nforged line"}, stdin)
    assert json.loads(out.stdout)["code"] == 11
    assert log.read_text().count("\n") == 1 and "forged line" in log.read_text()
