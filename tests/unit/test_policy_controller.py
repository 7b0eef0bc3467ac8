"""Controller behaviour without a kernel: a failed apply raises, not-ready, last good state kept; the CNI ADD
path retries quickly; per-family plans and applies against a simulated kernel (both families' tables, one ipset
namespace)."""

from __future__ import annotations

import pytest

from policy import names
from policy.calc import PolicyInputs
from policy.controller import PolicyApplyError, PolicyController
from routed.config import PolicyOptions
from routed.model import ContainerPort, Endpoint, Namespace, Pod


def _inputs(policies=()):
    pod = Pod("x", "a", {}, "n", ("10.1.0.1",))
    ep = Endpoint("c", "eth0", "", "rtd00000000001", ("10.1.0.1",), "x", "a")
    return PolicyInputs([Namespace("x")], [pod], list(policies), [ep], [])


def test_apply_failure_raises_keeps_last_good_and_endpoint_path_retries(monkeypatch):
    # backend given explicitly: no detection (nothing is read or written outside this test)
    ctl = PolicyController(PolicyOptions(iptables_backend="nft", apply_retries=2, ip_families=[4, 6]), "n")
    ctl.endpoint_backoff.base = ctl.endpoint_backoff.cap = 0.001
    calls = []

    def ok(plan, report):
        calls.append("ok")
        ctl._applied = {}

    def broken(plan, report):
        calls.append("fail")
        raise RuntimeError("iptables-restore: resource busy")

    monkeypatch.setattr(ctl, "_execute_full", ok)
    assert ctl.sync(_inputs()).ok and ctl.report()["ready"]
    monkeypatch.setattr(ctl, "_execute_full", broken)
    with pytest.raises(PolicyApplyError) as failed:
        ctl.sync(_inputs([{"metadata": {"name": "d", "namespace": "x"}, "spec": {"podSelector": {}}}]))
    assert not failed.value.report.ok and calls.count("fail") == 1
    assert "resource busy" in failed.value.report.error
    status = ctl.report()
    assert status["ready"] is False and "resource busy" in status["lastError"] and status["failures"] == 1
    assert ctl._applied is None  # after a failure nothing is trusted: the next apply reads the kernel back
    with pytest.raises(PolicyApplyError):
        ctl.ensure_endpoint(Endpoint("c2", "eth0", "", "rtd00000000002", ("10.1.0.2",), "x", "b"))
    assert calls.count("fail") == 4  # 1 + apply_retries attempts on the ADD path, each a full apply
    monkeypatch.setattr(ctl, "_execute_full", ok)
    assert ctl.sync(_inputs()).ok and ctl.report()["ready"] and ctl.report()["failures"] == 0


def test_invalid_policy_in_report(monkeypatch):
    ctl = PolicyController(PolicyOptions(iptables_backend="nft"), "n")
    monkeypatch.setattr(ctl, "_execute_full", lambda plan, report: None)
    bad = {"metadata": {"name": "bad", "namespace": "x"},
           "spec": {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "nope"}}]}]}}
    report = ctl.sync(_inputs([bad]))
    assert report.ok
    assert report.invalid == [{"policy": "x/bad", "reasons": ["spec.egress[0].to[0].ipBlock.cidr: invalid CIDR 'nope'"],
                               "failClosed": ["Ingress", "Egress"]}]
    assert ctl.report()["invalidPolicies"][0]["policy"] == "x/bad"


from tests.unit.policy_fakes import FakeKernel, controller  # noqa: E402

WEB = ContainerPort(80, "TCP", "web")
ALLOW = {"metadata": {"name": "allow", "namespace": "x"},
         "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "c"}}},
                                                           {"ipBlock": {"cidr": "::/0", "except": ["fd00:1::/64"]}},
                                                           {"ipBlock": {"cidr": "10.0.0.0/8"}}],
                                                  "ports": [{"port": "web"}]}]}}


