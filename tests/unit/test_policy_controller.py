"""Controller behaviour without a kernel: retries with backoff, not-ready, last good state kept."""

from __future__ import annotations

from policy.calc import PolicyInputs
from policy.controller import PolicyController
from routed.config import PolicyOptions
from routed.model import Endpoint, Namespace, Pod


def _inputs(policies=()):
    pod = Pod("x", "a", {}, "n", ("10.1.0.1",))
    ep = Endpoint("c", "eth0", "", "rtd00000000001", ("10.1.0.1",), "x", "a")
    return PolicyInputs([Namespace("x")], [pod], list(policies), [ep], [])


def test_apply_failure_retries_then_not_ready_and_keeps_last_good(monkeypatch):
    # backend given explicitly: no detection (nothing is read or written outside this test)
    ctl = PolicyController(PolicyOptions(iptables_backend="nft", apply_retries=2), "n")
    ctl.backoff_base = 0.001
    calls = []

    def ok(calc, ruleset, report):
        calls.append("ok")

    def broken(calc, ruleset, report):
        calls.append("fail")
        raise RuntimeError("iptables-restore: resource busy")

    monkeypatch.setattr(ctl, "_apply_once", ok)
    assert ctl.sync(_inputs()).ok and ctl.report()["ready"]
    good = ctl._ruleset
    monkeypatch.setattr(ctl, "_apply_once", broken)
    report = ctl.sync(_inputs([{"metadata": {"name": "d", "namespace": "x"}, "spec": {"podSelector": {}}}]))
    assert not report.ok and report.attempts == 3 and calls.count("fail") == 3
    assert "resource busy" in report.error
    status = ctl.report()
    assert status["ready"] is False and "resource busy" in status["last_error"]
    assert ctl._ruleset is good  # the last good desired state is what drop counters etc. refer to
    monkeypatch.setattr(ctl, "_apply_once", ok)
    assert ctl.sync(_inputs()).ok and ctl.report()["ready"]


def test_invalid_policy_in_report(monkeypatch):
    ctl = PolicyController(PolicyOptions(iptables_backend="nft"), "n")
    monkeypatch.setattr(ctl, "_apply_once", lambda calc, ruleset, report: None)
    bad = {"metadata": {"name": "bad", "namespace": "x"},
           "spec": {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "nope"}}]}]}}
    report = ctl.sync(_inputs([bad]))
    assert report.ok
    assert report.invalid == [{"policy": "x/bad", "reasons": ["spec.egress[0].to[0].ipBlock.cidr: invalid CIDR 'nope'"],
                               "fail_closed": ["Ingress", "Egress"]}]
    assert ctl.report()["invalid_policies"][0]["policy"] == "x/bad"
