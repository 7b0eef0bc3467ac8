"""The agent core's pure pieces: backoff, failpoints, the supervisor, the reconciler loop, the error model,
and the tests' own JSON-subset comparison."""

from __future__ import annotations

import asyncio
import logging

import pytest

from routed import failpoints
from routed.backoff import Backoff
from routed.errors import Code, RoutedError, cli_exit_status
from routed.failpoints import InjectedFault
from routed.reconcile import Reconciler
from routed.supervisor import Supervisor
from tests.helpers import holds_for, json_cmp, run_and_expect


def test_backoff_grows_to_the_cap_with_bounded_jitter_and_resets():
    b = Backoff(base=0.1, cap=1.0, jitter=0.2)
    delays = [b.next_delay() for _ in range(8)]
    for i, d in enumerate(delays):
        nominal = min(1.0, 0.1 * 2**i)
        assert nominal * 0.8 - 1e-9 <= d <= min(1.0, nominal * 1.2) + 1e-9, (i, d)
    assert max(delays) <= 1.0 and b.attempts == 8
    b.reset()
    assert b.attempts == 0 and b.next_delay() <= 0.12
    with pytest.raises(ValueError):
        Backoff(base=2.0, cap=1.0)


def test_failpoints_count_down_and_always():
    failpoints.configure("a=2,b=*")
    try:
        for _ in range(2):
            with pytest.raises(InjectedFault):
                failpoints.hit("a")
        failpoints.hit("a")  # spent
        for _ in range(5):
            with pytest.raises(InjectedFault) as fault:
                failpoints.hit("b")
        assert fault.value.code == Code.INJECTED_FAULT
        failpoints.hit("c")  # not armed
    finally:
        failpoints.configure("")
    with pytest.raises(ValueError):
        failpoints.parse("novalue")


def test_error_model_maps_once_per_boundary():
    err = RoutedError("no such pod", "ns/x", code=Code.NOT_FOUND)
    assert err.to_json() == {"code": 102, "msg": "no such pod", "details": "ns/x"}
    assert err.to_cni("1.0.0") == {"cniVersion": "1.0.0", "code": 102, "msg": "no such pod", "details": "ns/x"}
    back = RoutedError.from_json(err.to_json())
    assert (back.code, back.msg, back.details) == (Code.NOT_FOUND, "no such pod", "ns/x")
    assert RoutedError.from_json({"code": 4242, "msg": "?"}).code == Code.UNEXPECTED
    assert cli_exit_status(err) == 2 and cli_exit_status(RoutedError("x")) == 1
    from cni.ipam import IpamExhausted
    from cni.netnsfd import NetnsGone
    from policy.model import PolicyError

    assert IpamExhausted("full").code == Code.IPAM_EXHAUSTED
    gone = NetnsGone(2, "no netns")
    assert isinstance(gone, OSError) and gone.errno == 2 and gone.code == Code.UNKNOWN_CONTAINER
    assert isinstance(PolicyError("bad"), ValueError) and PolicyError("bad").code == Code.POLICY_INVALID


def fast() -> Backoff:
    return Backoff(base=0.01, cap=0.05, jitter=0)


def test_supervisor_restarts_a_dying_task_and_is_not_live_meanwhile(caplog):
    async def scenario() -> None:
        sup = Supervisor(backoff=lambda: Backoff(base=0.2, cap=0.2, jitter=0))
        runs: list[int] = []

        async def body(liveness) -> None:
            runs.append(1)
            if len(runs) < 3:
                raise RuntimeError(f"boom {len(runs)}")
            await asyncio.Event().wait()

        sup.spawn("worker", body)
        await asyncio.sleep(0.05)
        live, why = sup.liveness()
        assert not live and "task worker restarting after: RuntimeError: boom 1" in why[0]
        assert sup.readiness() == why
        for _ in range(100):
            if sup.liveness()[0]:
                break
            await asyncio.sleep(0.02)
        assert sup.liveness() == (True, [])
        assert sup.status()[0]["restarts"] == 2 and sup.status()[0]["state"] == "running"
        assert not sup.fatal.is_set()
        await sup.stop()
        assert sup.status()[0]["state"] == "stopped"

    with caplog.at_level(logging.ERROR, logger="routed.supervisor"):
        asyncio.run(scenario())
    died = [r for r in caplog.records if "task worker died" in r.getMessage()]
    assert len(died) == 2 and all(r.exc_info for r in died)  # logged with the traceback


