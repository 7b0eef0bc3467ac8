"""A simulated kernel for policy tests without one: each family's filter table, one ipset namespace, and a
PolicyController wired to it (unit tests only)."""

from __future__ import annotations

from typing import Any

import pytest

from policy import names
from policy.component import PolicyComponent
from policy.controller import PolicyController
from policy.dataplane import ipsets as ipsets_mod
from policy.dataplane.iptables import ActualRule, Op, TableState
from policy.dataplane.writers import Writer
from policy.render import render
from routed.cache import ClusterCache
from routed.config import PolicyOptions
from routed.datastore.base import Event
from routed.model import Endpoint
from routed.supervisor import Supervisor


class FakeKernel:
    def __init__(self) -> None:
        self.tables = {4: TableState({"INPUT": [], "FORWARD": [], "OUTPUT": []}),
                       6: TableState({"INPUT": [], "FORWARD": [], "OUTPUT": []})}
        self.sets: dict[str, ipsets_mod.ActualSet] = {}
        self.log: list[tuple[str, object]] = []  # ("ipset", lines) / ("iptables4" | "iptables6", ops)
        self.packets = 0  # what read_table(counters=True) reports for every rule
        self.failures: dict[str, int] = {}  # "iptables4" | "iptables6" | "ipset" -> how many writes fail next

    # iptables
    def read_table(self, backend: str, counters: bool = False, family: int = 4) -> TableState:
        packets = self.packets if counters else 0
        return TableState({c: [ActualRule(r.hash, packets, 0, r.text) for r in rules]
                           for c, rules in self.tables[family].chains.items()})

    def read_chains(self, backend: str, chains, family: int = 4) -> TableState:
        table = self.read_table(backend, family=family)
        return TableState({c: table.chains[c] for c in chains if c in table.chains})

    def fail_if_armed(self, what: str) -> None:
        if self.failures.get(what, 0) > 0:
            self.failures[what] -= 1
            raise RuntimeError(f"{what}: injected write failure")

    def apply_ops(self, family: int, ops: list[Op]) -> None:
        self.fail_if_armed(f"iptables{family}")
        self.log.append((f"iptables{family}", list(ops)))
        chains = self.tables[family].chains
        for op in ops:
            if op.kind == "new_chain":
                chains[op.chain] = []
        for op in ops:
            rule = ActualRule(op.hash, 0, 0, op.line)
            if op.kind == "replace":
                chains[op.chain][op.position - 1] = rule
            elif op.kind == "append":
                chains[op.chain].append(rule)
            elif op.kind == "insert":
                chains[op.chain].insert(op.position - 1, rule)
            elif op.kind == "delete":
                del chains[op.chain][op.position - 1]
        for op in ops:
            if op.kind == "flush":
                chains[op.chain] = []
        for op in ops:
            if op.kind == "delete_chain":
                del chains[op.chain]

    # ipset
    def ipset_read(self) -> dict[str, ipsets_mod.ActualSet]:
        return {n: ipsets_mod.ActualSet(s.name, s.kind, set(s.members), s.family) for n, s in self.sets.items()}

    def ipset_restore(self, lines: list[str]) -> None:
        if not lines:
            return
        self.fail_if_armed("ipset")
        self.log.append(("ipset", list(lines)))
        for line in lines:
            verb, name, *rest = line.split()
            if verb == "create" and name not in self.sets:
                self.sets[name] = ipsets_mod.ActualSet(name, rest[0], set(), ipsets_mod.set_family(name, rest[1:]))
            elif verb == "add":
                self.sets[name].members.add(" ".join(rest))
            elif verb == "del":
                self.sets[name].members.discard(" ".join(rest))
            elif verb == "flush":
                self.sets[name].members.clear()
            elif verb == "swap":
                a, b = self.sets[name], self.sets[rest[0]]
                a.members, b.members = b.members, a.members
            elif verb == "destroy":
                del self.sets[name]


class FakeWriter(Writer):
    name = "fake"

    def __init__(self, kernel: FakeKernel, family: int) -> None:
        self.kernel, self.family = kernel, family

    def apply(self, ops: list[Op]) -> None:
        if ops:
            self.kernel.apply_ops(self.family, ops)


def controller(monkeypatch, families=(4, 6), kernel: FakeKernel | None = None,
               options: PolicyOptions | None = None) -> tuple[PolicyController, FakeKernel]:
    kernel = kernel or FakeKernel()
    monkeypatch.setattr("policy.controller.read_table", kernel.read_table)
    monkeypatch.setattr("policy.controller.read_chains", kernel.read_chains)
    monkeypatch.setattr("policy.controller.family_available", lambda backend, family: True)
    ctl = PolicyController(options or PolicyOptions(iptables_backend="nft", ip_families=list(families)), "n")
    monkeypatch.setattr(ctl.ipsets, "read", kernel.ipset_read)
    monkeypatch.setattr(ctl.ipsets, "restore", kernel.ipset_restore)
    ctl._writers = {f: FakeWriter(kernel, f) for f in (4, 6)}
    return ctl, kernel


def kernel_chains(kernel: FakeKernel, family: int) -> dict[str, list[str | None]]:
    return {c: [r.hash for r in rules] for c, rules in kernel.tables[family].chains.items()}


def pod_obj(name: str, ip: str, labels: Any = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "x", "labels": labels or {}},
            "spec": {"nodeName": "n"}, "status": {"podIPs": [{"ip": ip}]}}


class ComponentHarness:
    """A real PolicyComponent over a real ClusterCache, its controller on the simulated kernel."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kernel = FakeKernel()
        self.cache = ClusterCache()
        self.endpoints = [Endpoint("c1", "eth0", "", "rtd00000000001", ("10.1.0.1",), "x", "a")]

        def make(options: PolicyOptions, node: str) -> PolicyController:
            return controller(monkeypatch, kernel=self.kernel, options=options)[0]

        self.component = PolicyComponent(PolicyOptions(iptables_backend="nft", ip_families=[4, 6]), "n",
                                         self.cache, lambda: list(self.endpoints), lambda *a: None, lambda: None,
                                         Supervisor(), make_controller=make)

    async def start(self) -> None:
        await self.cache.apply([Event("ADDED", "Namespace", "x", {"metadata": {"name": "x"}}),
                                Event("ADDED", "Pod", "x/a", pod_obj("a", "10.1.0.1"))])
        await self.component.start()

    async def settle(self) -> None:
        assert await self.component.reconciler.run_once()

    def fresh_ruleset_hashes(self) -> dict[str, list[str]]:
        from policy.calc import calculate

        calc = calculate(self.component.inputs())
        return {c: [r.hash for r in rules] for c, rules in render(calc, family=4).chains.items()}

    def kernel_hashes(self) -> dict[str, list[str | None]]:
        return {c: h for c, h in kernel_chains(self.kernel, 4).items() if c.startswith(names.PREFIX)}

    async def stop(self) -> None:
        await self.component.stop()
