"""CNI ADD+DEL latency: routed-cni (the static shim + the agent) against the reference ptp + host-local plugins.

Both run interleaved in one run, each against its own pod namespace, from inside a node namespace
(`rtd-cnib-<id>-host`, with an uplink namespace giving it a default route). The plugins are executed exactly as a
runtime does (env + stdin, fresh process per call); the bench process enters the node namespace itself so neither
side pays for `ip netns exec`.

    .venv/bin/python bench/cni_latency.py [--cycles 200] [--agent routed|harness] [--dual-stack]

--dual-stack: both sides hand out an IPv4 and an IPv6 address per pod (routed: two pod CIDRs on the Node;
ptp: host-local with one range per family).

routed-cni is the static executable scripts/bootstrap builds from cni/shim/routed-cni.c (.venv/bin/routed-cni).
`routed` (default) serves the calls with the real `routed agent` (policy and BGP off: CNI latency only);
`harness` with tests/netns/cni_harness.py (the CNI service alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cni.netnsfd import CLONE_NEWNET, _libc  # noqa: E402
from routed import netns  # noqa: E402

PREFIX = "rtd-cnib-"
REF = "/usr/lib/cni"
ROUTED_CNI = str(REPO / ".venv" / "bin" / "routed-cni")
PYTHON = str(REPO / ".venv" / "bin" / "python")
HARNESS = str(REPO / "tests" / "netns" / "cni_harness.py")
ROUTED = str(REPO / ".venv" / "bin" / "routed")


def setns_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(f"setns into {path} failed")
    finally:
        os.close(fd)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    idx = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[idx]


def call(exe: str, command: str, conf: bytes, container: str, pod_ns: str) -> float:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_NETNS": netns.netns_path(pod_ns),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": REF,
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=p",
    }
    t0 = time.perf_counter()
    proc = subprocess.run([exe], input=conf, capture_output=True, env=env)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{exe} {command} failed: {proc.stdout.decode()} {proc.stderr.decode()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--agent", choices=["routed", "harness"], default="routed")
    parser.add_argument("--dual-stack", action="store_true", help="an IPv4 and an IPv6 address per pod")
    args = parser.parse_args()
    our_cidrs = ["10.90.0.0/16", "fd00:90::/64"] if args.dual_stack else ["10.90.0.0/16"]
    ref_ranges = [[{"subnet": "10.91.0.0/16"}]] + ([[{"subnet": "fd00:91::/64"}]] if args.dual_stack else [])
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2

    netns.delete_all(PREFIX)
    run = uuid.uuid4().hex[:6]
    host, up = f"{PREFIX}{run}-host", f"{PREFIX}{run}-up"
    pod_ours, pod_ref = f"{PREFIX}{run}-ours", f"{PREFIX}{run}-ref"
    tmp = tempfile.mkdtemp(prefix="rtd-cnib-")
    sock = os.path.join(tmp, "agent.sock")
    agent: subprocess.Popen[bytes] | None = None
    home = os.open("/proc/self/ns/net", os.O_RDONLY)  # to come back before cleaning up (netns.delete kills pids)
    try:
        for ns in (host, up, pod_ours, pod_ref):
            netns.create(ns)
        netns.veth(host, "up0", up, "dn0")
        netns.ns_run(host, ["ip", "addr", "add", "192.168.78.2/24", "dev", "up0"])
        netns.ns_run(up, ["ip", "addr", "add", "192.168.78.1/24", "dev", "dn0"])
        netns.ns_run(host, ["ip", "route", "add", "default", "via", "192.168.78.1"])
        netns.sysctl(host, "net.ipv4.ip_forward", "1")
        if args.dual_stack:
            netns.ns_run(host, ["ip", "addr", "add", "fd00:78::2/64", "dev", "up0", "nodad"])
            netns.ns_run(up, ["ip", "addr", "add", "fd00:78::1/64", "dev", "dn0", "nodad"])
            netns.ns_run(host, ["ip", "-6", "route", "add", "default", "via", "fd00:78::1"])
            netns.sysctl(host, "net.ipv6.conf.all.forwarding", "1")
        env = dict(os.environ)
        if args.agent == "harness":
            cmd = [PYTHON, HARNESS, "--socket", sock, "--state-dir", os.path.join(tmp, "state"),
                   *[a for c in our_cidrs for a in ("--pod-cidr", c)], "--log-file", os.path.join(tmp, "agent.log")]
        else:
            manifests = Path(tmp, "manifests")
            manifests.mkdir()
            (manifests / "node.yaml").write_text(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: bench\nspec:\n  podCIDR: 10.90.0.0/16\n"
                f"  podCIDRs: [{', '.join(our_cidrs)}]\n"
            )
            env.update({"ROUTED_POLICY__ENABLED": "false", "ROUTED_BGP__ENABLED": "false"})
            cmd = [ROUTED, "agent", "--node", "bench", "--manifest-dir", str(manifests), "--state-dir",
                   os.path.join(tmp, "state"), "--socket", sock, "--http-listen", "",
                   "--log-file", os.path.join(tmp, "agent.log")]
        agent = subprocess.Popen(netns.ns_cmd(host, cmd), env=env)
        deadline = time.monotonic() + 30
        status = json.dumps({"cniVersion": "1.1.0", "name": "bench", "type": "routed-cni",
                             "socketPath": sock}).encode()
        while True:  # until the agent serves CNI (STATUS succeeds)
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("agent did not start")
            proc = subprocess.run(netns.ns_cmd(host, [ROUTED_CNI]), input=status, capture_output=True,
                                  env={"CNI_COMMAND": "STATUS"})
            if proc.returncode == 0:
                break
            time.sleep(0.05)
        ours_conf = json.dumps({"cniVersion": "1.0.0", "name": "bench", "type": "routed-cni", "socketPath": sock,
                                "logFile": os.path.join(tmp, "cni.log"), "mtu": args.mtu}).encode()
        ref_conf = json.dumps({"cniVersion": "1.0.0", "name": "bench-ref", "type": "ptp", "ipMasq": False,
                               "mtu": args.mtu, "ipam": {"type": "host-local", "ranges": ref_ranges,
                                                         "dataDir": os.path.join(tmp, "host-local")}}).encode()
        setns_path(netns.netns_path(host))  # this process (and the plugins it runs) now live in the node namespace
        times: dict[str, dict[str, list[float]]] = {
            k: {"add": [], "del": [], "cycle": []} for k in ("routed-cni", "ptp+host-local")
        }
        sides = [("routed-cni", ROUTED_CNI, ours_conf, pod_ours), ("ptp+host-local", f"{REF}/ptp", ref_conf, pod_ref)]
        for i in range(args.cycles + 5):  # 5 warm-up cycles, not counted
            order = sides if i % 2 == 0 else list(reversed(sides))
            for name, exe, conf, pod in order:
                container = f"bench{i:05d}{name[:3]}"
                t_add = call(exe, "ADD", conf, container, pod)
                t_del = call(exe, "DEL", conf, container, pod)
                if i >= 5:
                    times[name]["add"].append(t_add)
                    times[name]["del"].append(t_del)
                    times[name]["cycle"].append(t_add + t_del)
        stack = "dual-stack (IPv4 + IPv6 per pod)" if args.dual_stack else "IPv4"
        print(f"{args.cycles} ADD+DEL cycles each, interleaved, {stack}; static routed-cni, agent {args.agent} (ms)")
        print(f"{'':16} {'ADD p50':>8} {'ADD p95':>8} {'DEL p50':>8} {'DEL p95':>8} {'cyc p50':>8} {'cyc p95':>8}")
        for name, t in times.items():
            row = [pct(t[k], q) * 1000 for k in ("add", "del", "cycle") for q in (0.5, 0.95)]
            print(f"{name:16} " + " ".join(f"{v:8.1f}" for v in row))
        agent_ms: dict[str, list[float]] = {"ADD": [], "DEL": []}
        try:
            for line in Path(tmp, "agent.log").read_text().splitlines():
                parts = line.split()  # "... cni.exec: CNI ADD <container>/<ifname> pod ns/name ok in 3.2 ms"
                if "CNI" in parts and "ok" in parts and parts[parts.index("CNI") + 1] in agent_ms:
                    agent_ms[parts[parts.index("CNI") + 1]].append(float(parts[parts.index("ok") + 2]))
        except (OSError, ValueError, IndexError):
            pass
        if agent_ms["ADD"] and agent_ms["DEL"]:
            print(f"routed-cni: time in the agent p50 ADD {statistics.median(agent_ms['ADD']):.1f}"
                  f" DEL {statistics.median(agent_ms['DEL']):.1f} (the rest is the shim's process and the socket)")
        ours, ref = times["routed-cni"], times["ptp+host-local"]
        for k in ("add", "del", "cycle"):
            print(f"ratio ours/reference {k:5} p50 {statistics.median(ours[k]) / statistics.median(ref[k]):.3f}"
                  f"  p95 {pct(ours[k], 0.95) / pct(ref[k], 0.95):.3f}")
        return 0
    finally:
        if _libc.setns(home, CLONE_NEWNET) != 0:
            raise OSError("cannot return to the original network namespace")
        os.close(home)
        if agent is not None and agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
        for ns in (pod_ours, pod_ref, host, up):
            netns.delete(ns)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
