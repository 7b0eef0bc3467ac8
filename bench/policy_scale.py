"""Policy engine at scale: cold start, incremental updates, rule/ipset counts, for every iptables writer.

Cluster pods are objects only; local endpoints are real veth interfaces in a node namespace
(`rtd-polb-…`), plus a few real pods that carry traffic as a sanity check. Every kernel change happens
inside those namespaces. Prints a table and ratios against a baseline measured in the same run.

    .venv/bin/python bench/policy_scale.py                 # 10,000 pods, 1,000 policies, 100 endpoints
    .venv/bin/python bench/policy_scale.py --quick         # 1,000 pods, 100 policies, 20 endpoints
    .venv/bin/python bench/policy_scale.py --pods 100000 --policies 2000 --endpoints 100 --json
    .venv/bin/python bench/policy_scale.py --dual-stack --writers restore/legacy@4,restore/legacy

A writer spec `writer/backend` programs both families' tables (the agent's default); `writer/backend@4` only
the IPv4 one (the baseline of the ratios when present). --dual-stack gives every pod an IPv6 address too.

Figures per writer: cold (engine load + full apply), no-op apply, full resync (read-back, the periodic drift
repair), label change (p50/p99 of 50 remote pods joining/leaving a programmed set), policy add, endpoint ADD
(the CNI ADD's policy part), and sustained churn (--churn N pod updates per second for --churn-seconds).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from policy.calc import Calculation, PolicyInputs, calculate  # noqa: E402
from policy.incremental import PolicyEngine  # noqa: E402
from policy.render import render  # noqa: E402
from routed import netns  # noqa: E402
from routed.model import ContainerPort, Endpoint, Namespace, Pod  # noqa: E402

PREFIX = "rtd-polb"
PYTHON = str(REPO / ".venv" / "bin" / "python")
CONFIGS = [("restore", "legacy"), ("restore", "nft"), ("iptc", "legacy")]


def build_inputs(n_pods: int, n_policies: int, n_endpoints: int, seed: int = 1, dual_stack: bool = False) -> PolicyInputs:
    rnd = random.Random(seed)
    n_ns = max(2, n_pods // 200)
    namespaces = [Namespace(f"ns{i}", {"team": f"t{i % 10}", "env": rnd.choice(["prod", "dev"])}) for i in range(n_ns)]
    pods: list[Pod] = []
    endpoints: list[Endpoint] = []
    for i in range(n_pods):
        ns = f"ns{i % n_ns}"
        ip = f"10.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        ips = (ip, str(ipaddress.IPv6Address(0xFD00_0064 << 96 | i))) if dual_stack else (ip,)
        labels = {"app": f"app{i % 100}", "tier": rnd.choice(["fe", "be", "db"]), "ver": f"v{i % 3}"}
        ports = (ContainerPort(8080, "TCP", "http"), ContainerPort(9000 + i % 10, "TCP", "metrics"))
        pods.append(Pod(ns, f"pod{i}", labels, "node" if i < n_endpoints else "other", ips, ports))
        if i < n_endpoints:
            endpoints.append(Endpoint(f"c{i}", "eth0", "", f"rtd{i:011x}", ips, ns, f"pod{i}"))
    policies = []
    for j in range(n_policies):
        ns = f"ns{j % n_ns}"
        peer = rnd.choice([
            {"podSelector": {"matchLabels": {"app": f"app{rnd.randrange(100)}"}}},
            {"namespaceSelector": {"matchLabels": {"team": f"t{rnd.randrange(10)}"}},
             "podSelector": {"matchLabels": {"tier": rnd.choice(["fe", "be"])}}},
            {"namespaceSelector": {"matchLabels": {"env": "prod"}}},
            {"ipBlock": {"cidr": f"172.{rnd.randrange(16, 32)}.0.0/16", "except": [f"172.{rnd.randrange(16, 32)}.1.0/24"]}},
        ])
        peer = peer if "ipBlock" not in peer or peer["ipBlock"]["except"][0].split(".")[1] == peer["ipBlock"]["cidr"].split(".")[1] \
            else {"ipBlock": {"cidr": peer["ipBlock"]["cidr"]}}
        port = rnd.choice([{"port": 80}, {"port": "http"}, {"port": "metrics"}, {"port": 5000, "endPort": 5100},
                           {"port": 53, "protocol": "UDP"}])
        spec = {"podSelector": {"matchLabels": {"app": f"app{j % 100}"}},
                "policyTypes": ["Ingress", "Egress"] if j % 3 == 0 else ["Ingress"],
                "ingress": [{"from": [peer], "ports": [port]}]}
        if j % 3 == 0:
            spec["egress"] = [{"to": [peer]}, {"ports": [{"port": 53, "protocol": "UDP"}]}]
        policies.append({"metadata": {"name": f"pol{j}", "namespace": ns}, "spec": spec})
    return PolicyInputs(namespaces, pods, policies, endpoints, ["192.168.250.1"])


def joining_label_changes(inputs: PolicyInputs, calc: Calculation, count: int, seed: int = 3) -> list[Pod]:
    """Remote pods changing their app label so that they join (then leave, then join...) a selector ipset the
    node programs: one member added or removed each, the most common event in a big cluster."""
    rnd = random.Random(seed)
    sets = [s.description for s in calc.ipsets.values()
            if s.description.startswith("sel|ns=") and "app In (" in s.description]
    by_ns: dict[str, list[Pod]] = {}
    for pod in inputs.pods:
        if pod.node_name != "node":
            by_ns.setdefault(pod.namespace, []).append(pod)
    changes = []
    for i in range(count):
        ident = sets[i % len(sets)]
        ns, app = ident.split("|")[1][3:], ident.split("app In (")[1].split(")")[0]
        pod = rnd.choice(by_ns[ns])
        labels = {**pod.labels, "app": app if pod.labels["app"] != app else "app-none"}
        changes.append(Pod(pod.namespace, pod.name, labels, pod.node_name, pod.ips, pod.ports))
    return changes


def added_policy(inputs: PolicyInputs) -> dict:
    ep_pod = next(p for p in inputs.pods if p.key == inputs.endpoints[0].pod_key)
    return {"metadata": {"name": "bench-added", "namespace": ep_pod.namespace},
            "spec": {"podSelector": {"matchLabels": {"app": ep_pod.labels["app"]}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "fe"}}}], "ports": [{"port": 443}]}]}}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))] if values else 0.0


def churn(ctl, inputs: PolicyInputs, rate: int, seconds: float, seed: int = 9) -> dict:
    """`rate` remote pod updates per second for `seconds`: label or address changes arriving on a schedule; each
    apply covers everything that arrived before it (as the agent's coalescing reconciler does). Latency: event
    scheduled -> kernel written."""
    rnd = random.Random(seed)
    remote = [p for p in inputs.pods if p.node_name != "node"]
    current = {p.key: p for p in remote}
    total = int(rate * seconds)
    latencies: list[float] = []
    applies = 0
    start = time.perf_counter()
    i = 0
    while i < total:
        now = time.perf_counter()
        due = min(total, int((now - start) * rate) + 1)
        if due <= i:
            time.sleep(max(0.0, start + i / rate - now))
            continue
        arrivals = []
        for j in range(i, due):
            pod = current[rnd.choice(remote).key]
            if rnd.random() < 0.8:
                new = Pod(pod.namespace, pod.name, {**pod.labels, "app": f"app{rnd.randrange(100)}"}, pod.node_name,
                          pod.ips, pod.ports)
            else:
                octets = pod.ips[0].split(".")
                new = Pod(pod.namespace, pod.name, pod.labels, pod.node_name,
                          (f"10.{200 + rnd.randrange(50)}.{octets[2]}.{octets[3]}",), pod.ports)
            current[new.key] = new
            ctl.engine.set_pod(new)
            arrivals.append(start + j / rate)
        ctl.apply()
        applies += 1
        done = time.perf_counter()
        latencies += [done - t for t in arrivals]
        i = due
    elapsed = time.perf_counter() - start
    return {"rate": rate, "seconds": seconds, "events": total, "applies": applies,
            "p50_s": pct(latencies, 0.5), "p99_s": pct(latencies, 0.99), "max_s": max(latencies, default=0.0),
            "elapsed_s": elapsed, "keeps_up": elapsed < seconds * 1.1 and pct(latencies, 0.99) < 1.0}


# -- worker: runs inside the node namespace ------------------------------------------------------------
def worker(writer: str, backend: str, inputs_file: str, churn_rate: int, churn_seconds: float,
           families: list[int]) -> None:
    from policy.controller import PolicyController
    from routed.config import PolicyOptions

    with open(inputs_file, "rb") as f:
        inputs, spare = pickle.load(f)
    out: dict[str, object] = {"writer": writer}
    t0 = time.perf_counter()
    ctl = PolicyController(PolicyOptions(iptables_writer=writer, iptables_backend=backend,
                                         ip_families=families), "bench")  # type: ignore[arg-type]
    _ = ctl.writer  # python-iptables is imported lazily: count its import in init, not in cold
    out["init_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = ctl.sync(inputs)  # engine load (every event of the snapshot) + the full apply
    out["cold_s"] = time.perf_counter() - t0
    out.update(rules=rep.rules, chains=rep.chains, ipsets=rep.ipsets, members=rep.members,
               cold_iptables_ops=rep.iptables_ops, cold_ipset_ops=rep.ipset_ops, backend=rep.backend)
    t0 = time.perf_counter()
    rep = ctl.apply()
    out["noop_s"] = time.perf_counter() - t0
    out["noop_writes"] = rep.iptables_ops + rep.ipset_ops
    ctl.force_readback()
    t0 = time.perf_counter()
    rep = ctl.apply()  # the periodic drift repair: read everything back, compare, write nothing
    out["full_resync_s"] = time.perf_counter() - t0
    out["full_resync_writes"] = rep.iptables_ops + rep.ipset_ops
    label_times, label_ops = [], [0, 0]
    for pod in joining_label_changes(inputs, ctl.engine.calculation(), 50):
        t0 = time.perf_counter()
        ctl.engine.set_pod(pod)
        rep = ctl.apply()
        label_times.append(time.perf_counter() - t0)
        label_ops[0] += rep.iptables_ops
        label_ops[1] += rep.ipset_ops
    out.update(label_s=pct(label_times, 0.5), label_p99_s=pct(label_times, 0.99), label_ops=label_ops, label_events=50)
    t0 = time.perf_counter()
    ctl.engine.set_policy(added_policy(inputs))
    rep = ctl.apply()
    out["policy_add_s"] = time.perf_counter() - t0
    out["policy_add_ops"] = (rep.iptables_ops, rep.ipset_ops)
    t0 = time.perf_counter()
    rep = ctl.ensure_endpoint(spare)  # the CNI ADD's policy part: chains, dispatch rule, set memberships
    out["endpoint_add_s"] = time.perf_counter() - t0
    out["endpoint_add_ops"] = (rep.iptables_ops, rep.ipset_ops)
    if churn_rate:
        out["churn"] = churn(ctl, inputs, churn_rate, churn_seconds)
    t0 = time.perf_counter()
    ctl.remove_all()
    out["remove_s"] = time.perf_counter() - t0
    print(json.dumps(out))


# -- driver -------------------------------------------------------------------------------------------
def make_node(tag: str, n_endpoints: int) -> tuple[str, str]:
    node, sink = f"{PREFIX}-{tag}-node", f"{PREFIX}-{tag}-sink"
    netns.create(node)
    netns.create(sink)
    batch = "".join(f"link add rtd{i:011x} type veth peer name p{i} netns {sink}\nlink set rtd{i:011x} up\n"
                    for i in range(n_endpoints + 1))  # + the spare one the endpoint-ADD figure wires
    subprocess.run(["ip", "-n", node, "-batch", "-"], input=batch, text=True, check=True)
    return node, sink


def real_pod_check(n_real: int) -> str:
    """A few real pods with traffic, policed by the bench's own ruleset: a sanity check, not a figure."""
    from tests.netns.policy_harness import once_cmd  # test helpers: the same wiring as the netns tests
    from tests.netns.policy_topo import NODE_IP, PolicyTopo

    topo = PolicyTopo(f"{PREFIX}-real")
    try:
        topo.up()
        pods = [topo.add_pod("ns0", f"r{i}", f"10.250.0.{i + 2}", {"app": "web" if i == 0 else "cli"})
                for i in range(max(2, n_real))]
        deny = {"metadata": {"name": "only-cli", "namespace": "ns0"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}], "ports": [{"port": 80}]}]}}
        inputs = PolicyInputs([Namespace("ns0")], [p.pod() for p in pods], [deny], [p.endpoint() for p in pods],
                              [NODE_IP])
        path = _dump(inputs)
        subprocess.run(once_cmd(topo.node, path), check=True, cwd=REPO)
        os.unlink(path)
        ok80 = topo.reach("r1", pods[0].ip, 80)
        ok8080 = topo.reach("r1", pods[0].ip, 8080)
        return f"real pods: cli->web:80 {'allowed' if ok80 else 'DENIED'}, cli->web:8080 {'denied' if not ok8080 else 'ALLOWED'}"
    finally:
        topo.down()


