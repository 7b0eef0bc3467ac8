"""Calculation -> iptables rules (filter table) of one IP family, each with a deterministic hash comment.

Layout (Felix-style), the same chains (same names) in each family's own table:
  FORWARD -> rtd-FORWARD: conntrack INVALID drop / ESTABLISHED accept, then from-workload dispatch
             (by input interface) and to-workload dispatch (by output interface), then ACCEPT.
  INPUT   -> rtd-INPUT: the same from-workload dispatch for traffic a pod sends to the node.
  dispatch chains end in DROP: an `rtd+` interface without chains carries nothing (fail closed).
  per endpoint: rtd-fw-* (anti-spoofing, egress policies), rtd-tw-* (ingress policies);
  per policy direction: rtd-pi-* / rtd-pe-*, whose rules set the accept mark: one rule per port alternative of
  each NetworkPolicy rule (calc.RuleMatch), the peer matched by one set (a selector set, the rule's ipBlock set,
  or the list:set of those), so a rule's cost is the sum of its peers and ports, never their product.

One code path for both families, parameterised by `family` (4 gives exactly the IPv4-only output): rules name
each set by its family's kernel name (names.family_ipset_name), anti-spoofing is /32 or /128 over the pod's
addresses of that family (none: every packet of that family from the pod is dropped as spoofed), and the IPv6
fixed chains accept the ICMPv6 that RFC 4890 says must not be dropped, before conntrack and the dispatch:
  rtd-INPUT:   neighbour discovery (133-137) and MLD (130-132, 143) from `rtd+` (link-local: a pod resolves its
               gateway fe80::1 on the host veth), and the error messages 1-4;
  rtd-FORWARD: the error messages 1-4 (destination unreachable, packet too big, time exceeded, parameter
               problem) from and to `rtd+`.
  Neighbour discovery and MLD are not accepted in FORWARD: they are link-local (hop limit 255 / 1), a forwarded
  one is discarded by its receiver anyway (RFC 4890 4.3.3), and accepting them would open an unpoliced channel.
  The errors go ahead of conntrack because one whose flow conntrack does not know (an asymmetric path, an
  expired entry) is INVALID to it and would be dropped; the price: a pod can send those four error types past
  its egress policy and anti-spoofing. Echo request/reply stay under policy (like every other protocol).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from policy import names
from policy.calc import Calculation, EndpointPlan, PolicyPlan, PortMatch, RuleMatch, family_ips, run_text
from policy.incremental import PolicyEngine

ACCEPT_MARK = 0x40000
SPOOF_OK_MARK = 0x80000
IF_WILDCARD = "rtd+"
HOOKS = {"FORWARD": names.CHAIN_FORWARD, "INPUT": names.CHAIN_INPUT}
HOST_PREFIX = {4: 32, 6: 128}
ICMPV6_ERRORS = (1, 2, 3, 4)  # destination unreachable, packet too big, time exceeded, parameter problem
ICMPV6_LINK_LOCAL = (133, 134, 135, 136, 137, 130, 131, 132, 143)  # RS, RA, NS, NA, redirect; MLD query/report/done/v2


@dataclass(frozen=True)
class RenderOptions:
    deny_log: bool = False
    log_mode: str = "nflog"  # nflog | log
    nflog_group: int = 100


@dataclass(frozen=True)
class RenderedRule:
    hash: str
    body: str

    def line(self, chain: str) -> str:
        return f"-A {chain} -m comment --comment {names.COMMENT_PREFIX}{self.hash} {self.body}"


@dataclass
class Ruleset:
    chains: dict[str, list[RenderedRule]] = field(default_factory=dict)  # our chains, in order
    hooks: dict[str, RenderedRule] = field(default_factory=dict)  # built-in chain -> rule at position 1

    def rule_count(self) -> int:
        return sum(len(r) for r in self.chains.values()) + len(self.hooks)


def hash_rules(chain: str, bodies: list[str]) -> list[RenderedRule]:
    out: list[RenderedRule] = []
    previous = ""
    for body in bodies:
        h = names.rule_hash(chain, previous, body)
        out.append(RenderedRule(h, body))
        previous = h
    return out


def _mark(value: int) -> str:
    return f"0x{value:x}/0x{value:x}"


def _port_parts(pm: PortMatch, family: int) -> list[str]:
    proto = pm.protocol.lower()
    parts = [f"-p {proto}"]
    if pm.named_port_set:
        parts.append(f"-m set --match-set {names.family_ipset_name(pm.named_port_set, family)} dst,dst")
    elif pm.port_set:
        parts.append(f"-m set --match-set {names.family_ipset_name(pm.port_set, family)} dst")
    elif len(pm.ranges) == 1:
        parts.append(f"-m {proto} --dport {run_text(*pm.ranges[0], sep=':')}")
    elif pm.ranges:
        parts.append(f"-m multiport --dports {','.join(run_text(lo, hi, sep=':') for lo, hi in pm.ranges)}")
    return parts


def policy_rules(direction: str, rm: RuleMatch, family: int = 4) -> list[str]:
    """One NetworkPolicy rule: a rule per port alternative (one when any port), each matching the peer set."""
    peer: list[str] = []
    if rm.peer_set:
        peer_set = names.family_ipset_name(rm.peer_set, family)
        peer.append(f"-m set --match-set {peer_set} {'src' if direction == 'Ingress' else 'dst'}")
    accept = f"-j MARK --set-xmark {_mark(ACCEPT_MARK)}"
    if rm.ports is None:
        return [" ".join([*peer, accept])]
    out = []
    for pm in rm.ports:
        parts = _port_parts(pm, family)
        out.append(" ".join([parts[0], *peer, *parts[1:], accept]))  # protocol, peer, port: as before
    return out


def _deny(opts: RenderOptions, ep: EndpointPlan, what: str) -> list[str]:
    rules: list[str] = []
    if opts.deny_log:
        tag = f"rtd {what} {ep.host_ifname} "
        if opts.log_mode == "log":
            rules.append(f'-j LOG --log-prefix "{tag[:28]}"')
        else:
            prefix = f"rtd {what} {ep.host_ifname} {ep.pod_key}"[:60]
            rules.append(f'-j NFLOG --nflog-group {opts.nflog_group} --nflog-prefix "{prefix}"')
    rules.append("-j DROP")
    return rules


def _policy_jumps(chains: tuple[str, ...] | None, opts: RenderOptions, ep: EndpointPlan, what: str) -> list[str]:
    if chains is None:  # no policy selects the pod in this direction: allowed
        return ["-j RETURN"]
    rules: list[str] = []
    for chain in chains:
        rules.append(f"-j {chain}")
        rules.append(f"-m mark --mark {_mark(ACCEPT_MARK)} -j RETURN")
    return rules + _deny(opts, ep, what)


def anti_spoofing(ep: EndpointPlan, opts: RenderOptions, family: int = 4) -> list[str]:
    """The source must be one of the pod's own addresses of this family; a pod without one: every packet of the
    family is dropped (the mark check never passes)."""
    ips, plen = family_ips(ep.ips, family), HOST_PREFIX[family]
    if len(ips) == 1:
        return [f"! -s {ips[0]}/{plen} {r}" for r in _deny(opts, ep, "SPOOF")]
    rules = [f"-s {ip}/{plen} -j MARK --set-xmark {_mark(SPOOF_OK_MARK)}" for ip in ips]
    return rules + [f"-m mark --mark 0x0/0x{SPOOF_OK_MARK:x} {r}" for r in _deny(opts, ep, "SPOOF")]


def from_workload(ep: EndpointPlan, opts: RenderOptions, family: int = 4) -> list[str]:
    rules = [f"-j MARK --set-xmark 0x0/0x{ACCEPT_MARK | SPOOF_OK_MARK:x}"]
    rules += anti_spoofing(ep, opts, family)
    return rules + _policy_jumps(ep.egress, opts, ep, "DENY-E")


def to_workload(ep: EndpointPlan, opts: RenderOptions) -> list[str]:
    return [f"-j MARK --set-xmark 0x0/0x{ACCEPT_MARK:x}"] + _policy_jumps(ep.ingress, opts, ep, "DENY-I")


def icmpv6_accepts(direction: str, types: tuple[int, ...]) -> list[str]:
    """direction: '-i' (from pods) or '-o' (to pods)."""
    return [f"{direction} {IF_WILDCARD} -p icmpv6 -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in types]


def icmpv6_rules() -> dict[str, list[str]]:
    """The ICMPv6 accepted ahead of conntrack and the dispatch in the IPv6 fixed chains (RFC 4890)."""
    return {
        names.CHAIN_FORWARD: icmpv6_accepts("-i", ICMPV6_ERRORS) + icmpv6_accepts("-o", ICMPV6_ERRORS),
        names.CHAIN_INPUT: icmpv6_accepts("-i", ICMPV6_LINK_LOCAL) + icmpv6_accepts("-i", ICMPV6_ERRORS),
    }


def fixed_chains(family: int = 4) -> dict[str, list[str]]:
    """The chains hooked from the built-in ones (they never change); IPv6 first accepts the ICMPv6 it must."""
    chains = _fixed_chains()
    if family == 6:
        chains = {chain: icmpv6_rules()[chain] + rules for chain, rules in chains.items()}
    return chains


def _fixed_chains() -> dict[str, list[str]]:
    w = IF_WILDCARD
    return {
        names.CHAIN_FORWARD: [
            f"-i {w} -m conntrack --ctstate INVALID -j DROP",
            f"-o {w} -m conntrack --ctstate INVALID -j DROP",
            f"-i {w} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-o {w} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-i {w} -j {names.CHAIN_FROM_DISPATCH}",
            f"-o {w} -j {names.CHAIN_TO_DISPATCH}",
            f"-i {w} -j ACCEPT",
            f"-o {w} -j ACCEPT",
        ],
        names.CHAIN_INPUT: [
            f"-i {w} -m conntrack --ctstate INVALID -j DROP",
            f"-i {w} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-i {w} -j {names.CHAIN_FROM_DISPATCH}",
        ],
    }


def dispatch_chains(endpoints: list[EndpointPlan], host_set: str) -> dict[str, list[str]]:
    """Interface -> endpoint chain, for every local endpoint (sorted by interface); unknown `rtd+` interfaces
    end in DROP (fail closed)."""
    w = IF_WILDCARD
    return {
        names.CHAIN_FROM_DISPATCH: [f"-i {ep.host_ifname} -g {ep.from_chain}" for ep in endpoints] + [f"-i {w} -j DROP"],
        names.CHAIN_TO_DISPATCH: ([f"-m set --match-set {host_set} src -j RETURN"]
                                  + [f"-o {ep.host_ifname} -g {ep.to_chain}" for ep in endpoints]
                                  + [f"-o {w} -j DROP"]),
    }


def endpoint_chains(ep: EndpointPlan, opts: RenderOptions, family: int = 4) -> dict[str, list[str]]:
    return {ep.from_chain: from_workload(ep, opts, family), ep.to_chain: to_workload(ep, opts)}


def policy_chain_rules(plan: PolicyPlan, family: int = 4) -> list[str]:
    return [rule for rm in plan.rules for rule in policy_rules(plan.direction, rm, family)]


def hooks() -> dict[str, RenderedRule]:
    return {builtin: hash_rules(builtin, [f"-j {target}"])[0] for builtin, target in HOOKS.items()}


def render(calc: Calculation, opts: RenderOptions | None = None, family: int = 4) -> Ruleset:
    """The whole ruleset of one family's filter table."""
    opts = opts or RenderOptions()
    bodies = fixed_chains(family) | dispatch_chains(calc.endpoints, names.family_ipset_name(calc.host_set, family))
    for ep in calc.endpoints:
        bodies |= endpoint_chains(ep, opts, family)
    for chain, plan in calc.policies.items():
        bodies[chain] = policy_chain_rules(plan, family)
    return Ruleset({chain: hash_rules(chain, rules) for chain, rules in bodies.items()}, hooks())


