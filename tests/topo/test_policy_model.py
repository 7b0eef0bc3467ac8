"""NetworkPolicy semantics on real packets: the upstream e2e model (x, y, z × a, b, c; 80/81; TCP/UDP) in the lab.

Each case applies policies through the lab (manifest datastore → agents → ipsets/iptables) and polls the live
matrix until it equals the expected table, written by hand from the NetworkPolicy API rules.
The whole suite runs three times: an IPv4 lab, a dual-stack lab probed on its pods' IPv6 addresses (ipBlocks
written in IPv6), and an IPv6-only lab.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
import yaml

from routed import api, netns
from routed.lab.lab import Lab
from tests.helpers import run_and_expect
from tests.topo.netpol_model import (
    ANY,
    Reachability,
    diff,
    model_manifest,
    observed,
    pods_where,
    policy,
)

pytestmark = [pytest.mark.requires_root, pytest.mark.topo]
CONVERGE_SECONDS = 20.0


VARIANTS = {"ipv4": ("ipv4", 4), "dual-v6": ("dual", 6), "ipv6": ("ipv6", 6)}  # lab family, probed family


@pytest.fixture(scope="module", params=list(VARIANTS))
def lab(request, tmp_path_factory):
    ip_family, probed = VARIANTS[request.param]
    lab = Lab(f"tpol{request.param.replace('-', '')[:6]}")
    lab.probe_family = probed  # type: ignore[attr-defined]  # which pod addresses the matrix probes
    manifest = tmp_path_factory.mktemp("model") / "model.yaml"
    manifest.write_text(model_manifest())
    lab.up(nodes=2, files=[str(manifest)], ip_family=ip_family)
    yield lab
    lab.down()


def family(lab: Lab) -> int:
    return int(getattr(lab, "probe_family", 4))


def ip_of(lab: Lab, pod: str, version: int | None = None) -> str:
    """The pod's address of the probed family (or of `version`)."""
    version = version or family(lab)
    return next(ip for ip in lab.state().pods[pod].ips if ipaddress.ip_address(ip).version == version)


def host_net(ip: str) -> str:
    return f"{ip}/{ipaddress.ip_address(ip).max_prefixlen}"


def cidr_of(lab: Lab, node: str, version: int | None = None) -> str:
    version = version or family(lab)
    return next(c for c in lab.state().node(node).cidrs() if ipaddress.ip_network(c).version == version)


@pytest.fixture
def apply(lab, tmp_path):
    """Apply policies (or other objects); everything applied is deleted after the test."""
    applied: list[str] = []

    def _apply(*objects: dict[str, Any]) -> None:
        path = tmp_path / f"objs-{len(applied)}.yaml"
        path.write_text(yaml.safe_dump_all(list(objects)))
        lab.apply(str(path))
        applied.append(str(path))

    yield _apply
    for path in reversed(applied):
        lab.delete(path)
    # back to all-allowed before the next case
    expect_matrix(lab, Reachability.all())


def expect_matrix(lab: Lab, expected: Reachability) -> None:
    wanted = expected.table
    ok, seen, _ = run_and_expect(lambda: observed(lab.matrix(timeout=0.8, family=family(lab))), lambda s: s == wanted,
                                 timeout=CONVERGE_SECONDS, interval=0.2)
    problems = diff(wanted, seen)
    assert ok and not problems, f"{len(problems)} cells differ:\n" + "\n".join(problems[:40])


def test_no_policy_all_allowed(lab):
    expect_matrix(lab, Reachability.all())


def test_deny_all_ingress_in_namespace(lab, apply):
    apply(policy("deny-ingress", "x", {"podSelector": {}, "policyTypes": ["Ingress"]}))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where(ns="x"), False).allow_loopback())


def test_deny_all_egress_in_namespace(lab, apply):
    apply(policy("deny-egress", "x", {"podSelector": {}, "policyTypes": ["Egress"]}))
    expect_matrix(lab, Reachability.all().set(pods_where(ns="x"), ANY, False).allow_loopback())


def test_inferred_policy_types_ingress_only(lab, apply):
    # no policyTypes and no egress section: only Ingress is affected
    apply(policy("infer", "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": []}))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False).allow_loopback())


def test_allow_from_same_namespace(lab, apply):
    apply(policy("same-ns", "x", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where(ns="x"), False)
                  .set(pods_where(ns="x"), pods_where(ns="x"), True))


def test_pod_and_namespace_selector_in_one_peer_is_and(lab, apply):
    apply(policy("and", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                "podSelector": {"matchLabels": {"pod": "b"}}}]}],
    }))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(pods_where("y", "b"), pods_where("x", "a"), True).allow_loopback())


def test_pod_and_namespace_selector_in_two_peers_is_or(lab, apply):
    apply(policy("or", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}},
                               {"podSelector": {"matchLabels": {"pod": "b"}}}]}],
    }))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(pods_where(ns="y"), pods_where("x", "a"), True)
                  .set(pods_where("x", "b"), pods_where("x", "a"), True).allow_loopback())


