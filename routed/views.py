"""Plain-text renderings of what the agent reports (the CLI's table output; `-o json` skips these)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
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


def render_status(data: dict[str, Any]) -> str:
    out = [
        f"node:       {data.get('node')}",
        f"ready:      {data.get('ready')}" + (f" ({'; '.join(data.get('reasons') or [])})" if data.get("reasons") else ""),
        f"pod CIDRs:  {', '.join(data.get('pod_cidrs') or []) or '-'}",
        f"endpoints:  {data.get('endpoints')}",
        f"datastore:  {data.get('datastore', {}).get('kind')} synced={data.get('datastore', {}).get('synced')}",
    ]
    policy = data.get("policy") or {}
    if "rules" in policy:
        out.append(
            f"policy:     {policy.get('rules', 0)} rules, {policy.get('ipsets', 0)} ipsets, "
            f"{len(policy.get('invalid_policies') or [])} invalid policies"
        )
        for item in policy.get("invalid_policies") or []:
            out.append(f"  invalid: {item}")
    bgp = data.get("bgp") or {}
    peers = bgp.get("peers") if isinstance(bgp, dict) else None
    if peers:
        out.append("BGP peers:")
        out.append(table(peer_rows(peers), ["peer", "asn", "state", "since", "received", "advertised", "error"]).rstrip())
    elif isinstance(bgp, dict) and bgp.get("enabled") is False:
        out.append("BGP:        disabled")
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


def peer_rows(peers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """BGP peers as the agent reports them, shaped for a table (like `calicoctl node status`)."""
    return [
        {**p, "peer": p.get("address", p.get("peer", "")), "since": _age(p.get("since")),
         "error": p.get("last_error", "")}
        for p in peers
    ]


def render_ipam(data: dict[str, Any]) -> str:
    head = f"CIDRs: {', '.join(data.get('cidrs') or []) or '-'}\n"
    return head + table(data.get("allocations") or [], ["ip", "containerId", "ifname"])


def render_routes(data: Any) -> str:
    rows = data if isinstance(data, list) else data.get("routes", [])
    shaped = [
        {**r, "next_hop": r.get("next_hop") or r.get("nexthop", ""),
         "status": ("" if r.get("accepted", True) else f"rejected: {r.get('rejected', '')}")
         + (" (stale)" if r.get("stale") else "")}
        for r in rows
    ]
    return table(shaped, ["peer", "prefix", "next_hop", "as_path", "communities", "status"])


def render_explain(data: dict[str, Any]) -> str:
    verdict = "ALLOWED" if data.get("allowed") else "DENIED"
    src_pod = (data.get("egress") or {}).get("pod")
    dst_pod = (data.get("ingress") or {}).get("pod")
    src = f"{src_pod} ({data.get('src')})" if src_pod else str(data.get("src"))
    dst = f"{dst_pod} ({data.get('dst')})" if dst_pod else str(data.get("dst"))
    lines = [f"{verdict}  {src} -> {dst} {data.get('protocol')}/{data.get('port')}"]
    for key in ("egress", "ingress"):
        part = data.get(key) or {}
        if isinstance(part, dict):
            who = part.get("pod") or "not a local pod"
            state = "allowed" if part.get("allowed") else "denied"
            lines.append(f"  {key:<7} ({who}): {state} - {part.get('reason', '')}")
    for note in data.get("notes") or []:
        lines.append(f"  note: {note}")
    return "\n".join(lines) + "\n"


def render_policy_show(data: dict[str, Any]) -> str:
    lines = []
    for direction in ("ingress", "egress"):
        names = data.get(direction) or []
        lines.append(f"{direction}: {', '.join(str(n) for n in names) if names else '(none: default allow)'}")
    return "\n".join(lines) + "\n"
