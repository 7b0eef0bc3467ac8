"""Invalid policies become one Warning Event each, from nodes with pods in the namespace; a failed post is
retried with the next report (pure logic, a recording poster)."""

from __future__ import annotations

import asyncio

from policy.events import REASON, InvalidPolicyEvents
from routed.supervisor import Liveness


def test_reported_once_only_where_they_fail_closed_and_retried_after_a_failed_post():
    posted: list[tuple[dict, str, str]] = []
    fail_next = [True]

    async def post(involved: dict, reason: str, message: str) -> None:
        if fail_next[0]:
            fail_next[0] = False
            raise ConnectionError("API server down")
        posted.append((involved, reason, message))

    events = InvalidPolicyEvents("n1", post)
    invalid = [
        {"policy": "x/bad", "reasons": ["spec.ingress[0]: broken"], "failClosed": ["Ingress"]},
        {"policy": "other/bad", "reasons": ["nope"], "failClosed": ["Egress"]},  # no local pods there
    ]

    async def drain() -> None:
        task = asyncio.create_task(events.run(Liveness(10)))
        for _ in range(20):
            await asyncio.sleep(0)
        task.cancel()

    async def scenario() -> None:
        events.report(invalid, {"x"})
        await drain()  # the post fails: nothing recorded, and it will be queued again
        assert posted == []
        events.report(invalid, {"x"})
        events.report(invalid, {"x"})  # same reasons: nothing new
        await drain()
        events.report([{**invalid[0], "reasons": ["spec.ingress[0]: broken differently"]}], {"x"})
        await drain()

    asyncio.run(scenario())
    assert [(e[0]["namespace"], e[0]["name"], e[1]) for e in posted] == [("x", "bad", REASON), ("x", "bad", REASON)]
    assert "fail closed for: Ingress" in posted[0][2] and "differently" in posted[1][2]
