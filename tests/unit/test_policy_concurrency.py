"""Concurrency property: whatever interleaving of cache events, CNI ADD/DEL, resyncs, hook checks, injected
write failures and partial (one family) writes the real policy component goes through, once the failures stop
and it settles, every family's kernel state == the trusted applied state == what a fresh full calculation of
the cache renders (issue 16).

The component runs on a real event loop with its real lock, reconciler and thread hand-off; only the kernel is
simulated (tests/unit/policy_fakes.py). Steps run in concurrent groups, so an apply's thread executes while the
loop keeps feeding the engine. More examples: ROUTED_PROPERTY_EXAMPLES=2000.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy import names
from policy.calc import calculate
from policy.controller import PolicyApplyError, family_sets, kernel_sets
from policy.dataplane.iptables import ActualRule
from policy.render import render
from routed.datastore.base import Event
from routed.model import Endpoint
from tests.unit.policy_fakes import ComponentHarness

EXAMPLES = int(os.environ.get("ROUTED_PROPERTY_EXAMPLES", "60"))
PODS = ["a", "b", "c", "d"]
LABELS = [{}, {"app": "web"}, {"app": "db"}, {"app": "web", "tier": "fe"}]
IPS = [("10.1.0.{n}",), ("fd00::{n:x}",), ("10.1.0.{n}", "fd00::{n:x}")]
NS_LABELS = [{}, {"team": "a"}, {"team": "b"}]
POLICIES = {
    "deny": {"podSelector": {}},
    "allow-web": {"podSelector": {"matchLabels": {"app": "web"}},
                  "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": 80}]}]},
    "team": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]},
    "blocks": {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
               "policyTypes": ["Ingress", "Egress"],
               "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/24"]}},
                                  {"ipBlock": {"cidr": "fd00::/8"}}]}]},
}
FAILURES = ["iptables4", "iptables6", "ipset"]

step = st.one_of(
    st.tuples(st.just("pod"), st.sampled_from(PODS), st.integers(0, len(LABELS) - 1), st.integers(0, len(IPS) - 1)),
    st.tuples(st.just("delpod"), st.sampled_from(PODS)),
    st.tuples(st.just("ns"), st.integers(0, len(NS_LABELS) - 1)),
    st.tuples(st.just("policy"), st.sampled_from(sorted(POLICIES)), st.sampled_from(sorted(POLICIES))),
    st.tuples(st.just("delpolicy"), st.sampled_from(sorted(POLICIES))),
    st.tuples(st.just("add"), st.sampled_from(PODS)),
    st.tuples(st.just("del"), st.sampled_from(PODS)),
    st.tuples(st.just("resync")),
    st.tuples(st.just("hooks")),
    st.tuples(st.just("mess")),
    st.tuples(st.just("fail"), st.sampled_from(FAILURES), st.integers(1, 3)),
    st.tuples(st.just("apply")),
)


def pod_obj(name: str, labels: dict[str, str], ips: tuple[str, ...]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "x", "labels": labels}, "spec": {"nodeName": "n"},
            "status": {"podIPs": [{"ip": ip} for ip in ips]}}


class Driver:
    def __init__(self, harness: ComponentHarness) -> None:
        self.h = harness
        self.ips: dict[str, tuple[str, ...]] = {"a": ("10.1.0.1",)}
        # the CNI server serialises the calls for one attachment (cni/server.py _attachment_lock), as the CNI
        # spec asks of runtimes; calls for different pods interleave freely
        self.attachment_locks = {pod: asyncio.Lock() for pod in PODS}

    def endpoint(self, pod: str) -> Endpoint:
        n = PODS.index(pod) + 1
        return Endpoint(f"c{n}", "eth0", "", f"rtd{n:011x}", self.ips.get(pod, ()), "x", pod)

    async def run(self, item: tuple[Any, ...]) -> None:
        h, comp = self.h, self.h.component
        kind = item[0]
        if kind == "pod":
            _, pod, labels, ips = item
            n = PODS.index(pod) + 1
            self.ips[pod] = tuple(template.format(n=n) for template in IPS[ips])
            await h.cache.apply([Event("MODIFIED", "Pod", f"x/{pod}", pod_obj(pod, LABELS[labels], self.ips[pod]))])
        elif kind == "delpod":
            await h.cache.apply([Event("DELETED", "Pod", f"x/{item[1]}", pod_obj(item[1], {}, ()))])
        elif kind == "ns":
            await h.cache.apply([Event("MODIFIED", "Namespace", "x",
                                       {"metadata": {"name": "x", "labels": NS_LABELS[item[1]]}})])
        elif kind == "policy":
            obj = {"metadata": {"name": item[1], "namespace": "x"}, "spec": POLICIES[item[2]]}
            await h.cache.apply([Event("MODIFIED", "NetworkPolicy", f"x/{item[1]}", obj)])
        elif kind == "delpolicy":
            obj = {"metadata": {"name": item[1], "namespace": "x"}, "spec": {}}
            await h.cache.apply([Event("DELETED", "NetworkPolicy", f"x/{item[1]}", obj)])
        elif kind == "add":
            async with self.attachment_locks[item[1]]:
                await self.add(item[1])
        elif kind == "del":
            async with self.attachment_locks[item[1]]:
                await self.delete(item[1])
        elif kind == "resync":
            comp.resync()
        elif kind == "hooks":
            await comp.check_hooks()
        elif kind == "mess":  # something inserts ahead of our IPv4 FORWARD hook and flushes IPv6 INPUT
            h.kernel.tables[4].chains["FORWARD"].insert(0, ActualRule(None, 0, 0, "-A FORWARD -j FOREIGN"))
            h.kernel.tables[6].chains["INPUT"] = []
        elif kind == "fail":
            h.kernel.failures[item[1]] = h.kernel.failures.get(item[1], 0) + item[2]
        elif kind == "apply":
            await comp.reconciler.run_once()

    async def add(self, pod: str) -> None:
        """What the CNI service does: the endpoint into the store, the hook; a refused hook undoes the ADD."""
        ep = self.endpoint(pod)
        if any(e.host_ifname == ep.host_ifname for e in self.h.endpoints):
            return
        self.h.endpoints.append(ep)
        try:
            await self.h.component.endpoint_added(ep)
        except PolicyApplyError:
            await self.h.component.endpoint_removed(ep)
            self.h.endpoints.remove(ep)

    async def delete(self, pod: str) -> None:
        found = [e for e in self.h.endpoints if e.pod_name == pod]
        for ep in found:
            await self.h.component.endpoint_removed(ep)
            self.h.endpoints.remove(ep)


def check_settled(h: ComponentHarness) -> None:
    ctl = h.component.controller
    calc = calculate(h.component.inputs())
    assert ctl._applied is not None
    for family in ctl.families:
        want = render(calc, ctl.render_options, family)
        table = h.kernel.tables[family].chains
        ours = {c: [r.hash for r in rules] for c, rules in table.items() if c.startswith(names.PREFIX)}
        assert ours == {c: [r.hash for r in rules] for c, rules in want.chains.items()}, f"IPv{family} tables"
        trusted = {c: [r.hash for r in rules] for c, rules in ctl._applied[family].chains.items()}
        assert trusted == ours, f"IPv{family} trusted state"
        for builtin, hook in want.hooks.items():
            assert [r.hash for r in table[builtin] if r.hash] == [hook.hash], (family, builtin)
            assert table[builtin][0].hash == hook.hash, (family, builtin)
        desired_sets = kernel_sets(family_sets(calc, ctl.families), family)
        kernel = {n: (s.kind, s.members) for n, s in h.kernel.sets.items() if s.family == family}
        assert kernel == desired_sets, f"IPv{family} sets"
        assert ctl._applied[family].sets == desired_sets, f"IPv{family} trusted sets"


async def scenario(h: ComponentHarness, groups: list[list[tuple[Any, ...]]]) -> None:
    driver = Driver(h)
    await h.start()
    try:
        for group in groups:
            await asyncio.gather(*(driver.run(item) for item in group))
        h.kernel.failures.clear()  # quiescence: the failures stop
        await h.component.check_hooks()
        for _ in range(3):
            if await h.component.reconciler.run_once():
                break
        check_settled(h)
        h.kernel.log.clear()
        assert await h.component.reconciler.run_once()
        assert h.kernel.log == [], "a second apply changed something"
    finally:
        await h.stop()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(step, min_size=1, max_size=4), min_size=1, max_size=12))
def test_kernel_equals_trusted_equals_fresh_calculation(groups):
    with pytest.MonkeyPatch.context() as monkeypatch:
        asyncio.run(scenario(ComponentHarness(monkeypatch), groups))
