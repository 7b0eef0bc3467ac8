"""Prometheus view of a BgpManager: a custom collector reading `metrics_snapshot()` at scrape time.

The agent registers it once: `REGISTRY.register(BgpCollector(manager))` (routed/metrics.py's registry).
Names ending in `_total` are counters, the rest gauges; per-peer values carry a `peer` label.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

HELP = {
    "routed_bgp_ready": "1 when the BGP speaker is up (ExaBGP running, API bridge connected)",
    "routed_bgp_sessions_established": "BGP sessions in Established state",
    "routed_bgp_peers": "Configured BGP peers of this node",
    "routed_bgp_peer_established": "1 when the session to the peer is Established",
    "routed_bgp_peer_received_prefixes": "Prefixes received from the peer (before filters)",
    "routed_bgp_peer_accepted_prefixes": "Prefixes received from the peer and accepted",
    "routed_bgp_peer_advertised_prefixes": "Prefixes ExaBGP reported sent to the peer",
    "routed_bgp_peer_max_prefix_exceeded_total": "Prefixes ignored because the peer exceeded maxPrefixes",
    "routed_bgp_exabgp_starts_total": "ExaBGP process starts",
    "routed_bgp_updates_received_total": "UPDATE messages received (all peers)",
    "routed_bgp_updates_sent_total": "UPDATE messages sent (all peers)",
    "routed_bgp_routes_installed": "Kernel routes with the BGP protocol number",
    "routed_bgp_route_apply_errors_total": "Route table applies that had errors",
    "routed_bgp_config_errors": "BGPPeer/BGPConfiguration objects that failed validation for this node",
    "routed_bgp_commands_refused_total": "Lines refused by the ExaBGP command sink (control character, outside the grammar)",
    "routed_bgp_peers_refused": "Peers left out of ExaBGP's config: a value outside its grammar (see bgp status errors)",
    "routed_bgp_service_prefixes": "Service prefixes this node announces (configured CIDRs and Service /32s)",
    "routed_bfd_session_up": "1 when the BFD session to the peer is Up",
    "routed_bfd_session_downs_total": "BFD Up -> Down transitions per peer",
    "routed_bfd_packets_received_total": "BFD control packets accepted (all sessions)",
    "routed_bfd_packets_sent_total": "BFD control packets sent (all sessions)",
    "routed_bfd_packets_dropped_total": "BFD packets dropped: TTL not 255, invalid, or no matching session",
}


class _HasSnapshot(Protocol):
    def metrics_snapshot(self) -> dict[str, Any]: ...


class BgpCollector(Collector):
    def __init__(self, manager: _HasSnapshot) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        for name, value in self.manager.metrics_snapshot().items():
            counter = name.endswith("_total")
            base = name[: -len("_total")] if counter else name
            help_text = HELP.get(name, name)
            if isinstance(value, dict):
                fam: Any = (CounterMetricFamily(base, help_text, labels=["peer"]) if counter
                            else GaugeMetricFamily(name, help_text, labels=["peer"]))
                for peer, v in sorted(value.items()):
                    fam.add_metric([peer], float(v))
            else:
                fam = (CounterMetricFamily(base, help_text, value=float(value)) if counter
                       else GaugeMetricFamily(name, help_text, value=float(value)))
            yield fam
