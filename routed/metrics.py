"""Prometheus metrics of the agent, in one registry served by routed/health.py."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

CNI_REQUESTS = Counter(
    "routed_cni_requests", "CNI requests handled by the agent", ["command", "result"], registry=REGISTRY
)
CNI_SECONDS = Histogram(
    "routed_cni_request_seconds",
    "Agent-side time to serve a CNI request",
    ["command"],
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
    registry=REGISTRY,
)
ENDPOINTS = Gauge("routed_endpoints", "Pod interfaces wired on this node", registry=REGISTRY)
READY = Gauge("routed_ready", "1 when the agent is ready", registry=REGISTRY)
DATASTORE_SYNCED = Gauge("routed_datastore_synced", "1 once the datastore's first listing is in", registry=REGISTRY)
DATASTORE_OBJECTS = Gauge("routed_datastore_objects", "Objects in the cluster cache", ["kind"], registry=REGISTRY)
POLICY_SYNC_SECONDS = Histogram(
    "routed_policy_sync_seconds",
    "Time to compute and apply the policy dataplane",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
POLICY_SYNC_FAILURES = Counter("routed_policy_sync_failures", "Failed policy applies", registry=REGISTRY)
POLICY_INVALID = Gauge("routed_policy_invalid", "NetworkPolicies that failed validation", registry=REGISTRY)
POLICY_RULES = Gauge("routed_policy_iptables_rules", "iptables rules owned by the agent", registry=REGISTRY)
POLICY_IPSETS = Gauge("routed_policy_ipsets", "ipsets owned by the agent", registry=REGISTRY)
POLICY_DROPS = Gauge(
    "routed_policy_dropped_packets", "Packets dropped by policy per endpoint", ["endpoint"], registry=REGISTRY
)
