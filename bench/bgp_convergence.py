"""BGP convergence benchmark: real FRR ToR in a namespace, one BgpManager + ExaBGP per node namespace.

    .venv/bin/python bench/bgp_convergence.py [--nodes 50] [--baseline 5] [--router frr] [--repeat 3]

1. start → the node's pod CIDR is in the ToR's kernel (median of --repeat runs, 1 node)
2. pod CIDR change → the ToR's kernel has the new prefix and not the old one
3. scale: K nodes against one ToR: time until every node has every other node's route (proto 202 in its
   kernel), RSS per node (harness + ExaBGP + bridge); compared with a baseline run of --baseline nodes.
Namespaces: rtd-bgpb-…, removed on exit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "topo"))

from bgp_topo import BgpTopo  # noqa: E402

from routed import netns  # noqa: E402
from routed.lab.routers import kernel_routes  # noqa: E402
from tests.helpers import run_and_expect  # noqa: E402

PREFIX = "rtd-bgpb"


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def node_rss(topo: BgpTopo, i: int) -> tuple[int, int, int]:
    """(harness, exabgp, bridge) RSS in KiB."""
    harness = topo.procs[i].pid
    agent = [c for c in children(harness)] or [harness]  # `ip netns exec` execs, so usually the same pid
    exa = topo.exabgp_pid(i) or 0
    bridge = sum(rss_kb(c) for c in children(exa)) if exa else 0
    return rss_kb(harness) + sum(rss_kb(a) for a in agent if a != harness and a != exa), rss_kb(exa), bridge


def on_tor(topo: BgpTopo, prefix: str) -> bool:
    return prefix in topo.tor_routes()


def single_start(router: str, repeat: int) -> tuple[list[float], list[float]]:
    starts, changes = [], []
    for r in range(repeat):
        topo = BgpTopo(f"{PREFIX}-s{r}", nodes=1, router=router, log_level="WARNING")
        try:
            topo.build()
            topo.start_tor()
            t0 = time.monotonic()
            topo.start_node(1)
            run_and_expect(lambda topo=topo: on_tor(topo, "10.244.1.0/24"), bool, 30, interval=0.01,
                           ignore=(Exception,)).check("pod CIDR on the ToR")
            starts.append(time.monotonic() - t0)
            topo.cidrs[1] = ["10.245.1.0/24"]
            t0 = time.monotonic()
            topo.write_spec(1)
            run_and_expect(lambda topo=topo: on_tor(topo, "10.245.1.0/24")
                           and not on_tor(topo, "10.244.1.0/24"),
                           bool, 30, interval=0.01, ignore=(Exception,)).check("new pod CIDR on the ToR")
            changes.append(time.monotonic() - t0)
        finally:
            topo.cleanup()
    return starts, changes


def scale(k: int, router: str) -> dict[str, float]:
    topo = BgpTopo(f"{PREFIX}-k{k}", nodes=k, router=router, log_level="WARNING", status_interval=1.0,
                   hold=9, keepalive=3)
    try:
        t_build = time.monotonic()
        topo.build()
        topo.start_tor()
        build = time.monotonic() - t_build
        t0 = time.monotonic()
        for i in range(1, k + 1):
            topo.start_node(i)
        launched = time.monotonic() - t0

        def all_routes() -> bool:
            for i in range(1, k + 1):
                routes = kernel_routes(topo.node_ns(i), protocol="202")
                if len(routes) < k - 1:
                    return False
            return True

        run_and_expect(lambda: len(topo.tor_routes()) >= 2 * k, bool, 600, interval=0.2,
                       ignore=(Exception,)).check("ToR has every CIDR")
        tor_done = time.monotonic() - t0
        run_and_expect(all_routes, bool, 600, interval=0.2,
                       ignore=(Exception,)).check("every node has every route")
        total = time.monotonic() - t0
        for i in range(1, k + 1):  # exact check once
            got = {r["prefix"] for r in kernel_routes(topo.node_ns(i), protocol="202")}
            want = {f"10.244.{j}.0/24" for j in range(1, k + 1) if j != i}
            assert got == want, (i, sorted(want - got), sorted(got - want))
        time.sleep(1.0)  # let the status files settle before sampling memory
        rss = [node_rss(topo, i) for i in range(1, k + 1)]
        return {
            "k": k, "build_s": build, "launch_s": launched, "tor_s": tor_done, "total_s": total,
            "per_node_s": total / k,
            "rss_harness_mib": statistics.mean(r[0] for r in rss) / 1024,
            "rss_exabgp_mib": statistics.mean(r[1] for r in rss) / 1024,
            "rss_bridge_mib": statistics.mean(r[2] for r in rss) / 1024,
            "rss_node_mib": statistics.mean(sum(r) for r in rss) / 1024,
        }
    finally:
        topo.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--baseline", type=int, default=5)
    ap.add_argument("--router", default="frr", choices=["frr", "bird"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.nodes > 250:
        ap.error("at most 250 nodes (addressing 10.1.<i>.0/24)")
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    netns.delete_all(PREFIX)
    try:
        starts, changes = single_start(args.router, args.repeat)
        print(f"router: {args.router}")
        print(f"start -> pod CIDR in ToR kernel:   median {statistics.median(starts):.3f}s "
              f"(runs: {', '.join(f'{s:.3f}' for s in starts)})")
        print(f"CIDR change -> ToR kernel updated: median {statistics.median(changes):.3f}s "
              f"(runs: {', '.join(f'{s:.3f}' for s in changes)})")
        base = scale(args.baseline, args.router)
        big = scale(args.nodes, args.router)
        hdr = f"{'K':>4} {'launch':>8} {'ToR all':>8} {'all nodes':>10} {'per node':>9} {'RSS/node':>9} " \
              f"{'agent':>7} {'exabgp':>7} {'bridge':>7}"
        print(hdr)
        for r in (base, big):
            print(f"{r['k']:>4} {r['launch_s']:>7.2f}s {r['tor_s']:>7.2f}s {r['total_s']:>9.2f}s "
                  f"{r['per_node_s']:>8.3f}s {r['rss_node_mib']:>6.1f}MiB {r['rss_harness_mib']:>6.1f}M "
                  f"{r['rss_exabgp_mib']:>6.1f}M {r['rss_bridge_mib']:>6.1f}M")
        print(f"ratio K={args.nodes} / K={args.baseline}: total time x{big['total_s'] / base['total_s']:.2f}, "
              f"time per node x{big['per_node_s'] / base['per_node_s']:.2f}, "
              f"RSS per node x{big['rss_node_mib'] / base['rss_node_mib']:.2f}")
    finally:
        netns.delete_all(PREFIX)


if __name__ == "__main__":
    main()
