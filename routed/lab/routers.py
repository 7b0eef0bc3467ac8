"""Real BGP routers (ToR / route reflector) inside a network namespace: FRR (default), BIRD 2, GoBGP.

Each router runs its daemons as children of this process inside the given namespace (`ip netns exec`),
with every file (config, pid, sockets, logs) in its own work directory, so several instances coexist.
The caller creates the namespace and its links/addresses; `stop()` kills exactly the PIDs started here.

Peering model: a neighbour whose ASN differs from the router's is eBGP; an equal ASN makes it an iBGP
route-reflector client with `next-hop-self` (FRR: `force`), as the ToR of a routed cluster needs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from routed.lab.errors import LabError
from routed.netns import ns_cmd, ns_run

log = logging.getLogger(__name__)

FRR_DIR = "/usr/lib/frr"
BFD_PROFILE = "lab"


@dataclass(frozen=True)
class Neighbor:
    address: str
    asn: int
    password: str | None = None
    # an IPv4 neighbour that also carries IPv6 unicast (MP-BGP over the IPv4 session): the router's own global
    # IPv6 next hop on that link, which it sends with the IPv6 routes ("": IPv4 unicast only)
    ipv6_next_hop: str = ""


class RouterError(LabError):
    pass


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


class Router:
    """Common process handling; subclasses write configs and know their daemons."""

    kind = "router"

    def __init__(self, workdir: str | None = None, hold_time: int = 9, keepalive: int = 3) -> None:
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"rtd-{self.kind}-")
        self.hold_time = hold_time
        self.keepalive = keepalive
        self.netns = ""
        self.asn = 0
        self.router_id = ""
        self.neighbors: list[Neighbor] = []
        self.graceful_restart = True
        self.ecmp = True
        self.bfd: tuple[int, int, int] | None = None  # (detect multiplier, min rx ms, min tx ms): FRR only
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- lifecycle --------------------------------------------------------------------------------
    def start(
        self,
        netns: str,
        asn: int,
        router_id: str,
        neighbors: Sequence[Neighbor],
        graceful_restart: bool = True,
        ecmp: bool = True,
    ) -> None:
        self.netns = netns
        self.asn = asn
        self.router_id = router_id
        self.neighbors = list(neighbors)
        self.graceful_restart = graceful_restart
        self.ecmp = ecmp
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o777)
        self._start()

    def _start(self) -> None:
        raise NotImplementedError

    def _spawn(self, cmd: Sequence[str], name: str) -> subprocess.Popen[bytes]:
        logf = open(os.path.join(self.workdir, f"{name}.out"), "ab")
        try:
            proc = subprocess.Popen(
                ns_cmd(self.netns, cmd), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            logf.close()
        self._procs.append(proc)
        log.debug("%s: started %s pid %d in %s", self.kind, name, proc.pid, self.netns)
        return proc

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    def running(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 3.0
        for proc in reversed(self._procs):
            try:
                proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(2)
        self._procs.clear()

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _wait_for(self, path: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            dead = [p for p in self._procs if p.poll() is not None]
            if dead:
                raise RouterError(f"{self.kind} in {self.netns} exited early: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RouterError(f"{self.kind} in {self.netns}: {path} did not appear: {self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        out: list[str] = []
        for name in sorted(os.listdir(self.workdir)):
            if name.endswith((".out", ".log")):
                with open(os.path.join(self.workdir, name), errors="replace") as f:
                    out += [f"{name}: {line.rstrip()}" for line in f.readlines()[-lines:]]
        return "\n".join(out)

    # -- observation ------------------------------------------------------------------------------
    def sessions(self) -> list[dict[str, Any]]:
        """[{"peer": addr, "state": "Established" | ..., "asn": int}]"""
        raise NotImplementedError

    def bfd_peers(self) -> list[dict[str, Any]]:
        return []  # BFD runs on FRR ToRs only

    def daemon_pids(self) -> dict[str, int]:
        """PIDs of this instance's daemons from their pid files (they outlive the Router object)."""
        out: dict[str, int] = {}
        for name in sorted(os.listdir(self.workdir)) if os.path.isdir(self.workdir) else []:
            if name.endswith(".pid"):
                with contextlib.suppress(OSError, ValueError), open(os.path.join(self.workdir, name)) as f:
                    out[name[:-4]] = int(f.read().strip())
        return out

    def established(self) -> set[str]:
        return {s["peer"] for s in self.sessions() if s["state"].lower() == "established"}

    def kernel_routes(self, family: int = 4, protocol: str | None = None) -> list[dict[str, Any]]:
        """Routes in the namespace's main table: [{"prefix", "nexthops": [addr…], "protocol"}]."""
        return kernel_routes(self.netns, family, protocol)


