"""Controller behaviour without a kernel: a failed apply raises, not-ready, last good state kept; the CNI ADD
path retries quickly."""

from __future__ import annotations

import pytest

from policy.calc import PolicyInputs
from policy.controller import PolicyApplyError, PolicyController
from routed.config import PolicyOptions
from routed.model import Endpoint, Namespace, Pod


def _inputs(policies=()):
    pod = Pod("x", "a", {}, "n", ("10.1.0.1",))
    ep = Endpoint("c", "eth0", "", "rtd00000000001", ("10.1.0.1",), "x", "a")
    return PolicyInputs([Namespace("x")], [pod], list(policies), [ep], [])


def test_apply_failure_raises_keeps_last_good_and_endpoint_path_retries(monkeypatch):
    # backend given explicitly: no detection (nothing is read or written outside this test)
    ctl = PolicyController(PolicyOptions(iptables_backend="nft", apply_retries=2), "n")
    ctl.endpoint_backoff.base = ctl.endpoint_backoff.cap = 0.001
    calls = []

    def ok(plan, report):
        calls.append("ok")

        ctl._applied, ctl._applied_sets = dict(plan.ruleset.chains), {}

    def broken(plan, report):
        calls.append("fail")
        raise RuntimeError("iptables-restore: resource busy")

    monkeypatch.setattr(ctl, "_execute_full", ok)
    assert ctl.sync(_inputs()).ok and ctl.report()["ready"]
    good = dict(ctl._applied)
    monkeypatch.setattr(ctl, "_execute_full", broken)
    with pytest.raises(PolicyApplyError) as failed:
        ctl.sync(_inputs([{"metadata": {"name": "d", "namespace": "x"}, "spec": {"podSelector": {}}}]))
    assert not failed.value.report.ok and calls.count("fail") == 1
    assert "resource busy" in failed.value.report.error
    status = ctl.report()
    assert status["ready"] is False and "resource busy" in status["lastError"] and status["failures"] == 1
    assert ctl._applied is None  # after a failure nothing is trusted: the next apply reads the kernel back
    assert good
    with pytest.raises(PolicyApplyError):
        ctl.ensure_endpoint(Endpoint("c2", "eth0", "", "rtd00000000002", ("10.1.0.2",), "x", "b"))
    assert calls.count("fail") == 4  # 1 + apply_retries attempts on the ADD path, each a full apply
    monkeypatch.setattr(ctl, "_execute_full", ok)
    assert ctl.sync(_inputs()).ok and ctl.report()["ready"] and ctl.report()["failures"] == 0


def test_invalid_policy_in_report(monkeypatch):
    ctl = PolicyController(PolicyOptions(iptables_backend="nft"), "n")
    monkeypatch.setattr(ctl, "_execute_full", lambda plan, report: None)
    bad = {"metadata": {"name": "bad", "namespace": "x"},
           "spec": {"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "nope"}}]}]}}
    report = ctl.sync(_inputs([bad]))
    assert report.ok
    assert report.invalid == [{"policy": "x/bad", "reasons": ["spec.egress[0].to[0].ipBlock.cidr: invalid CIDR 'nope'"],
                               "failClosed": ["Ingress", "Egress"]}]
    assert ctl.report()["invalidPolicies"][0]["policy"] == "x/bad"
