"""The policy budget: a policy over its own budget, or beyond what the node has left (policies admitted in
namespace/name order), is reported by name as invalid and only the pods it selects fail closed; the others keep
being rendered; the engine keeps the same verdicts as the full calculation as policies come and go."""

from __future__ import annotations

from policy import names
from policy.calc import DEFAULT_BUDGET, PolicyBudget, PolicyInputs, calculate, policy_cost
from policy.controller import PolicyController, budget_of
from policy.explain import explain
from policy.incremental import PolicyEngine
from policy.model import parse_policy
from policy.render import render
from routed.config import PolicyBudgetOptions, PolicyOptions, load_config
from routed.model import Endpoint, Namespace, Pod

BIG = Pod("x", "big", {"app": "big"}, "n", ("10.1.0.1", "fd00::1"))
SMALL = Pod("x", "small", {"app": "small"}, "n", ("10.1.0.2", "fd00::2"))
CLIENT = Pod("x", "cli", {"app": "cli"}, "n", ("10.1.0.3", "fd00::3"))
EPS = [Endpoint("c1", "eth0", "", "rtd00000000001", BIG.ips, "x", "big"),
       Endpoint("c2", "eth0", "", "rtd00000000002", SMALL.ips, "x", "small")]


def pol(name: str, app: str, peers: list[dict], ports: list[dict] | None = None) -> dict:
    rule: dict = {"from": peers}
    if ports is not None:
        rule["ports"] = ports
    return {"metadata": {"name": name, "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": app}}, "ingress": [rule]}}


# 300 distinct selectors: 300 sets (+ the list:set), over the default 200 sets per policy
HUGE = pol("huge", "big", [{"podSelector": {"matchLabels": {"app": "cli", "n": str(i)}}} for i in range(299)]
           + [{"podSelector": {"matchLabels": {"app": "cli"}}}])
OK = pol("ok", "small", [{"podSelector": {"matchLabels": {"app": "cli"}}}], [{"port": 80}])


def inputs(policies: list[dict], budget: PolicyBudget = DEFAULT_BUDGET) -> PolicyInputs:
    return PolicyInputs([Namespace("x")], [BIG, SMALL, CLIENT], policies, EPS, [], budget)


def test_over_its_budget_named_its_pods_fail_closed_others_rendered():
    calc = calculate(inputs([HUGE, OK]))
    (problem,) = calc.problems
    assert problem.key == "x/huge" and problem.fail_closed == ("Ingress",)
    assert "over the per-policy budget: 301 ipsets (at most 200)" in problem.reasons[0]
    huge_chain, ok_chain = names.policy_chain("x/huge", "Ingress"), names.policy_chain("x/ok", "Ingress")
    big_ep, small_ep = calc.endpoints
    assert big_ep.ingress == (huge_chain,) and small_ep.ingress == (ok_chain,)
    for family in (4, 6):
        ruleset = render(calc, family=family)
        assert ruleset.chains[huge_chain] == []  # no rule: the pod it selects is denied (fail closed)
        assert len(ruleset.chains[ok_chain]) == 1  # the other policy is rendered
        assert ruleset.chains[big_ep.to_chain][-1].body == "-j DROP"
    assert {s.kind for s in calc.ipsets.values()} == {"hash:ip"}  # nothing of the huge one was created
    assert not explain(inputs([HUGE, OK]), CLIENT, BIG, 80)["allowed"]
    assert "invalid, failing closed: x/huge" in explain(inputs([HUGE, OK]), CLIENT, BIG, 80)["ingress"]["reason"]
    assert explain(inputs([HUGE, OK]), CLIENT, SMALL, 80, family=6)["allowed"]
    # within a larger budget it is an ordinary policy
    roomy = calculate(inputs([HUGE, OK], PolicyBudget(policy_sets=400)))
    assert not roomy.problems and len(render(roomy).chains[huge_chain]) == 1