def test_match_expressions(lab, apply):
    apply(policy("expr", "x", {
        "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
        "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
            {"key": "ns", "operator": "NotIn", "values": ["y"]}]}}]}],
    }))
    targets = lambda k: k in ("x/a", "x/b")  # noqa: E731
    expect_matrix(lab, Reachability.all().set(ANY, targets, False)
                  .set(lambda k: not k.startswith("y/"), targets, True).allow_loopback())


def test_port_restriction(lab, apply):
    apply(policy("port-81", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"ports": [{"port": 81, "protocol": "TCP"}]}],
    }))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(ANY, pods_where("x", "a"), True, ports=[81], protocols=["TCP"]).allow_loopback())


def test_named_port(lab, apply):
    apply(policy("named", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"ports": [{"port": "serve-80-udp", "protocol": "UDP"}]}],
    }))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(ANY, pods_where("x", "a"), True, ports=[80], protocols=["UDP"]).allow_loopback())


def test_named_port_egress_resolved_per_destination(lab, apply):
    apply(policy("egress-named", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "policyTypes": ["Egress"],
        "egress": [{"ports": [{"port": "serve-81-tcp", "protocol": "TCP"}]}],
    }))
    expect_matrix(lab, Reachability.all().set(pods_where("x", "a"), ANY, False)
                  .set(pods_where("x", "a"), ANY, True, ports=[81], protocols=["TCP"]).allow_loopback())


def test_end_port_range(lab, apply):
    apply(policy("range", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"ports": [{"port": 79, "endPort": 80, "protocol": "TCP"}]}],
    }))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(ANY, pods_where("x", "a"), True, ports=[80], protocols=["TCP"]).allow_loopback())


def test_ip_block_with_except(lab, apply):
    state = lab.state()
    xb_ip = ip_of(lab, "x/b")
    node2_cidr = cidr_of(lab, "node2")
    apply(policy("ipblock", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": node2_cidr, "except": [host_net(xb_ip)]}}]}],
    }))
    on_node2 = lambda k: state.pods[k].node == "node2" and k != "x/b"  # noqa: E731
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(on_node2, pods_where("x", "a"), True).allow_loopback())


def test_egress_to_namespace_and_udp_only(lab, apply):
    apply(policy("egress-y", "x", {
        "podSelector": {},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}], "ports": [{"protocol": "UDP"}]}],
    }))
    expect_matrix(lab, Reachability.all().set(pods_where(ns="x"), ANY, False)
                  .set(pods_where(ns="x"), pods_where(ns="y"), True, protocols=["UDP"]).allow_loopback())


def test_policies_are_ored(lab, apply):
    apply(
        policy("from-y", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        policy("from-z-81", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                  "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}],
                                               "ports": [{"port": 81}]}]}),
    )
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(pods_where(ns="y"), pods_where("x", "a"), True)
                  .set(pods_where(ns="z"), pods_where("x", "a"), True, ports=[81], protocols=["TCP"])
                  .allow_loopback())


def test_ingress_and_egress_deny_both(lab, apply):
    apply(policy("deny-both", "y", {"podSelector": {"matchLabels": {"pod": "c"}},
                                    "policyTypes": ["Ingress", "Egress"]}))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("y", "c"), False)
                  .set(pods_where("y", "c"), ANY, False).allow_loopback())


def test_live_update_and_delete(lab, apply):
    apply(policy("live", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(pods_where("x", "b"), pods_where("x", "a"), True).allow_loopback())
    # update in place: now from pod c instead
    apply(policy("live", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                               "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(pods_where("x", "c"), pods_where("x", "a"), True).allow_loopback())


def test_pod_and_namespace_label_changes(lab, apply):
    apply(policy("labels", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                 "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False).allow_loopback())
    apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "z", "labels": {"ns": "z", "team": "blue"}}})
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(pods_where(ns="z"), pods_where("x", "a"), True).allow_loopback())
    apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "z", "labels": {"ns": "z"}}})
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False).allow_loopback())


def test_pod_label_change(lab, apply, tmp_path):
    apply(policy("podlabel", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "friend"}}}]}]}))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False).allow_loopback())
    relabel = tmp_path / "relabel.yaml"
    pod_c = yaml.safe_load_all(model_manifest())
    pod_doc = next(d for d in pod_c if d["kind"] == "Pod" and d["metadata"]["name"] == "c"
                   and d["metadata"]["namespace"] == "x")
    pod_doc["metadata"]["labels"] = {"pod": "c", "role": "friend"}
    relabel.write_text(yaml.safe_dump(pod_doc))
    lab.apply(str(relabel))
    try:
        expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                      .set(pods_where("x", "c"), pods_where("x", "a"), True).allow_loopback())
    finally:
        pod_doc["metadata"]["labels"] = {"pod": "c"}
        relabel.write_text(yaml.safe_dump(pod_doc))
        lab.apply(str(relabel))


