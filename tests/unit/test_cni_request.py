"""CNI request parsing/validation, names and result shapes (pure, no kernel)."""

from __future__ import annotations

import pytest

from cni.names import attachment_key, host_veth_name, is_host_veth_name
from cni.request import (
    decode_netconf,
    parse_cni_args,
    parse_env,
    validate_netconf,
    version_for_errors,
)
from cni.result import Interface, build_add_result
from routed.errors import Code, RoutedError

GOOD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc123", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0"}


def conf(version: str = "1.0.0", **extra: object) -> dict:
    return {"cniVersion": version, "name": "k8s", "type": "routed-cni", **extra}


def test_host_veth_name_is_deterministic_and_short() -> None:
    name = host_veth_name("abc123", "eth0")
    assert name == host_veth_name("abc123", "eth0")
    assert name != host_veth_name("abc123", "eth1")
    assert name.startswith("rtd") and len(name) == 14 <= 15
    assert is_host_veth_name(name)
    assert not is_host_veth_name("rtd-cni-x")
    assert not is_host_veth_name("eth0")
    assert attachment_key("abc", "eth0") == "3.abc.eth0"


def test_host_veth_name_matches_documented_formula() -> None:
    import hashlib

    assert host_veth_name("c", "eth0") == "rtd" + hashlib.sha1(b"c:eth0").hexdigest()[:11]