def kernel_routes(netns: str, family: int = 4, protocol: str | None = None) -> list[dict[str, Any]]:
    cmd = ["ip", "-j", f"-{family}", "route", "show", "table", "main"]
    if protocol:
        cmd += ["proto", protocol]
    proc = ns_run(netns, cmd)
    result: list[dict[str, Any]] = []
    for r in json.loads(proc.stdout or "[]"):
        dst = r.get("dst", "")
        if dst == "default":
            dst = "0.0.0.0/0" if family == 4 else "::/0"
        elif "/" not in dst:
            dst = f"{dst}/{32 if family == 4 else 128}"
        hops = [h.get("gateway", "") for h in r.get("nexthops") or []]
        if not hops and r.get("gateway"):
            hops = [r["gateway"]]
        result.append(
            {"prefix": dst, "nexthops": sorted(h for h in hops if h), "protocol": str(r.get("protocol", "")),
             "type": r.get("type", "unicast")}
        )
    return result


# ------------------------------------------------------------------------------------------------
class FrrRouter(Router):
    """FRR 8: zebra + bgpd as user frr, per-instance pathspace, vty socket dir, zserv socket and pid files."""

    kind = "frr"

    @property
    def _zserv(self) -> str:
        return os.path.join(self.workdir, "zserv.api")

    def _name(self) -> str:
        return os.path.basename(self.workdir.rstrip("/"))

    def config_text(self) -> str:
        lines = [
            "frr defaults datacenter",
            f"hostname {self.netns}",
            f"log file {os.path.join(self.workdir, 'bgpd.log')}",
            "!",
            f"router bgp {self.asn}",
            f" bgp router-id {self.router_id}",
            " no bgp ebgp-requires-policy",
            " no bgp network import-check",
            " bgp bestpath as-path multipath-relax",
            f" timers bgp {self.keepalive} {self.hold_time}",
        ]
        if self.graceful_restart:
            lines += [" bgp graceful-restart", " bgp graceful-restart preserve-fw-state"]
        else:
            lines += [" bgp graceful-restart-disable"]
        for n in self.neighbors:
            lines.append(f" neighbor {n.address} remote-as {n.asn}")
            lines.append(f" neighbor {n.address} timers {self.keepalive} {self.hold_time}")
            lines.append(f" neighbor {n.address} timers connect 1")
            lines.append(f" neighbor {n.address} advertisement-interval 0")
            if n.password:
                lines.append(f" neighbor {n.address} password {n.password}")
            if self.bfd:
                lines.append(f" neighbor {n.address} bfd profile {BFD_PROFILE}")
        shared = Counter(n.asn for n in self.neighbors)
        route_maps: list[str] = []
        for fam in ("ipv4", "ipv6"):
            members = [n for n in self.neighbors if _family(n.address) == (4 if fam == "ipv4" else 6)
                       or (fam == "ipv6" and n.ipv6_next_hop)]
            if not members:
                continue
            lines.append(f" address-family {fam} unicast")
            if self.ecmp:
                lines += ["  maximum-paths 16", "  maximum-paths ibgp 16"]
            else:
                lines += ["  maximum-paths 1", "  maximum-paths ibgp 1"]
            for n in members:
                if fam == "ipv6":
                    lines.append(f"  neighbor {n.address} activate")
                    if n.ipv6_next_hop and _family(n.address) == 4:  # else FRR sends an IPv4-mapped next hop
                        name = f"v6nh-{len(route_maps) + 1}"
                        lines.append(f"  neighbor {n.address} route-map {name} out")
                        route_maps += [f"route-map {name} permit 10", f" set ipv6 next-hop global {n.ipv6_next_hop}",
                                       "!"]
                if n.asn != self.asn and shared[n.asn] > 1:
                    # AS per rack: nodes sharing an AS would drop each other's routes (own AS in the path)
                    lines.append(f"  neighbor {n.address} as-override")
                if n.asn == self.asn:
                    lines.append(f"  neighbor {n.address} route-reflector-client")
                    lines.append(f"  neighbor {n.address} next-hop-self force")
            lines.append(" exit-address-family")
        lines += ["!", *route_maps, "line vty", "!"]
        return "\n".join(lines) + "\n"

    def bfdd_config_text(self) -> str:
        assert self.bfd is not None
        mult, rx, tx = self.bfd
        return "\n".join([
            f"hostname {self.netns}", f"log file {os.path.join(self.workdir, 'bfdd.log')}", "!", "bfd",
            f" profile {BFD_PROFILE}", f"  detect-multiplier {mult}", f"  receive-interval {rx}",
            f"  transmit-interval {tx}", " !", "!", ""])

    def bfd_peers(self) -> list[dict[str, Any]]:
        """FRR's `show bfd peers json`: [{"peer", "status", "id", "remote-id", "diagnostic", ...}]."""
        try:
            data = json.loads(self.vtysh("show bfd peers json") or "[]")
        except (RouterError, json.JSONDecodeError):
            return []
        return data if isinstance(data, list) else []

    def _start(self) -> None:
        conf = os.path.join(self.workdir, "bgpd.conf")
        zconf = os.path.join(self.workdir, "zebra.conf")
        with open(conf, "w") as f:
            f.write(self.config_text())
        with open(zconf, "w") as f:
            f.write(f"hostname {self.netns}\nlog file {os.path.join(self.workdir, 'zebra.log')}\n")
        for path in (conf, zconf):
            os.chmod(path, 0o644)
        common = ["-N", self._name(), "--vty_socket", self.workdir, "-u", "frr", "-g", "frr", "-P", "0",
                  "-z", self._zserv]
        self._spawn([os.path.join(FRR_DIR, "zebra"), *common, "-i", os.path.join(self.workdir, "zebra.pid"),
                     "-f", zconf], "zebra")
        self._wait_for(self._zserv)
        if self.bfd:
            bconf = os.path.join(self.workdir, "bfdd.conf")
            with open(bconf, "w") as f:
                f.write(self.bfdd_config_text())
            os.chmod(bconf, 0o644)
            self._spawn([os.path.join(FRR_DIR, "bfdd"), *common, "-i", os.path.join(self.workdir, "bfdd.pid"),
                         "-f", bconf], "bfdd")
            self._wait_for(os.path.join(self.workdir, "bfdd.vty"))
        self._spawn([os.path.join(FRR_DIR, "bgpd"), *common, "-i", os.path.join(self.workdir, "bgpd.pid"),
                     "-f", conf], "bgpd")
        self._wait_for(os.path.join(self.workdir, "bgpd.vty"))

    def vtysh(self, command: str) -> str:
        """Run vtysh against this instance; several lines become several -c (e.g. a config session)."""
        args: list[str] = []
        for line in command.splitlines():
            if line.strip():
                args += ["-c", line.strip()]
        proc = ns_run(self.netns, ["vtysh", "--vty_socket", self.workdir, *args], check=False, timeout=10)
        if proc.returncode != 0:
            raise RouterError(f"vtysh {command!r}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def sessions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = []
        for fam in ("ipv4", "ipv6"):
            try:
                data = json.loads(self.vtysh(f"show bgp {fam} unicast summary json") or "{}")
            except (RouterError, json.JSONDecodeError):
                continue
            for peer, info in (data.get("peers") or {}).items():
                if _family(peer) != (4 if fam == "ipv4" else 6) and any(
                        n.address == peer for n in self.neighbors):
                    continue  # a session's own family counts its prefixes (FRR lists it under IPv4 too)
                result.append({"peer": peer, "state": str(info.get("state", "")),
                               "asn": int(info.get("remoteAs", 0)), "received": info.get("pfxRcd", 0)})
        seen: set[str] = set()
        unique = []
        for s in result:
            if s["peer"] not in seen:
                seen.add(s["peer"])
                unique.append(s)
        for n in self.neighbors:  # neighbours FRR has not listed yet
            if n.address not in seen:
                unique.append({"peer": n.address, "state": "Idle", "asn": n.asn, "received": 0})
        return unique

    def rib(self) -> dict[str, Any]:
        return json.loads(self.vtysh("show bgp ipv4 unicast json") or "{}")


# ------------------------------------------------------------------------------------------------
class BirdRouter(Router):
    """BIRD 2: one `bgp` protocol per neighbour, `kernel` protocol exporting with ECMP merge paths."""

    kind = "bird"

    @property
    def _ctl(self) -> str:
        return os.path.join(self.workdir, "bird.ctl")

    def config_text(self) -> str:
        lines = [
            f'log "{os.path.join(self.workdir, "bird.log")}" all;',
            f"router id {self.router_id};",
            "protocol device { scan time 10; }",
            "protocol direct { ipv4; ipv6; }",
        ]
        for fam in ("ipv4", "ipv6"):
            merge = "merge paths on limit 16;" if self.ecmp else ""
            lines.append(
                f"protocol kernel kernel_{fam} {{ {fam} {{ import none; export filter {{ if source = RTS_BGP "
                f"then accept; reject; }}; }}; {merge} graceful restart on; }}"
            )
        for i, n in enumerate(self.neighbors):
            fam = "ipv4" if _family(n.address) == 4 else "ipv6"
            body = [
                f"  local as {self.asn};",
                f"  neighbor {n.address} as {n.asn};",
                f"  hold time {self.hold_time};",
                f"  keepalive time {self.keepalive};",
                "  connect retry time 1;",
                "  error wait time 1, 5;",
            ]
            if n.password:
                body.append(f'  password "{n.password}";')
            if self.graceful_restart:
                body.append("  graceful restart on;")
            else:
                body.append("  graceful restart off;")
            chan = f"  {fam} {{ import all; export all;"
            if n.asn == self.asn:
                body.append("  rr client;")
                chan += " next hop self;"
            if self.ecmp:
                chan += " add paths off;"
            chan += " };"
            body.append(chan)
            if n.ipv6_next_hop and fam == "ipv4":  # IPv6 unicast over this IPv4 session
                body.append(f"  ipv6 {{ import all; export all; next hop address {n.ipv6_next_hop};"
                            + (" add paths off;" if self.ecmp else "") + " };")
            lines.append(f"protocol bgp peer{i} {{\n" + "\n".join(body) + "\n}")
        return "\n".join(lines) + "\n"

    def _start(self) -> None:
        conf = os.path.join(self.workdir, "bird.conf")
        with open(conf, "w") as f:
            f.write(self.config_text())
        self._spawn(["bird", "-f", "-c", conf, "-s", self._ctl, "-P", os.path.join(self.workdir, "bird.pid")],
                    "bird")
        self._wait_for(self._ctl)

    def birdc(self, command: str) -> str:
        proc = ns_run(self.netns, ["birdc", "-s", self._ctl, *command.split()], check=False, timeout=10)
        if proc.returncode != 0:
            raise RouterError(f"birdc {command!r}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def sessions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = []
        for i, n in enumerate(self.neighbors):
            state = "Idle"
            try:
                out = self.birdc(f"show protocols all peer{i}")
            except RouterError:
                out = ""
            for line in out.splitlines():
                line = line.strip()
                if line.startswith("BGP state:"):
                    state = line.split(":", 1)[1].strip()
            result.append({"peer": n.address, "state": state, "asn": n.asn})
        return result


# ------------------------------------------------------------------------------------------------
class GobgpRouter(Router):
    """GoBGP: gobgpd with a TOML config. GoBGP has no FIB code of its own; it can install routes through FRR's
    zebra (ZAPI), but GoBGP 3.10 crashes decoding FRR 8.4's ZAPI (tried software-name frr8…frr10), so that is
    off by default (`use_zebra = True` to try with other versions). Instead a small loop
    (routed/lab/gobgp_fib.py) copies GoBGP's RIB into the ToR's kernel, so traffic is forwarded."""

    kind = "gobgp"
    api_port = 50051
    zebra_software = "frr8.2"
    use_zebra = False

    @property
    def _zserv(self) -> str:
        return os.path.join(self.workdir, "zserv.api")

    def _use_zebra(self) -> bool:
        return self.use_zebra and os.path.exists(os.path.join(FRR_DIR, "zebra"))

    def config_text(self) -> str:
        lines = [
            "[global.config]",
            f"  as = {self.asn}",
            f'  router-id = "{self.router_id}"',
            "  port = 179",
        ]
        if self.ecmp:
            lines += ["[global.use-multiple-paths.config]", "  enabled = true"]
        if self._use_zebra():
            lines += ["[zebra.config]", "  enabled = true", f'  url = "unix:{self._zserv}"', "  version = 6",
                      f'  software-name = "{self.zebra_software}"', "  redistribute-route-type-list = []"]
        shared = Counter(n.asn for n in self.neighbors)
        for n in self.neighbors:
            fam = "ipv4-unicast" if _family(n.address) == 4 else "ipv6-unicast"
            lines += [
                "[[neighbors]]",
                "  [neighbors.config]",
                f'    neighbor-address = "{n.address}"',
                f"    peer-as = {n.asn}",
            ]
            if n.password:
                lines.append(f'    auth-password = "{n.password}"')
            lines += [
                "  [neighbors.timers.config]",
                "    connect-retry = 1",
                f"    hold-time = {self.hold_time}",
                f"    keepalive-interval = {self.keepalive}",
            ]
            if n.asn != self.asn and shared[n.asn] > 1:
                lines += ["  [neighbors.as-path-options.config]", "    replace-peer-as = true"]
            if n.asn == self.asn:
                lines += ["  [neighbors.route-reflector.config]", "    route-reflector-client = true",
                          f'    route-reflector-cluster-id = "{self.router_id}"']
            if self.graceful_restart:
                lines += ["  [neighbors.graceful-restart.config]", "    enabled = true", "    restart-time = 120"]
            lines += [
                "  [[neighbors.afi-safis]]",
                "    [neighbors.afi-safis.config]",
                f'      afi-safi-name = "{fam}"',
            ]
            if self.graceful_restart:
                lines += ["    [neighbors.afi-safis.mp-graceful-restart.config]", "      enabled = true"]
        return "\n".join(lines) + "\n"

    def _start(self) -> None:
        conf = os.path.join(self.workdir, "gobgpd.toml")
        with open(conf, "w") as f:
            f.write(self.config_text())
        if self._use_zebra():
            zconf = os.path.join(self.workdir, "zebra.conf")
            with open(zconf, "w") as f:
                f.write(f"hostname {self.netns}\nlog file {os.path.join(self.workdir, 'zebra.log')}\n")
            os.chmod(zconf, 0o644)
            self._spawn([os.path.join(FRR_DIR, "zebra"), "-N", os.path.basename(self.workdir.rstrip("/")),
                         "--vty_socket", self.workdir, "-u", "frr", "-g", "frr", "-P", "0", "-z", self._zserv,
                         "-i", os.path.join(self.workdir, "zebra.pid"), "-f", zconf], "zebra")
            self._wait_for(self._zserv)
            os.chmod(self._zserv, 0o777)  # gobgpd (root) connects; zebra made it as frr
        self._spawn(["gobgpd", "-f", conf, "-p", "--api-hosts", f"127.0.0.1:{self.api_port}",
                     "--pprof-disable"], "gobgpd")
        deadline = time.monotonic() + 10
        while True:
            proc = ns_run(self.netns, ["gobgp", "-u", "127.0.0.1", "-p", str(self.api_port), "global"],
                          check=False, timeout=5)
            if proc.returncode == 0:
                break
            if not self.running() or time.monotonic() > deadline:
                raise RouterError(f"gobgpd in {self.netns} did not come up: {self.log_tail()}")
            time.sleep(0.05)
        if not self._use_zebra():
            self._spawn([sys.executable, "-m", "routed.lab.gobgp_fib", "--port", str(self.api_port)], "gobgp-fib")

    def gobgp(self, *args: str) -> str:
        proc = ns_run(self.netns, ["gobgp", "-u", "127.0.0.1", "-p", str(self.api_port), *args], check=False,
                      timeout=10)
        if proc.returncode != 0:
            raise RouterError(f"gobgp {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def sessions(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.gobgp("neighbor", "-j") or "[]")
        except (RouterError, json.JSONDecodeError):
            data = []
        states = {
            "BGP_FSM_ESTABLISHED": "Established", "BGP_FSM_IDLE": "Idle", "BGP_FSM_ACTIVE": "Active",
            "BGP_FSM_CONNECT": "Connect", "BGP_FSM_OPENSENT": "OpenSent", "BGP_FSM_OPENCONFIRM": "OpenConfirm",
        }
        result = []
        for entry in data:
            conf = entry.get("conf") or {}
            st = (entry.get("state") or {}).get("session_state", "")
            if isinstance(st, int):
                st = {1: "Idle", 2: "Connect", 3: "Active", 4: "OpenSent", 5: "OpenConfirm", 6: "Established"}.get(
                    st, str(st))
            result.append({"peer": conf.get("neighbor_address", ""), "state": states.get(str(st), str(st)),
                           "asn": int(conf.get("peer_asn", 0) or 0)})
        return result

    def rib(self, family: int = 4) -> list[dict[str, Any]]:
        """[{"prefix", "nexthops": [...]}] from gobgp's global RIB (best paths and ECMP candidates)."""
        out = self.gobgp("global", "rib", "-a", "ipv4" if family == 4 else "ipv6", "-j")
        data = json.loads(out or "{}")
        result = []
        for prefix, paths in (data or {}).items():
            hops: set[str] = set()
            for p in paths:
                for attr in p.get("attrs") or []:
                    if attr.get("type") == 3 and attr.get("nexthop"):
                        hops.add(attr["nexthop"])
                    if attr.get("type") == 14 and attr.get("nexthop"):
                        hops.add(attr["nexthop"])
            result.append({"prefix": prefix, "nexthops": sorted(hops)})
        return result


ROUTERS: dict[str, type[Router]] = {"frr": FrrRouter, "bird": BirdRouter, "gobgp": GobgpRouter}


def make_router(kind: str = "frr", workdir: str | None = None, hold_time: int = 9, keepalive: int = 3) -> Router:
    try:
        cls = ROUTERS[kind]
    except KeyError:
        raise RouterError(f"unknown router kind {kind!r} (have: {', '.join(ROUTERS)})") from None
    return cls(workdir=workdir, hold_time=hold_time, keepalive=keepalive)