def dual_inputs(policies=(ALLOW,)) -> PolicyInputs:
    pods = [Pod("x", "a", {"app": "s"}, "n", ("10.1.0.1", "fd00::1"), (WEB,)),
            Pod("x", "b", {"app": "c"}, "n", ("10.1.0.2",)),
            Pod("x", "c", {"app": "c"}, "n", ("fd00::3",))]
    eps = [Endpoint("c1", "eth0", "", "rtd00000000001", ("10.1.0.1", "fd00::1"), "x", "a"),
           Endpoint("c2", "eth0", "", "rtd00000000002", ("10.1.0.2",), "x", "b")]
    return PolicyInputs([Namespace("x")], pods, list(policies), eps, ["192.168.0.1", "fd99::1"])


def _set_lines(kernel: FakeKernel) -> list[str]:
    return [line for kind, lines in kernel.log if kind == "ipset" for line in lines]  # type: ignore[union-attr]


def test_full_apply_per_family_then_second_apply_writes_nothing(monkeypatch):
    ctl, kernel = controller(monkeypatch)
    report = ctl.sync(dual_inputs())
    assert report.ok and report.families == (4, 6) and report.family_ops[4] > 0 and report.family_ops[6] > 0
    # order: ipset lines (both families) -> IPv4 table -> IPv6 table (no destroys on a fresh kernel)
    assert [kind for kind, _ in kernel.log] == ["ipset", "iptables4", "iptables6"]
    v4, v6 = kernel.tables[4].chains, kernel.tables[6].chains
    assert set(v4) == set(v6)  # the same chain names in each family's table
    text4 = " ".join(r.text for rules in v4.values() for r in rules)
    text6 = " ".join(r.text for rules in v6.values() for r in rules)
    assert "rtd6-" not in text4 and "--match-set rtd-" not in text6 and "--match-set rtd6-host-ips src" in text6
    assert "! -s 10.1.0.1/32" in text4 and "! -s fd00::1/128" in text6 and "fd00" not in text4
    # the kernel sets: each family's name, family and members only
    sets = kernel.sets
    assert sets["rtd6-host-ips"].family == 6 and sets["rtd6-host-ips"].members == {"fd99::1"}
    assert sets[names.IPSET_HOST].family == 4 and sets[names.IPSET_HOST].members == {"192.168.0.1"}
    v4_sets = {n for n, s in sets.items() if s.family == 4}
    assert {names.family_ipset_name(n, 6) for n in v4_sets} == {n for n, s in sets.items() if s.family == 6}
    nets = [s for s in sets.values() if s.kind == "hash:net"]  # the rule's ipBlocks: one set, per family
    assert sorted((s.family, sorted(s.members)) for s in nets) == [
        (4, ["10.0.0.0/8"]), (6, ["8000::/1", "::/1", "fd00:1::/64 nomatch"])]
    port6 = next(s for s in sets.values() if s.family == 6 and s.kind == "hash:ip,port")
    assert port6.members == {"fd00::1,tcp:80"}
    assert report.ipsets == len(sets) and report.rules == sum(len(r) for t in kernel.tables.values()
                                                              for r in t.chains.values())
    # read back in full again: nothing to write in either family
    kernel.log.clear()
    again = ctl.sync(dual_inputs())
    assert again.full and again.iptables_ops == 0 and again.ipset_ops == 0 and kernel.log == []


