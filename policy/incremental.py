"""Incremental policy calculation, after Felix's calculation graph: the Calculation that calc.calculate() gives
for the same inputs, kept up to date event by event, each event touching only what it affects.

State and indexes:
- pods (as the datastore says, and "effective": a pod without an address takes its local endpoint's), indexed
  by namespace and by label (only pods that can be set members: own network, an address of either family);
- policies by namespace; local endpoints by pod; each endpoint's plan (which policy chains, in order);
- *used* policy plans (referenced by at least one local endpoint) and the *active* sets they reference; only
  active sets have members, kept as counts per member string (two pods may share an address);
- active selector sets indexed by (namespace | any, required label key=value | none), so a pod event visits only
  the sets that could hold it; named-port sets by (protocol, port name);
- the budget ledger (calc.BudgetLedger): which policies are over their own or the node's budget. `policies`
  holds them as parsed; plans and problems use them as enforced (`enforced`: an over-budget one is invalid).
  A policy event that changes another policy's verdict re-plans that one too.

Events: set_namespace/delete_namespace, set_pod/delete_pod, set_policy/delete_policy, add_endpoint/
remove_endpoint, set_node_ips. `take_changes()` returns what changed since the last call: the sets touched (with
their member deltas when known) and the chains to re-render. `calculation()` builds the whole Calculation (the
property test holds it equal to calc.calculate() after every event; the dataplane's full applies use it).
Family-neutral like calc: set members and endpoint addresses of both families; the dataplane renders and
splits them per family. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from policy import names
from policy.calc import (
    DEFAULT_BUDGET,
    DIRECTIONS,
    BudgetLedger,
    Calculation,
    EndpointPlan,
    IpSetSpec,
    PolicyBudget,
    PolicyInputs,
    PolicyPlan,
    PolicyProblem,
    SetDef,
    contributes,
    default_namespace_labels,
    endpoint_plan,
    host_set,
    local_pod_ips,
    namespace_labels_of,
    over_budget,
    plan_policy,
    plan_sets,
    pod_members,
    problems_of,
    unknown_pod_warning,
    used_policies,
)
from policy.model import Policy, parse_policy
from routed.model import Endpoint, Namespace, Pod

IndexKey = tuple[Any, ...]  # (namespace | None, label key, value) or (namespace | None,)


@dataclass
class ActiveSet:
    definition: SetDef
    refs: int = 0  # used plans referencing it
    counts: dict[str, int] = field(default_factory=dict)  # member -> how many pods put it there

    @property
    def members(self) -> frozenset[str]:
        return self.definition.static_members if self.definition.static else frozenset(self.counts)


@dataclass
class Changes:
    """What changed since the last `take_changes`: sets (name -> (added, removed), or None when only a full
    comparison tells) and chain names whose rendering may differ (or that are gone)."""

    sets: dict[str, tuple[set[str], set[str]] | None] = field(default_factory=dict)
    chains: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.sets or self.chains)

    def merge(self, later: Changes) -> None:
        for name, delta in later.sets.items():
            if delta is None:
                self.sets[name] = None
            else:
                self.set_delta(name, *delta)
        self.chains |= later.chains

    def set_delta(self, name: str, added: Iterable[str], removed: Iterable[str]) -> None:
        if name in self.sets and self.sets[name] is None:
            return
        add, rem = self.sets.setdefault(name, (set(), set())) or (set(), set())
        for m in removed:
            if m in add:
                add.discard(m)
            else:
                rem.add(m)
        for m in added:
            if m in rem:
                rem.discard(m)
            else:
                add.add(m)


class PolicyEngine:
    def __init__(self, node_ips: Iterable[str] = (), budget: PolicyBudget = DEFAULT_BUDGET) -> None:
        self.ns_labels: dict[str, dict[str, str]] = {}
        self.raw_pods: dict[str, Pod] = {}
        self.pods: dict[str, Pod] = {}  # effective
        self.pods_by_ns: dict[str, set[str]] = {}
        self.pods_by_ns_label: dict[tuple[str, str, str], set[str]] = {}
        self.pods_by_port: dict[tuple[str, str], set[str]] = {}
        self.policies: dict[str, Policy] = {}  # as parsed
        self.policies_by_ns: dict[str, dict[str, Policy]] = {}
        self.ledger = BudgetLedger(budget)
        self._verdicts: set[str] = set()  # policies whose budget verdict changed: re-planned once the event is in
        self.endpoints: dict[str, Endpoint] = {}  # host_ifname -> endpoint
        self.endpoints_by_pod: dict[str, set[str]] = {}
        self.ep_plans: dict[str, EndpointPlan] = {}
        self.plans: dict[tuple[str, str], PolicyPlan] = {}  # used plans
        self.plan_users: dict[tuple[str, str], int] = {}
        self.chain_plan: dict[str, tuple[str, str]] = {}  # policy chain -> (policy key, direction)
        self.sets: dict[str, ActiveSet] = {}
        self.selector_index: dict[IndexKey, set[str]] = {}
        self.port_index: dict[tuple[str, str], set[str]] = {}
        self.node_ips: tuple[str, ...] = tuple(node_ips)
        self.changes = Changes()

    # -- loading and reading back ----------------------------------------------------------------------
    @classmethod
    def from_inputs(cls, inputs: PolicyInputs) -> PolicyEngine:
        """A whole snapshot at once: namespaces, pods and endpoints straight into the indexes (no set is active
        yet, so there is nothing to update), then each policy as an event (activating what it uses)."""
        engine = cls(inputs.node_ips, inputs.budget)
        for ns in inputs.namespaces:
            engine.ns_labels[ns.name] = namespace_labels_of(ns)
        for ep in inputs.endpoints:
            engine.endpoints[ep.host_ifname] = ep
            engine.endpoints_by_pod.setdefault(ep.pod_key, set()).add(ep.host_ifname)
        for pod in inputs.pods:
            engine.raw_pods[pod.key] = pod
        local = local_pod_ips(inputs.endpoints)
        for key, raw in engine.raw_pods.items():
            pod = raw
            if not raw.ips and key in local:
                pod = Pod(raw.namespace, raw.name, raw.labels, raw.node_name, local[key], raw.ports, raw.host_network)
            engine.pods[key] = pod
            engine._index(pod)
        for host_ifname in engine.endpoints:
            engine._refresh_endpoint(host_ifname)
        engine.changes.chains.update((names.CHAIN_FROM_DISPATCH, names.CHAIN_TO_DISPATCH))
        parsed = [parse_policy(raw) for raw in inputs.policies]
        for policy in parsed:  # every verdict first: admission in key order needs them all
            engine.ledger.take(policy, settle=False)
        for key in used_policies(parsed, (engine.pods.get(ep.pod_key) for ep in inputs.endpoints)):
            engine.ledger.use(key, settle=False)
        engine.ledger.settle()
        for policy in parsed:  # no plan is used yet: the endpoints are planned once, with every policy
            engine.policies[policy.key] = policy
            engine.policies_by_ns.setdefault(policy.namespace, {})[policy.key] = policy
        for host_ifname in engine.endpoints:
            engine._refresh_endpoint(host_ifname)
        engine._settle_verdicts()
        return engine

    def take_changes(self) -> Changes:
        changes, self.changes = self.changes, Changes()
        return changes

    def set_spec(self, name: str) -> IpSetSpec | None:
        if name == names.IPSET_HOST:
            return host_set(self.node_ips)
        active = self.sets.get(name)
        if active is None:
            return None
        d = active.definition
        return IpSetSpec(name, d.kind, active.members, d.identity)

    def calculation(self) -> Calculation:
        ipsets = {name: spec for name in sorted(self.sets) if (spec := self.set_spec(name)) is not None}
        ipsets[names.IPSET_HOST] = host_set(self.node_ips)
        plans = {plan.chain: plan for plan in self.plans.values()}
        endpoints = [self.ep_plans[h] for h in sorted(self.ep_plans)]
        return Calculation(ipsets, dict(sorted(plans.items())), endpoints, self.problems(), names.IPSET_HOST,
                           [unknown_pod_warning(ep) for ep in endpoints if ep.unknown_pod])

    def enforced(self, key: str) -> Policy:
        """The policy as enforced: as parsed, or invalid (no rules) when over budget."""
        policy = self.policies[key]
        reason = self.ledger.reason(key)
        return policy if reason is None else over_budget(policy, reason)

    def problems(self) -> list[PolicyProblem]:
        """Invalid policies (as parsed or over budget), in namespace/name order."""
        keys = sorted(self.policies, key=lambda k: (self.policies[k].namespace, self.policies[k].name))
        return problems_of(self.enforced(k) for k in keys)

    def namespace_labels(self, name: str) -> dict[str, str]:
        return self.ns_labels.get(name) or default_namespace_labels(name)

    # -- namespaces ----------------------------------------------------------------------------------------
    def set_namespace(self, ns: Namespace) -> None:
        self._namespace_changed(ns.name, namespace_labels_of(ns))

    def delete_namespace(self, name: str) -> None:
        self._namespace_changed(name, None)

    def _namespace_changed(self, name: str, labels: dict[str, str] | None) -> None:
        old = self.namespace_labels(name)
        if labels is None:
            self.ns_labels.pop(name, None)
        else:
            self.ns_labels[name] = labels
        new = self.namespace_labels(name)
        if old == new:
            return
        for set_name in self._namespace_selector_sets():
            d = self.sets[set_name].definition
            assert d.namespace_selector is not None
            if d.namespace_selector.matches(old) == d.namespace_selector.matches(new):
                continue
            for key in self.pods_by_ns.get(name, ()):
                pod = self.pods[key]
                self._apply_members(set_name, pod_members(d, pod, old), pod_members(d, pod, new))

    def _namespace_selector_sets(self) -> list[str]:
        """The active namespaceSelector sets, each once (a set with an `In` requirement of several values is
        indexed under each value)."""
        return sorted({n for key, found in self.selector_index.items() if key[0] is None for n in found})

    # -- pods ----------------------------------------------------------------------------------------------
    def set_pod(self, pod: Pod) -> None:
        self.raw_pods[pod.key] = pod
        self._refresh_pod(pod.key)
        self._settle_verdicts()

    def delete_pod(self, key: str) -> None:
        if self.raw_pods.pop(key, None) is not None:
            self._refresh_pod(key)
            self._settle_verdicts()

    def _effective(self, key: str) -> Pod | None:
        raw = self.raw_pods.get(key)
        if raw is None or raw.ips:
            return raw
        ips = local_pod_ips([self.endpoints[h] for h in self.endpoints_by_pod.get(key, ())]).get(key, ())
        if not ips:
            return raw
        return Pod(raw.namespace, raw.name, raw.labels, raw.node_name, ips, raw.ports, raw.host_network)

    def _refresh_pod(self, key: str) -> None:
        old, new = self.pods.get(key), self._effective(key)
        if old == new:
            return
        self._unindex(old)
        if new is None:
            self.pods.pop(key, None)
        else:
            self.pods[key] = new
        self._index(new)
        for set_name in self._candidate_sets(old) | self._candidate_sets(new):
            d = self.sets[set_name].definition
            before = pod_members(d, old, self.namespace_labels(old.namespace)) if old else ()
            after = pod_members(d, new, self.namespace_labels(new.namespace)) if new else ()
            self._apply_members(set_name, before, after)
        for host_ifname in self.endpoints_by_pod.get(key, ()):
            self._refresh_endpoint(host_ifname)

    def _index(self, pod: Pod | None) -> None:
        if pod is None or not contributes(pod):
            return
        key, ns = pod.key, pod.namespace
        self.pods_by_ns.setdefault(ns, set()).add(key)
        by_label = self.pods_by_ns_label
        for k, v in pod.labels.items():
            by_label.setdefault((ns, k, v), set()).add(key)
        for cp in pod.ports:
            self.pods_by_port.setdefault((cp.protocol, cp.name), set()).add(pod.key)

    def _unindex(self, pod: Pod | None) -> None:
        if pod is None or not contributes(pod):
            return
        _discard(self.pods_by_ns, pod.namespace, pod.key)
        for k, v in pod.labels.items():
            _discard(self.pods_by_ns_label, (pod.namespace, k, v), pod.key)
        for cp in pod.ports:
            _discard(self.pods_by_port, (cp.protocol, cp.name), pod.key)

    def _candidate_sets(self, pod: Pod | None) -> set[str]:
        """Active sets `pod` could be a member of (a superset; membership itself is pod_members)."""
        if pod is None or not (self.selector_index or self.port_index) or not contributes(pod):
            return set()
        out: set[str] = set()
        for scope in (pod.namespace, None):
            out |= self.selector_index.get((scope,), set())
            for k, v in pod.labels.items():
                out |= self.selector_index.get((scope, k, v), set())
        for cp in pod.ports:
            out |= self.port_index.get((cp.protocol, cp.name), set())
        return out

    # -- sets ----------------------------------------------------------------------------------------------
    def _apply_members(self, set_name: str, before: Iterable[str], after: Iterable[str]) -> None:
        before, after = tuple(before), tuple(after)
        if before == after:
            return
        counts = self.sets[set_name].counts
        added, removed = [], []
        for m in before:
            counts[m] -= 1
            if counts[m] == 0:
                del counts[m]
                removed.append(m)
        for m in after:
            counts[m] = counts.get(m, 0) + 1
            if counts[m] == 1:
                added.append(m)
        gone = [m for m in removed if m not in counts]
        fresh = [m for m in added if m not in removed]
        self.changes.set_delta(set_name, fresh, gone)

    @staticmethod
    def _index_keys(d: SetDef) -> list[IndexKey]:
        scope = d.namespace  # None: a namespaceSelector set, any namespace
        first_in = next((r for r in d.pod_selector.requirements if r.operator == "In"), None) if d.pod_selector else None
        if first_in is None:
            return [(scope,)]
        return [(scope, first_in.key, v) for v in first_in.values]

    def _ref_set(self, d: SetDef) -> None:
        active = self.sets.get(d.name)
        if active is None:
            active = self.sets[d.name] = ActiveSet(d)
            if d.named_port is not None:
                self.port_index.setdefault(d.named_port, set()).add(d.name)
                candidates: Iterable[str] = list(self.pods_by_port.get(d.named_port, ()))
            elif d.kind == "hash:ip":
                keys = self._index_keys(d)
                for index_key in keys:
                    self.selector_index.setdefault(index_key, set()).add(d.name)
                candidates = self._initial_candidates(d, keys)
            else:
                candidates = ()
            for pod_key in candidates:
                pod = self.pods[pod_key]
                for m in pod_members(d, pod, self.namespace_labels(pod.namespace)):
                    active.counts[m] = active.counts.get(m, 0) + 1
            self.changes.sets[d.name] = None  # a new set: compared in full
        active.refs += 1

    def _initial_candidates(self, d: SetDef, keys: list[IndexKey]) -> Iterable[str]:
        """The pods of the namespaces `d` may take members from, narrowed by its required label if it has one."""
        if d.namespace is not None:
            namespaces: Iterable[str] = [d.namespace]
        else:
            sel = d.namespace_selector
            namespaces = [ns for ns in self.pods_by_ns if sel is not None and sel.matches(self.namespace_labels(ns))]
        if len(keys[0]) == 3:
            return {p for ns in namespaces for key in keys for p in self.pods_by_ns_label.get((ns, key[1], key[2]), ())}
        return [p for ns in namespaces for p in self.pods_by_ns.get(ns, ())]

    def _deref_set(self, name: str) -> None:
        active = self.sets[name]
        active.refs -= 1
        if active.refs:
            return
        d = active.definition
        if d.named_port is not None:
            _discard(self.port_index, d.named_port, name)
        elif d.kind == "hash:ip":
            for key in self._index_keys(d):
                _discard(self.selector_index, key, name)
        del self.sets[name]
        self.changes.sets[name] = None

    # -- policies ----------------------------------------------------------------------------------------
    def set_policy(self, raw: dict[str, Any]) -> None:
        policy = parse_policy(raw)
        old = self.policies.get(policy.key)
        if old == policy:
            return
        self._verdicts |= self.ledger.take(policy)
        self._store_policy(policy)
        self._settle_verdicts()

    def _store_policy(self, policy: Policy) -> None:
        self.policies[policy.key] = policy
        self.policies_by_ns.setdefault(policy.namespace, {})[policy.key] = policy
        self._policy_changed(policy.namespace, policy.key)

    def delete_policy(self, key: str) -> None:
        policy = self.policies.pop(key, None)
        if policy is None:
            return
        self._verdicts |= self.ledger.remove(key)
        _discard(self.policies_by_ns, policy.namespace, key)
        self._policy_changed(policy.namespace, key)
        self._settle_verdicts()

    def _settle_verdicts(self) -> None:
        """Re-plan, where used, the policies whose budget verdict an event changed (the node's budget: another
        policy came, went or became used); runs once the event's own changes are in."""
        while self._verdicts:
            key = min(self._verdicts)
            self._verdicts.discard(key)
            if key in self.policies:
                self._policy_changed(self.policies[key].namespace, key)

    def _policy_changed(self, namespace: str, key: str) -> None:
        for direction in DIRECTIONS:  # a used plan of this policy is re-planned in place (its chain name stays)
            if (key, direction) in self.plans:
                self._replan((key, direction), direction)
        for host_ifname in self._endpoints_in(namespace):
            self._refresh_endpoint(host_ifname)

    def _endpoints_in(self, namespace: str) -> list[str]:
        return [h for h, ep in self.endpoints.items() if ep.pod_namespace == namespace]

    def _plan_for(self, policy: Policy, direction: str) -> PolicyPlan:
        return plan_policy(policy, direction, lambda d: d.name)

    def _used(self, policy_key: str) -> bool:
        return any((policy_key, d) in self.plan_users for d in DIRECTIONS)

    def _use_plan(self, policy_key: str, direction: str) -> str:
        key = (policy_key, direction)
        if not self._used(policy_key):  # the node starts using it: it counts for the node's budget
            self._verdicts |= self.ledger.use(policy_key)
        self.plan_users[key] = self.plan_users.get(key, 0) + 1
        if key not in self.plans:
            self._set_plan(key, self._plan_defs(self.enforced(policy_key), direction))
        return self.plans[key].chain

    def _plan_defs(self, policy: Policy, direction: str) -> tuple[PolicyPlan, list[SetDef]]:
        defs: list[SetDef] = []

        def define(d: SetDef) -> str:
            defs.append(d)
            return d.name

        return plan_policy(policy, direction, define), defs

    def _set_plan(self, key: tuple[str, str], planned: tuple[PolicyPlan, list[SetDef]] | None) -> None:
        """Install (or drop, None) the plan of a used policy direction; new sets are referenced before the old
        ones are released, so a set both use is never torn down."""
        old = self.plans.get(key)
        if planned is not None:
            plan, defs = planned
            by_name = {d.name: d for d in defs}
            for name in sorted(plan_sets(plan)):
                self._ref_set(by_name[name])
            self.plans[key] = plan
            self.chain_plan[plan.chain] = key
            self.changes.chains.add(plan.chain)
        else:
            self.plans.pop(key, None)
        if old is not None:
            for name in sorted(plan_sets(old)):
                self._deref_set(name)
            if planned is None:
                self.chain_plan.pop(old.chain, None)
                self.changes.chains.add(old.chain)

    def _replan(self, key: tuple[str, str], direction: str) -> None:
        if key[0] in self.policies:
            self._set_plan(key, self._plan_defs(self.enforced(key[0]), direction))
        # a deleted policy's plan goes when its last endpoint stops using it (_refresh_endpoint)

    def _unuse_plan(self, policy_key: str, direction: str) -> None:
        key = (policy_key, direction)
        self.plan_users[key] -= 1
        if self.plan_users[key] == 0:
            del self.plan_users[key]
            self._set_plan(key, None)
            if not self._used(policy_key):
                self._verdicts |= self.ledger.use(policy_key, used=False)

    # -- endpoints -----------------------------------------------------------------------------------------
    def add_endpoint(self, ep: Endpoint) -> None:
        old = self.endpoints.get(ep.host_ifname)
        if old == ep:
            return
        if old is not None:
            self.remove_endpoint(old)
        self.endpoints[ep.host_ifname] = ep
        self.endpoints_by_pod.setdefault(ep.pod_key, set()).add(ep.host_ifname)
        self.changes.chains.add(names.CHAIN_FROM_DISPATCH)
        self.changes.chains.add(names.CHAIN_TO_DISPATCH)
        self._refresh_endpoint(ep.host_ifname)
        self._refresh_pod(ep.pod_key)  # its address may become the pod's
        self._settle_verdicts()

    def remove_endpoint(self, ep: Endpoint) -> None:
        if self.endpoints.get(ep.host_ifname) is None:
            return
        del self.endpoints[ep.host_ifname]
        _discard(self.endpoints_by_pod, ep.pod_key, ep.host_ifname)
        self._drop_endpoint_plan(ep.host_ifname)
        self.changes.chains.add(names.CHAIN_FROM_DISPATCH)
        self.changes.chains.add(names.CHAIN_TO_DISPATCH)
        self._refresh_pod(ep.pod_key)
        self._settle_verdicts()

    def _refresh_endpoint(self, host_ifname: str) -> None:
        ep = self.endpoints[host_ifname]
        pod = self.pods.get(ep.pod_key)
        candidates = sorted(self.policies_by_ns.get(ep.pod_namespace, {}).values(), key=lambda p: p.name)
        new = endpoint_plan(ep, pod, candidates, lambda p, d: names.policy_chain(p.key, d))
        old = self.ep_plans.get(host_ifname)
        if old == new:
            return
        for policy_key, direction in _plan_keys(new, self.chain_plan_key_of(candidates)):
            self._use_plan(policy_key, direction)
        if old is not None:
            self._release(old)
        self.ep_plans[host_ifname] = new
        self.changes.chains.update((new.from_chain, new.to_chain))

    def chain_plan_key_of(self, policies: list[Policy]) -> dict[str, tuple[str, str]]:
        return {names.policy_chain(p.key, d): (p.key, d) for p in policies for d in DIRECTIONS}

    def _release(self, plan: EndpointPlan) -> None:
        for chain in (plan.ingress or ()) + (plan.egress or ()):
            self._unuse_plan(*self.chain_plan[chain])

    def _drop_endpoint_plan(self, host_ifname: str) -> None:
        old = self.ep_plans.pop(host_ifname, None)
        if old is not None:
            self._release(old)
            self.changes.chains.update((old.from_chain, old.to_chain))

    # -- the node ------------------------------------------------------------------------------------------
    def set_node_ips(self, ips: Iterable[str]) -> None:
        new = tuple(ips)
        if new != self.node_ips:
            old = host_set(self.node_ips).members
            self.node_ips = new
            self.changes.set_delta(names.IPSET_HOST, host_set(new).members - old, old - host_set(new).members)


def _plan_keys(plan: EndpointPlan, by_chain: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    return [by_chain[c] for c in (plan.ingress or ()) + (plan.egress or ())]


def _discard(index: dict[Any, Any], key: Any, value: str) -> None:
    found = index.get(key)
    if found is None:
        return
    if isinstance(found, dict):
        found.pop(value, None)
    else:
        found.discard(value)
    if not found:
        del index[key]
