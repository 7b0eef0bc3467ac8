"""A small BGP topology for tests and the bench: ToR namespace(s) with a real router, node namespaces each
running tests/topo/bgp_harness.py (BgpManager). Every namespace is `<prefix>-…` under `rtd-bgp`.

Addressing (ToR t = 1.., node i = 1..):
  link ToR t <-> node i: 10.<t>.<i>.1/24 (ToR side, iface n<i>) / 10.<t>.<i>.2/24 (node side, iface t<t>)
  node i: InternalIP 10.1.<i>.2, AS 65000+i, pod CIDR 10.244.<i>.0/24 with 10.244.<i>.1/32 on lo ("pod")
  ToR t: AS 65100 (all ToRs), router id 10.<t>.255.1 — eBGP to every node
IPv6 (v6=True): links fd00:<t>:<i>::1/64 (ToR) / ::2 (node), pod CIDR fd10:<i>::/64 with fd10:<i>::1/128 on lo,
in one of the two fabric designs (v6_design):
  "separate": one more BGP session per link over IPv6 (BGPPeer tor<t>-node<i>-v6);
  "over-v4":  IPv6 unicast over the IPv4 session (BGPPeer addressFamilies [IPv4, IPv6]; with two ToRs each
              peer names its link's ipv6NextHop). The FRR ToR activates IPv6 for the IPv4 neighbours and, with
              tor_v6_next_hop, sets its link's global IPv6 next hop (route-map `set ipv6 next-hop global`);
              without it (and tor_link_v6=False: no IPv6 on the ToR's links) FRR sends ::ffff:<its IPv4>.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from routed import netns
from routed.lab.routers import FrrRouter, GobgpRouter, Neighbor, Router, kernel_routes, make_router
from tests.helpers import run_and_expect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
HARNESS = os.path.join(ROOT, "tests", "topo", "bgp_harness.py")
TOR_ASN = 65100


def node_name(i: int) -> str:
    return f"node{i}"


def pod_cidr(i: int) -> str:
    return f"10.244.{i}.0/24"


class FrrV6OverV4(FrrRouter):
    """FRR with IPv6 unicast activated on its IPv4 neighbours, each optionally with a route-map setting the
    global IPv6 next hop it sends (without one FRR sends an IPv4-mapped address on a link without IPv6)."""

    def __init__(self, v6_next_hops: dict[str, str], originate: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init__(**kw)
        self.v6_next_hops = v6_next_hops  # IPv4 neighbour -> global IPv6 next hop to send it ("" or absent: none)
        self.originate = originate  # IPv6 prefixes the ToR announces itself

    def config_text(self) -> str:
        base = super().config_text()
        tail = "!\nline vty\n!\n"
        assert base.endswith(tail)
        v4 = [n for n in self.neighbors if ":" not in n.address]
        lines = [" address-family ipv6 unicast", "  maximum-paths 16" if self.ecmp else "  maximum-paths 1"]
        lines += [f"  network {p}" for p in self.originate]
        maps: list[str] = []
        for k, n in enumerate(v4, start=1):
            lines.append(f"  neighbor {n.address} activate")
            nh = self.v6_next_hops.get(n.address)
            if nh:
                lines.append(f"  neighbor {n.address} route-map v6nh-{k} out")
                maps += [f"route-map v6nh-{k} permit 10", f" set ipv6 next-hop global {nh}", "!"]
        lines.append(" exit-address-family")
        return base[: -len(tail)] + "\n".join(lines + ["!"] + maps) + "\n" + tail


class BgpTopo:
    def __init__(self, prefix: str, nodes: int = 2, tors: int = 1, router: str = "frr", hold: int = 3,
                 keepalive: int = 1, gr_time: int = 120, passwords: dict[int, str] | None = None,
                 tor_passwords: dict[int, str] | None = None, extra_config: dict[str, Any] | None = None,
                 log_level: str = "INFO", status_interval: float = 0.2,
                 asns: dict[int, int] | None = None, v6: bool = False, v6_design: str = "separate",
                 tor_v6_next_hop: bool = True, tor_link_v6: bool = True,
                 tor_originate6: tuple[str, ...] = ()) -> None:
        assert prefix.startswith("rtd-bgp")
        assert v6_design in ("separate", "over-v4")
        self.prefix = prefix
        self.n = nodes
        self.t = tors
        self.kind = router
        self.hold = hold
        self.keepalive = keepalive
        self.gr_time = gr_time
        self.passwords = passwords or {}  # node i -> password the node uses
        self.tor_passwords = tor_passwords if tor_passwords is not None else dict(self.passwords)
        self.extra_config = extra_config or {}
        self.log_level = log_level
        self.status_interval = status_interval
        self.v6 = v6  # dual stack: IPv6 links, sessions and pod CIDRs next to the IPv4 ones
        self.v6_design = v6_design
        self.tor_v6_next_hop = tor_v6_next_hop
        self.tor_link_v6 = tor_link_v6
        self.tor_originate6 = tor_originate6
        self.extra_peer_spec: dict[int, dict[str, Any]] = {}  # node i -> fields merged into its BGPPeers' spec
        self.asns = asns or {}  # node i -> AS (default 65000 + i); TOR_ASN for iBGP
        self.workdir = tempfile.mkdtemp(prefix=f"{prefix}-")
        os.chmod(self.workdir, 0o755)
        self.routers: dict[int, Router] = {}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.cidrs: dict[int, list[str]] = {i: [pod_cidr(i)] + ([f"fd10:{i}::/64"] if v6 else [])
                                            for i in range(1, nodes + 1)}

    # -- names ------------------------------------------------------------------------------------
    def tor_ns(self, t: int = 1) -> str:
        return f"{self.prefix}-t{t}"

    def node_ns(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    @staticmethod
    def node_addr(i: int, t: int = 1) -> str:
        return f"10.{t}.{i}.2"

    @staticmethod
    def tor_addr(i: int, t: int = 1) -> str:
        return f"10.{t}.{i}.1"

    @staticmethod
    def node_addr6(i: int, t: int = 1) -> str:
        return f"fd00:{t}:{i}::2"

    @staticmethod
    def tor_addr6(i: int, t: int = 1) -> str:
        return f"fd00:{t}:{i}::1"

    # -- build ------------------------------------------------------------------------------------
    def build(self) -> None:
        netns.delete_all(self.prefix)
        for t in range(1, self.t + 1):
            netns.create(self.tor_ns(t))
            netns.sysctl(self.tor_ns(t), "net.ipv4.ip_forward", "1")
            netns.sysctl(self.tor_ns(t), "net.ipv6.conf.all.forwarding", "1")
        for i in range(1, self.n + 1):
            ns = self.node_ns(i)
            netns.create(ns)
            netns.sysctl(ns, "net.ipv4.ip_forward", "1")
            netns.sysctl(ns, "net.ipv4.fib_multipath_hash_policy", "1")
            netns.sysctl(ns, "net.ipv4.conf.all.ignore_routes_with_linkdown", "1")
            netns.ns_run(ns, ["ip", "addr", "add", f"10.244.{i}.1/32", "dev", "lo"])
            for t in range(1, self.t + 1):
                netns.veth(self.tor_ns(t), f"n{i}", ns, f"t{t}")
                netns.ns_run(self.tor_ns(t), ["ip", "addr", "add", f"{self.tor_addr(i, t)}/24", "dev", f"n{i}"])
                netns.ns_run(ns, ["ip", "addr", "add", f"{self.node_addr(i, t)}/24", "dev", f"t{t}"])
                if self.v6 and self.tor_link_v6:
                    netns.ns_run(self.tor_ns(t), ["ip", "addr", "add", f"{self.tor_addr6(i, t)}/64", "dev", f"n{i}",
                                                  "nodad"])
                if self.v6:
                    netns.ns_run(ns, ["ip", "addr", "add", f"{self.node_addr6(i, t)}/64", "dev", f"t{t}", "nodad"])
            if self.v6:
                netns.ns_run(ns, ["ip", "addr", "add", f"fd10:{i}::1/128", "dev", "lo"])
                netns.sysctl(ns, "net.ipv6.conf.all.forwarding", "1")

    def node_asn(self, i: int) -> int:
        return self.asns.get(i, 65000 + i)

    def start_tor(self, t: int = 1, kind: str | None = None) -> Router:
        kind = kind or self.kind
        workdir = os.path.join(self.workdir, f"tor{t}")
        r: Router
        if self.v6 and self.v6_design == "over-v4":
            assert kind == "frr", "IPv6 over the IPv4 session: the harness configures FRR ToRs only"
            hops = {self.node_addr(i, t): self.tor_addr6(i, t) if self.tor_v6_next_hop else ""
                    for i in range(1, self.n + 1)}
            r = FrrV6OverV4(hops, self.tor_originate6, workdir=workdir, hold_time=self.hold,
                            keepalive=self.keepalive)
        else:
            r = make_router(kind, workdir=workdir, hold_time=self.hold, keepalive=self.keepalive)
        neighbors = [Neighbor(self.node_addr(i, t), self.node_asn(i), self.tor_passwords.get(i))
                     for i in range(1, self.n + 1)]
        if self.v6 and self.v6_design == "separate":
            neighbors += [Neighbor(self.node_addr6(i, t), self.node_asn(i), self.tor_passwords.get(i))
                          for i in range(1, self.n + 1)]
        r.start(self.tor_ns(t), TOR_ASN, f"10.{t}.255.1", neighbors)
        self.routers[t] = r
        return r

    def objects(self) -> list[dict[str, Any]]:
        objs: list[dict[str, Any]] = []
        for i in range(1, self.n + 1):
            objs.append({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node_name(i), "labels": {"rack": "r1"}},
                "spec": {"podCIDRs": self.cidrs[i]},
                "status": {"addresses": [{"type": "InternalIP", "address": self.node_addr(i, t)}
                                         for t in range(1, self.t + 1)]
                           + [{"type": "InternalIP", "address": self.node_addr6(i, t)}
                              for t in range(1, self.t + 1) if self.v6]},
            })
            for t in range(1, self.t + 1):
                peer: dict[str, Any] = {"peerIP": self.tor_addr(i, t), "asNumber": TOR_ASN, "node": node_name(i)}
                if i in self.passwords:
                    peer["password"] = {"secretKeyRef": {"name": "bgp-passwords", "key": f"node{i}"}}
                if self.v6 and self.v6_design == "over-v4":
                    peer["addressFamilies"] = ["IPv4", "IPv6"]
                    if self.t > 1:  # the default (the node's first IPv6 address) is on ToR 1's link only
                        peer["ipv6NextHop"] = self.node_addr6(i, t)
                peer.update(self.extra_peer_spec.get(i, {}))
                objs.append({"apiVersion": "routed.dev/v1alpha1", "kind": "BGPPeer",
                             "metadata": {"name": f"tor{t}-{node_name(i)}"}, "spec": peer})
                if self.v6 and self.v6_design == "separate":
                    objs.append({"apiVersion": "routed.dev/v1alpha1", "kind": "BGPPeer",
                                 "metadata": {"name": f"tor{t}-{node_name(i)}-v6"},
                                 "spec": dict(peer, peerIP=self.tor_addr6(i, t))})
        if self.passwords:
            objs.append({"apiVersion": "v1", "kind": "Secret",
                         "metadata": {"name": "bgp-passwords", "namespace": "routed-system"},
                         "stringData": {f"node{i}": pw for i, pw in self.passwords.items()}})
        spec = {"nodeASNumbers": {node_name(i): self.node_asn(i) for i in range(1, self.n + 1)},
                "asNumber": 64512, "holdTime": self.hold, "keepaliveTime": self.keepalive,
                "gracefulRestartTime": self.gr_time, "communities": ["65000:100"]}
        spec.update(self.extra_config)
        objs.append({"apiVersion": "routed.dev/v1alpha1", "kind": "BGPConfiguration",
                     "metadata": {"name": "default"}, "spec": spec})
        return objs

    def spec_path(self, i: int) -> str:
        return os.path.join(self.workdir, f"node{i}.spec.json")

    def status_path(self, i: int) -> str:
        return os.path.join(self.workdir, f"node{i}.status.json")

    def write_spec(self, i: int) -> None:
        spec = {"node_name": node_name(i), "run_dir": os.path.join(self.workdir, f"node{i}-run"),
                "state_dir": os.path.join(self.workdir, f"node{i}-state"), "objects": self.objects(),
                "status_interval": self.status_interval}
        tmp = self.spec_path(i) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(spec, f)
        os.replace(tmp, self.spec_path(i))

    def start_node(self, i: int) -> subprocess.Popen[bytes]:
        self.write_spec(i)
        with contextlib_suppress():
            os.unlink(self.status_path(i))
        logf = open(os.path.join(self.workdir, f"node{i}.log"), "ab")
        env = dict(os.environ, RTD_LOG=self.log_level)
        proc = subprocess.Popen(netns.ns_cmd(self.node_ns(i), [PYTHON, HARNESS, self.spec_path(i),
                                                              self.status_path(i)]),
                                stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()
        self.procs[i] = proc
        return proc

    def status(self, i: int) -> dict[str, Any]:
        with open(self.status_path(i)) as f:
            return json.load(f)

    def exabgp_pid(self, i: int) -> int | None:
        try:
            return self.status(i)["status"].get("exabgpPid")
        except (OSError, ValueError, KeyError):
            return None

    def stop_node(self, i: int, graceful: bool = True, timeout: float = 10.0) -> None:
        proc = self.procs.pop(i, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM if graceful else signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill9_node(self, i: int) -> None:
        """kill -9 of the agent-like harness and its ExaBGP (by PID)."""
        exa = self.exabgp_pid(i)
        proc = self.procs.pop(i)
        os.kill(proc.pid, signal.SIGKILL)
        if exa:
            try:
                os.kill(exa, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(5)

    # -- observation ------------------------------------------------------------------------------
    def node_routes(self, i: int) -> dict[str, list[str]]:
        routes = kernel_routes(self.node_ns(i), protocol="202")
        if self.v6:
            routes += kernel_routes(self.node_ns(i), family=6, protocol="202")
        return {r["prefix"]: r["nexthops"] for r in routes}

    def tor_routes(self, t: int = 1) -> dict[str, list[str]]:
        r = self.routers[t]
        if isinstance(r, GobgpRouter):
            routes = r.rib() + (r.rib(6) if self.v6 else [])
        else:
            routes = r.kernel_routes() + (r.kernel_routes(6) if self.v6 else [])
        return {x["prefix"]: x["nexthops"] for x in routes}

    def ping6(self, src: int, dst: int, count: int = 3, interval: float = 0.2,
              timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return netns.ns_run(self.node_ns(src), ["ping", "-6", "-q", "-n", "-c", str(count), "-i", str(interval),
                                                "-W", "1", "-I", f"fd10:{src}::1", f"fd10:{dst}::1"],
                            check=False, timeout=timeout)

    def ping(self, src: int, dst: int, count: int = 3, interval: float = 0.2,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return netns.ns_run(self.node_ns(src), ["ping", "-q", "-n", "-c", str(count), "-i", str(interval), "-W", "1",
                                                "-I", f"10.244.{src}.1", f"10.244.{dst}.1"],
                            check=False, timeout=timeout)

    def converged(self) -> bool:
        """Every node's CIDR on every ToR; every node has every other node's CIDR."""
        for t in self.routers:
            routes = self.tor_routes(t)
            for i in range(1, self.n + 1):
                if any(c not in routes for c in self.cidrs[i]):
                    return False
        for i in range(1, self.n + 1):
            if i not in self.procs:
                continue
            routes = self.node_routes(i)
            for j in range(1, self.n + 1):
                if j != i and j in self.procs and any(c not in routes for c in self.cidrs[j]):
                    return False
        return True

    def cleanup(self) -> None:
        for i in list(self.procs):
            proc = self.procs.pop(i)
            exa = None
            with contextlib_suppress():
                exa = self.exabgp_pid(i)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            if exa:
                with contextlib_suppress():
                    os.kill(exa, signal.SIGKILL)
        for r in self.routers.values():
            r.stop()
        self.routers.clear()
        netns.delete_all(self.prefix)
        if os.environ.get("RTD_KEEP") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self) -> str:
        out = []
        for i in range(1, self.n + 1):
            p = os.path.join(self.workdir, f"node{i}.log")
            if os.path.exists(p):
                with open(p, errors="replace") as f:
                    out.append(f"--- node{i}\n" + "".join(f.readlines()[-40:]))
        for t, r in self.routers.items():
            out.append(f"--- tor{t}\n" + r.log_tail(20))
        return "\n".join(out)


class contextlib_suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


if __name__ == "__main__":  # manual smoke run: python tests/topo/bgp_topo.py [frr|bird|gobgp]
    topo = BgpTopo("rtd-bgp-smoke", nodes=2, router=sys.argv[1] if len(sys.argv) > 1 else "frr")
    try:
        topo.build()
        topo.start_tor()
        for n in (1, 2):
            topo.start_node(n)
        run_and_expect(topo.converged, bool, 20, ignore=(Exception,)).check("convergence")
        print(topo.tor_routes(), topo.node_routes(1), topo.node_routes(2))
        print(topo.ping(1, 2).stdout)
    finally:
        print(topo.logs())
        topo.cleanup()