def test_incremental_plans_per_family(monkeypatch):
    ctl, kernel = controller(monkeypatch)
    ctl.sync(dual_inputs())
    kernel.log.clear()
    # an IPv6-only client joins the selector set: only the v6 set changes, no rule is written
    ctl.engine.set_pod(Pod("x", "d", {"app": "c"}, "n", ("fd00::4",)))
    plan = ctl.plan()
    assert not plan.full and all(not f.ops for f in plan.families.values())
    assert len(plan.ipset_before) == 1 and plan.ipset_before[0].startswith("add rtd6-s-")
    assert plan.ipset_before[0].endswith(" fd00::4")
    ctl.execute(plan)
    # an IPv4 one: only the v4 set
    ctl.engine.set_pod(Pod("x", "e", {"app": "c"}, "n", ("10.1.0.5",)))
    plan = ctl.plan()
    assert len(plan.ipset_before) == 1 and plan.ipset_before[0].startswith("add rtd-s-")
    assert plan.ipset_before[0].endswith(" 10.1.0.5")
    ctl.execute(plan)
    # a new dual-stack endpoint: its chains and the dispatch in both families
    ctl.engine.set_pod(Pod("x", "f", {"app": "s"}, "n", ("10.1.0.6", "fd00::6"), (WEB,)))
    ctl.engine.add_endpoint(Endpoint("c6", "eth0", "", "rtd00000000006", ("10.1.0.6", "fd00::6"), "x", "f"))
    plan = ctl.plan()
    for family, fplan in plan.families.items():
        assert any(op.chain == names.CHAIN_FROM_DISPATCH for op in fplan.ops), family
        lines = " ".join(op.line for op in fplan.ops)
        assert ("! -s fd00::6/128" in lines) == (family == 6) and ("! -s 10.1.0.6/32" in lines) == (family == 4)
    assert any(" fd00::6,tcp:80" in line for line in plan.ipset_before)
    ctl.execute(plan)
    # the policy goes: its chains leave both tables, and its sets are destroyed after both tables stopped using them
    kernel.log.clear()
    ctl.engine.delete_policy("x/allow")
    report = ctl.execute(ctl.plan())
    assert report.family_ops[4] > 0 and report.family_ops[6] > 0
    assert [kind for kind, _ in kernel.log] == ["iptables4", "iptables6", "ipset"]
    destroyed = [line.split()[1] for line in kernel.log[-1][1]]  # type: ignore[union-attr]
    assert len(destroyed) == 8 and sum(n.startswith("rtd6-") for n in destroyed) == 4
    # the incremental applies left exactly what a full apply wants: a read-back writes nothing
    kernel.log.clear()
    ctl.force_readback()
    check = ctl.apply()
    assert check.full and check.iptables_ops == 0 and check.ipset_ops == 0, kernel.log


def test_drop_counters_sum_both_families(monkeypatch):
    ctl, kernel = controller(monkeypatch)
    ctl.sync(dual_inputs([{"metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}}]))
    kernel.packets = 3
    drops = ctl.drop_counters()
    # every DROP rule of the pod's two chains counts 3, in each family
    per_family = {f: sum(1 for c in (ep.from_chain, ep.to_chain) for r in ctl._applied[f].chains[c]
                         if r.body.endswith("-j DROP"))
                  for f in (4, 6) for ep in [ctl.engine.ep_plans["rtd00000000001"]]}
    assert drops["x/a"] == 3 * (per_family[4] + per_family[6]) and per_family[6] > 0


def test_ipv4_only_configuration_sweeps_ipv6(monkeypatch):
    ctl, kernel = controller(monkeypatch)
    ctl.sync(dual_inputs())
    assert kernel.tables[6].ours()
    v4_only, _ = controller(monkeypatch, families=(4,), kernel=kernel)  # the same (simulated) kernel
    assert v4_only.families == (4,) and v4_only.sweep_families == (6,)
    report = v4_only.sync(dual_inputs())
    assert report.ok and report.families == (4,) and report.family_ops[6] > 0
    assert kernel.tables[6].ours() == [] and not any(r.hash for r in kernel.tables[6].chains["FORWARD"])
    assert not any(s.family == 6 for s in kernel.sets.values())
    v4_only.remove_all()
    assert kernel.tables[4].ours() == [] and kernel.sets == {}


def test_ip_families_option_and_default(monkeypatch):
    from pydantic import ValidationError

    from routed.config import load_config

    env = {"ROUTED_POLICY__IP_FAMILIES": "6,4"}
    assert load_config(None, {"node_name": "n", "manifest_dir": "/m"}, environ=env).policy.ip_families == [4, 6]
    assert PolicyOptions().ip_families is None and PolicyOptions(ip_families=[4]).ip_families == [4]
    for bad in ([], [5], "x"):
        with pytest.raises(ValidationError):
            PolicyOptions(ip_families=bad)
    # None: IPv4, and IPv6 where it is available
    monkeypatch.setattr("policy.controller.family_available", lambda backend, family: True)
    monkeypatch.setattr("policy.dataplane.iptables.family_available", lambda backend, family: family != 6)
    ctl = PolicyController(PolicyOptions(iptables_backend="nft"), "n")
    assert ctl.families == (4,) and ctl.sweep_families == (6,)
    monkeypatch.setattr("policy.dataplane.iptables.family_available", lambda backend, family: True)
    assert PolicyController(PolicyOptions(iptables_backend="nft"), "n").families == (4, 6)
