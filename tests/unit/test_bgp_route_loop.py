"""The `bgp-routes` loop of BgpManager (learned routes -> route table) with a fake route table: what it asks the
table to keep and remove during the start-up hold, and how fast it retries after a failed apply."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from routed.bgp import bfd
from routed.bgp import manager as manager_mod
from routed.bgp.manager import BgpInputs, BgpManager
from routed.bgp.rib import parse_message
from routed.config import BgpOptions
from routed.model import Node
from routed.routes import ApplyResult

if TYPE_CHECKING:
    from routed.routes import Gone

NODE = Node(name="n1", pod_cidrs=("10.244.1.0/24",), addresses=("10.1.0.2",))
TOR1, TOR2 = "10.1.1.1", "10.1.2.1"
PEERS = [{"kind": "BGPPeer", "metadata": {"name": f"tor{i}"}, "spec": {"peerIP": ip, "asNumber": 65100 + i}}
         for i, ip in ((1, TOR1), (2, TOR2))]
CONFIGS = [{"kind": "BGPConfiguration", "metadata": {"name": "default"}, "spec": {"asNumber": 65001}}]
P, Q = "10.244.2.0/24", "10.244.3.0/24"


def msg(peer: str, **neighbor):
    return parse_message(json.dumps({"type": neighbor.pop("type"), "neighbor": {"address": {"peer": peer},
                                                                                 **neighbor}}))


def upd(peer: str, announce=(), withdraw=()):
    u: dict = {"attribute": {"as-path": {"0": {"element": "as-sequence", "value": [65100, 65002]}}}}
    if announce:
        u["announce"] = {"ipv4 unicast": {peer: [{"nlri": p} for p in announce]}}
    if withdraw:
        u["withdraw"] = {"ipv4 unicast": [{"nlri": p} for p in withdraw]}
    return msg(peer, type="update", direction="receive", message={"update": u})


class ModelTable:
    """Stands in for RouteTable with its documented contract: prune replaces the table by `desired`; merging
    keeps the kernel's next hops next to the desired ones except those in `gone`."""

    def __init__(self, kernel: dict[str, frozenset[str]]) -> None:
        self.table = dict(kernel)
        self.last = ApplyResult()
        self.calls: list[tuple[dict[str, frozenset[str]], bool, Gone | None]] = []
        self.fail = False

    async def kernel(self) -> dict[str, frozenset[str]]:
        return dict(self.table)

    async def apply(self, desired, prune=True, gone=None) -> ApplyResult:
        self.calls.append((dict(desired), prune, gone))
        if self.fail:
            self.last = ApplyResult(errors={P: "22: injected"})
            return self.last
        new: dict[str, frozenset[str]] = {}
        for prefix in set(desired) | set(self.table):
            hops = frozenset(desired.get(prefix, ()))
            if not prune:
                hops |= self.table.get(prefix, frozenset()) - (gone.of(prefix) if gone else frozenset())
            if hops:
                new[prefix] = hops
        self.table = new
        self.last = ApplyResult()
        return self.last

    async def flush(self) -> int:
        return 0

    async def close(self) -> None:
        pass


async def until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll `pred` with a deadline (the loop under test runs meanwhile)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def started(tmp_path, table: ModelTable) -> BgpManager:
    mgr = BgpManager("n1", str(tmp_path / "state"), str(tmp_path / "run"),
                     BgpOptions(exabgp=str(tmp_path / "no-such-exabgp")))
    mgr.routes = table  # type: ignore[assignment]

    async def no_exabgp() -> None:  # the test feeds ExaBGP's messages to the speaker itself
        (tmp_path / "run").mkdir()

    mgr.speaker.start = no_exabgp  # type: ignore[method-assign]
    await mgr.start()
    await mgr.update(BgpInputs(node=NODE, nodes=[NODE], peers=PEERS, configs=CONFIGS, secrets={}))
    return mgr


def test_bfd_down_withdrawal_and_session_down_remove_next_hops_during_the_startup_hold(tmp_path):
    async def run():
        # a previous run left P over both ToRs and Q over TOR1; neither ToR sends End-of-RIB: the hold lasts
        table = ModelTable({P: frozenset({TOR1, TOR2}), Q: frozenset({TOR1})})
        mgr = await started(tmp_path, table)
        try:
            sp = mgr.speaker
            for tor in (TOR1, TOR2):
                sp.handle(msg(tor, type="state", state="up"), 1.0)
                sp.handle(upd(tor, announce=[P]), 1.1)
            await until(lambda: any(d.get(P) == {TOR1, TOR2} for d, _, _ in table.calls), "P learned from both")
            assert table.table == {P: {TOR1, TOR2}, Q: {TOR1}}  # Q not re-learned yet: kept (merge)

            mgr._on_bfd_change(TOR1, bfd.UP, bfd.DOWN, 1)  # BFD Down: TOR1's next hop goes at once
            await until(lambda: table.table.get(P) == {TOR2}, "TOR1 removed from P")
            assert Q not in table.table  # also what TOR1 routed from before the restart: its forwarding failed
            assert not mgr._synced and all(not prune for _, prune, _ in table.calls)

            sp.handle(upd(TOR2, announce=[Q]), 2.0)
            await until(lambda: table.table.get(Q) == {TOR2}, "Q learned from TOR2")
            sp.handle(upd(TOR2, withdraw=[Q]), 2.1)  # a withdrawal in the hold
            await until(lambda: Q not in table.table, "Q withdrawn")
            sp.handle(msg(TOR2, type="state", state="down", reason="notification received (6,2)"), 2.2)
            await until(lambda: P not in table.table, "P gone with TOR2's session")
            assert not mgr._synced
        finally:
            await mgr.stop(graceful=False)
    asyncio.run(run())


def test_failed_apply_retries_as_soon_as_a_change_arrives(tmp_path, monkeypatch):
    monkeypatch.setattr(manager_mod, "APPLY_RETRY_MIN", 30.0)  # a backoff the test would notice
    monkeypatch.setattr(manager_mod, "APPLY_RETRY_MAX", 30.0)

    async def run():
        table = ModelTable({})
        table.fail = True
        mgr = await started(tmp_path, table)
        try:
            await until(lambda: mgr.apply_errors >= 1, "a failed apply")  # the loop now waits in its backoff
            table.fail = False
            mgr.speaker.handle(msg(TOR1, type="state", state="up"), 1.0)
            mgr.speaker.handle(upd(TOR1, announce=[P]), 1.1)
            await until(lambda: table.table.get(P) == {TOR1}, "the change applied within the backoff")
        finally:
            await mgr.stop(graceful=False)
    asyncio.run(run())
