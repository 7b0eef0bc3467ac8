"""A real kube-apiserver + etcd (scripts/kube-testenv) in a control-plane namespace, and a node namespace wired to
it, so an agent in the node namespace reaches the API server (the machine's own namespace is never touched).

    with NetnsApiserver("rtd-kst-") as env:
        env.kubectl("apply", "-f", "-", stdin=yaml_text)
        AgentProcess(env.node_ns, ..., {"datastore": "kube", "kubeconfig": env.kubeconfig, ...})
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

import yaml

from routed import netns
from tests.kube.kube_env import SCRIPT

CP_ADDR, NODE_ADDR = "10.123.0.1", "10.123.0.2"
API_PORT = 16443


class NetnsApiserver:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        run = uuid.uuid4().hex[:6]
        self.cp_ns, self.node_ns = f"{prefix}{run}-cp", f"{prefix}{run}-n1"
        self.workdir = tempfile.mkdtemp(prefix=f"{prefix}{run}-")
        self.kube_dir = Path(self.workdir, "kube")
        self.kubeconfig = str(Path(self.workdir, "admin-from-node.kubeconfig"))  # reaches the API from the node
        self.kubectl_path = str(Path(subprocess.run(["bash", str(SCRIPT), "bindir"], capture_output=True, text=True,
                                                    check=True).stdout.strip(), "kubectl"))

    def __enter__(self) -> NetnsApiserver:
        netns.delete_all(self.prefix)
        netns.create(self.cp_ns)
        netns.create(self.node_ns)
        try:
            netns.veth(self.cp_ns, "n1", self.node_ns, "cp")
            netns.ns_run(self.cp_ns, ["ip", "addr", "add", f"{CP_ADDR}/30", "dev", "n1"])
            netns.ns_run(self.node_ns, ["ip", "addr", "add", f"{NODE_ADDR}/30", "dev", "cp"])
            netns.ns_run(self.node_ns, ["ip", "route", "add", "default", "via", CP_ADDR])
            netns.sysctl(self.node_ns, "net.ipv4.ip_forward", "1")
            start = subprocess.run(
                netns.ns_cmd(self.cp_ns, ["env", f"KUBE_TESTENV_BIND={CP_ADDR}", f"KUBE_TESTENV_API_PORT={API_PORT}",
                                          "bash", str(SCRIPT), "start", "--dir", str(self.kube_dir)]),
                capture_output=True, text=True, timeout=300)
            if start.returncode != 0:
                raise RuntimeError(f"kube-apiserver did not start: {start.stderr[-2000:]}")
            admin = yaml.safe_load((self.kube_dir / "admin.kubeconfig").read_text())
            admin["clusters"][0]["cluster"]["server"] = f"https://{CP_ADDR}:{API_PORT}"
            Path(self.kubeconfig).write_text(yaml.safe_dump(admin))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """kubectl from the node namespace; raises with its stderr on failure."""
        proc = subprocess.run(netns.ns_cmd(self.node_ns, [self.kubectl_path, "--kubeconfig", self.kubeconfig, *args]),
                              input=stdin, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def close(self) -> None:
        subprocess.run(netns.ns_cmd(self.cp_ns, ["bash", str(SCRIPT), "stop", "--dir", str(self.kube_dir)]),
                       capture_output=True, timeout=120)
        netns.delete(self.node_ns)
        netns.delete(self.cp_ns)
        shutil.rmtree(self.workdir, ignore_errors=True)
