"""The lab: a small cluster in network namespaces on one machine (ToR, nodes with real agents, pods).

`up` builds it and waits until every agent is ready; `apply`/`delete` take ordinary Kubernetes YAML;
`matrix` probes every pod pair with real connections; `down` removes everything (also a crashed run's).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

from routed import api, netns
from routed.errors import RoutedError
from routed.lab import cri, endpointslices, manifests, pods, topology
from routed.lab.errors import LabError
from routed.lab.state import LabPaths, LabState, PodState
from routed.lab.store import ClusterStore, KubeStore, ManifestStore

log = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 90.0
POD_WORKERS = 16
SUPERVISOR_STOP_SECONDS = 20.0


def poll(predicate: Any, timeout: float, interval: float = 0.1) -> Any:
    """run_and_expect: call until truthy or the deadline; return the last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def node_addresses(node: Any) -> list[str]:
    """The node's InternalIPs: every uplink address, the first family's before the second's."""
    per_uplink = [topology.link_side_addresses(up) for up in node.uplinks]
    width = max((len(a) for a in per_uplink), default=0)
    return [a[f] for f in range(width) for a in per_uplink if f < len(a)]


def _pid_is(pid: int, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle.encode() in f.read()
    except OSError:
        return False


class Lab:
    def __init__(self, name: str = "lab") -> None:
        if not name.replace("-", "").isalnum() or len(name) > 12:
            raise LabError("lab name: letters, digits and '-', at most 12 characters")
        self.name = name
        self.paths = LabPaths(name)

    # ---- lifecycle -----------------------------------------------------------------------------------

    def store(self, state: LabState | None = None) -> ClusterStore:
        state = state or self.state()
        if state.datastore == "kube":
            return KubeStore(state.control_plane["netns"], str(self.paths.kube_dir / "admin.kubeconfig"))
        return ManifestStore(self.paths.cluster_dir)

    def state(self) -> LabState:
        if not LabState.exists(self.paths):
            raise LabError(f"lab {self.name!r} is not up (run: routed lab up)")
        return LabState.load(self.paths)

    def up(self, nodes: int = 2, files: list[str] | None = None, tor: str = "frr", tors: int = 1,
           topology_kind: str = "as-per-node", datastore: str = "manifest", runtime: str = "process",
           bfd: bool = False, ip_family: str = "ipv4", ipv6_over_ipv4: bool = False) -> LabState:
        self.down(quiet=True)
        if runtime not in ("process", "containerd"):
            raise LabError(f"runtime {runtime!r}: process or containerd")
        if ipv6_over_ipv4 and (ip_family != "dual" or tor not in ("frr", "bird")):
            raise LabError("--ipv6-over-ipv4 needs --ip-family dual and an FRR or BIRD ToR (the lab cannot make "
                           "GoBGP send an IPv6 next hop over an IPv4 session)")
        if bfd and tor != "frr":
            raise LabError("--bfd needs FRR ToRs (--tor frr): the lab runs FRR's bfdd against the agents")
        images = cri.prepare() if runtime == "containerd" else {}
        try:
            state = topology.plan(self.name, nodes, tors=tors, topology=topology_kind, tor_kind=tor,
                                  datastore=datastore, ip_family=ip_family)
        except ValueError as exc:
            raise LabError(str(exc)) from None
        state.runtime = runtime
        state.bfd = bfd
        state.ipv6_over_ipv4 = ipv6_over_ipv4
        self.paths.root.mkdir(parents=True, exist_ok=True)
        state.save(self.paths)
        try:
            topology.build(state)
            pods.install_plugin(self.paths)
            if datastore == "kube":
                from routed.lab import kube_setup

                kube_setup.start_control_plane(self, state)
            store = self.store(state)
            for node in state.nodes:
                store.write(self._node_object(node))
                self._write_agent_config(state, node)
                if runtime == "containerd":  # before the agent: its mount namespace must see the pods' netns
                    cri.NodeRuntime(self.paths, node.name).start(node.netns, images)
            self._start_routers(state)
            self._start_supervisor()
            self.wait_ready(state)
            if state.tor_kind != "static":
                self.wait_routes(state)
            for file in files or []:
                self.apply(file)
        except Exception:
            log.error("lab up failed; logs are under %s", self.paths.root)
            raise
        return self.state()

    def down(self, quiet: bool = False) -> list[str]:
        self._stop_supervisor()
        if LabState.exists(self.paths):
            state = LabState.load(self.paths)
            if state.runtime == "containerd":
                for node in state.nodes:
                    try:
                        cri.NodeRuntime(self.paths, node.name).stop()
                    except LabError as exc:
                        log.warning("stopping %s's containerd: %s", node.name, exc)
        removed = topology.destroy(self.name)  # ends router daemons and pod servers with their namespaces
        shutil.rmtree(self.paths.root, ignore_errors=True)
        if removed and not quiet:
            log.info("removed namespaces: %s", " ".join(removed))
        return removed

    def _node_object(self, node: Any) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "labels": {"kubernetes.io/hostname": node.name, topology.RACK_LABEL: node.rack},
            },
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": node.cidrs()},
            # every uplink address is an InternalIP: a dual-homed node speaks BGP from each (first family first)
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in node_addresses(node)]
                       + [{"type": "Hostname", "address": node.name}]},
        }

    def _write_agent_config(self, state: LabState, node: Any) -> None:
        """The node's agent config; the containerd runtime runs the agent as the DaemonSet does, with the
        ConfigMap (agent.yaml and the conflist) mounted at /etc/routed and state, run, log dirs at theirs."""
        node_dir = self.paths.node_dir(node.name)
        for sub_dir in ("run", "log", "state", "config"):
            (node_dir / sub_dir).mkdir(parents=True, exist_ok=True)
        inside = state.runtime == "containerd"
        config: dict[str, Any] = {
            "node_name": node.name,
            "datastore": state.datastore,
            "state_dir": "/var/lib/routed" if inside else str(node_dir / "state"),
            "socket_path": "/var/run/routed/agent.sock" if inside else self.paths.node_socket(node.name),
            "http_listen": "127.0.0.1:9099",
            "log_file": "/var/log/routed/agent.log" if inside else str(self.paths.agent_log(node.name)),
            "bgp": {"enabled": state.tor_kind != "static"},
        }
        if state.datastore == "kube":
            from routed.lab import kube_setup

            config["kubeconfig"] = kube_setup.agent_kubeconfig(self, state, node.name)
        else:
            config["manifest_dir"] = str(self.paths.cluster_dir)
        self.paths.node_config(node.name).write_text(yaml.safe_dump(config, sort_keys=False))
        conflist = {"cniVersion": "1.1.0", "name": pods.CNI_NETWORK_NAME,
                    "plugins": [{"type": "routed-cni", "socketPath": self.paths.node_socket(node.name),
                                 "logFile": str(node_dir / "log" / "cni.log")}]}
        (node_dir / "config" / "10-routed.conflist").write_text(json.dumps(conflist, indent=1))

    def _start_routers(self, state: LabState) -> None:
        if state.tor_kind == "static":
            return
        from routed.lab.bgp_setup import start_routers

        start_routers(self, state)

    def _start_supervisor(self) -> None:
        with open(self.paths.supervisor_log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "routed.lab.supervisor", "--lab", self.name],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.paths.supervisor_pid.write_text(str(proc.pid))

    def _stop_supervisor(self) -> None:
        try:
            pid = int(self.paths.supervisor_pid.read_text())
        except (OSError, ValueError):
            return
        if not _pid_is(pid, "routed.lab.supervisor"):
            return
        os.kill(pid, signal.SIGTERM)
        if not poll(lambda: not _pid_is(pid, "routed.lab.supervisor"), SUPERVISOR_STOP_SECONDS):
            os.kill(pid, signal.SIGKILL)
        try:  # reap it if it is our child (lab up and down in one process, as tests do)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def agent_status(self, node: str) -> dict[str, Any] | None:
        try:
            return api.call(self.paths.node_socket(node), "status", timeout=5)
        except (OSError, RoutedError, ValueError):
            return None

    def wait_ready(self, state: LabState | None = None, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        state = state or self.state()

        def all_ready() -> bool:
            return all((self.agent_status(n.name) or {}).get("ready") for n in state.nodes)

        if not poll(all_ready, timeout, interval=0.2):
            details = []
            for node in state.nodes:
                status = self.agent_status(node.name)
                details.append(f"{node.name}: {status.get('reasons') if status else 'agent not answering'}")
                details.append(pods.read_log_tail(self.paths.agent_log(node.name), 10))
            raise LabError("agents not ready in time:\n" + "\n".join(details))

    def wait_routes(self, state: LabState, timeout: float = 30.0) -> bool:
        """Until every node has installed a BGP route to every other node's pod CIDR (so `up` shows a converged
        fabric). Only a wait: a lab whose fabric does not converge is still up, and `status` shows why."""
        others = (len(state.nodes) - 1) * len(state.families)  # one pod CIDR per family from each other node

        def converged() -> bool:
            return all(((self.agent_status(n.name) or {}).get("bgp") or {}).get("routesInstalled", 0) >= others
                       for n in state.nodes)

        return bool(poll(converged, timeout, interval=0.2))

    # ---- objects -------------------------------------------------------------------------------------

    def apply(self, file: str) -> list[str]:
        state = self.state()
        store = self.store(state)
        done: list[str] = []
        objects = manifests.load_objects(file)
        known_namespaces = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"}
        for obj in objects:
            if obj["kind"] == "Pod":
                continue
            store.write(obj)
            if obj["kind"] == "Service":
                state.services[f"{obj['metadata'].get('namespace') or 'default'}/{obj['metadata']['name']}"] = obj
            done.append(f"{obj['kind'].lower()}/{obj['metadata']['name']} configured")
        pods_to_apply = [obj for obj in objects if obj["kind"] == "Pod"]
        for obj in pods_to_apply:
            ns = obj["metadata"]["namespace"]
            namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
            if ns not in known_namespaces and store.read(namespace) is None:
                store.write(namespace)
                known_namespaces.add(ns)
        # pods are created side by side, as a kubelet starts many sandboxes at once; each records itself
        if pods_to_apply:
            with ThreadPoolExecutor(max_workers=min(POD_WORKERS, len(pods_to_apply))) as pool:
                futures = [pool.submit(self._apply_pod, state, store, o) for o in pods_to_apply]
            state.save(self.paths)  # every pod that was created is recorded, even if another one failed
            errors = [e for f in futures if (e := f.exception()) is not None]
            if errors:
                done += endpointslices.sync(state, store)
                state.save(self.paths)
                raise errors[0]
            done += [f.result() for f in futures]
        done += endpointslices.sync(state, store)
        state.save(self.paths)
        return done

    def _apply_pod(self, state: LabState, store: ClusterStore, obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        node = (obj.get("spec") or {}).get("nodeName") or self._least_loaded_node(state)
        state.node(node)  # raises for an unknown node
        obj = {**obj, "spec": {**(obj.get("spec") or {}), "nodeName": node}}
        existing = state.pods.get(key)
        if existing is not None:
            if existing.node != node:
                raise LabError(f"pod {key}: spec.nodeName cannot change ({existing.node} -> {node}); delete it first")
            existing.labels = dict(meta.get("labels") or {})
            store.write(pods.pod_object_with_status(obj, existing))
            return f"pod/{key} configured"
        store.write(obj)  # the API object exists before the sandbox
        pod = pods.new_pod(self.name, meta["namespace"], meta["name"], node, manifests.container_ports(obj))
        pod.labels = dict(meta.get("labels") or {})
        try:
            pods.create(self.paths, pod, state.runtime)
        except Exception:
            store.delete(obj)
            raise
        store.write_status(obj, pods.pod_object_with_status(obj, pod)["status"])
        state.pods[key] = pod
        return f"pod/{key} created on {node} with IP {', '.join(pod.ips)}"

    def _least_loaded_node(self, state: LabState) -> str:
        load = {n.name: 0 for n in state.nodes}
        for pod in state.pods.values():
            load[pod.node] = load.get(pod.node, 0) + 1
        return min(load, key=lambda n: (load[n], n))

    def delete(self, file: str) -> list[str]:
        state = self.state()
        store = self.store(state)
        done: list[str] = []
        for obj in manifests.load_objects(file):
            if obj["kind"] == "Pod":
                key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
                pod = state.pods.pop(key, None)
                if pod is not None:
                    pods.destroy(self.paths, pod, state.runtime)
            if obj["kind"] == "Service":
                state.services.pop(f"{obj['metadata'].get('namespace') or 'default'}/{obj['metadata']['name']}", None)
            if store.delete(obj):
                done.append(f"{obj['kind'].lower()}/{obj['metadata']['name']} deleted")
            state.save(self.paths)
        done += endpointslices.sync(state, store)
        state.save(self.paths)
        return done

    # ---- views ---------------------------------------------------------------------------------------

    def crictl(self, node: str, args: list[str]) -> subprocess.CompletedProcess[str]:
        state = self.state()
        state.node(node)
        if state.runtime != "containerd":
            raise LabError("this lab runs no containerd (routed lab up --runtime containerd)")
        return cri.NodeRuntime(self.paths, node).crictl(*args, check=False)

    def pod_netns(self, ref: str) -> str:
        state = self.state()
        if "/" in ref:
            if ref not in state.pods:
                raise LabError(f"no pod {ref} in the lab")
            return state.pods[ref].netns
        for node in state.nodes:
            if node.name == ref:
                return node.netns
        for tor in state.tors:
            if tor.name == ref:
                return tor.netns
        if ref == "ctl" and state.control_plane:
            return state.control_plane["netns"]
        if ref == "ext" and state.external:
            return state.external["netns"]
        raise LabError(f"no node, ToR or pod called {ref!r}")

    def status(self) -> dict[str, Any]:
        state = self.state()
        nodes = []
        for node in state.nodes:
            agent = self.agent_status(node.name) or {}
            nodes.append({
                "name": node.name, "address": node.address, "pod_cidr": node.pod_cidr, "asn": node.asn,
                "addresses": node_addresses(node), "pod_cidrs": node.cidrs(),
                "ready": agent.get("ready", False), "reasons": agent.get("reasons", ["agent not answering"]),
                "endpoints": agent.get("endpoints", 0), "bgp": agent.get("bgp", {}),
            })
        tors = []
        for tor in state.tors:
            routes: list[dict[str, Any]] = []
            for version in state.families:
                out = netns.run(["ip", "-n", tor.netns, f"-{version}", "-j", "route", "show"], check=False).stdout
                routes += [r for r in json.loads(out or "[]") if not str(r.get("dst", "")).startswith("fe80:")]
            entry: dict[str, Any] = {"name": tor.name, "kind": tor.kind, "asn": tor.asn, "routes": routes}
            if tor.kind != "static":
                from routed.lab.bgp_setup import router_sessions

                entry["sessions"] = router_sessions(self, state, tor)
            if state.bfd:
                from routed.lab.bgp_setup import tor_router

                entry["bfd"] = tor_router(self, state, tor.name).bfd_peers()
            tors.append(entry)
        pod_rows = [
            {"pod": p.key, "node": p.node, "ips": p.ips, "netns": p.netns,
             "ports": [f"{x['port']}/{x['protocol']}" for x in p.ports]}
            for p in state.pods.values()
        ]
        return {"lab": self.name, "tor": state.tor_kind, "datastore": state.datastore, "runtime": state.runtime,
                "ipFamily": state.ip_family, "bfd": state.bfd, "nodes": nodes, "tors": tors,
                "pods": pod_rows}

    def probe_external(self, ip: str, port: int, protocol: str = "TCP", timeout: float = 1.0) -> dict[str, Any]:
        """One probe from the client outside the cluster (behind ToR 1): {"allowed", "server", "client_seen"}."""
        state = self.state()
        if not state.external:
            raise LabError("this lab has no external client (made by an older routed)")
        request = json.dumps({"targets": [{"to": ip, "ip": ip, "port": port, "protocol": protocol}],
                              "timeout": timeout})
        proc = subprocess.run(netns.ns_cmd(state.external["netns"], [sys.executable, "-m", "routed.lab.probe"]),
                              input=request, capture_output=True, text=True, timeout=timeout * 4 + 30)
        if proc.returncode != 0:
            raise LabError(f"probe from the external client failed: {proc.stderr.strip()}")
        return dict(json.loads(proc.stdout)["results"][0])

    def matrix(self, ports: list[int] | None = None, protocols: list[str] | None = None,
               timeout: float = 1.0, family: int | None = None) -> list[dict[str, Any]]:
        """Probe every pod port from every pod; `family` 4 or 6 picks the pods' address of that family
        (default: the lab's first family). Pods without an address of the family are left out."""
        state = self.state()
        family = family or state.families[0]
        if family not in state.families:
            raise LabError(f"this lab is {state.ip_family}: it has no IPv{family} pods")
        wanted_protocols = {p.upper() for p in protocols} if protocols else None
        targets = []
        for pod in state.pods.values():
            for port in pod.ports:
                if ports and port["port"] not in ports:
                    continue
                if wanted_protocols and port["protocol"] not in wanted_protocols:
                    continue
                for ip in topology.of_family(pod.ips, family)[:1]:
                    targets.append({"to": pod.key, "ip": ip, "port": port["port"], "protocol": port["protocol"]})

        def probe_from(src: PodState) -> list[dict[str, Any]]:
            request = json.dumps({"targets": targets, "timeout": timeout})
            proc = subprocess.run(netns.ns_cmd(src.netns, [sys.executable, "-m", "routed.lab.probe"]),
                                  input=request, capture_output=True, text=True, timeout=timeout * 4 + 30)
            if proc.returncode != 0:
                raise LabError(f"probe from {src.key} failed: {proc.stderr.strip()}")
            own = topology.of_family(src.ips, family)
            return [{"from": src.key, "from_ip": own[0] if own else "", **r}
                    for r in json.loads(proc.stdout)["results"]]

        sources = [p for p in state.pods.values() if topology.of_family(p.ips, family)]
        if not sources or not targets:
            return []
        with ThreadPoolExecutor(max_workers=min(32, len(sources))) as pool:
            chunks = list(pool.map(probe_from, sources))
        return [row for chunk in chunks for row in chunk]