@pytest.mark.parametrize(
    "env,missing",
    [
        ({k: v for k, v in GOOD_ENV.items() if k != "CNI_CONTAINERID"}, ["CNI_CONTAINERID"]),
        ({k: v for k, v in GOOD_ENV.items() if k != "CNI_NETNS"}, ["CNI_NETNS"]),
        ({"CNI_COMMAND": "ADD"}, ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"]),
        ({"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": "a"}, ["CNI_IFNAME", "CNI_NETNS"]),
        ({"CNI_COMMAND": "DEL", "CNI_NETNS": "/x"}, ["CNI_CONTAINERID", "CNI_IFNAME"]),
    ],
)
def test_missing_env_is_code_4_and_named(env: dict, missing: list[str]) -> None:
    with pytest.raises(RoutedError) as info:
        parse_env(env)
    assert info.value.code == Code.INVALID_ENV
    for var in missing:
        assert var in info.value.msg and var in info.value.details


def test_del_gc_status_need_no_netns() -> None:
    assert parse_env({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "a", "CNI_IFNAME": "eth0"}).netns == ""
    assert parse_env({"CNI_COMMAND": "GC"}).container_id == ""
    assert parse_env({"CNI_COMMAND": "STATUS"}).command == "STATUS"


@pytest.mark.parametrize("cmd", ["", "ADDX", "add"])
def test_bad_command(cmd: str) -> None:
    with pytest.raises(RoutedError) as info:
        parse_env({"CNI_COMMAND": cmd} if cmd else {})
    assert info.value.code == Code.INVALID_ENV
    assert "CNI_COMMAND" in info.value.msg


@pytest.mark.parametrize(
    "var,value", [("CNI_CONTAINERID", "-bad"), ("CNI_CONTAINERID", "a/b"), ("CNI_IFNAME", "x" * 16), ("CNI_IFNAME", "a/b"), ("CNI_IFNAME", "..")]
)
def test_invalid_env_values(var: str, value: str) -> None:
    with pytest.raises(RoutedError) as info:
        parse_env({**GOOD_ENV, var: value})
    assert info.value.code == Code.INVALID_ENV and var in info.value.msg


def test_cni_args() -> None:
    assert parse_cni_args("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;IgnoreUnknown=1") == {
        "K8S_POD_NAMESPACE": "ns",
        "K8S_POD_NAME": "p",
        "IgnoreUnknown": "1",
    }
    assert parse_cni_args("") == {}
    with pytest.raises(RoutedError) as info:
        parse_cni_args("novalue")
    assert info.value.code == Code.INVALID_ENV


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[1,2]", b'"x"'])
def test_decode_failures_are_code_6(raw: bytes) -> None:
    with pytest.raises(RoutedError) as info:
        decode_netconf(raw)
    assert info.value.code == Code.DECODE_FAILURE


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_supported_versions(version: str) -> None:
    for verb in ("ADD", "DEL"):
        validate_netconf(verb, conf(version))


@pytest.mark.parametrize("version", ["0.3.1", "2.0.0", "1.1", "banana"])
def test_unsupported_version_is_code_1(version: str) -> None:
    with pytest.raises(RoutedError) as info:
        validate_netconf("ADD", conf(version))
    assert info.value.code == Code.INCOMPATIBLE_VERSION
    assert version_for_errors(conf(version)) == "1.1.0"


@pytest.mark.parametrize("verb", ["GC", "STATUS"])
@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_gc_status_need_1_1(verb: str, version: str) -> None:
    with pytest.raises(RoutedError) as info:
        validate_netconf(verb, conf(version))
    assert info.value.code == Code.INCOMPATIBLE_VERSION
    validate_netconf(verb, conf("1.1.0"))


@pytest.mark.parametrize(
    "bad,code",
    [
        ({"cniVersion": "1.0.0", "type": "x"}, Code.INVALID_CONFIG),  # no name
        ({"name": "x"}, Code.INVALID_CONFIG),  # no version
        (conf(mtu=10), Code.INVALID_CONFIG),
        (conf(mtu="1500"), Code.INVALID_CONFIG),
        (conf(socketPath=3), Code.INVALID_CONFIG),
        (conf(dns=[1]), Code.INVALID_CONFIG),
        (conf(ipam={"type": "host-local"}), Code.UNSUPPORTED_FIELD),
    ],
)
def test_invalid_netconf(bad: dict, code: int) -> None:
    with pytest.raises(RoutedError) as info:
        validate_netconf("ADD", bad)
    assert info.value.code == code


def test_check_needs_prev_result() -> None:
    with pytest.raises(RoutedError) as info:
        validate_netconf("CHECK", conf())
    assert info.value.code == Code.INVALID_CONFIG
    validate_netconf("CHECK", conf(prevResult={}))


def test_gc_valid_attachments_shape() -> None:
    validate_netconf("GC", conf("1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}))
    with pytest.raises(RoutedError) as info:
        validate_netconf("GC", conf("1.1.0", **{"cni.dev/valid-attachments": [{"containerID": "a"}]}))
    assert info.value.code == Code.INVALID_CONFIG


HOST = Interface("rtd0123456789a", "aa:aa:aa:aa:aa:aa", 1450)
POD = Interface("eth0", "bb:bb:bb:bb:bb:bb", 1450, "/var/run/netns/p")


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_result_shape_per_version(version: str) -> None:
    res = build_add_result(version, HOST, POD, ["10.88.0.5/32"], dns={"nameservers": ["10.96.0.10"]})
    assert res["cniVersion"] == version
    assert res["interfaces"][0] == {"name": HOST.name, "mac": HOST.mac, "sandbox": "",
                                    **({"mtu": 1450} if version == "1.1.0" else {})}
    assert res["interfaces"][1]["sandbox"] == "/var/run/netns/p"
    ip = res["ips"][0]
    assert ip["address"] == "10.88.0.5/32" and ip["interface"] == 1
    assert ("version" in ip) == (version == "0.4.0")
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert res["dns"] == {"nameservers": ["10.96.0.10"]}


def test_result_appends_to_prev_result() -> None:
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "lo", "sandbox": "/p"}],
        "ips": [{"address": "127.0.0.1/8", "interface": 0, "version": "4"}],
        "dns": {"nameservers": ["1.1.1.1"]},
    }
    res = build_add_result("1.0.0", HOST, POD, ["10.88.0.5/32"], prev_result=prev)
    assert [i["name"] for i in res["interfaces"]] == ["lo", HOST.name, "eth0"]
    assert res["ips"][0] == {"address": "127.0.0.1/8", "interface": 0}
    assert res["ips"][1]["interface"] == 2
    assert res["dns"] == {"nameservers": ["1.1.1.1"]}
    assert prev["ips"][0]["version"] == "4"  # not mutated
