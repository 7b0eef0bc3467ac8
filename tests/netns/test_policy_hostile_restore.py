"""Hostile text from every NetworkPolicy, Pod and Namespace field never changes the structure of what reaches
iptables-restore and ipset restore (issue 17): hypothesis puts arbitrary strings and known injections into
names, namespaces, label keys and values, named ports, protocols, ports, ipBlocks and pod IPs, a real
PolicyController applies the result in a namespace, and the kernel's own dump (iptables-save, ip6tables-save,
ipset save) must hold exactly the chains and rules the calculation rendered, and none of the hostile text.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from policy import names
from policy.calc import PolicyInputs, calculate
from policy.render import render
from routed import netns
from routed.model import Endpoint, Namespace, Pod
from tests.netns.policy_harness import RemoteController

pytestmark = [pytest.mark.netns, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

PREFIX = "rtd-pol-hst"
EXAMPLES = int(os.environ.get("ROUTED_PROPERTY_EXAMPLES", "30"))
INJECTIONS = [
    'a" -j ACCEPT', "x\n-A FORWARD -j ACCEPT", "web\nCOMMIT", "80 -j ACCEPT", "10.0.0.0/8 -j ACCEPT",
    "10.9.0.0/16\nadd rtd-x 8.8.8.8", "fe80::1%eth0\n-A INPUT -j ACCEPT", "fd00::1%x y", "8.8.8.8/32,1.1.1.1",
    "TCP\n-F", "app\x00", "'; rm -rf /", "--comment", "{}", "\u0661\u0662", "a b", "-Xrtd", "\t",
]
TEXT = st.one_of(st.sampled_from(INJECTIONS), st.text(max_size=12),
                 st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?\Z"))
PORT = st.one_of(st.integers(-1, 70000), TEXT)
NODE_IPS = ["192.168.250.1", "fd99:250::1"]


# a character that no kernel dump of ours holds outside a hash comment's quotes
FOREIGN = re.compile(r"[^A-Za-z0-9 ._:/,+!-]")
# what a line of our chains may be made of: options, numbers, addresses, names, our quoted hash comment
TOKEN = re.compile(r'[A-Za-z0-9_.:/,+!-]+|"' + re.escape(names.COMMENT_PREFIX) + r'[a-z0-9]+"')


def hostile(value: Any) -> bool:
    """Text that must never show up in a kernel dump: it holds a quote, a control, a non-ASCII character..."""
    return isinstance(value, str) and bool(FOREIGN.search(value))


@st.composite
def objects(draw: st.DrawFn) -> tuple[PolicyInputs, list[str]]:
    texts: list[str] = []

    def text(strategy: st.SearchStrategy[Any] = TEXT) -> Any:
        value = draw(strategy)
        if hostile(value):
            texts.append(value)
        return value

    ns_names = ["x", text()]
    namespaces = [Namespace.from_k8s({"metadata": {"name": ns, "labels": {text(): text(), "team": "a"}}})
                  for ns in ns_names]
    pods, endpoints = [], []
    for i in range(3):
        ns = ns_names[i % 2]
        ips = [f"10.244.0.{i + 2}", f"fd00:244::{i + 2:x}"] + ([text()] if i == 2 else [])
        pod = Pod.from_k8s({
            "metadata": {"name": f"p{i}" if i else text(), "namespace": ns,
                         "labels": {"app": "web", text(): text()}},
            "spec": {"nodeName": "node", "containers": [{"name": "c", "ports": [
                {"name": text(), "containerPort": text(PORT), "protocol": text(st.one_of(
                    st.sampled_from(["TCP", "UDP", "SCTP"]), TEXT))},
                {"name": "web", "containerPort": 8080, "protocol": "TCP"}]}]},
            "status": {"podIPs": [{"ip": ip} for ip in ips]}})
        pods.append(pod)
        endpoints.append(Endpoint(f"c{i}", "eth0", "", f"rtd{i:011x}", pod.ips, pod.namespace, pod.name))
    peers: list[dict[str, Any]] = [
        {"podSelector": {"matchLabels": {text(): text()}}},
        {"namespaceSelector": {"matchExpressions": [{"key": text(), "operator": text(st.one_of(
            st.sampled_from(["In", "NotIn", "Exists"]), TEXT)), "values": [text()]}]}},
        {"ipBlock": {"cidr": text(st.one_of(st.sampled_from(["10.0.0.0/8", "fd00::/8"]), TEXT)),
                     "except": [text()]}},
        {"ipBlock": {"cidr": "10.244.0.0/16", "except": [text(st.one_of(st.just("10.244.0.3/32"), TEXT))]}},
    ]
    ports = [{"port": text(PORT), "protocol": text(st.one_of(st.sampled_from(["TCP", "UDP"]), TEXT))},
             {"port": 9000, "endPort": text(PORT)}, {"port": "web"}, {"port": text()}]
    policies = []
    for j, ns in enumerate(ns_names):
        spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": "web"}},
                                "policyTypes": ["Ingress", "Egress", text()][: 2 + draw(st.integers(0, 1))],
                                "ingress": [{"from": peers[: 1 + draw(st.integers(0, 3))], "ports": ports}],
                                "egress": [{"to": peers[2:], "ports": ports[:2]}]}
        policies.append({"metadata": {"name": text() if j else "good", "namespace": ns}, "spec": spec})
    # one ordinary policy: whatever the hostile ones do, it must be rendered as meant
    policies.append({"metadata": {"name": "plain", "namespace": "x"}, "spec": {
        "podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                        "ports": [{"port": 80}]}]}})
    return PolicyInputs(namespaces, pods, policies, endpoints, NODE_IPS), texts


def our_rules(ns: str, family: int) -> dict[str, int]:
    tool = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    out = netns.ns_run(ns, [tool, "-t", "filter"]).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        if line.startswith(f":{names.PREFIX}"):
            counts.setdefault(line[1:].split()[0], 0)
        elif line.startswith(f"-A {names.PREFIX}"):
            chain = line.split()[1]
            counts[chain] = counts.get(chain, 0) + 1
    return counts


@pytest.fixture(scope="module")
def controller():
    netns.delete_all(PREFIX)
    ns = f"{PREFIX}-0"
    netns.create(ns)
    ctl = RemoteController(ns, iptables_writer="restore", iptables_backend="legacy")
    try:
        yield ns, ctl
    finally:
        ctl.close()
        netns.delete(ns)
        netns.delete_all(PREFIX)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])
@given(objects())
def test_hostile_fields_never_change_what_the_kernel_is_given(controller, drawn):
    ns, ctl = controller
    inputs, texts = drawn
    report = ctl.call("sync", inputs)
    assert report.ok, report.error
    calc = calculate(inputs)
    assert "x/plain" not in {p.key for p in calc.problems}
    dumps = []
    for family in (4, 6):
        want = render(calc, family=family)
        assert our_rules(ns, family) == {c: len(rules) for c, rules in want.chains.items()}, f"IPv{family}"
        dump = netns.ns_run(ns, ["iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"]).stdout
        for line in dump.splitlines():
            if line.startswith(f"-A {names.PREFIX}"):
                assert all(TOKEN.fullmatch(t) for t in line.split(" ")), line
        dumps.append(dump)
    ipsets = netns.ns_run(ns, ["ipset", "save"]).stdout
    dumps.append(ipsets)
    for line in ipsets.splitlines():
        assert re.fullmatch(r"(create|add) (rtd|rtd6|rtd-tmp)-[A-Za-z0-9-]+ [ -~]+", line), line
    for text in texts:
        for dump in dumps:
            assert text not in dump, f"{text!r} reached the kernel"
