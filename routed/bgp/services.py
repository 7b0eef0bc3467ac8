"""Service VIP advertisement (Calico's semantics): which Service prefixes this node announces, and why.

Pure: no I/O. Inputs are the BGPConfiguration's allow-lists, the cluster's Services and EndpointSlices (dicts
shaped like the Kubernetes objects) and this node's name. Output: prefix -> `Advertisement` (the advertisement
type, the Services behind it — shared IPs are reference-counted: the prefix stays while any Service needs it).

- Every node announces each configured CIDR (`serviceClusterIPs`, `serviceExternalIPs`,
  `serviceLoadBalancerIPs`), so the fabric reaches the whole range through any node.
- Per Service, a /32 (/128) for each of `spec.clusterIPs` inside an allowed ClusterIP CIDR, each of
  `spec.externalIPs` inside an allowed external CIDR, each `status.loadBalancer.ingress[].ip` inside an allowed
  LoadBalancer CIDR (never `spec.loadBalancerIP`: the IP is what the load-balancer controller assigned).
- Traffic policy `Local` (`externalTrafficPolicy` for external and LoadBalancer IPs, `internalTrafficPolicy`
  for ClusterIPs): only a node with a ready endpoint of the Service on it announces the /32; `Cluster`
  (the default): every node.
- The annotation `routed.dev/advertise: "false"` on a Service keeps all of its /32s out (the CIDRs stay).
- Headless Services (clusterIP None) have no ClusterIP to announce.
- IPv6 prefixes (/128s, IPv6 CIDRs) go out like the IPv6 pod CIDR: on every session carrying IPv6 (a separate
  IPv6 session or IPv6 over the IPv4 one), with that session's IPv6 next hop (routed/bgp/speaker.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

OPT_OUT_ANNOTATION = "routed.dev/advertise"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
KIND_CLUSTER_IP = "clusterIP"
KIND_EXTERNAL_IP = "externalIP"
KIND_LOAD_BALANCER_IP = "loadBalancerIP"
KINDS = (KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER_IP)
CONFIG_FIELDS = {KIND_CLUSTER_IP: "serviceClusterIPs", KIND_EXTERNAL_IP: "serviceExternalIPs",
                 KIND_LOAD_BALANCER_IP: "serviceLoadBalancerIPs"}  # the BGPConfiguration allow-list per type

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ServicePolicy:
    """The advertisement part of a BGPConfiguration: allowed CIDRs and communities per advertisement type."""

    cluster_ip_cidrs: tuple[str, ...] = ()
    external_ip_cidrs: tuple[str, ...] = ()
    load_balancer_ip_cidrs: tuple[str, ...] = ()
    communities: dict[str, tuple[str, ...]] = field(default_factory=dict)  # advertisement type -> communities

    def cidrs(self, kind: str) -> tuple[str, ...]:
        return {KIND_CLUSTER_IP: self.cluster_ip_cidrs, KIND_EXTERNAL_IP: self.external_ip_cidrs,
                KIND_LOAD_BALANCER_IP: self.load_balancer_ip_cidrs}[kind]

    @property
    def enabled(self) -> bool:
        return bool(self.cluster_ip_cidrs or self.external_ip_cidrs or self.load_balancer_ip_cidrs)

    def __hash__(self) -> int:
        return hash((self.cluster_ip_cidrs, self.external_ip_cidrs, self.load_balancer_ip_cidrs,
                     tuple(sorted(self.communities.items()))))


@dataclass(frozen=True)
class Advertisement:
    prefix: str
    kind: str  # clusterIP | externalIP | loadBalancerIP
    services: tuple[str, ...]  # "ns/name" of every Service behind it; () for a configured CIDR
    communities: tuple[str, ...] = ()


def _host_prefix(ip: str) -> str | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return f"{addr}/{addr.max_prefixlen}"


def _inside(ip: str, networks: Iterable[Network]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr.version == n.version and addr in n for n in networks)


def ready_nodes(slices: Iterable[dict[str, Any]]) -> dict[str, set[str]]:
    """"ns/service" -> nodes with at least one ready endpoint (a missing `ready` condition counts as ready)."""
    out: dict[str, set[str]] = {}
    for es in slices:
        meta = es.get("metadata") or {}
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service:
            continue
        key = f"{meta.get('namespace') or 'default'}/{service}"
        nodes = out.setdefault(key, set())
        for ep in es.get("endpoints") or []:
            ready = (ep.get("conditions") or {}).get("ready")
            if ready is not False and ep.get("nodeName"):
                nodes.add(str(ep["nodeName"]))
    return out


def service_ips(svc: dict[str, Any]) -> dict[str, list[str]]:
    """Advertisement type -> the Service's IPs of that type."""
    spec = svc.get("spec") or {}
    cluster = [ip for ip in (spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else []))
               if ip and ip != "None"]
    ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return {
        KIND_CLUSTER_IP: cluster,
        KIND_EXTERNAL_IP: [ip for ip in spec.get("externalIPs") or [] if ip],
        KIND_LOAD_BALANCER_IP: [i["ip"] for i in ingress if isinstance(i, dict) and i.get("ip")],
    }


def advertisements(node: str, policy: ServicePolicy, services: Iterable[dict[str, Any]],
                   slices: Iterable[dict[str, Any]]) -> dict[str, Advertisement]:
    if not policy.enabled:
        return {}
    allowed = {kind: [ipaddress.ip_network(c, strict=False) for c in policy.cidrs(kind)] for kind in KINDS}
    out: dict[str, Advertisement] = {}
    for kind in KINDS:
        for net in allowed[kind]:
            out[str(net)] = Advertisement(str(net), kind, (), policy.communities.get(kind, ()))
    local = ready_nodes(slices)
    behind: dict[str, tuple[str, set[str]]] = {}  # prefix -> (type, services)
    for svc in services:
        meta = svc.get("metadata") or {}
        if str((meta.get("annotations") or {}).get(OPT_OUT_ANNOTATION, "")).lower() == "false":
            continue
        key = f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}"
        spec = svc.get("spec") or {}
        has_local_endpoint = node in local.get(key, set())
        for kind, ips in service_ips(svc).items():
            policy_field = "internalTrafficPolicy" if kind == KIND_CLUSTER_IP else "externalTrafficPolicy"
            if spec.get(policy_field) == "Local" and not has_local_endpoint:
                continue
            for ip in ips:
                prefix = _host_prefix(ip)
                if prefix is None or not _inside(ip, allowed[kind]):
                    continue
                entry = behind.setdefault(prefix, (kind, set()))
                entry[1].add(key)
    for prefix, (kind, keys) in behind.items():
        if prefix in out:  # a /32 CIDR configured as such: the CIDR entry already covers it
            out[prefix] = Advertisement(prefix, out[prefix].kind, tuple(sorted(keys)), out[prefix].communities)
            continue
        out[prefix] = Advertisement(prefix, kind, tuple(sorted(keys)), policy.communities.get(kind, ()))
    return out
