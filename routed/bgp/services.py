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
- Every IP and CIDR passes routed/validation.py first: an invalid one (a scope ID, whitespace, not an IP) is
  left out and named with its Service in `problems`; the Service's other IPs and every other Service stay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from routed import validation

OPT_OUT_ANNOTATION = "routed.dev/advertise"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
KIND_CLUSTER_IP = "clusterIP"
KIND_EXTERNAL_IP = "externalIP"
KIND_LOAD_BALANCER_IP = "loadBalancerIP"
KINDS = (KIND_CLUSTER_IP, KIND_EXTERNAL_IP, KIND_LOAD_BALANCER_IP)
CONFIG_FIELDS = {KIND_CLUSTER_IP: "serviceClusterIPs", KIND_EXTERNAL_IP: "serviceExternalIPs",
                 KIND_LOAD_BALANCER_IP: "serviceLoadBalancerIPs"}  # the BGPConfiguration allow-list per type

Network = validation.Network


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


def _inside(addr: validation.Address, networks: Iterable[Network]) -> bool:
    return any(addr.version == n.version and addr in n for n in networks)


def _allowed(policy: ServicePolicy, kind: str, problems: list[str]) -> list[Network]:
    out = []
    for i, cidr in enumerate(policy.cidrs(kind)):
        try:
            out.append(validation.network(cidr, f"BGPConfiguration {CONFIG_FIELDS[kind]}[{i}]"))
        except validation.InvalidValue as e:
            problems.append(f"{e.msg}; not announced")
    return out


def ready_nodes(slices: Iterable[dict[str, Any]]) -> dict[str, set[str]]:
    """"ns/service" -> nodes with at least one ready endpoint (a missing `ready` condition counts as ready)."""
    out: dict[str, set[str]] = {}
    for es in slices:
        try:
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
        except (AttributeError, TypeError):  # a malformed slice (manifest datastore) counts for nothing
            continue
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


def _service_prefixes(node: str, svc: dict[str, Any], allowed: dict[str, list[Network]],
                      local: dict[str, set[str]], problems: list[str]) -> list[tuple[str, str, str]]:
    """(prefix, type, "ns/name") for each IP of the Service this node announces."""
    meta = svc.get("metadata") or {}
    if str((meta.get("annotations") or {}).get(OPT_OUT_ANNOTATION, "")).lower() == "false":
        return []
    key = f"{meta.get('namespace') or 'default'}/{meta.get('name', '')}"
    spec = svc.get("spec") or {}
    has_local_endpoint = node in local.get(key, set())
    out = []
    for kind, ips in service_ips(svc).items():
        policy_field = "internalTrafficPolicy" if kind == KIND_CLUSTER_IP else "externalTrafficPolicy"
        if spec.get(policy_field) == "Local" and not has_local_endpoint:
            continue
        for ip in ips:
            try:
                addr = validation.address(ip, f"Service {validation.display_name(key)}: {_IP_FIELDS[kind]}")
            except validation.InvalidValue as e:
                problems.append(f"{e.msg}; not announced")
                continue
            if _inside(addr, allowed[kind]):
                out.append((f"{addr}/{addr.max_prefixlen}", kind, key))
    return out


_IP_FIELDS = {KIND_CLUSTER_IP: "spec.clusterIPs", KIND_EXTERNAL_IP: "spec.externalIPs",
              KIND_LOAD_BALANCER_IP: "status.loadBalancer.ingress[].ip"}


def advertisements(node: str, policy: ServicePolicy, services: Iterable[dict[str, Any]],
                   slices: Iterable[dict[str, Any]], problems: list[str] | None = None) -> dict[str, Advertisement]:
    """prefix -> Advertisement; an invalid IP or CIDR is skipped and named in `problems` (when given)."""
    if not policy.enabled:
        return {}
    problems = [] if problems is None else problems
    allowed = {kind: _allowed(policy, kind, problems) for kind in KINDS}
    out: dict[str, Advertisement] = {}
    for kind in KINDS:
        for net in allowed[kind]:
            out[str(net)] = Advertisement(str(net), kind, (), policy.communities.get(kind, ()))
    local = ready_nodes(slices)
    behind: dict[str, tuple[str, set[str]]] = {}  # prefix -> (type, services)
    for svc in services:
        try:
            wanted = _service_prefixes(node, svc, allowed, local, problems)
        except (AttributeError, TypeError, KeyError) as e:  # malformed (manifest datastore): only it is left out
            meta = svc.get("metadata") if isinstance(svc, dict) else None
            name = f"{meta.get('namespace')}/{meta.get('name')}" if isinstance(meta, dict) else "<unnamed>"
            problems.append(f"Service {validation.display_name(name)}: malformed ({type(e).__name__}); not announced")
            continue
        for prefix, kind, key in wanted:
            entry = behind.setdefault(prefix, (kind, set()))
            entry[1].add(key)
    for prefix, (kind, keys) in behind.items():
        if prefix in out:  # a /32 CIDR configured as such: the CIDR entry already covers it
            out[prefix] = Advertisement(prefix, out[prefix].kind, tuple(sorted(keys)), out[prefix].communities)
            continue
        out[prefix] = Advertisement(prefix, kind, tuple(sorted(keys)), policy.communities.get(kind, ()))
    return out
