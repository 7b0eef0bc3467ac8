"""Plain-text renderings of what the agent reports (the CLI's table output; `-o json` skips these)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from routed.api_types import (
    AgentStatus,
    BfdPeerStatus,
    BgpPeerStatus,
    BgpRoute,
    IpamShow,
    PolicyExplain,
    PolicyShow,
    Verdict,
)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width table of the given columns; lists are joined with spaces."""

    def cell(value: Any) -> str:
        if isinstance(value, list | tuple):
            return " ".join(str(v) for v in value)
        if isinstance(value, dict):
            return json.dumps(value, separators=(",", ":"))
        return "" if value is None else str(value)

    cells = [[cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]
    lines = ["  ".join(col.upper().ljust(w) for col, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def render_status(data: AgentStatus) -> str:
    reasons = data["reasons"]
    datastore = data["datastore"]
    out = [
        f"node:       {data['node']}",
        f"ready:      {data['ready']}" + (f" ({'; '.join(reasons)})" if reasons else ""),
        f"live:       {data['live']}" + (f" ({'; '.join(data['liveReasons'])})" if data["liveReasons"] else ""),
        f"pod CIDRs:  {', '.join(data['podCIDRs']) or '-'}",
        f"endpoints:  {data['endpoints']}",
        f"datastore:  {datastore['kind']} synced={datastore['synced']}"
        + (f" error: {datastore['error']}" if datastore["error"] else ""),
    ]
    policy = data["policy"]
    if policy["enabled"]:
        out.append(f"policy:     {policy['rules']} rules, {policy['ipsets']} ipsets, "
                   f"{len(policy['invalidPolicies'])} invalid policies"
                   + (f", last error: {policy['lastError']}" if policy["lastError"] else ""))
        for item in policy["invalidPolicies"]:
            out.append(f"  invalid: {item['policy']}: {'; '.join(item['reasons'])} "
                       f"(fails closed for {', '.join(item['failClosed']) or 'nothing'})")
    else:
        out.append("policy:     disabled")
    troubled = [t for t in data["tasks"] if t["state"] != "running" or t["restarts"]]
    if troubled:
        out.append("tasks:")
        out.append(table(troubled, ["name", "state", "restarts", "lastError"]).rstrip())
    bgp = data["bgp"]
    if not bgp["enabled"]:
        out.append("BGP:        disabled")
    elif bgp["peers"]:
        out.append(f"BGP:        AS {bgp['asNumber']}, router ID {bgp['routerID']}, "
                   f"{bgp['routesInstalled']} routes installed, {bgp.get('serviceRoutes', 0)} Service prefixes "
                   "announced")
        out.append(table(peer_rows(bgp["peers"]), ["peer", "asn", "state", "since", "received", "advertised",
                                                   "bfd", "error"]).rstrip())
    if bgp.get("bfd"):
        out.append("BFD:")
        out.append(table(bfd_rows(bgp["bfd"]), ["peer", "state", "remote", "discriminators", "tx ms", "detect ms",
                                                "since", "downs", "last diag"]).rstrip())
    return "\n".join(out) + "\n"


def _age(since: Any) -> str:
    if not isinstance(since, int | float) or since <= 0:
        return ""
    seconds = int(time.time() - since)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60}m"


def peer_rows(peers: Sequence[BgpPeerStatus]) -> list[dict[str, Any]]:
    """BGP peers as the agent reports them, shaped for a table (like `calicoctl node status`)."""
    return [
        {"peer": p["address"], "asn": p["asNumber"], "state": p["state"], "since": _age(p["since"]),
         "received": p["received"], "advertised": p["advertised"], "bfd": p.get("bfd", ""),
         "error": p["lastError"]}
        for p in peers
    ]


def bfd_rows(sessions: Sequence[BfdPeerStatus]) -> list[dict[str, Any]]:
    return [
        {"peer": b["peer"], "state": b["state"], "remote": b["remoteState"],
         "discriminators": f"{b['localDiscriminator']}/{b['remoteDiscriminator']}",
         "tx ms": f"{b['txIntervalMs']:g}", "detect ms": f"{b['detectionTimeMs']:g}", "since": _age(b["since"]),
         "downs": b["downs"], "last diag": b["localDiag"]}
        for b in sessions
    ]


def render_ipam(data: IpamShow) -> str:
    pools = [{"CIDR": p["cidr"], "family": f"IPv{p['family']}", "allocated": p["allocated"], "size": p["size"]}
             for p in data.get("pools", [])]
    head = table(pools, ["CIDR", "family", "allocated", "size"]) + "\n" if pools else "CIDRs: -\n"
    return head + table(data["allocations"], ["ip", "containerId", "ifname"])


def render_routes(rows: list[BgpRoute]) -> str:
    shaped = [
        {"peer": r.get("peer", ""), "prefix": r.get("prefix", ""), "next hop": r.get("nextHop", ""),
         "AS path": r.get("asPath", []), "communities": r.get("communities", []), "source": r.get("source", ""),
         "status": ("" if r.get("accepted", True) else f"rejected: {r.get('rejected', '')}")
         + (" (stale)" if r.get("stale") else "")}
        for r in rows
    ]
    columns = ["peer", "prefix", "next hop", "AS path", "communities", "status"]
    if any(row["source"] for row in shaped):
        columns.insert(5, "source")
    return table(shaped, columns)


def render_explain(data: PolicyExplain) -> str:
    verdict = "ALLOWED" if data["allowed"] else "DENIED"
    src_pod, dst_pod = data["egress"]["pod"], data["ingress"]["pod"]
    src = f"{src_pod} ({data['src']})" if src_pod else data["src"]
    dst = f"{dst_pod} ({data['dst']})" if dst_pod else data["dst"]
    lines = [f"{verdict}  {src} -> {dst} {data['protocol']}/{data['port']}"]
    for key in ("egress", "ingress"):
        part: Verdict = data[key]
        who = part["pod"] or "not a local pod"
        state = "allowed" if part["allowed"] else "denied"
        lines.append(f"  {key:<7} ({who}): {state} - {part['reason']}")
    for note in data["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines) + "\n"


def render_policy_show(data: PolicyShow) -> str:
    lines = []
    for direction in ("ingress", "egress"):
        names: list[str] = data[direction]
        lines.append(f"{direction}: {', '.join(names) if names else '(none: default allow)'}")
    return "\n".join(lines) + "\n"
