"""Regression tests for the ways a policy change could be lost or late (issue 16), against the simulated kernel:
a planning failure, a write that stops between the two families, hooks flushed or overtaken, a cache listener
that fails mid-batch, an engine that drifted from the cache, threads reading the engine."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from policy import names
from policy.controller import PolicyApplyError, PolicyController
from policy.dataplane.iptables import ActualRule
from policy.render import render
from routed import failpoints
from routed.datastore.base import Event
from routed.model import Endpoint
from tests.unit.policy_fakes import ComponentHarness as Harness
from tests.unit.policy_fakes import FakeKernel, controller, kernel_chains, pod_obj
from tests.unit.test_policy_controller import dual_inputs

DENY = {"metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}}


@pytest.fixture
def armed():
    """Arm failpoints for one test; disarmed afterwards whatever happens."""
    yield failpoints.configure
    failpoints.configure("")


def assert_kernel_is_full_calculation(ctl: PolicyController, kernel: FakeKernel) -> None:
    """Every family's tables hold exactly what a fresh full calculation of the engine renders, hooks first."""
    calc = ctl.engine.calculation()
    for family in ctl.families:
        want = render(calc, ctl.render_options, family)
        have = kernel_chains(kernel, family)
        ours = {c: h for c, h in have.items() if c.startswith(names.PREFIX)}
        assert ours == {c: [r.hash for r in rules] for c, rules in want.chains.items()}, family
        for builtin, hook in want.hooks.items():
            assert have[builtin][:1] == [hook.hash], (family, builtin, have[builtin])
    assert ctl._applied is None or all(
        {c: [r.hash for r in rules] for c, rules in ctl._applied[f].chains.items()}
        == {c: h for c, h in kernel_chains(kernel, f).items() if c.startswith(names.PREFIX)}
        for f in ctl.families)


