"""Policy engine at scale: cold start, incremental updates, rule/ipset counts, for every iptables writer.

Cluster pods are objects only; local endpoints are real veth interfaces in a node namespace
(`rtd-polb-…`), plus a few real pods that carry traffic as a sanity check. Every kernel change happens
inside those namespaces. Prints a table and ratios against a baseline measured in the same run.

    .venv/bin/python bench/policy_scale.py                 # 10,000 pods, 1,000 policies, 100 endpoints
    .venv/bin/python bench/policy_scale.py --quick         # 1,000 pods, 100 policies, 20 endpoints
"""

from __future__ import annotations

import argparse
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

from policy.calc import PolicyInputs, calculate  # noqa: E402
from policy.render import render  # noqa: E402
from routed import netns  # noqa: E402
from routed.model import ContainerPort, Endpoint, Namespace, Pod  # noqa: E402

PREFIX = "rtd-polb"
PYTHON = str(REPO / ".venv" / "bin" / "python")
CONFIGS = [("restore", "legacy"), ("restore", "nft"), ("iptc", "legacy")]


def build_inputs(n_pods: int, n_policies: int, n_endpoints: int, seed: int = 1) -> PolicyInputs:
    rnd = random.Random(seed)
    n_ns = max(2, n_pods // 200)
    namespaces = [Namespace(f"ns{i}", {"team": f"t{i % 10}", "env": rnd.choice(["prod", "dev"])}) for i in range(n_ns)]
    pods: list[Pod] = []
    endpoints: list[Endpoint] = []
    for i in range(n_pods):
        ns = f"ns{i % n_ns}"
        ip = f"10.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        labels = {"app": f"app{i % 100}", "tier": rnd.choice(["fe", "be", "db"]), "ver": f"v{i % 3}"}
        ports = (ContainerPort(8080, "TCP", "http"), ContainerPort(9000 + i % 10, "TCP", "metrics"))
        pods.append(Pod(ns, f"pod{i}", labels, "node" if i < n_endpoints else "other", (ip,), ports))
        if i < n_endpoints:
            endpoints.append(Endpoint(f"c{i}", "eth0", "", f"rtd{i:011x}", (ip,), ns, f"pod{i}"))
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


def label_change(inputs: PolicyInputs) -> PolicyInputs:
    """A remote pod changes its app label so that it joins a selector ipset the node uses."""
    calc = calculate(inputs)
    ident = next(s.description for s in calc.ipsets.values()
                 if s.description.startswith("sel|ns=") and "app In (" in s.description)
    ns = ident.split("|")[1][3:]
    app = ident.split("app In (")[1].rstrip(")")
    pods = list(inputs.pods)
    i = next(i for i in range(len(pods) - 1, -1, -1) if pods[i].namespace == ns and pods[i].labels["app"] != app)
    p = pods[i]
    pods[i] = Pod(p.namespace, p.name, {**p.labels, "app": app}, p.node_name, p.ips, p.ports)
    return PolicyInputs(inputs.namespaces, pods, inputs.policies, inputs.endpoints, inputs.node_ips)


def policy_add(inputs: PolicyInputs) -> PolicyInputs:
    ep_pod = next(p for p in inputs.pods if p.key == inputs.endpoints[0].pod_key)
    new = {"metadata": {"name": "bench-added", "namespace": ep_pod.namespace},
           "spec": {"podSelector": {"matchLabels": {"app": ep_pod.labels["app"]}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "fe"}}}], "ports": [{"port": 443}]}]}}
    return PolicyInputs(inputs.namespaces, inputs.pods, [*inputs.policies, new], inputs.endpoints, inputs.node_ips)


# -- worker: runs inside the node namespace ------------------------------------------------------------
def worker(writer: str, backend: str, inputs_file: str) -> None:
    from policy.controller import PolicyController
    from routed.config import PolicyOptions

    with open(inputs_file, "rb") as f:
        inputs = pickle.load(f)
    out: dict[str, object] = {}
    t0 = time.perf_counter()
    ctl = PolicyController(PolicyOptions(iptables_writer=writer, iptables_backend=backend), "bench")
    _ = ctl.writer  # python-iptables is imported lazily: count its import in init, not in cold
    out["init_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = ctl.sync(inputs)
    out["cold_s"] = time.perf_counter() - t0
    assert rep.ok, rep.error
    out.update(rules=rep.rules, chains=rep.chains, ipsets=rep.ipsets, members=rep.members,
               cold_iptables_ops=rep.iptables_ops, backend=rep.backend)
    t0 = time.perf_counter()
    rep = ctl.sync(inputs)
    out["noop_s"] = time.perf_counter() - t0
    out["noop_writes"] = rep.iptables_ops + rep.ipset_ops
    changed = label_change(inputs)
    t0 = time.perf_counter()
    rep = ctl.sync(changed)
    out["label_s"] = time.perf_counter() - t0
    out["label_ops"] = (rep.iptables_ops, rep.ipset_ops)
    added = policy_add(changed)
    t0 = time.perf_counter()
    rep = ctl.sync(added)
    out["policy_add_s"] = time.perf_counter() - t0
    out["policy_add_ops"] = (rep.iptables_ops, rep.ipset_ops)
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
                    for i in range(n_endpoints))
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