def test_the_budget_is_checked_from_sizes():
    # 20,000 /32 blocks would be 20,000 entries: over a budget of 1,000, found without building the set
    many = pol("many", "big", [{"ipBlock": {"cidr": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}/32"}}
                               for i in range(20_000)])
    cost = policy_cost(parse_policy(many))
    assert (cost.rules, len(cost.sets), cost.members) == (1, 1, 20_000)
    calc = calculate(inputs([many], PolicyBudget(policy_members=1_000)))
    assert "20000 set entries (at most 1000)" in calc.problems[0].reasons[0] and len(calc.ipsets) == 1


def _policies(n: int) -> list[dict]:
    """n policies selecting the big pod, two rules each (one per protocol)."""
    return [pol(f"p{i}", "big", [{"ipBlock": {"cidr": f"192.168.{i}.0/24"}}], [{"port": 80}, {"port": 53, "protocol": "UDP"}])
            for i in range(n)]


def test_node_budget_admits_in_name_order_and_the_engine_follows():
    budget = PolicyBudget(node_rules=5)  # two policies of two rules fit, the third does not
    policies = _policies(3) + [OK]  # "ok" (one rule) sorts after them and still fits
    calc = calculate(inputs(policies, budget))
    assert [p.key for p in calc.problems] == ["x/p2"] and "over the node's budget" in calc.problems[0].reasons[0]
    engine = PolicyEngine.from_inputs(inputs(policies, budget))
    assert engine.calculation() == calc
    engine.take_changes()
    engine.delete_policy("x/p0")  # room again: p2 is admitted, its chain re-rendered
    assert engine.problems() == [] and names.policy_chain("x/p2", "Ingress") in engine.take_changes().chains
    assert engine.calculation() == calculate(inputs([p for p in policies if p["metadata"]["name"] != "p0"], budget))
    engine.set_policy(_policies(1)[0])  # p0 back first in order: p2 is out again
    assert [p.key for p in engine.problems()] == ["x/p2"]
    assert engine.calculation() == calc


def test_budget_configurable_and_used_by_the_controller():
    config = load_config(overrides={"node_name": "n", "manifest_dir": "/tmp"},
                         environ={"ROUTED_POLICY__BUDGET__NODE_RULES": "7", "ROUTED_POLICY__BUDGET__POLICY_SETS": "3"})
    assert config.policy.budget.node_rules == 7 and config.policy.budget.policy_sets == 3
    assert budget_of(config.policy) == PolicyBudget(node_rules=7, policy_sets=3)
    assert budget_of(PolicyOptions()) == PolicyBudget() and PolicyBudgetOptions().node_sets <= 32_000
    ctl = PolicyController(PolicyOptions(iptables_backend="nft", budget=PolicyBudgetOptions(policy_sets=3)), "n")
    ctl.engine.set_policy(HUGE)
    assert [p.key for p in ctl.engine.problems()] == ["x/huge"]
    assert ctl.report()["invalidPolicies"][0]["policy"] == "x/huge"


def test_node_budget_counts_only_the_policies_of_this_nodes_pods():
    budget = PolicyBudget(node_rules=4)
    elsewhere = [pol(f"e{i}", f"nobody-{i}", [{"ipBlock": {"cidr": f"192.168.{i}.0/24"}}], [{"port": 80}])
                 for i in range(10)]  # ten rules' worth, selecting no local pod
    policies = elsewhere + _policies(2)  # p0 and p1: four rules, the node's whole budget
    assert calculate(inputs(policies, budget)).problems == []
    engine = PolicyEngine.from_inputs(inputs(policies, budget))
    assert engine.problems() == []
    # a pod of this node starts matching x/e0: now it counts, and the last in order (x/p1) is out
    late = Pod("x", "late", {"app": "nobody-0"}, "n", ("10.1.0.9",))
    late_ep = Endpoint("c9", "eth0", "", "rtd00000000009", ("10.1.0.9",), "x", "late")
    engine.add_endpoint(late_ep)
    engine.set_pod(late)
    assert [p.key for p in engine.problems()] == ["x/p1"]
    want = PolicyInputs([Namespace("x")], [BIG, SMALL, CLIENT, late], policies, [*EPS, late_ep], [], budget)
    assert engine.calculation() == calculate(want)
    assert [p.key for p in calculate(want).problems] == ["x/p1"]
    # the pod goes: x/e0 no longer counts and x/p1 is back
    engine.delete_pod("x/late")
    engine.remove_endpoint(engine.endpoints["rtd00000000009"])
    assert engine.problems() == []
    assert engine.calculation() == calculate(inputs(policies, budget))
