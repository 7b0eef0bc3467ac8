"""The policy component's request parsing for policy.explain: IPv4/IPv6 addresses, NS/POD, the family choice."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from policy.component import PolicyComponent
from routed.errors import Code, RoutedError
from routed.model import Pod

POD = Pod("prod", "web", {}, "n", ("10.0.0.1", "fd00::1"))


class Cache:
    def pod(self, namespace: str, name: str) -> Pod | None:
        return POD if (namespace, name) == ("prod", "web") else None


def pod_or_ip(ref: str) -> Pod | str:
    return PolicyComponent._pod_or_ip(SimpleNamespace(cache=Cache()), ref)  # type: ignore[arg-type]


def test_explain_ends_are_pods_or_addresses_of_either_family():
    assert pod_or_ip("prod/web") is POD
    assert pod_or_ip("10.0.0.1") == "10.0.0.1"
    assert pod_or_ip("FD00:0::1") == "fd00::1"  # canonical
    with pytest.raises(RoutedError) as missing:
        pod_or_ip("prod/nope")
    assert missing.value.code == Code.NOT_FOUND
    with pytest.raises(RoutedError) as bad:
        pod_or_ip("not-an-address")
    assert bad.value.code == Code.MALFORMED_REQUEST


def test_explain_family_parameter():
    assert PolicyComponent._family({}) is None and PolicyComponent._family({"family": None}) is None
    assert PolicyComponent._family({"family": 6}) == 6 and PolicyComponent._family({"family": "4"}) == 4
    with pytest.raises(RoutedError) as bad:
        PolicyComponent._family({"family": 5})
    assert bad.value.code == Code.MALFORMED_REQUEST
