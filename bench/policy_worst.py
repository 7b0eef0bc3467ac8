"""Worst-case NetworkPolicies: what one hostile (or just large) policy costs a node.

Cases (each in a fresh process, so its peak RSS is its own):
  blocks-x-ports   one policy, one rule: 800 ipBlocks (half with an except) x 800 TCP ports (the issue's 52 KiB)
  slash32          one policy, one rule: 50,000 /32 ipBlocks, port 443 (about 1.5 MiB of YAML)
  many-policies    2,000 policies each with 100 peers (50 podSelectors from a pool, 50 ipBlocks), ports 80 and
                   443, every one selecting a local endpoint; 5,000 cluster pods, 100 local endpoints

Figures per case: the policy's size, full calculation, incremental engine load and render (both families) times,
peak RSS of the process that did all three (what an agent holds during a full apply), policy chain rules per
family table, ipsets (calculation; the kernel holds one per family), set members, invalid policies. `--apply`
also writes it to a real kernel in a namespace (`rtd-polw-…`, iptables-restore legacy): apply time, peak RSS,
whether the kernel took it.

`--before DIR` runs the same cases on another checkout (e.g. `git worktree add --detach /tmp/wt-before <commit>`)
and prints both side by side with ratios:

    .venv/bin/python bench/policy_worst.py --before /tmp/wt-before [--apply] [--json]
    .venv/bin/python bench/policy_worst.py --cases slash32 --apply
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python")
PREFIX = "rtd-polw"
CASES = ("blocks-x-ports", "slash32", "many-policies")


# -- the policies -----------------------------------------------------------------------------------------------
def _pol(name: str, namespace: str, app: str, peers: list[dict], ports: list[dict]) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": {"app": app}}, "ingress": [{"from": peers, "ports": ports}]}}


def _v4(i: int, prefix: int) -> str:
    return f"{10 + i // 65536 % 200}.{i // 256 % 256}.{i % 256}.0/{prefix}" if prefix <= 24 else \
        f"{10 + i // 65536 % 200}.{i // 256 % 256}.{i % 256}.{i % 251 + 1}/{prefix}"


def case_policies(case: str) -> tuple[list[dict], int, int]:
    """(policies, cluster pods, local endpoints)."""
    if case == "blocks-x-ports":
        peers = [{"ipBlock": {"cidr": f"172.{16 + i // 256}.{i % 256}.0/24",
                              **({"except": [f"172.{16 + i // 256}.{i % 256}.128/25"]} if i % 2 else {})}}
                 for i in range(800)]
        ports = [{"port": 1000 + 2 * i} for i in range(800)]  # not adjacent: 800 runs
        return [_pol("blocks-x-ports", "ns0", "app0", peers, ports)], 1000, 20
    if case == "slash32":
        peers = [{"ipBlock": {"cidr": f"{11 + i // 65536}.{i // 256 % 256}.{i % 256}.1/32"}} for i in range(50_000)]
        return [_pol("slash32", "ns0", "app0", peers, [{"port": 443}])], 1000, 20
    rnd = random.Random(7)
    policies = []
    for j in range(2000):
        ns = f"ns{j % 10}"
        peers: list[dict] = [{"podSelector": {"matchLabels": {"app": f"app{rnd.randrange(200)}"}}} for _ in range(50)]
        peers += [{"ipBlock": {"cidr": f"{100 + j // 256 % 100}.{j % 256}.{k}.0/24"}} for k in range(50)]
        policies.append(_pol(f"p{j}", ns, f"app{j % 100}", peers, [{"port": 80}, {"port": 443}]))
    return policies, 5000, 100


def build_inputs(case: str) -> Any:
    from policy.calc import PolicyInputs
    from routed.model import Endpoint, Namespace, Pod

    policies, n_pods, n_endpoints = case_policies(case)
    namespaces = [Namespace(f"ns{i}", {"team": f"t{i % 3}"}) for i in range(10)]
    pods, endpoints = [], []
    for i in range(n_pods):
        ns, ip = f"ns{i % 10}", f"10.{64 + i // 65536}.{i // 256 % 256}.{i % 256}"
        # local endpoint i is app<i> in ns<i % 10>: policy j (app<j % 100> in ns<j % 10>) selects one
        pods.append(Pod(ns, f"pod{i}", {"app": f"app{i if i < n_endpoints else i % 200}"},
                        "node" if i < n_endpoints else "other", (ip,)))
        if i < n_endpoints:
            endpoints.append(Endpoint(f"c{i}", "eth0", "", f"rtd{i:011x}", (ip,), ns, f"pod{i}"))
    return PolicyInputs(namespaces, pods, policies, endpoints, ["192.168.250.1"])


def policy_bytes(policies: list[dict]) -> int:
    return sum(len(json.dumps(p, separators=(",", ":"))) for p in policies)


# -- workers (one process per case and tree) --------------------------------------------------------------------
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calc_worker(case: str) -> dict[str, Any]:
    from policy.calc import calculate
    from policy.incremental import PolicyEngine
    from policy.render import render

    inputs = build_inputs(case)
    out: dict[str, Any] = {"policy_bytes": policy_bytes(inputs.policies), "rss_inputs_mib": peak_rss_mib()}
    t0 = time.perf_counter()
    calc = calculate(inputs)
    out["calc_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine = PolicyEngine.from_inputs(inputs)
    out["engine_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rulesets = [render(calc, family=family) for family in (4, 6)]
    out["render_s"] = time.perf_counter() - t0
    policy_chains = set(calc.policies)
    out["rules"] = sum(len(rules) for chain, rules in rulesets[0].chains.items() if chain in policy_chains)
    out["all_rules"] = rulesets[0].rule_count()
    out["sets"] = len(calc.ipsets)
    out["members"] = sum(len(s.members) for s in calc.ipsets.values())
    out["invalid"] = [p.key for p in calc.problems]
    out["peak_rss_mib"] = peak_rss_mib()
    del engine
    return out


def apply_worker(case: str, backend: str) -> dict[str, Any]:
    from policy.controller import PolicyApplyError, PolicyController
    from routed.config import PolicyOptions

    inputs = build_inputs(case)
    ctl = PolicyController(PolicyOptions(iptables_writer="restore", iptables_backend=backend,  # type: ignore[arg-type]
                                         ip_families=[4, 6]), "bench")
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        report = ctl.sync(inputs)
        out.update(ok=True, rules=report.rules, ipsets=report.ipsets, members=report.members)
    except PolicyApplyError as exc:
        out.update(ok=False, error=str(exc)[:300])
    out["apply_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = peak_rss_mib()
    return out


# -- driver -----------------------------------------------------------------------------------------------------
def run_worker(tree: Path, args: list[str], timeout: float, ns: str | None = None) -> dict[str, Any]:
    cmd = [PYTHON, str(Path(__file__).resolve()), "--worker", str(tree), *args]
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tree)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(tree: Path, cases: list[str], apply: bool, backend: str, timeout: float) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        print(f"  {tree}: {case} ...", file=sys.stderr, flush=True)
        row = run_worker(tree, ["calc", case], timeout)
        if apply:
            ns = f"{PREFIX}-{case[:8]}"
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            subprocess.run(["ip", "netns", "add", ns], check=True)
            try:
                row["apply"] = run_worker(tree, ["apply", case, backend], timeout, ns)
            finally:
                subprocess.run(["ip", "netns", "del", ns], check=True)
        results[case] = row
    return results


def _fmt(row: dict[str, Any]) -> str:
    if "calc_s" not in row:
        return f"FAILED: {row.get('error')}"
    text = (f"calc {row['calc_s']:7.2f} s  engine {row['engine_s']:7.2f} s  render {row['render_s']:7.2f} s  "
            f"peak RSS {row['peak_rss_mib']:7.0f} MiB  rules {row['rules']:>7}  sets {row['sets']:>6} "
            f"(kernel {2 * row['sets']:>6})  members {row['members']:>7}  invalid {len(row['invalid'])}")
    a = row.get("apply")
    if a:
        text += (f"\n{'':20} apply: {'ok' if a.get('ok') else 'FAILED'} {a.get('apply_s', 0):.2f} s, peak RSS "
                 f"{a.get('peak_rss_mib', 0):.0f} MiB" + (f", {a['rules']} rules, {a['ipsets']} kernel sets"
                                                           if a.get("ok") else f": {a.get('error')}"))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--before", help="another checkout to measure the same way (the baseline of the ratios)")
    ap.add_argument("--apply", action="store_true", help="also apply to a real kernel in a namespace (root)")
    ap.add_argument("--backend", default="legacy", choices=("legacy", "nft"))
    ap.add_argument("--timeout", type=float, default=600.0, help="per case and tree")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        tree, kind, case, *rest = args.worker
        sys.path.insert(0, tree)
        result = calc_worker(case) if kind == "calc" else apply_worker(case, rest[0])
        print(json.dumps(result))
        return
    if args.apply and os.geteuid() != 0:
        sys.exit("--apply needs root (creates rtd-polw-* namespaces)")
    cases = [c for c in args.cases.split(",") if c]
    trees = {"after": REPO} | ({"before": Path(args.before).resolve()} if args.before else {})
    results = {label: measure(tree, cases, args.apply, args.backend, args.timeout) for label, tree in trees.items()}
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for case in cases:
        size = results["after"][case].get("policy_bytes", 0)
        print(f"\n{case} ({size / 1024:.0f} KiB of policy JSON)")
        for label in ("before", "after"):
            if label in results:
                print(f"  {label:6} {_fmt(results[label][case])}")
        if "before" in results and "calc_s" in results["before"][case] and "calc_s" in results["after"][case]:
            b, a = results["before"][case], results["after"][case]
            print(f"  after/before: calc x{a['calc_s'] / b['calc_s']:.3f}, peak RSS x{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}, "
                  f"rules x{a['rules'] / max(1, b['rules']):.4f}, sets x{a['sets'] / max(1, b['sets']):.4f}")


if __name__ == "__main__":
    main()
