"""Why is a flow allowed or denied? Evaluated on the very rule objects and ipset members the dataplane
programs (policy.calc), not on a second implementation of the semantics.

Both families: a flow is IPv4 or IPv6. Its family is the one asked for (`family`), else that of an address given
for either end, else IPv4 when both pods have an IPv4 address, else IPv6 when both have an IPv6 one. A pod is
resolved to its first address of the flow's family. The calculation's sets hold both families' members, so the
same rule objects decide both (the kernel's per-family sets hold exactly these members of their family).
"""

from __future__ import annotations

import ipaddress

from policy.calc import Calculator, PolicyInputs, family_ips, ip_family
from policy.model import EGRESS, INGRESS
from routed.api_types import PolicyExplain, PolicyShow, Verdict
from routed.model import Pod

FAMILIES = (4, 6)


def verdict(direction: str, pod: str | None, allowed: bool, reason: str, policy: str | None = None,
            rule_index: int | None = None) -> Verdict:
    """pod: the pod whose policies decide (None: not a pod); reason: "no policy selects -> default allow",
    "allowed by ns/name rule i", ..."""
    return Verdict(direction=direction, pod=pod, allowed=allowed, reason=reason, policy=policy, ruleIndex=rule_index)


def _lookup(calc: Calculator, who: Pod | str) -> Pod | str:
    """A Pod (as the calculation knows it), or an address (canonical text)."""
    if isinstance(who, Pod):
        return calc.pods.get(who.key, who)
    if _is_ip(who):
        return str(ipaddress.ip_address(who))
    if "/" in who:
        known = calc.pods.get(who)
        if known is None:
            raise KeyError(f"unknown pod {who}")
        return known
    raise ValueError(f"{who!r} is neither an IP address nor NS/POD")


def _resolve(calc: Calculator, who: Pod | str, family: int) -> tuple[str | None, Pod | None]:
    """(the address of the flow's family, the pod it belongs to); address None: the pod has none of it."""
    if isinstance(who, Pod):
        ips = family_ips(who.ips, family)
        return (ips[0] if ips else None), who
    if ip_family(who) != family:
        return None, calc.pod_by_ip.get(who)
    return who, calc.pod_by_ip.get(who)


def flow_family(src: Pod | str, dst: Pod | str, family: int | None = None) -> int:
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"family must be 4 or 6, got {family!r}")
        return family
    for end in (src, dst):
        if isinstance(end, str):
            return ip_family(end)
    assert isinstance(src, Pod) and isinstance(dst, Pod)
    for candidate in FAMILIES:
        if family_ips(src.ips, candidate) and family_ips(dst.ips, candidate):
            return candidate
    return 4


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _verdict(
    calc: Calculator, direction: str, pod: Pod | None, src: str, dst: str, port: int, protocol: str
) -> Verdict:
    if pod is None:
        return verdict(direction, None, True, "not a pod: not policed here")
    if pod.host_network:
        return verdict(direction, pod.key, True, "hostNetwork pod: NetworkPolicy does not apply")
    selecting = calc.selecting(pod, direction)
    if not selecting:
        return verdict(direction, pod.key, True, "no policy selects -> default allow")
    for policy in selecting:
        plan = calc.plan(policy, direction)
        for rm in plan.rules:
            if rm.matches(direction, src, dst, protocol, port, calc.sets):
                return verdict(direction, pod.key, True, f"allowed by {policy.key} rule {rm.rule_index}",
                               policy.key, rm.rule_index)
    keys = ", ".join(p.key for p in selecting)
    invalid = [p.key for p in selecting if not p.valid]
    reason = f"selected by {keys} but no rule matches -> default deny"
    if invalid:
        reason += f" (invalid, failing closed: {', '.join(invalid)})"
    return verdict(direction, pod.key, False, reason)


def _missing(end: str, ref: Pod | str, family: int) -> str:
    if isinstance(ref, Pod):
        return f"{end} pod {ref.key} has no IPv{family} address"
    return f"{end} {ref} is not an IPv{family} address (the flow is IPv{family})"


def _unresolved(reason: str, src_ip: str | None, dst_ip: str | None, port: int, protocol: str) -> PolicyExplain:
    v = verdict(EGRESS, None, False, reason)
    return PolicyExplain(allowed=False, src=str(src_ip), dst=str(dst_ip), port=port, protocol=protocol,
                         egress=v, ingress=v, notes=[reason])


def explain(
    inputs: PolicyInputs, src: Pod | str, dst: Pod | str, port: int, protocol: str = "TCP",
    family: int | None = None,
) -> PolicyExplain:
    """src/dst: a Pod, a pod key `ns/name`, or an IP address (either family); family: 4, 6 or None (see above)."""
    calc = Calculator(inputs)
    protocol = protocol.upper()
    src_ref, dst_ref = _lookup(calc, src), _lookup(calc, dst)
    fam = flow_family(src_ref, dst_ref, family)
    src_ip, src_pod = _resolve(calc, src_ref, fam)
    dst_ip, dst_pod = _resolve(calc, dst_ref, fam)
    if src_ip is None or dst_ip is None:
        reason = _missing("source", src_ref, fam) if src_ip is None else _missing("destination", dst_ref, fam)
        return _unresolved(reason, src_ip, dst_ip, port, protocol)
    egress = _verdict(calc, EGRESS, src_pod, src_ip, dst_ip, port, protocol)
    if src_ip in {str(ipaddress.ip_address(ip)) for ip in inputs.node_ips if _is_ip(ip)}:
        ingress = verdict(INGRESS, dst_pod.key if dst_pod else None, True,
                          "from this node's own address -> allowed (probes)")
    else:
        ingress = _verdict(calc, INGRESS, dst_pod, src_ip, dst_ip, port, protocol)
    notes: list[str] = []
    if fam == 6:
        notes.append("IPv6 flow")
    if protocol == "SCTP":
        notes.append("SCTP rules are rendered; this kernel cannot carry SCTP traffic")
    return PolicyExplain(allowed=egress["allowed"] and ingress["allowed"], src=src_ip, dst=dst_ip, port=port,
                         protocol=protocol, egress=egress, ingress=ingress, notes=notes)


def policies_for(inputs: PolicyInputs, pod: Pod | str) -> PolicyShow:
    """The policies that select `pod` in each direction, in evaluation order."""
    calc = Calculator(inputs)
    ref = _lookup(calc, pod)
    resolved = ref if isinstance(ref, Pod) else calc.pod_by_ip.get(ref)
    if resolved is None:
        return PolicyShow(ingress=[], egress=[])
    return PolicyShow(ingress=[p.key for p in calc.selecting(resolved, INGRESS)],
                      egress=[p.key for p in calc.selecting(resolved, EGRESS)])