def render_chains(engine: PolicyEngine, chains: Iterable[str], opts: RenderOptions,
                  family: int = 4) -> dict[str, list[RenderedRule] | None]:
    """Just these chains of the engine's current state in one family (None: the chain should not exist any more)."""
    wanted = set(chains)
    out: dict[str, list[str] | None] = {c: None for c in wanted}
    if wanted & {names.CHAIN_FROM_DISPATCH, names.CHAIN_TO_DISPATCH}:
        ordered = [engine.ep_plans[h] for h in sorted(engine.ep_plans)]
        host = names.family_ipset_name(names.IPSET_HOST, family)
        out |= {c: r for c, r in dispatch_chains(ordered, host).items() if c in wanted}
    for ep in engine.ep_plans.values():
        if ep.from_chain in wanted or ep.to_chain in wanted:
            out |= {c: r for c, r in endpoint_chains(ep, opts, family).items() if c in wanted}
    for chain in wanted:
        key = engine.chain_plan.get(chain)
        if key is not None and key in engine.plans:
            out[chain] = policy_chain_rules(engine.plans[key], family)
    return {c: (hash_rules(c, r) if r is not None else None) for c, r in out.items()}


def drop_rule_chains(calc: Calculation) -> dict[str, tuple[str, str]]:
    """pod key -> (from-workload chain, to-workload chain): their DROP counters are the drop metric."""
    return {ep.pod_key: (ep.from_chain, ep.to_chain) for ep in calc.endpoints}