def _dump(inputs: PolicyInputs) -> str:
    fd, path = tempfile.mkstemp(prefix="rtd-polb-", suffix=".pickle")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(inputs, f)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=10000)
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--real-pods", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1,000 pods, 100 policies, 20 endpoints")
    ap.add_argument("--writers", default=",".join(f"{w}/{b}" for w, b in CONFIGS))
    ap.add_argument("--worker", nargs=3, metavar=("WRITER", "BACKEND", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.quick:
        args.pods, args.policies, args.endpoints = 1000, 100, 20
    if os.geteuid() != 0:
        sys.exit("needs root (creates rtd-polb-* namespaces)")
    netns.delete_all(PREFIX)
    inputs = build_inputs(args.pods, args.policies, args.endpoints)
    t0 = time.perf_counter()
    calc = calculate(inputs)
    t_calc = time.perf_counter() - t0
    t0 = time.perf_counter()
    ruleset = render(calc)
    t_render = time.perf_counter() - t0
    print(f"cluster: {args.pods} pods, {args.policies} policies, {args.endpoints} local endpoints (veths)")
    print(f"calculation {t_calc * 1000:.0f} ms, render {t_render * 1000:.0f} ms (pure, in-process); "
          f"{ruleset.rule_count()} rules in {len(ruleset.chains)} chains, {len(calc.ipsets)} ipsets, "
          f"{sum(len(s.members) for s in calc.ipsets.values())} members")
    path = _dump(inputs)
    results: dict[str, dict] = {}
    try:
        for spec in args.writers.split(","):
            writer, backend = spec.split("/")
            tag = f"{writer[0]}{backend[0]}"
            node, _sink = make_node(tag, args.endpoints)
            try:
                proc = netns.ns_run(node, [PYTHON, str(REPO / "bench" / "policy_scale.py"), "--worker", writer, backend,
                                           path], timeout=1200)
                results[spec] = json.loads(proc.stdout.strip().splitlines()[-1])
            finally:
                netns.delete_all(f"{PREFIX}-{tag}-")
        sanity = real_pod_check(args.real_pods) if args.real_pods else "real pods: skipped"
    finally:
        os.unlink(path)
        netns.delete_all(PREFIX)
    cols = ["init_s", "cold_s", "noop_s", "label_s", "policy_add_s", "remove_s"]
    print(f"\n{'writer/backend':18} {'rules':>7} {'ipsets':>6} {'members':>8} " + " ".join(f"{c:>13}" for c in cols)
          + "   label ops (ipt,ipset)  add ops")
    for spec, r in results.items():
        print(f"{spec:18} {r['rules']:>7} {r['ipsets']:>6} {r['members']:>8} "
              + " ".join(f"{r[c] * 1000:>10.0f} ms" for c in cols)
              + f"   {tuple(r['label_ops'])!s:>20}  {tuple(r['policy_add_ops'])!s}")
    base_name = "restore/legacy" if "restore/legacy" in results else next(iter(results))
    base = results[base_name]
    print(f"\nratios against {base_name} (same run):")
    for spec, r in results.items():
        print(f"  {spec:18} cold x{r['cold_s'] / base['cold_s']:.2f}  label x{r['label_s'] / base['label_s']:.2f}"
              f"  policy-add x{r['policy_add_s'] / base['policy_add_s']:.2f}")
    for spec, r in results.items():
        print(f"  {spec:18} incremental/cold: label {r['label_s'] / r['cold_s']:.2f}, "
              f"policy-add {r['policy_add_s'] / r['cold_s']:.2f}; no-op re-sync writes {r['noop_writes']}")
    print(sanity)


if __name__ == "__main__":
    main()