def _dump(obj: object) -> str:
    fd, path = tempfile.mkstemp(prefix="rtd-polb-", suffix=".pickle")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(obj, f)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--real-pods", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1,000 pods, 100 policies, 20 endpoints")
    ap.add_argument("--writers", default=",".join(f"{w}/{b}" for w, b in CONFIGS))
    ap.add_argument("--churn", type=int, default=1000, help="sustained pod updates per second (0: skip)")
    ap.add_argument("--churn-seconds", type=float, default=30.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object: writer -> figures")
    ap.add_argument("--dual-stack", action="store_true", help="every pod has an IPv4 and an IPv6 address")
    ap.add_argument("--worker", nargs=6, metavar=("WRITER", "BACKEND", "FILE", "RATE", "SECONDS", "FAMILIES"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        writer, backend, path, rate, seconds, families = args.worker
        worker(writer, backend, path, int(rate), float(seconds), [int(f) for f in families.split(",")])
        return
    if args.quick:
        args.pods, args.policies, args.endpoints = 1000, 100, 20
    if os.geteuid() != 0:
        sys.exit("needs root (creates rtd-polb-* namespaces)")
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    netns.delete_all(PREFIX)
    inputs = build_inputs(args.pods, args.policies, args.endpoints, dual_stack=args.dual_stack)
    t0 = time.perf_counter()
    calc = calculate(inputs)
    t_calc = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = PolicyEngine.from_inputs(inputs)
    t_engine = time.perf_counter() - t0
    t0 = time.perf_counter()
    ruleset = render(calc)
    t_render = time.perf_counter() - t0
    assert engine.calculation() == calc, "incremental and full calculations differ"
    say(f"cluster: {args.pods} pods, {args.policies} policies, {args.endpoints} local endpoints (veths)")
    say(f"full calculation {t_calc * 1000:.0f} ms, incremental engine load {t_engine * 1000:.0f} ms, render "
        f"{t_render * 1000:.0f} ms (pure, in-process); {ruleset.rule_count()} rules in {len(ruleset.chains)} chains, "
        f"{len(calc.ipsets)} ipsets, {sum(len(s.members) for s in calc.ipsets.values())} members")
    ep_pod = next(p for p in inputs.pods if p.node_name != "node")
    spare = Endpoint("spare", "eth0", "", f"rtd{args.endpoints:011x}", ep_pod.ips, ep_pod.namespace, ep_pod.name)
    path = _dump((inputs, spare))
    results: dict[str, dict] = {}
    try:
        for spec in args.writers.split(","):
            writer_backend, _, only = spec.partition("@")  # "restore/legacy@4": the IPv4 table only
            writer, backend = writer_backend.split("/")
            families = only or "4,6"
            tag = f"{writer[0]}{backend[0]}{families.replace(',', '')}"
            node, _sink = make_node(tag, args.endpoints)
            try:
                proc = netns.ns_run(node, [PYTHON, str(REPO / "bench" / "policy_scale.py"), "--worker", writer, backend,
                                           path, str(args.churn), str(args.churn_seconds), families], timeout=3600)
                results[spec] = json.loads(proc.stdout.strip().splitlines()[-1])
            finally:
                netns.delete_all(f"{PREFIX}-{tag}-")
        sanity = real_pod_check(args.real_pods) if args.real_pods else "real pods: skipped"
    finally:
        os.unlink(path)
        netns.delete_all(PREFIX)
    summary = {"pods": args.pods, "policies": args.policies, "endpoints": args.endpoints,
               "full_calculation_s": t_calc, "engine_load_s": t_engine, "render_s": t_render}
    if args.json:
        print(json.dumps({"cluster": summary, "writers": results, "sanity": sanity}, indent=1))
        return
    cols = ["init_s", "cold_s", "noop_s", "full_resync_s", "label_s", "label_p99_s", "policy_add_s", "endpoint_add_s"]
    print(f"\n{'writer/backend':16} {'rules':>6} {'ipsets':>6} {'members':>8} " + " ".join(f"{c[:-2]:>14}" for c in cols))
    for spec, r in results.items():
        print(f"{spec:16} {r['rules']:>6} {r['ipsets']:>6} {r['members']:>8} "
              + " ".join(f"{r[c] * 1000:>11.1f} ms" for c in cols))
    for spec, r in results.items():
        print(f"  {spec:16} writes: no-op {r['noop_writes']}, full resync {r['full_resync_writes']}, "
              f"label {tuple(r['label_ops'])} over {r['label_events']} events, policy add {tuple(r['policy_add_ops'])}, "
              f"endpoint add {tuple(r['endpoint_add_ops'])}")
        if "churn" in r:
            c = r["churn"]
            print(f"  {spec:16} churn {c['rate']}/s for {c['seconds']:.0f} s: {c['events']} events in {c['applies']} "
                  f"applies, event->kernel p50 {c['p50_s'] * 1000:.1f} ms p99 {c['p99_s'] * 1000:.1f} ms, "
                  f"{'keeps up' if c['keeps_up'] else 'FALLS BEHIND'}")
    base_name = next((n for n in ("restore/legacy@4", "restore/legacy") if n in results), next(iter(results)))
    base = results[base_name]
    print(f"\nratios against {base_name} (same run):")
    for spec, r in results.items():
        print(f"  {spec:16} cold x{r['cold_s'] / base['cold_s']:.2f}  label x{r['label_s'] / base['label_s']:.2f}"
              f"  policy-add x{r['policy_add_s'] / base['policy_add_s']:.2f}")
    for spec, r in results.items():
        print(f"  {spec:16} incremental/cold: label {r['label_s'] / r['cold_s']:.4f}, "
              f"policy-add {r['policy_add_s'] / r['cold_s']:.3f}, endpoint-add {r['endpoint_add_s'] / r['cold_s']:.3f}")
    print(sanity)


if __name__ == "__main__":
    main()