def test_a_planning_failure_keeps_the_changes(monkeypatch):
    ctl, kernel = controller(monkeypatch)
    ctl.sync(dual_inputs())
    ctl.engine.set_policy(DENY)
    real = ctl.__class__._plan_chains
    calls = {"n": 0}

    def fails_once(self: PolicyController, *args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("render blew up")
        real(self, *args)

    monkeypatch.setattr(PolicyController, "_plan_chains", fails_once)
    with pytest.raises(PolicyApplyError) as failed:
        ctl.plan()
    assert "render blew up" in failed.value.report.error and ctl.report()["ready"] is False
    ctl.execute(ctl.plan())
    assert_kernel_is_full_calculation(ctl, kernel)
    assert any(c.startswith("rtd-pi-") for c in kernel.tables[4].chains)  # the deny's chain is there


def test_failpoint_after_take_changes(monkeypatch, armed):
    ctl, kernel = controller(monkeypatch)
    ctl.sync(dual_inputs())
    ctl.engine.set_policy(DENY)
    armed("policy.plan=1")
    with pytest.raises(PolicyApplyError):
        ctl.plan()
    ctl.execute(ctl.plan())
    assert_kernel_is_full_calculation(ctl, kernel)


def test_a_write_that_stops_between_the_families_is_repaired(monkeypatch, armed):
    ctl, kernel = controller(monkeypatch)
    ctl.sync(dual_inputs())
    ctl.engine.set_policy(DENY)
    armed("policy.between_families=1")
    with pytest.raises(PolicyApplyError):
        ctl.apply()
    v6_chains = set(kernel.tables[6].chains)
    assert set(kernel.tables[4].chains) != v6_chains  # IPv4 written, IPv6 not: the partial state is real
    report = ctl.apply()
    assert report.full and report.ok
    assert_kernel_is_full_calculation(ctl, kernel)
    again = ctl.apply()
    assert again.iptables_ops == 0 and again.ipset_ops == 0


def test_hooks_flushed_or_overtaken_are_put_back_first(monkeypatch):
    ctl, kernel = controller(monkeypatch)
    ctl.sync(dual_inputs())
    assert ctl.check_hooks() == 0  # all in place: nothing written
    forward4 = kernel.tables[4].chains["FORWARD"]
    forward4.insert(0, ActualRule(None, 0, 0, "-A FORWARD -j KUBE-FORWARD"))  # kube-proxy inserts ahead
    kernel.tables[6].chains["INPUT"] = []  # something flushed INPUT
    kernel.log.clear()
    assert ctl.check_hooks() > 0
    assert_kernel_is_full_calculation(ctl, kernel)
    assert kernel.tables[4].chains["FORWARD"][1].text == "-A FORWARD -j KUBE-FORWARD"  # the foreign rule stays
    assert sum(r.hash is not None for r in kernel.tables[4].chains["FORWARD"]) == 1  # ours once
    assert ctl.check_hooks() == 0


def test_no_hook_check_before_the_first_apply(monkeypatch):
    ctl, kernel = controller(monkeypatch)
    assert ctl.check_hooks() == 0 and kernel.log == []


def test_the_apply_thread_reports_from_the_planned_copy(monkeypatch):
    ctl, _ = controller(monkeypatch)
    ctl.sync(dual_inputs())
    plan = ctl.plan()
    ctl.engine.add_endpoint(Endpoint("c9", "eth0", "", "rtd00000000009", ("10.1.0.9",), "x", "z"))
    report = ctl.execute(plan)  # what a thread runs while the loop goes on changing the engine
    assert report.endpoints == 2 and len(ctl.engine.ep_plans) == 3
    copy = ctl.drop_chains()
    ctl.engine.remove_endpoint(Endpoint("c9", "eth0", "", "rtd00000000009", ("10.1.0.9",), "x", "z"))
    assert set(ctl.drop_counters(copy)) == {"x/a", "x/b", "x/z"}


# -- the component: cache events -> engine -> kernel -------------------------------------------------------
def run(body: Any) -> None:
    asyncio.run(body())


def test_a_failing_event_does_not_lose_the_rest_of_its_batch(monkeypatch):
    async def body() -> None:
        h = Harness(monkeypatch)
        await h.start()
        try:
            # one bad object (labels that are not a map) ahead of a deny-all in the same batch
            await h.cache.apply([Event("ADDED", "Pod", "x/bad", pod_obj("bad", "10.1.0.7", ["not", "a", "map"])),
                                 Event("ADDED", "NetworkPolicy", "x/deny", DENY)])
            await h.settle()
            assert any(c.startswith("rtd-pi-") for c in h.kernel_hashes())  # the deny-all is enforced
            assert h.kernel_hashes() == h.fresh_ruleset_hashes()
            assert [p.key for p in h.cache.pods()] == ["x/a"]  # the bad one is left out, named in the log
        finally:
            await h.stop()

    run(body)


def test_a_failing_listener_makes_the_next_apply_rebuild(monkeypatch):
    async def body() -> None:
        h = Harness(monkeypatch)
        await h.start()
        try:
            def broken(*args: Any) -> None:
                raise RuntimeError("engine bug")

            monkeypatch.setattr(h.component, "_feed", broken)
            await h.cache.apply([Event("ADDED", "NetworkPolicy", "x/deny", DENY)])
            monkeypatch.undo()
            await h.settle()
            assert h.kernel_hashes() == h.fresh_ruleset_hashes()
        finally:
            await h.stop()

    run(body)


def test_resync_rebuilds_an_engine_that_drifted_from_the_cache(monkeypatch):
    async def body() -> None:
        h = Harness(monkeypatch)
        await h.start()
        try:
            await h.cache.apply([Event("ADDED", "NetworkPolicy", "x/deny", DENY)])
            await h.settle()
            h.component.controller.engine.delete_policy("x/deny")  # drift: the cache still has it
            await h.settle()
            assert not any(c.startswith("rtd-pi-") for c in h.kernel_hashes())
            h.component.resync()
            await h.settle()
            assert h.component.rebuilds == 1
            assert h.kernel_hashes() == h.fresh_ruleset_hashes()
            h.component.resync()  # no drift now: no rebuild
            await h.settle()
            assert h.component.rebuilds == 1
        finally:
            await h.stop()

    run(body)
