"""routed/validation.py: the one boundary for untrusted text (addresses, CIDRs, communities, ASNs, names)."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from routed import validation
from routed.errors import Code
from routed.validation import (
    InvalidValue,
    check_dns_label,
    check_dns_subdomain,
    check_label_key,
    check_label_value,
    check_secret_key,
    check_tcp_md5_key,
    parse_asn,
    parse_cidr,
    parse_community,
    parse_ip,
    shown,
)

PLAIN = re.compile(r"[0-9a-f.:/]+", re.ASCII)  # what a canonical address or CIDR may consist of

# Text that looks like an address with something dangerous around or inside it.
INJECTIONS = ["\nannounce route 8.8.8.8 next-hop 10.0.0.66", "%x", "%eth0", " ", "\t", "\r", "\x00", "\x85",
              "\u2028", "\ufeff", "}", "\"", ";"]
ADDRESS_TEXT = st.one_of(
    st.text(max_size=60),
    st.text(alphabet="0123456789abcdefABCDEF.:%/ \n", max_size=50),
    st.builds(lambda a, s: str(a) + s, st.ip_addresses(), st.sampled_from(INJECTIONS)),
    st.builds(lambda s, a: s + str(a), st.sampled_from(INJECTIONS), st.ip_addresses()),
    st.ip_addresses().map(str),
)


@given(ADDRESS_TEXT)
@settings(max_examples=2000)
@example("2001:db8::1%x\nannounce route 8.8.8.8 next-hop 10.0.0.66 local-preference 5000")
@example("fe80::1%eth0")
@example("\u0661\u0660.0.0.1")  # Arabic-Indic digits
@example("10.0.0.1\n")
def test_anything_parse_ip_accepts_is_plain_and_canonical(text: str) -> None:
    try:
        out = parse_ip(text, "f")
    except InvalidValue as e:
        assert e.code == Code.INVALID_VALUE and e.msg.startswith("f: ")
        assert e.msg.isascii() and not any(c in e.msg for c in "\r\n\t\x00")  # safe for a log line
        return
    assert PLAIN.fullmatch(out), out
    assert out.isascii() and "%" not in out and not any(c.isspace() for c in out)
    assert out == str(ipaddress.ip_address(text))  # the canonical form of what was given ...
    assert parse_ip(out, "f") == out  # ... and a fixed point
    assert "%" not in text and text.isascii() and text.strip() == text


@given(ADDRESS_TEXT, st.booleans())
@settings(max_examples=1000)
@example("10.0.0.0/8%x", False)
@example("2001:db8::/32\n", False)
def test_anything_parse_cidr_accepts_is_plain_and_canonical(text: str, strict: bool) -> None:
    try:
        out = parse_cidr(text, "f", strict=strict)
    except InvalidValue:
        return
    assert PLAIN.fullmatch(out) and "/" in out, out
    assert out == str(ipaddress.ip_network(text, strict=strict))
    assert parse_cidr(out, "f", strict=True) == out


@given(st.ip_addresses())
def test_every_real_address_passes(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        with pytest.raises(InvalidValue, match="IPv4-mapped"):
            parse_ip(str(addr), "f")
        assert parse_ip(str(addr), "f", allow_ipv4_mapped=True) == str(addr)
        return
    assert parse_ip(str(addr), "f") == str(addr)
    assert parse_ip(addr.exploded.upper(), "f") == str(addr)


@pytest.mark.parametrize("text, reason", [
    ("fe80::1%eth0", "scope IDs"),
    ("2001:db8::1%x\nannounce route 8.8.8.8", "control character"),
    (" 10.0.0.1", "whitespace"),
    ("10.0.0.1 ", "whitespace"),
    ("\u0661.0.0.1", "non-ASCII"),
    ("010.0.0.1", "not an IP address"),
    ("10.0.0.1/32", "not an IP address"),
    ("::ffff:10.0.0.1", "IPv4-mapped"),
    ("", "empty"),
    ("1" * 100, "longer than"),
])
def test_parse_ip_refuses_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidValue, match=reason) as info:
        parse_ip(text, "spec.peerIP")
    assert info.value.msg.startswith("spec.peerIP: ") and "\n" not in info.value.msg


def test_parse_ip_family_and_types() -> None:
    assert parse_ip("2001:DB8:0::1", "f", family=6) == "2001:db8::1"
    with pytest.raises(InvalidValue, match="not an IPv4 address"):
        parse_ip("2001:db8::1", "f", family=4)
    with pytest.raises(InvalidValue, match="must be a string"):
        parse_ip(167772161, "f")  # ipaddress would take an int


def test_parse_cidr() -> None:
    assert parse_cidr("10.1.2.3/8", "f") == "10.0.0.0/8"
    assert parse_cidr("10.1.2.3", "f") == "10.1.2.3/32"
    assert parse_cidr("2001:DB8::/32", "f") == "2001:db8::/32"
    for bad, reason in [("10.0.0.0/8%x", "scope"), ("10.0.0.0/08", "not an IP CIDR"), ("10.0.0.0/33", "not an IP"),
                        ("10.0.0.0//8", "not an IP CIDR"), ("10.0.0.0/8\n", "control"), ("::ffff:0:0/96", "mapped")]:
        with pytest.raises(InvalidValue, match=reason):
            parse_cidr(bad, "f")
    with pytest.raises(InvalidValue, match="host bits"):
        parse_cidr("10.1.2.3/8", "f", strict=True)
    assert parse_cidr("::ffff:0:0/96", "f", allow_ipv4_mapped=True) == "::ffff:0:0/96"


@pytest.mark.parametrize("text, out", [("65000:100", "65000:100"), ("0:0", "0:0"), ("65535:65535", "65535:65535"),
                                       ("01:002", "1:2"), ("4294967295:0:4294967295", "4294967295:0:4294967295")])
def test_communities_accepted(text: str, out: str) -> None:
    assert parse_community(text, "c") == out


@pytest.mark.parametrize("text", ["1:2\n", "1:2 ", "65536:1", "1:65536", "4294967296:1:1", "1:2:3:4", "1",
                                  "\u0663:1", "1:\uff12", "-1:2", "1:2\nannounce route 8.8.8.8/32 next-hop self", ""])
def test_communities_refused(text: str) -> None:
    with pytest.raises(InvalidValue):
        parse_community(text, "c")


@given(st.text(max_size=30))
def test_anything_parse_community_accepts_is_digits_and_colons(text: str) -> None:
    try:
        out = parse_community(text, "c")
    except InvalidValue:
        return
    assert re.fullmatch(r"[0-9]+(:[0-9]+){1,2}", out, re.ASCII)


def test_asn() -> None:
    assert parse_asn(65000, "a") == 65000 and parse_asn("4294967295", "a") == 4294967295
    for bad in (0, 4294967296, -1, True, "65000\n", "\uff16\uff15", " 1", "", 1.5):
        with pytest.raises(InvalidValue):
            parse_asn(bad, "a")


def test_names() -> None:
    assert check_dns_subdomain("node-a.rack1", "n") == "node-a.rack1"
    assert check_dns_label("routed-system", "ns") == "routed-system"
    assert check_label_key("topology.routed.dev/rack", "k") == "topology.routed.dev/rack"
    assert check_label_value("", "v") == "" and check_label_value("r1.a_b", "v") == "r1.a_b"
    assert check_secret_key("tor.password_1", "k") == "tor.password_1"
    for check, bad in [(check_dns_subdomain, "Node-A"), (check_dns_subdomain, "a\n"), (check_dns_subdomain, "a" * 254),
                       (check_dns_label, "a.b"), (check_label_key, "a/b/c"), (check_label_key, "x" * 64),
                       (check_label_value, "-x"), (check_label_value, "x\n"), (check_secret_key, "a/b"),
                       (check_secret_key, "k\n")]:
        with pytest.raises(InvalidValue):
            check(bad, "f")


def test_tcp_md5_key_never_echoed() -> None:
    secret = "pa\"ss; }\nprocess pwn { run sh -c \"touch /tmp/x\"; }"
    for value, reason in [("x" * 81, "81 bytes"), ("\u00e9" * 41, "82 bytes"), ("s3cret\n", "trailing newline"),
                          (secret, "control character at position 8"), ("a\u2028b", "control character"), ("", "empty")]:
        with pytest.raises(InvalidValue, match=reason) as info:
            check_tcp_md5_key(value, "secret ns/bgp key tor")
        assert info.value.msg.startswith("secret ns/bgp key tor: ")
        assert not value or value not in info.value.msg
        assert not any(word in info.value.msg for word in ("pwn", "touch", "s3cret", "xxx", "\u00e9"))
    assert check_tcp_md5_key("x" * 80, "s") == "x" * 80
    assert check_tcp_md5_key("with space \u00e9", "s") == "with space \u00e9"


def test_shown_is_escaped_and_short() -> None:
    assert shown("a\nb") == "'a\\nb'"
    assert shown("x" * 100).endswith("...") and len(shown("x" * 100)) < 60
    assert shown(5) == "int"
    assert validation.display_name("node-a") == "node-a" and validation.display_name("a\nb") == "'a\\nb'"


def test_crd_patterns_are_the_same_text() -> None:
    """The CRDs use the pattern sources anchored; they must agree with the checks on tricky input."""
    community = re.compile(f"^(?:{validation.ANY_COMMUNITY_RE})$")
    for text in ("65000:100", "65536:1", "1:2\n", "1:2:3"):
        ok = True
        try:
            parse_community(text, "c")
        except InvalidValue:
            ok = False
        # Python's `$` would match before the trailing newline: the Go regexp used by the apiserver does not, so
        # compare with \Z semantics here.
        assert bool(community.fullmatch(text)) == ok or text.endswith("\n")


def test_container_ports_as_the_apiserver_would_accept_them_the_others_left_out(caplog):
    from routed.model import ContainerPort, Pod
    pod = Pod.from_k8s({"metadata": {"name": "p", "namespace": "x"}, "spec": {"containers": [{"ports": [
        {"containerPort": "7jp"}, {"containerPort": 80, "name": "web", "protocol": "UDP"},
        {"containerPort": 81, "protocol": "tcp"}, {"containerPort": 70000}, {"containerPort": True},
        {"containerPort": 82, "name": 'a" -j ACCEPT'}, {"containerPort": 83, "protocol": "TCP\n-F"},
        {"containerPort": "8080", "name": "http-alt"}, "junk"]}, "junk"]}})
    assert pod.ports == (ContainerPort(80, "UDP", "web"), ContainerPort(81, "TCP", ""),
                         ContainerPort(8080, "TCP", "http-alt"))
    assert "pod x/p: spec.containers[0].ports[0].containerPort" in caplog.text
    assert "\n-F" not in caplog.text