def test_supervisor_fatal_task_and_restart_budget_and_stuck_detection():
    async def scenario() -> None:
        sup = Supervisor(backoff=fast)

        async def dies(liveness) -> None:
            raise RuntimeError("gone")

        sup.spawn("api", dies, on_failure="fatal")
        await asyncio.wait_for(sup.fatal.wait(), 1)
        assert "task api died: RuntimeError: gone" in sup.fatal_reason
        await sup.stop()

        sup = Supervisor(backoff=fast)
        sup.spawn("loop", dies, restart_budget=3)
        await asyncio.wait_for(sup.fatal.wait(), 2)
        assert "died 4 times in a row" in sup.fatal_reason
        await sup.stop()

        sup = Supervisor(backoff=fast)
        sup.spawn("optional", dies, required=False)  # never fatal, never fails liveness
        await asyncio.sleep(0.3)
        assert not sup.fatal.is_set() and sup.liveness() == (True, [])
        assert sup.readiness() and "optional" in sup.readiness()[0]
        await sup.stop()

        sup = Supervisor(backoff=fast)

        async def hangs(liveness) -> None:
            with liveness.busy("an iptables-restore"):
                await asyncio.Event().wait()

        sup.spawn("policy", hangs, stall_after=0.1)
        await asyncio.sleep(0.3)
        live, why = sup.liveness()
        assert not live and "busy with an iptables-restore" in why[0]
        await sup.stop()

    asyncio.run(scenario())


def test_retired_task_ends_without_an_error():
    async def scenario() -> None:
        sup = Supervisor(backoff=fast)
        stopping = asyncio.Event()

        async def body(liveness) -> None:
            await stopping.wait()  # its owner's own stop flag

        sup.spawn("exabgp", body)
        await asyncio.sleep(0.01)
        sup.retire("exabgp")
        stopping.set()
        await asyncio.sleep(0.05)
        assert sup.status()[0]["state"] == "stopped" and sup.status()[0]["lastError"] == ""
        await sup.stop_task("exabgp")

    asyncio.run(scenario())


def test_reconciler_retries_until_success_and_folds_changes_in():
    async def scenario() -> None:
        attempts: list[int] = []

        async def apply() -> None:
            attempts.append(1)
            if len(attempts) <= 3:
                raise OSError("xtables lock busy")

        rec = Reconciler("policy", apply, fast())
        sup = Supervisor()
        sup.spawn("policy", rec.run)
        rec.mark_dirty()
        rec.mark_dirty()  # two changes before the first run: one apply
        for _ in range(100):
            if rec.runs:
                break
            await asyncio.sleep(0.01)
        assert rec.runs == 1 and len(attempts) == 4 and rec.failures == 0 and rec.last_error == ""
        await sup.stop()

    asyncio.run(scenario())


def test_json_subset_compare_and_polling_helpers():
    actual = {"ready": True, "peers": [{"address": "a", "state": "up"}, {"address": "b", "state": "down"}], "x": 1}
    assert json_cmp(actual, {"ready": True, "peers": [{"address": "b"}]}) == []
    diffs = json_cmp(actual, {"ready": False, "peers": [{"address": "c"}], "missing": 1})
    assert len(diffs) == 3 and any("$.missing: missing" in d for d in diffs)
    values = iter([1, 2, 3, 4])
    out = run_and_expect(lambda: next(values), lambda v: v >= 3, timeout=1, interval=0)
    assert out.ok and out.last == 3
    out = run_and_expect(lambda: {"state": "down"}, {"state": "up"}, timeout=0.05, interval=0.01)
    assert not out.ok and "expected \"up\", got \"down\"" in out.diff
    with pytest.raises(AssertionError, match="session up"):
        out.check("session up")
    assert holds_for(lambda: 1, 1, 0.05, interval=0.01).ok
    flips = iter([1, 1, 2, 2, 2, 2, 2, 2])
    held = holds_for(lambda: next(flips), 1, 1.0, interval=0)
    assert not held.ok and held.last == 2
