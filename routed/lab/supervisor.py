"""Keeps one `routed agent` running per lab node, as kubelet keeps a DaemonSet pod running; in the kube lab
(process runtime) also one real kube-proxy per node (iptables mode, in the node's namespace), restarted alike.

Run detached by `routed lab up`: `python -m routed.lab.supervisor --lab NAME`. A crashed agent is
restarted with a short backoff; SIGTERM stops the agents (SIGTERM, then SIGKILL after a grace period).
The containerd runtime: the agent is a container of the node's `routed-<node>` pod (install-cni first, then
the agent, as the DaemonSet says); an exited agent container is replaced by a new one (restartPolicy Always).
A file `agent.hold` in the node's directory holds restarts back (tests stop the agent on purpose).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    kind: str = "agent"  # agent | kube-proxy
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


CLUSTER_CIDRS = {4: "10.244.0.0/16", 6: "fd00:10:244::/56"}  # every node's pod CIDR of a family lies inside


def kube_proxy_command(paths: LabPaths, node: str, netns_name: str, families: tuple[int, ...] = (4,)) -> list[str]:
    """kube-proxy as on a node, confined to the node's namespace: the conntrack tunables it would write are
    global to the kernel, so every one of them is left alone (0 = do not set)."""
    from routed.lab.kube_setup import NODE_KUBECONFIG
    from routed.lab.store import kube_bindir

    return [
        "ip", "netns", "exec", netns_name, str(Path(kube_bindir()) / "kube-proxy"),
        "--kubeconfig", str(paths.kube_dir / NODE_KUBECONFIG), "--hostname-override", node,
        "--proxy-mode", "iptables", "--cluster-cidr", ",".join(CLUSTER_CIDRS[f] for f in families),
        "--conntrack-max-per-core", "0", "--conntrack-min", "0",
        "--conntrack-tcp-timeout-established", "0", "--conntrack-tcp-timeout-close-wait", "0",
        "--metrics-bind-address", "127.0.0.1:10249", "--healthz-bind-address", "127.0.0.1:10256", "--v", "1",
    ]


class Supervisor:
    def __init__(self, lab: str) -> None:
        self.paths = LabPaths(lab)
        state = LabState.load(self.paths)
        self.runtime = state.runtime
        self.families = state.families
        self.shared = [str(self.paths.cluster_dir)] if state.datastore != "kube" else [
            str(self.paths.kube_dir / "pki"), *(str(self.paths.node_dir(n.name) / "kubeconfig") for n in state.nodes)]
        self.children = [Supervised(node=n.name, netns=n.netns) for n in state.nodes]
        if state.datastore == "kube" and state.runtime == "process":
            self.children += [Supervised(node=n.name, netns=n.netns, kind="kube-proxy") for n in state.nodes]
        self.containers: dict[str, tuple[str, str, int]] = {}  # node -> (sandbox, agent container, attempt)
        self.stopping = False

    def _start(self, child: Supervised) -> None:
        log_path = self.paths.node_dir(child.node) / f"{child.kind}.stdout"
        if child.kind == "agent":
            command = agent_command(self.paths, child.node, child.netns)
        else:
            command = kube_proxy_command(self.paths, child.node, child.netns, self.families)
        with open(log_path, "ab") as out:
            child.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        child.started_at = time.monotonic()
        if child.kind == "agent":
            self.paths.agent_pid(child.node).write_text(str(child.proc.pid))
        log.info("started %s for %s (pid %d, restarts %d)", child.kind, child.node, child.proc.pid, child.restarts)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.runtime == "containerd":
            self._run_containers()
            return
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
                    log.warning("%s for %s exited with %s; restarting in %.1fs", child.kind, child.node, code, delay)
                    child.proc = None
                    child.next_start = now + delay
                if child.proc is None and now >= child.next_start:
                    child.restarts += 1
                    self._start(child)
            time.sleep(0.05)
        self._stop_all()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    # -- the containerd runtime ---------------------------------------------------------------------
    def _run_containers(self) -> None:
        from routed.lab.cri import CriError, NodeRuntime

        runtimes = {c.node: NodeRuntime(self.paths, c.node) for c in self.children}
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                rt = runtimes[child.node]
                if child.node not in self.containers:  # the agent pod itself (install-cni, then the agent)
                    if now < child.next_start:
                        continue
                    try:
                        sandbox, container = rt.start_agent(self.shared)
                    except CriError as exc:
                        delay = child.backoff.next_delay()
                        child.next_start = now + delay
                        log.error("cannot start the agent pod on %s (next try in %.1fs): %s", child.node, delay, exc)
                        continue
                    self.containers[child.node] = (sandbox, container, 0)
                    self._note_pid(rt, child.node, container)
                    log.info("agent container %s started on %s", container[:12], child.node)
                    continue
                sandbox, container, attempt = self.containers[child.node]
                state, _ = rt.container_state(container)
                if state == "CONTAINER_RUNNING" or (self.paths.node_dir(child.node) / "agent.hold").exists():
                    continue
                if now < child.next_start:
                    continue
                delay = child.backoff.next_delay()
                child.next_start = now + delay
                try:
                    with contextlib.suppress(CriError):
                        rt.crictl("rm", container, check=False)
                    new = rt.start_agent_container(sandbox, self.shared, attempt + 1)
                except CriError as exc:
                    log.warning("cannot restart the agent on %s (next try in %.1fs): %s", child.node, delay, exc)
                    continue
                self.containers[child.node] = (sandbox, new, attempt + 1)
                child.restarts += 1
                self._note_pid(rt, child.node, new)
                log.warning("agent container on %s was %s: started %s (restart %d)", child.node, state or "gone",
                            new[:12], child.restarts)
            time.sleep(0.2)
        log.info("supervisor stopping (the agent containers stop with their containerd)")

    def _note_pid(self, rt: object, node: str, container: str) -> None:
        from routed.lab.cri import NodeRuntime

        assert isinstance(rt, NodeRuntime)
        _, pid = rt.container_state(container)
        self.paths.agent_pid(node).write_text(str(pid))
        (self.paths.node_dir(node) / "agent.container").write_text(container)

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
