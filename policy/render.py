"""Calculation -> iptables rules (filter table), each with a deterministic hash comment.

Layout (Felix-style):
  FORWARD -> rtd-FORWARD: conntrack INVALID drop / ESTABLISHED accept, then from-workload dispatch
             (by input interface) and to-workload dispatch (by output interface), then ACCEPT.
  INPUT   -> rtd-INPUT: the same from-workload dispatch for traffic a pod sends to the node.
  dispatch chains end in DROP: an `rtd+` interface without chains carries nothing (fail closed).
  per endpoint: rtd-fw-* (anti-spoofing, egress policies), rtd-tw-* (ingress policies);
  per policy direction: rtd-pi-* / rtd-pe-*, whose rules set the accept mark.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from policy import names
from policy.calc import Calculation, EndpointPlan, PolicyPlan, RuleMatch
from policy.incremental import PolicyEngine

ACCEPT_MARK = 0x40000
SPOOF_OK_MARK = 0x80000
IF_WILDCARD = "rtd+"
HOOKS = {"FORWARD": names.CHAIN_FORWARD, "INPUT": names.CHAIN_INPUT}


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


def policy_rule(direction: str, rm: RuleMatch) -> str:
    parts: list[str] = []
    if rm.protocol:
        parts.append(f"-p {rm.protocol.lower()}")
    if rm.peer_set:
        parts.append(f"-m set --match-set {rm.peer_set} {'src' if direction == 'Ingress' else 'dst'}")
    if rm.named_port_set:
        parts.append(f"-m set --match-set {rm.named_port_set} dst,dst")
    if rm.port is not None and rm.protocol:
        port = f"{rm.port}:{rm.end_port}" if rm.end_port else str(rm.port)
        parts.append(f"-m {rm.protocol.lower()} --dport {port}")
    parts.append(f"-j MARK --set-xmark {_mark(ACCEPT_MARK)}")
    return " ".join(parts)


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


def from_workload(ep: EndpointPlan, opts: RenderOptions) -> list[str]:
    rules = [f"-j MARK --set-xmark 0x0/0x{ACCEPT_MARK | SPOOF_OK_MARK:x}"]
    # Anti-spoofing: the source must be one of the pod's own addresses.
    if len(ep.ips) == 1:
        rules += [f"! -s {ep.ips[0]}/32 {r}" for r in _deny(opts, ep, "SPOOF")]
    else:
        rules += [f"-s {ip}/32 -j MARK --set-xmark {_mark(SPOOF_OK_MARK)}" for ip in ep.ips]
        rules += [f"-m mark --mark 0x0/0x{SPOOF_OK_MARK:x} {r}" for r in _deny(opts, ep, "SPOOF")]
    return rules + _policy_jumps(ep.egress, opts, ep, "DENY-E")


def to_workload(ep: EndpointPlan, opts: RenderOptions) -> list[str]:
    return [f"-j MARK --set-xmark 0x0/0x{ACCEPT_MARK:x}"] + _policy_jumps(ep.ingress, opts, ep, "DENY-I")


def fixed_chains() -> dict[str, list[str]]:
    """The chains hooked from the built-in ones (they never change)."""
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


def endpoint_chains(ep: EndpointPlan, opts: RenderOptions) -> dict[str, list[str]]:
    return {ep.from_chain: from_workload(ep, opts), ep.to_chain: to_workload(ep, opts)}


def policy_chain_rules(plan: PolicyPlan) -> list[str]:
    return [policy_rule(plan.direction, rm) for rm in plan.rules]


def hooks() -> dict[str, RenderedRule]:
    return {builtin: hash_rules(builtin, [f"-j {target}"])[0] for builtin, target in HOOKS.items()}


def render(calc: Calculation, opts: RenderOptions | None = None) -> Ruleset:
    opts = opts or RenderOptions()
    bodies = fixed_chains() | dispatch_chains(calc.endpoints, calc.host_set)
    for ep in calc.endpoints:
        bodies |= endpoint_chains(ep, opts)
    for chain, plan in calc.policies.items():
        bodies[chain] = policy_chain_rules(plan)
    return Ruleset({chain: hash_rules(chain, rules) for chain, rules in bodies.items()}, hooks())


def render_chains(engine: PolicyEngine, chains: Iterable[str], opts: RenderOptions) -> dict[str, list[RenderedRule] | None]:
    """Just these chains of the engine's current state (None: the chain should not exist any more)."""
    wanted = set(chains)
    out: dict[str, list[str] | None] = {c: None for c in wanted}
    if wanted & {names.CHAIN_FROM_DISPATCH, names.CHAIN_TO_DISPATCH}:
        ordered = [engine.ep_plans[h] for h in sorted(engine.ep_plans)]
        out |= {c: r for c, r in dispatch_chains(ordered, names.IPSET_HOST).items() if c in wanted}
    for ep in engine.ep_plans.values():
        if ep.from_chain in wanted or ep.to_chain in wanted:
            out |= {c: r for c, r in endpoint_chains(ep, opts).items() if c in wanted}
    for chain in wanted:
        key = engine.chain_plan.get(chain)
        if key is not None and key in engine.plans:
            out[chain] = policy_chain_rules(engine.plans[key])
    return {c: (hash_rules(c, r) if r is not None else None) for c, r in out.items()}


def drop_rule_chains(calc: Calculation) -> dict[str, tuple[str, str]]:
    """pod key -> (from-workload chain, to-workload chain): their DROP counters are the drop metric."""
    return {ep.pod_key: (ep.from_chain, ep.to_chain) for ep in calc.endpoints}