def test_invalid_policy_fails_closed_and_others_work(lab, apply):
    apply(
        policy("bad-cidr", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                 "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]}),
        policy("good", "y", {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}),
    )
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(ANY, pods_where("y", "a"), False).allow_loopback())
    report = api.call(lab.paths.node_socket("node1"), "policy.report")
    invalid = report.get("invalidPolicies") or []
    assert any("x/bad-cidr" in str(item) for item in invalid), report


def test_explain_agrees_with_matrix(lab, apply):
    apply(
        policy("e1", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                                  "podSelector": {"matchLabels": {"pod": "b"}}}],
                                        "ports": [{"port": "serve-80-tcp"}]}]}),
        policy("e2", "y", {"podSelector": {}, "policyTypes": ["Egress"],
                           "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP"}]},
                                      {"to": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
        policy("e3", "z", {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress", "Egress"],
                           "ingress": [{"from": [{"podSelector": {}}]}]}),
    )
    # let the dataplane settle on a stable matrix (two identical reads in a row), then compare every cell
    # (as before, a matrix that never settles within CONVERGE_SECONDS is compared as last read)
    reads: list[dict[Any, bool]] = [{}]

    def last_two_reads() -> list[dict[Any, bool]]:
        reads.append(observed(lab.matrix(timeout=0.8, family=family(lab))))
        return reads[-2:]

    _, last_two, _ = run_and_expect(last_two_reads, lambda pair: pair[0] == pair[1], CONVERGE_SECONDS,
                                    interval=0)
    seen = last_two[1]
    socket = lab.paths.node_socket("node1")
    mismatches = []
    for (src, dst, port, proto), allowed in seen.items():
        if src == dst:
            continue  # loopback never crosses the node's iptables
        verdict = api.call(socket, "policy.explain", {"from": ip_of(lab, src), "to": ip_of(lab, dst), "port": port,
                                                      "protocol": proto})
        if bool(verdict["allowed"]) != allowed:
            mismatches.append(f"{src}->{dst} {proto}/{port}: explain={verdict['allowed']} datapath={allowed}")
    assert not mismatches, "\n".join(mismatches[:30])
    assert any(not v for v in seen.values()) and any(v for v in seen.values())


def test_egress_ip_block_with_except(lab, apply):
    state = lab.state()
    yc_ip = ip_of(lab, "y/c")  # y/c runs on node2: the except lies inside the CIDR
    node2_cidr = cidr_of(lab, "node2")
    apply(policy("egress-cidr", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": node2_cidr, "except": [host_net(yc_ip)]}}]}],
    }))
    on_node2 = lambda k: state.pods[k].node == "node2" and k != "y/c"  # noqa: E731
    expect_matrix(lab, Reachability.all().set(pods_where("x", "a"), ANY, False)
                  .set(pods_where("x", "a"), on_node2, True).allow_loopback())


def test_ip_overlapping_cidr_and_except_is_allowed_by_another_peer(lab, apply):
    state = lab.state()
    xb_ip = ip_of(lab, "x/b")
    node2_cidr = cidr_of(lab, "node2")
    apply(policy("overlap", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": node2_cidr, "except": [host_net(xb_ip)]}},
                              {"ipBlock": {"cidr": host_net(xb_ip)}}]}],
    }))
    on_node2 = lambda k: state.pods[k].node == "node2"  # noqa: E731
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False)
                  .set(on_node2, pods_where("x", "a"), True).allow_loopback())


def test_sctp_only_policy_isolates_tcp_and_udp(lab, apply):
    # upstream: a policy allowing only SCTP must not be mistaken for TCP (this kernel carries no SCTP at all)
    apply(policy("sctp-only", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}, {"port": 81, "protocol": "SCTP"}]}],
    }))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False).allow_loopback())
    node1 = lab.state().node("node1")
    save = "iptables-save" if family(lab) == 4 else "ip6tables-save"
    rules = netns.ns_run(node1.netns, [save, "-t", "filter"]).stdout
    assert "-p sctp" in rules and "--dport 80" in rules


def test_ip_block_of_the_other_family_matches_nothing(lab, apply):
    """A dual-stack pod's IPv4 ipBlock never admits its IPv6 flows, and the other way round."""
    if len(lab.state().families) < 2:
        pytest.skip("needs a dual-stack lab")
    other = 4 if family(lab) == 6 else 6
    apply(policy("other-family", "x", {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "ingress": [{"from": [{"ipBlock": {"cidr": cidr_of(lab, "node1", other)}},
                              {"ipBlock": {"cidr": cidr_of(lab, "node2", other)}}]}],
    }))
    expect_matrix(lab, Reachability.all().set(ANY, pods_where("x", "a"), False).allow_loopback())
