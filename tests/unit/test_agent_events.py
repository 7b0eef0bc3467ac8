"""The agent reports each invalid policy once, from nodes with pods in its namespace (pure logic, fakes)."""

from __future__ import annotations

import asyncio

from routed.agent import Agent
from routed.config import load_config
from routed.model import Endpoint


class RecordingDatastore:
    def __init__(self) -> None:
        self.events: list[tuple[dict, str, str]] = []

    async def report_event(self, involved: dict, reason: str, message: str, event_type: str = "Warning") -> None:
        self.events.append((involved, reason, message))


class Endpoints:
    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("c1", "eth0", "/x", "rtd00000000000", ("10.0.0.1",), "x", "a")]


def test_invalid_policies_reported_once_and_only_where_they_fail_closed(tmp_path):
    agent = Agent(load_config(None, {"node_name": "n1", "manifest_dir": str(tmp_path)}, environ={}))
    store = RecordingDatastore()
    agent.datastore = store  # type: ignore[assignment]
    agent._cni_service = Endpoints()
    invalid = [
        {"policy": "x/bad", "reasons": ["spec.ingress[0]: broken"], "fail_closed": ["Ingress"]},
        {"policy": "other/bad", "reasons": ["nope"], "fail_closed": ["Egress"]},  # no local pods there
    ]

    async def scenario() -> None:
        agent._report_invalid_policies(invalid)
        agent._report_invalid_policies(invalid)  # same reasons: nothing new
        await asyncio.sleep(0)
        changed = [{**invalid[0], "reasons": ["spec.ingress[0]: broken differently"]}]
        agent._report_invalid_policies(changed)
        await asyncio.sleep(0)

    asyncio.run(scenario())
    assert [(e[0]["namespace"], e[0]["name"], e[1]) for e in store.events] == [
        ("x", "bad", "InvalidNetworkPolicy"), ("x", "bad", "InvalidNetworkPolicy")]
    assert "fail closed for: Ingress" in store.events[0][2] and "differently" in store.events[1][2]
