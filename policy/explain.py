"""Why is a flow allowed or denied? Evaluated on the very rule objects and ipset members the dataplane
programs (policy.calc), not on a second implementation of the semantics.
"""

from __future__ import annotations

import ipaddress

from policy.calc import Calculator, PolicyInputs
from policy.model import EGRESS, INGRESS
from routed.api_types import PolicyExplain, PolicyShow, Verdict
from routed.model import Pod


def verdict(direction: str, pod: str | None, allowed: bool, reason: str, policy: str | None = None,
            rule_index: int | None = None) -> Verdict:
    """pod: the pod whose policies decide (None: not a pod); reason: "no policy selects -> default allow",
    "allowed by ns/name rule i", ..."""
    return Verdict(direction=direction, pod=pod, allowed=allowed, reason=reason, policy=policy, ruleIndex=rule_index)


def _resolve(calc: Calculator, who: Pod | str) -> tuple[str | None, Pod | None]:
    if isinstance(who, Pod):
        pod = calc.pods.get(who.key, who)
        ips = [ip for ip in pod.ips if ipaddress.ip_address(ip).version == 4]
        return (ips[0] if ips else None), pod
    if "/" in who and not _is_ip(who):
        known = calc.pods.get(who)
        if known is None:
            raise KeyError(f"unknown pod {who}")
        return _resolve(calc, known)
    return who, calc.pod_by_ip.get(who)


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


def explain(
    inputs: PolicyInputs, src: Pod | str, dst: Pod | str, port: int, protocol: str = "TCP"
) -> PolicyExplain:
    """src/dst: a Pod, a pod key `ns/name`, or an IP address."""
    calc = Calculator(inputs)
    protocol = protocol.upper()
    src_ip, src_pod = _resolve(calc, src)
    dst_ip, dst_pod = _resolve(calc, dst)
    notes: list[str] = []
    if src_ip is None or dst_ip is None:
        missing = "source" if src_ip is None else "destination"
        v = verdict(EGRESS, None, False, f"{missing} pod has no IPv4 address")
        return PolicyExplain(allowed=False, src=str(src_ip), dst=str(dst_ip), port=port, protocol=protocol,
                             egress=v, ingress=v, notes=[f"{missing} has no IP"])
    egress = _verdict(calc, EGRESS, src_pod, src_ip, dst_ip, port, protocol)
    if src_ip in set(inputs.node_ips):
        ingress = verdict(INGRESS, dst_pod.key if dst_pod else None, True,
                          "from this node's own address -> allowed (probes)")
    else:
        ingress = _verdict(calc, INGRESS, dst_pod, src_ip, dst_ip, port, protocol)
    if protocol == "SCTP":
        notes.append("SCTP rules are rendered; this kernel cannot carry SCTP traffic")
    return PolicyExplain(allowed=egress["allowed"] and ingress["allowed"], src=src_ip, dst=dst_ip, port=port,
                         protocol=protocol, egress=egress, ingress=ingress, notes=notes)


def policies_for(inputs: PolicyInputs, pod: Pod | str) -> PolicyShow:
    """The policies that select `pod` in each direction, in evaluation order."""
    calc = Calculator(inputs)
    _, resolved = _resolve(calc, pod)
    if resolved is None:
        return PolicyShow(ingress=[], egress=[])
    return PolicyShow(ingress=[p.key for p in calc.selecting(resolved, INGRESS)],
                      egress=[p.key for p in calc.selecting(resolved, EGRESS)])
