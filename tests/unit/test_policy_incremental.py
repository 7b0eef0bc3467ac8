"""The incremental calculation (policy/incremental.py) against the full one (policy/calc.py), the reference:
random event sequences over a small universe (namespaces, pods sharing addresses, local endpoints, policies with
selectors, namespace selectors, ipBlocks, named ports, invalid specs); after every event the incremental
Calculation equals calculate() of the same inputs, and the changes it reports cover every difference."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from policy.calc import Calculation, PolicyBudget, PolicyInputs, calculate
from policy.incremental import Changes, PolicyEngine
from policy.names import FAMILIES
from policy.render import RenderOptions, render, render_chains
from routed.model import ContainerPort, Endpoint, Namespace, Pod

NAMESPACES = ("a", "b", "c")
POD_NAMES = ("p1", "p2", "p3", "p4")
LABEL_VALUES = ("x", "y")
IPS = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "fd00::1", "fd00::2")  # few: pods share addresses
ENDPOINTS = ("rtd00000000001", "rtd00000000002", "rtd00000000003")

labels = st.dictionaries(st.sampled_from(("app", "tier", "env")), st.sampled_from(LABEL_VALUES), max_size=2)
selector = st.one_of(
    st.just({}),
    st.builds(lambda k, v: {"matchLabels": {k: v}}, st.sampled_from(("app", "tier", "env")), st.sampled_from(LABEL_VALUES)),
    st.builds(lambda k, vs, op: {"matchExpressions": [{"key": k, "operator": op, "values": list(vs)}]},
              st.sampled_from(("app", "tier")), st.sets(st.sampled_from(LABEL_VALUES), min_size=1),
              st.sampled_from(("In", "NotIn"))),
    st.builds(lambda k: {"matchExpressions": [{"key": k, "operator": "Exists"}]}, st.sampled_from(("app", "env"))),
)
peer = st.one_of(
    st.builds(lambda s: {"podSelector": s}, selector),
    st.builds(lambda s: {"namespaceSelector": s}, selector),
    st.builds(lambda a, b: {"namespaceSelector": a, "podSelector": b}, selector, selector),
    st.builds(lambda c, e: {"ipBlock": {"cidr": c, "except": e}}, st.sampled_from(("10.0.0.0/24", "0.0.0.0/0", "fd00::/64")),
              st.sampled_from(([], ["10.0.0.2/32"]))),
    st.sampled_from(({"ipBlock": {"cidr": "::/0", "except": ["fd00::2/128"]}}, {"ipBlock": {"cidr": "fd00::/120"}})),
)
port = st.one_of(st.builds(lambda p: {"port": p}, st.sampled_from((80, 81))),
                 st.builds(lambda n: {"port": n, "protocol": "TCP"}, st.sampled_from(("web", "alt"))),
                 st.just({"protocol": "UDP"}))


def _rule(peer_key: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda peers, ports: {**({peer_key: peers} if peers is not None else {}),
                                           **({"ports": ports} if ports is not None else {})},
                     st.none() | st.lists(peer, max_size=2), st.none() | st.lists(port, max_size=2))


policy_spec = st.builds(
    lambda sel, ingress, egress, types, broken: {
        "podSelector": {"matchLabels": {"bad key!": "x"}} if broken else sel,
        **({"ingress": ingress} if ingress is not None else {}),
        **({"egress": egress} if egress is not None else {}),
        **({"policyTypes": types} if types else {}),
    },
    selector, st.none() | st.lists(_rule("from"), max_size=2), st.none() | st.lists(_rule("to"), max_size=2),
    st.sampled_from(([], ["Ingress"], ["Egress"], ["Ingress", "Egress"])),
    st.sampled_from((False, False, False, True)),
)
WEB, ALT = ContainerPort(8080, "TCP", "web"), ContainerPort(9090, "TCP", "alt")
pod_event = st.builds(
    lambda ns, name, lbl, ips, host, ports: ("pod", Pod(ns, name, lbl, "n", ips, ports, host)),
    st.sampled_from(NAMESPACES), st.sampled_from(POD_NAMES), labels,
    st.sampled_from(((), (IPS[0],), (IPS[1],), (IPS[2],), (IPS[3], IPS[4]), (IPS[0], IPS[1]), (IPS[5],),
                     (IPS[2], IPS[5]))),
    st.sampled_from((False, False, False, True)),
    st.sampled_from(((), (WEB,), (WEB, ALT))),
)
events = st.one_of(
    pod_event,
    st.builds(lambda ns, name: ("del_pod", f"{ns}/{name}"), st.sampled_from(NAMESPACES), st.sampled_from(POD_NAMES)),
    st.builds(lambda ns, lbl: ("ns", Namespace(ns, lbl)), st.sampled_from(NAMESPACES), labels),
    st.builds(lambda ns: ("del_ns", ns), st.sampled_from(NAMESPACES)),
    st.builds(lambda ns, name, spec: ("policy", {"metadata": {"name": name, "namespace": ns}, "spec": spec}),
              st.sampled_from(NAMESPACES), st.sampled_from(("q1", "q2", "q3")), policy_spec),
    st.builds(lambda ns, name: ("del_policy", f"{ns}/{name}"), st.sampled_from(NAMESPACES), st.sampled_from(("q1", "q2", "q3"))),
    st.builds(lambda hif, ns, name, ips: ("endpoint", Endpoint("c" + hif[-1], "eth0", "", hif, ips, ns, name)),
              st.sampled_from(ENDPOINTS), st.sampled_from(NAMESPACES), st.sampled_from(POD_NAMES),
              st.sampled_from(((IPS[0],), (IPS[2],), (IPS[3],), (), (IPS[4],), (IPS[2], IPS[5])))),
    st.builds(lambda hif: ("del_endpoint", hif), st.sampled_from(ENDPOINTS)),
    st.builds(lambda ips: ("node_ips", ips), st.sampled_from(((), ("192.168.0.1",), ("192.168.0.1", "192.168.0.2"),
                                                             ("192.168.0.1", "fd99::1")))),
)


def inputs_of(engine: PolicyEngine, policies: dict[str, dict[str, Any]]) -> PolicyInputs:
    namespaces = [Namespace(n, {k: v for k, v in lbl.items() if k != "kubernetes.io/metadata.name"})
                  for n, lbl in engine.ns_labels.items()]
    return PolicyInputs(namespaces, list(engine.raw_pods.values()), list(policies.values()),
                        list(engine.endpoints.values()), list(engine.node_ips), engine.ledger.budget)


def apply(engine: PolicyEngine, policies: dict[str, dict[str, Any]], event: tuple[str, Any]) -> None:
    kind, value = event
    if kind == "pod":
        engine.set_pod(value)
    elif kind == "del_pod":
        engine.delete_pod(value)
    elif kind == "ns":
        engine.set_namespace(value)
    elif kind == "del_ns":
        engine.delete_namespace(value)
    elif kind == "policy":
        key = f"{value['metadata']['namespace']}/{value['metadata']['name']}"
        policies[key] = value
        engine.set_policy(value)
    elif kind == "del_policy":
        policies.pop(value, None)
        engine.delete_policy(value)
    elif kind == "endpoint":
        engine.add_endpoint(value)
    elif kind == "del_endpoint":
        if value in engine.endpoints:
            engine.remove_endpoint(engine.endpoints[value])
    else:
        engine.set_node_ips(value)


def covered(before: Calculation, after: Calculation, changes: Changes) -> list[str]:
    """Differences between two calculations that the reported changes do not name (should be none)."""
    missing = []
    for name in set(before.ipsets) | set(after.ipsets):
        old, new = before.ipsets.get(name), after.ipsets.get(name)
        if old == new:
            continue
        delta = changes.sets.get(name, "absent")
        if delta == "absent":
            missing.append(f"set {name}")
        elif delta is not None and old is not None and new is not None and (
                (old.members | delta[0]) - delta[1] != new.members):
            missing.append(f"set {name} delta {delta} does not turn {sorted(old.members)} into {sorted(new.members)}")
    for family in FAMILIES:
        old_rules, new_rules = render(before, family=family).chains, render(after, family=family).chains
        for chain in set(old_rules) | set(new_rules):
            if old_rules.get(chain) != new_rules.get(chain) and chain not in changes.chains:
                missing.append(f"IPv{family} chain {chain}")
    return missing


# Every example starts from a node where policies select local endpoints and peers, so random events hit used
# plans and active sets (a random start rarely lines up a pod, its endpoint and a policy in one namespace).
PROLOGUE = [
    ("ns", Namespace("a", {"env": "x"})), ("ns", Namespace("b", {"env": "y"})),
    ("pod", Pod("a", "p1", {"app": "x"}, "n", (IPS[0],), (WEB,))), ("pod", Pod("a", "p2", {"app": "y"}, "n", ())),
    ("pod", Pod("b", "p1", {"app": "x", "tier": "y"}, "n", (IPS[2],))), ("pod", Pod("c", "p3", {"env": "x"}, "n", (IPS[1],))),
    ("endpoint", Endpoint("c1", "eth0", "", ENDPOINTS[0], (IPS[0],), "a", "p1")),
    ("endpoint", Endpoint("c2", "eth0", "", ENDPOINTS[1], (IPS[3],), "a", "p2")),
    ("endpoint", Endpoint("c3", "eth0", "", ENDPOINTS[2], (IPS[2], IPS[5]), "b", "p1")),
    ("policy", {"metadata": {"name": "q1", "namespace": "a"},
                "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "x"}}},
                                                                  {"namespaceSelector": {"matchLabels": {"env": "y"}}}],
                                                         "ports": [{"port": "web"}]}],
                         "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchExpressions": [
                             {"key": "env", "operator": "Exists"}]}}, {"ipBlock": {"cidr": "10.0.0.0/24",
                                                                                  "except": ["10.0.0.2/32"]}}]}],
                         "policyTypes": ["Ingress", "Egress"]}}),
    ("policy", {"metadata": {"name": "q2", "namespace": "b"},
                "spec": {"podSelector": {"matchLabels": {"tier": "y"}},
                         "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"env": "x"}}}]}]}}),
]


# a namespaceSelector set whose pod selector has `In` with two values is indexed twice: a namespace event
# must still update it once
_TWO_VALUE_IN = ("policy", {"metadata": {"name": "q1", "namespace": "a"}, "spec": {"podSelector": {}, "egress": [
    {"to": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "Exists"}]},
             "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["x", "y"]}]}}]}]}})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, min_size=1, max_size=40))
@example([_TWO_VALUE_IN, ("del_ns", "a")])
@example([_TWO_VALUE_IN, ("endpoint", Endpoint("c2", "eth0", "", ENDPOINTS[1], (IPS[2],), "a", "p2")),
          ("ns", Namespace("a", {}))])
def test_incremental_equals_full_after_every_event(sequence):
    check_incremental_equals_full(sequence, PolicyEngine())


# so small that policies go over their own budget and over the node's: an event on one policy changes whether
# others are admitted (in namespace/name order)
TIGHT = PolicyBudget(policy_rules=4, policy_sets=6, policy_members=6, node_rules=2, node_sets=3, node_members=3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events, min_size=1, max_size=40))
def test_incremental_equals_full_with_a_tight_budget(sequence):
    check_incremental_equals_full(sequence, PolicyEngine(budget=TIGHT))


def check_incremental_equals_full(sequence: list[tuple[str, Any]], engine: PolicyEngine) -> None:
    policies: dict[str, dict[str, Any]] = {}
    previous = calculate(inputs_of(engine, policies))
    # each family's chains, kept up to date from the changed chains only, as the dataplane does
    chains = {family: render(previous, family=family).chains for family in FAMILIES}
    for event in PROLOGUE + sequence:
        apply(engine, policies, event)
        want = calculate(inputs_of(engine, policies))
        assert engine.calculation() == want, event
        changes = engine.take_changes()
        missing = covered(previous, want, changes)
        assert not missing, (event, missing)
        for family in FAMILIES:
            for chain, rules in render_chains(engine, changes.chains, RenderOptions(), family).items():
                if rules is None:
                    chains[family].pop(chain, None)
                else:
                    chains[family][chain] = rules
            assert chains[family] == render(want, family=family).chains, (family, event)
        previous = want
    loaded = PolicyEngine.from_inputs(inputs_of(engine, policies))  # the bulk load gives the same state
    assert loaded.calculation() == previous


def test_from_inputs_equals_full():
    pods = [Pod("a", "p1", {"app": "x"}, "n", ("10.0.0.1",), (ContainerPort(80, "TCP", "web"),)),
            Pod("b", "p2", {"app": "y"}, "n", ("10.0.0.2", "fd00::2")), Pod("a", "p3", {"app": "x"}, "n", ())]
    eps = [Endpoint("c1", "eth0", "", "rtd00000000001", ("10.0.0.3", "fd00::3"), "a", "p3")]
    pol = {"metadata": {"name": "web", "namespace": "a"},
           "spec": {"podSelector": {"matchLabels": {"app": "x"}},
                    "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": "web"}]}]}}
    inputs = PolicyInputs([Namespace("a"), Namespace("b", {"env": "x"})], pods, [pol], eps, ["192.168.0.1"])
    assert PolicyEngine.from_inputs(inputs).calculation() == calculate(inputs)
