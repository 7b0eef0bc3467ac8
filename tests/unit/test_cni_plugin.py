"""The thin plugin in-process against a fake agent socket: forwarding, error codes, logging, stdlib-only imports."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni.plugin import run
from routed.errors import Code

REPO = Path(__file__).resolve().parents[2]


class FakeAgent:
    """Answers each connection with `self.answer` and records the requests."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self.answer: dict[str, Any] = {"result": None}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

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
                conn.sendall(json.dumps(self.answer).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(str(tmp_path / "agent.sock"))
    yield fake
    fake.close()


def call(env: dict[str, str], conf: Any) -> tuple[int, Any]:
    out = io.StringIO()
    raw = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    rc = run(env, raw, out)
    text = out.getvalue()
    return rc, (json.loads(text) if text.strip() else None)


def netconf(tmp_path: Path, sock: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "k8s", "type": "routed-cni", "socketPath": sock,
            "logFile": str(tmp_path / "cni.log"), **extra}


ADD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0",
           "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1", "CNI_PATH": "/usr/lib/cni"}


def test_add_forwards_and_prints_result(agent: FakeAgent, tmp_path: Path) -> None:
    agent.answer = {"result": {"cniVersion": "1.0.0", "ips": [{"address": "10.88.0.9/32", "interface": 1}]}}
    rc, out = call(ADD_ENV, netconf(tmp_path, agent.path))
    assert rc == 0
    assert out["ips"][0]["address"] == "10.88.0.9/32"
    req = agent.requests[0]
    assert req["method"] == "cni"
    params = req["params"]
    assert params["command"] == "ADD" and params["containerId"] == "c1" and params["netns"] == "/var/run/netns/x"
    assert params["ifname"] == "eth0" and params["args"]["K8S_POD_NAME"] == "web-1"
    assert params["config"]["socketPath"] == agent.path
    log = (tmp_path / "cni.log").read_text()
    assert log and all("container=c1" in line and "ifname=eth0" in line and "pod=default/web-1" in line
                       for line in log.splitlines())


@pytest.mark.parametrize("verb", ["DEL", "CHECK"])
def test_del_check_print_nothing_on_success(agent: FakeAgent, tmp_path: Path, verb: str) -> None:
    rc, out = call({**ADD_ENV, "CNI_COMMAND": verb}, netconf(tmp_path, agent.path, prevResult={}))
    assert (rc, out) == (0, None)


def test_agent_error_is_printed_with_its_code(agent: FakeAgent, tmp_path: Path) -> None:
    agent.answer = {"error": {"code": 111, "msg": "no free address left in pod CIDR 10.88.0.0/24", "details": ""}}
    rc, out = call(ADD_ENV, netconf(tmp_path, agent.path, "0.4.0"))
    assert rc == 1
    assert out == {"cniVersion": "0.4.0", "code": 111, "msg": "no free address left in pod CIDR 10.88.0.0/24"}


@pytest.mark.parametrize("verb,code", [("ADD", 11), ("DEL", 11), ("CHECK", 11), ("GC", 11), ("STATUS", 50)])
def test_agent_unreachable(tmp_path: Path, verb: str, code: int) -> None:
    env = {**ADD_ENV, "CNI_COMMAND": verb}
    rc, out = call(env, netconf(tmp_path, str(tmp_path / "nobody.sock"), "1.1.0", prevResult={}))
    assert rc == 1 and out["code"] == code and "not reachable" in out["msg"]


def test_version_is_answered_locally(tmp_path: Path) -> None:
    rc, out = call({"CNI_COMMAND": "VERSION"}, {"cniVersion": "1.0.0"})
    assert rc == 0 and out == {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}
    rc, out = call({"CNI_COMMAND": "VERSION"}, b"")
    assert rc == 0 and out["cniVersion"] == "1.1.0"


