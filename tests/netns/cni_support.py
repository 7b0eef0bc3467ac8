"""Test support for the CNI netns tests: a node namespace with an uplink, the CNI service running in it,
pod namespaces, and a runtime-like driver for routed-cni and plugin chains.

Namespaces: `rtd-cni-<run>-host`, `rtd-cni-<run>-up` (a fake ToR giving the node a default route, which proxy ARP
needs), pods `rtd-cni-<run>-p<name>`. Everything is removed by `NodeEnv.close()`; `cleanup_leftovers()` removes what
a crashed run left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cni.exec import encode_params
from routed import api, netns
from routed.errors import RoutedError
from tests.agent_process import stop_process
from tests.helpers import run_and_expect

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")
ROUTED_CNI = str(REPO / ".venv" / "bin" / "routed-cni")
HARNESS = str(REPO / "tests" / "netns" / "cni_harness.py")
ROUTED = str(REPO / ".venv" / "bin" / "routed")
REF_PLUGINS = "/usr/lib/cni"
PREFIX = "rtd-cni-"
NODE_IP = "192.168.77.2"
UPLINK_IP = "192.168.77.1"
UPLINK_MTU = 1450
NODE_IP6 = "fd00:77::2"
UPLINK_IP6 = "fd00:77::1"


def real_agent_available() -> bool:
    """True once `routed agent --help` works (the lead's agent); the harness is the fallback."""
    try:
        proc = subprocess.run([ROUTED, "agent", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "--manifest-dir" in proc.stdout


def default_agent_kind() -> str:
    """RTD_CNI_AGENT=routed|harness picks; default: the real agent when it is there."""
    kind = os.environ.get("RTD_CNI_AGENT", "")
    if kind in ("routed", "harness"):
        return kind
    return "routed" if real_agent_available() else "harness"


def cleanup_leftovers() -> None:
    netns.delete_all(PREFIX)


class PluginRun:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.rc = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        try:
            self.json: Any = json.loads(proc.stdout) if proc.stdout.strip() else None
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"PluginRun(rc={self.rc}, stdout={self.stdout!r}, stderr={self.stderr!r})"


class NodeEnv:
    """One node namespace with the CNI service (harness process) and helpers to drive CNI calls."""

    def __init__(
        self, run_id: str, pod_cidr: str = "10.88.0.0/24", agent: str = "harness", harness_args: list[str] | None = None,
        pod_cidr6: str = "",
    ) -> None:
        self.harness_args = list(harness_args or [])
        self.run_id = run_id
        self.agent_kind = agent
        self.node_name = f"cni-{run_id}"
        self.host = f"{PREFIX}{run_id}-host"
        self.uplink = f"{PREFIX}{run_id}-up"
        self.pod_cidr = pod_cidr  # "" with an IPv6-only node
        self.pod_cidr6 = pod_cidr6
        self.pod_cidrs = [c for c in (pod_cidr, pod_cidr6) if c]
        self.tmp = tempfile.mkdtemp(prefix=f"rtd-cni-{run_id}-")
        self.socket = os.path.join(self.tmp, "agent.sock")
        self.state_dir = os.path.join(self.tmp, "state")
        self.agent_log = os.path.join(self.tmp, "agent.log")
        self.cni_log = os.path.join(self.tmp, "cni.log")
        self.manifest_dir = os.path.join(self.tmp, "manifests")
        self.proc: subprocess.Popen[bytes] | None = None
        self.pods: list[str] = []
        self._setup_node()

    # -- topology --------------------------------------------------------------------------------
    def _setup_node(self) -> None:
        netns.create(self.host)
        netns.create(self.uplink)
        netns.veth(self.host, "up0", self.uplink, "dn0", mtu=UPLINK_MTU)
        netns.ns_run(self.host, ["ip", "addr", "add", f"{NODE_IP}/24", "dev", "up0"])
        netns.ns_run(self.uplink, ["ip", "addr", "add", f"{UPLINK_IP}/24", "dev", "dn0"])
        netns.ns_run(self.host, ["ip", "route", "add", "default", "via", UPLINK_IP])
        netns.sysctl(self.host, "net.ipv4.ip_forward", "1")
        if self.pod_cidr6:
            netns.ns_run(self.host, ["ip", "addr", "add", f"{NODE_IP6}/64", "dev", "up0", "nodad"])
            netns.ns_run(self.uplink, ["ip", "addr", "add", f"{UPLINK_IP6}/64", "dev", "dn0", "nodad"])
            netns.ns_run(self.host, ["ip", "-6", "route", "add", "default", "via", UPLINK_IP6])
            netns.sysctl(self.host, "net.ipv6.conf.all.forwarding", "1")

    def pod_ns(self, name: str) -> str:
        ns = f"{PREFIX}{self.run_id}-p{name}"
        netns.create(ns)
        self.pods.append(ns)
        return ns

    def delete_pod_ns(self, ns: str) -> None:
        netns.delete(ns)
        if ns in self.pods:
            self.pods.remove(ns)

    # -- agent -----------------------------------------------------------------------------------
    def _agent_cmd(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if self.agent_kind == "harness":
            cidr_args = [arg for cidr in self.pod_cidrs for arg in ("--pod-cidr", cidr)]
            cmd = [PYTHON, HARNESS, "--socket", self.socket, "--state-dir", self.state_dir,
                   *cidr_args, "--log-file", self.agent_log, *self.harness_args]
            return cmd, env
        os.makedirs(self.manifest_dir, exist_ok=True)
        node_yaml = (
            "apiVersion: v1\nkind: Node\n"
            f"metadata:\n  name: {self.node_name}\n"
            f"spec:\n  podCIDR: {self.pod_cidrs[0]}\n  podCIDRs: [{', '.join(self.pod_cidrs)}]\n"
        )
        Path(self.manifest_dir, "node.yaml").write_text(node_yaml)
        # the CNI side alone: no policy (its hooks need Pod objects), no BGP
        env.update({"ROUTED_POLICY__ENABLED": "false", "ROUTED_BGP__ENABLED": "false"})
        cmd = [ROUTED, "agent", "--node", self.node_name, "--manifest-dir", self.manifest_dir,
               "--state-dir", self.state_dir, "--socket", self.socket, "--http-listen", "",
               "--log-file", self.agent_log]
        return cmd, env

    def start_agent(self, timeout: float = 30.0) -> None:
        assert self.proc is None
        cmd, env = self._agent_cmd()
        with open(self.agent_log + ".out", "ab") as out:
            self.proc = subprocess.Popen(netns.ns_cmd(self.host, cmd), stdout=out, stderr=subprocess.STDOUT, env=env)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {self.read_agent_log()[-2000:]}")
            if not os.path.exists(self.socket):
                return False
            try:  # the real agent answers STATUS with 50 until its first datastore sync and CNI start
                status = api.call(self.socket, "cni", encode_params(
                    {"CNI_COMMAND": "STATUS"}, '{"cniVersion": "1.1.0", "name": "x"}'))
            except (RoutedError, OSError):
                return False
            return status["exitCode"] == 0

        run_and_expect(up, bool, timeout, interval=0.05).check("the agent to serve CNI")

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, sig)
        self.proc = None
        if sig == signal.SIGKILL and os.path.exists(self.socket):
            os.unlink(self.socket)

    def read_agent_log(self) -> str:
        text = ""
        for path in (self.agent_log, self.agent_log + ".out"):
            try:
                text += Path(path).read_text()
            except OSError:
                pass
        return text

    def api(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return api.call(self.socket, method, params)

    def endpoint_ids(self) -> list[str]:
        """Container ids of the agent's endpoints (the harness answers camelCase, the agent dataclass fields)."""
        return [e["containerId"] for e in self.api("endpoints.list")]

    # -- CNI driving -----------------------------------------------------------------------------
    def netconf(self, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "cniVersion": version,
            "name": "routed-test",
            "type": "routed-cni",
            "socketPath": self.socket,
            "logFile": self.cni_log,
        }
        conf.update(extra)
        return conf

    def run_plugin(
        self,
        plugin: str,
        command: str,
        conf: dict[str, Any] | str | bytes,
        container_id: str | None = None,
        netns_path: str | None = None,
        ifname: str | None = "eth0",
        args: str = "",
        env: dict[str, str] | None = None,
        drop_env: Iterable[str] = (),
    ) -> PluginRun:
        environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_PATH": REF_PLUGINS}
        if command:
            environ["CNI_COMMAND"] = command
        if container_id is not None:
            environ["CNI_CONTAINERID"] = container_id
        if netns_path is not None:
            environ["CNI_NETNS"] = netns_path
        if ifname is not None:
            environ["CNI_IFNAME"] = ifname
        if args:
            environ["CNI_ARGS"] = args
        environ.update(env or {})
        for key in drop_env:
            environ.pop(key, None)
        data = conf if isinstance(conf, (str, bytes)) else json.dumps(conf)
        if isinstance(data, str):
            data = data.encode()
        proc = subprocess.run(
            netns.ns_cmd(self.host, [plugin]), input=data, capture_output=True, env=environ, timeout=60
        )
        return PluginRun(
            subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())
        )

    def cni(
        self,
        command: str,
        container_id: str | None,
        pod_ns: str | None,
        version: str = "1.0.0",
        conf: dict[str, Any] | None = None,
        **kw: Any,
    ) -> PluginRun:
        return self.run_plugin(
            ROUTED_CNI,
            command,
            conf if conf is not None else self.netconf(version),
            container_id=container_id,
            netns_path=netns.netns_path(pod_ns) if pod_ns else None,
            **kw,
        )

    def ns(self, ns: str, cmd: list[str], check: bool = False, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return netns.ns_run(ns, cmd, check=check, timeout=timeout)

    def ping(self, ns: str, ip: str) -> bool:
        return self.ns(ns, ["ping", "-c", "1", "-W", "1", ip]).returncode == 0

    def links(self) -> list[str]:
        out = self.ns(self.host, ["ip", "-o", "link", "show"]).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    def routes(self) -> str:
        return self.ns(self.host, ["ip", "route", "show"]).stdout

    def close(self) -> None:
        self.stop_agent()
        for ns in list(self.pods):
            netns.delete(ns)
        netns.delete(self.host)
        netns.delete(self.uplink)
        shutil.rmtree(self.tmp, ignore_errors=True)


def tcp_server_cmd(port: int, reply: str = "hello") -> list[str]:
    """A one-connection-at-a-time TCP server printing `reply` to each client (runs until killed)."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
        f"s.bind(('::', {port})); s.listen(16)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    c,_=s.accept(); c.sendall(" + repr(reply.encode()) + "); c.close()\n"
    )
    return [sys.executable if os.path.exists(sys.executable) else PYTHON, "-c", code]


def tcp_fetch_cmd(ip: str, port: int) -> list[str]:
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(({ip!r}, {port}), timeout=3)\n"
        "data=b''\n"
        "while True:\n"
        "    d=s.recv(100)\n"
        "    if not d: break\n"
        "    data+=d\n"
        "sys.stdout.write(data.decode())\n"
    )
    return [PYTHON, "-c", code]