def test_validation_happens_before_contacting_the_agent(agent: FakeAgent, tmp_path: Path) -> None:
    rc, out = call({"CNI_COMMAND": "ADD"}, netconf(tmp_path, agent.path))
    assert rc == 1 and out["code"] == Code.INVALID_ENV and "CNI_CONTAINERID" in out["msg"]
    rc, out = call(ADD_ENV, b"{oops")
    assert rc == 1 and out["code"] == Code.DECODE_FAILURE
    rc, out = call(ADD_ENV, netconf(tmp_path, agent.path, "9.9.9"))
    assert rc == 1 and out["code"] == Code.INCOMPATIBLE_VERSION and out["cniVersion"] == "1.1.0"
    rc, out = call({k: v for k, v in ADD_ENV.items() if k != "CNI_COMMAND"}, netconf(tmp_path, agent.path))
    assert rc == 1 and out["code"] == Code.INVALID_ENV and "CNI_COMMAND" in out["msg"]
    assert agent.requests == []


def test_unwritable_log_never_fails_the_call(agent: FakeAgent, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    conf = netconf(tmp_path, agent.path, logFile=str(blocker / "sub" / "cni.log"))
    agent.answer = {"result": {"cniVersion": "1.0.0"}}
    rc, _ = call(ADD_ENV, conf)
    assert rc == 0


def test_unexpected_failure_is_999_without_traceback_on_stdout(agent: FakeAgent, tmp_path: Path) -> None:
    agent.answer = {"result": {"cniVersion": "1.0.0", "ips": "not-a-list"}}  # makes the ADD log line blow up
    rc, out = call(ADD_ENV, netconf(tmp_path, agent.path))
    assert rc == 1 and out["code"] == 999
    assert "Traceback" not in json.dumps(out)
    assert "Traceback" in (tmp_path / "cni.log").read_text()


def test_plugin_imports_stdlib_only() -> None:
    code = (
        "import sys, cni.plugin\n"
        "bad = [m for m in ('pyroute2','iptc','pydantic','kubernetes','asyncio','yaml') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == ""
    assert (REPO / "cni" / "__init__.py").read_text().strip() == ""


def test_executable_end_to_end_error_on_stdout(tmp_path: Path) -> None:
    exe = REPO / ".venv" / "bin" / "routed-cni"
    env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "ADD", "CNI_IFNAME": "eth0"}
    proc = subprocess.run([str(exe)], input=b'{"cniVersion":"1.0.0","name":"n"}', capture_output=True, env=env)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["code"] == 4 and "CNI_CONTAINERID" in out["msg"] and "CNI_NETNS" in out["msg"]
    assert proc.stderr == b""


def test_launcher_runs_the_plugin_without_site(tmp_path: Path) -> None:
    from cni.launcher import write_launcher

    exe = write_launcher(str(tmp_path / "bin" / "routed-cni"))
    first = Path(exe).read_text().splitlines()[0]
    assert first.startswith("#!") and first.endswith(" -IS")
    proc = subprocess.run([exe], input=b'{"cniVersion":"0.4.0"}', capture_output=True, env={"CNI_COMMAND": "VERSION"})
    assert proc.returncode == 0, proc
    assert json.loads(proc.stdout)["cniVersion"] == "0.4.0"
    proc = subprocess.run([exe], input=b"{", capture_output=True, env={"CNI_COMMAND": "ADD"})
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == 6


@pytest.mark.parametrize(
    "doc",
    ['{"a":1,"b":[1,2.5,"x\\u00e9",null,true,false],"c":{"d":"e"}}', '  {"x": 1}\n', "[]", '"s"', "3", '{"k": -1e5}'],
)
def test_fastjson_matches_json(doc: str) -> None:
    from cni import fastjson

    assert fastjson.loads(doc) == json.loads(doc)
    assert fastjson.loads(doc.encode()) == json.loads(doc)
    assert fastjson.dumps(json.loads(doc)) == json.dumps(json.loads(doc), separators=(",", ":"))


def test_fastjson_errors_without_json_imported() -> None:
    code = (
        "import sys\n"
        "from cni import fastjson\n"
        "assert 'json' not in sys.modules\n"
        "for bad in ['{', '{\"a\":}', 'x', '{\"a\":1}x', '']:\n"
        "    try:\n"
        "        fastjson.loads(bad)\n"
        "    except ValueError:\n"
        "        continue\n"
        "    raise SystemExit('accepted ' + bad)\n"
    )
    proc = subprocess.run([sys.executable, "-IS", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + code],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
