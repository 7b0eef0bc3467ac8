"""Hostile input against what ExaBGP receives, checked with ExaBGP's own parsers (in process).

Arbitrary text (quotes, backslashes, newlines, braces, semicolons, scope ids, unicode digits, ...) goes straight
into every field that reaches ExaBGP's config (password, names, addresses, AS numbers, timers) or its API lines
(prefixes, next hops, communities), bypassing the model's validation. Either the renderer / announcement builder
refuses the value with a BgpConfigError naming the peer, or ExaBGP parses exactly what was meant: the one
`routed` process running the bridge, exactly the intended neighbours with their values, no static route; an API
line is exactly one command for exactly the intended route. More examples: ROUTED_PROPERTY_EXAMPLES=2000.
"""

from __future__ import annotations

import base64
import os
import sys
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routed.bgp import announce, exabgp_conf
from routed.bgp.commands import CommandSink, refusal
from routed.bgp.config import BgpConfigError, PeerConfig, SpeakerConfig

EXAMPLES = int(os.environ.get("ROUTED_PROPERTY_EXAMPLES", "60"))
PYTHON = sys.executable
SOCKET = "/var/lib/routed/bgp/exabgp-api.sock"
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INJECTIONS = [
    '"', '\\"', "\\", "\n", "\r", "\r\n", ";", "{", "}", "}\n", " ", "\t", "#", "[", "]", "'", "\x00", "\x1b[2J",
    "\u2028", "\x85", "\ufeff", "٣", "%x\nannounce route 8.8.8.8/32 next-hop 10.0.0.66",
    '"; }\nprocess pwn { run /bin/sh -c "id"; encoder text; }\nneighbor 10.9.9.9 { md5-password "x',
    '\\"; }\nprocess pwn { run /bin/sh -c \\"id\\"; encoder text; }\n', " ; announce route 8.8.8.8/32 next-hop self",
    "%eth0", "/32", "$(id)", "`id`",
]


def hostile(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A valid value, arbitrary text, or a valid value with an injection before or after it."""
    text = st.text(max_size=12)
    return st.one_of(
        valid, st.text(), st.integers(), st.none(), st.booleans(),
        st.builds(lambda v, i, t: f"{v}{i}{t}", valid, st.sampled_from(INJECTIONS), text),
        st.builds(lambda i, v: f"{i}{v}", st.sampled_from(INJECTIONS), valid),
    )


V4 = st.ip_addresses(v=4).map(str)
V6 = st.ip_addresses(v=6).map(str)
ASN = st.integers(1, 2**32 - 1)
PASSWORD = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20)
COMMUNITY = st.one_of(st.builds(lambda a, b: f"{a}:{b}", st.integers(0, 65535), st.integers(0, 65535)),
                      st.builds(lambda a, b, c: f"{a}:{b}:{c}", ASN, ASN, ASN))


@dataclass
class Case:
    cfg: SpeakerConfig
    valid_peers: set[str]  # addresses of the peers drawn only from valid values: these must be rendered
    node_valid: bool


@st.composite
def peers(draw: st.DrawFn, index: int, valid: bool) -> PeerConfig:
    family = draw(st.sampled_from([4, 6]))
    addr = V4 if family == 4 else V6
    pick = (lambda s: s) if valid else hostile
    multihop = draw(st.one_of(st.none(), st.integers(1, 255)))
    ttl_security = None if multihop else draw(st.one_of(st.none(), st.integers(1, 254)))
    return PeerConfig(
        address=draw(pick(addr)),
        asn=draw(pick(ASN)),
        name=draw(st.text()),  # never in the config
        password=draw(st.one_of(st.none(), pick(PASSWORD))),
        multihop=draw(pick(st.just(multihop))),
        ttl_security=draw(pick(st.just(ttl_security))),
        passive=draw(pick(st.booleans())),
        families=draw(st.sampled_from([(family,), (4, 6)])),
        local_address=draw(st.one_of(st.just(""), pick(addr))),
    )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    node_valid = draw(st.booleans())
    pick = (lambda s: s) if node_valid else hostile
    drawn: list[tuple[PeerConfig, bool]] = []
    for i in range(draw(st.integers(1, 4))):
        valid = draw(st.booleans())
        drawn.append((draw(peers(i, valid)), valid))
    cfg = SpeakerConfig(
        node_name=draw(st.text()), asn=draw(pick(ASN)), router_id=draw(pick(V4)),
        hold_time=draw(pick(st.one_of(st.just(0), st.integers(3, 65535)))),
        graceful_restart_time=draw(pick(st.integers(0, 4095))),
        peers=tuple(p for p, _ in drawn),
    )
    seen: set[str] = set()
    valid_peers = set()
    for p, valid in drawn:
        if valid and p.address not in seen:
            valid_peers.add(p.address)
        seen.add(p.address)
    return Case(cfg, valid_peers, node_valid)


def exabgp_parse(text: str) -> Any:
    """ExaBGP's own configuration parser on `text` (what `exabgp <file>` runs first)."""
    from exabgp.configuration.configuration import Configuration
    from exabgp.environment import getenv
    from exabgp.logger import log

    log.init(getenv())
    config = Configuration([text], text=True)
    assert config.reload() is True, f"ExaBGP refused the config: {config.error}\n{text}"
    return config


def expect_neighbour(cfg: SpeakerConfig, peer: PeerConfig, parsed: Any) -> None:
    assert str(parsed["peer-address"]) == peer.address
    assert int(parsed["peer-as"]) == peer.asn and int(parsed["local-as"]) == cfg.asn
    assert str(parsed["router-id"]) == cfg.router_id and int(parsed["hold-time"]) == cfg.hold_time
    if peer.local_address:
        assert str(parsed["local-address"]) == peer.local_address
    if peer.password:
        assert parsed["md5-base64"] is True
        assert base64.b64decode(parsed["md5-password"], validate=True) == peer.password.encode("utf-8")
    else:
        assert not parsed["md5-password"]
    assert parsed["passive"] is peer.passive
    want_out = 255 if peer.ttl_security else (peer.multihop or None)
    assert parsed["outgoing-ttl"] == want_out
    assert parsed["incoming-ttl"] == (256 - peer.ttl_security if peer.ttl_security else None)
    assert parsed["description"] == ""
    assert [str(afi) for afi, _ in parsed.families()] == [exabgp_conf.AFI[f] for f in peer.families]
    assert parsed.api["processes"] == [exabgp_conf.PROCESS_NAME]
    assert list(parsed.changes) == []  # no static route


@PROPERTY
@given(cases())
def test_config_is_refused_or_exactly_what_was_meant(case: Case):
    cfg = case.cfg
    try:
        rendered = exabgp_conf.render_config(cfg, SOCKET, python=PYTHON)
    except BgpConfigError as exc:
        assert not case.node_valid, f"a valid node refused: {exc}"
        return
    assert case.valid_peers <= rendered.peers, f"a valid peer refused: {rendered.refused}"
    for address, why in rendered.refused:
        assert "peer" in why and "\n" not in why
        for p in cfg.peers:
            if p.address == address and isinstance(p.password, str) and len(p.password) > 3:
                assert p.password not in why
    parsed = exabgp_parse(rendered.text)
    assert list(parsed.processes) == [exabgp_conf.PROCESS_NAME]
    assert parsed.processes[exabgp_conf.PROCESS_NAME]["run"] == [PYTHON, "-m", "routed.bgp.bridge", SOCKET]
    by_address = {str(n["peer-address"]): n for n in parsed.neighbors.values()}
    assert set(by_address) == set(rendered.peers)
    for address in rendered.peers:
        expect_neighbour(cfg, rendered_peer(cfg, address), by_address[address])


def rendered_peer(cfg: SpeakerConfig, address: str) -> PeerConfig:
    """The first peer with `address` that renders (the others with it are refused)."""
    for p in cfg.peers:
        if p.address == address:
            try:
                exabgp_conf.neighbor_lines(cfg, p)
            except BgpConfigError:
                continue
            return p
    raise AssertionError(f"no peer {address} renders")


@PROPERTY
@given(st.text(), st.sampled_from([(PYTHON, SOCKET), ("python3", SOCKET), (PYTHON, "sock")]))
def test_hostile_paths_never_reach_the_run_line(extra: str, paths: tuple[str, str]):
    python, socket = paths
    cfg = SpeakerConfig(node_name="n1", asn=65001, router_id="10.0.0.1",
                        peers=(PeerConfig(address="10.1.1.1", asn=65100, name="tor", families=(4,)),))
    try:
        text = exabgp_conf.render(cfg, socket + extra, python=python)
    except BgpConfigError as exc:
        assert "node n1" in str(exc)
        return
    parsed = exabgp_parse(text)
    assert parsed.processes[exabgp_conf.PROCESS_NAME]["run"] == [python, "-m", "routed.bgp.bridge", socket + extra]
    assert list(parsed.processes) == [exabgp_conf.PROCESS_NAME]


@pytest.mark.parametrize("password, why", [
    ("hunter2\n", "control character"), ('a"; }\nprocess pwn { run /bin/sh; }', "control character"),
    ("x" * 81, "longer than 80 bytes"), ("é" * 41, "longer than 80 bytes"), ("\ud800abc", "control character"),
])
def test_unusable_passwords_are_refused_without_echo(password, why):
    cfg = SpeakerConfig(node_name="n1", asn=65001, router_id="10.0.0.1",
                        peers=(PeerConfig(address="10.1.1.1", asn=65100, name="tor-a", password=password,
                                          families=(4,)),
                               PeerConfig(address="10.1.1.5", asn=65100, name="tor-b", families=(4,))))
    rendered = exabgp_conf.render_config(cfg, SOCKET, python=PYTHON)
    assert rendered.peers == {"10.1.1.5"}  # the other peer is still configured
    [(address, message)] = rendered.refused
    assert address == "10.1.1.1" and "BGPPeer tor-a" in message and why in message
    assert password not in message and password.strip() not in message
    assert list(exabgp_parse(rendered.text).processes) == [exabgp_conf.PROCESS_NAME]


def test_a_password_breaking_out_of_quotes_is_just_a_password():
    """What used to start a shell through `md5-password "…"` (ExaBGP unescapes `\\"` before it reads quotes):
    as base64 it is one token, and ExaBGP runs no process but ours."""
    password = 'a\\"; } process pwn { run /bin/sh -c "id"; encoder text; }'
    cfg = SpeakerConfig(node_name="n1", asn=65001, router_id="10.0.0.1",
                        peers=(PeerConfig(address="10.1.1.1", asn=65100, name="tor", password=password, families=(4,)),))
    parsed = exabgp_parse(exabgp_conf.render(cfg, SOCKET, python=PYTHON))
    assert list(parsed.processes) == [exabgp_conf.PROCESS_NAME]
    [neighbour] = parsed.neighbors.values()
    assert base64.b64decode(neighbour["md5-password"]) == password.encode()


# -- API lines ---------------------------------------------------------------------------------------------
def exabgp_command(line: str) -> tuple[list[str], list[Any], list[list[str]]]:
    """What ExaBGP's API makes of one line: the commands it matches, the routes it parses, the neighbours named."""
    from exabgp.configuration.core.format import formated
    from exabgp.environment import getenv
    from exabgp.logger import log
    from exabgp.reactor.api import API
    from exabgp.reactor.api.command import Command
    from exabgp.reactor.api.command.limit import extract_neighbors

    log.init(getenv())
    lines = [formated(part.rstrip()) for part in line.split("\n")]
    assert len(lines) == 1, "one line, one command"
    text = lines[0]
    matched = [r for r in Command.functions if r == text or text.endswith(" " + r) or r + " " in text]
    descriptions, command = extract_neighbors(text)
    routes: list[Any] = []
    if command.startswith(("announce route ", "withdraw route ")):
        routes = API(None).api_route(command)
    return matched, routes, descriptions


PREFIX4 = st.ip_addresses(v=4).map(lambda a: f"{a}/32")
PREFIX6 = st.ip_addresses(v=6).map(lambda a: f"{a}/128")


@PROPERTY
@given(family=st.sampled_from([4, 6]), data=st.data())
def test_announcements_are_refused_or_exactly_one_route(family: int, data: st.DataObject):
    valid = data.draw(st.booleans())
    pick = (lambda s: s) if valid else hostile
    peer_address = data.draw(pick(V4))
    next_hop = data.draw(pick(V4 if family == 4 else V6.filter(lambda a: not a.startswith(("fe8", "::", "ff")))))
    prefix = data.draw(pick(PREFIX4 if family == 4 else PREFIX6))
    communities = data.draw(st.lists(pick(COMMUNITY), max_size=3))
    peer = PeerConfig(address=peer_address, asn=65100, name="tor", families=(4, 6),
                      next_hops=((family, next_hop),))
    try:
        ann = announce.announcement(peer, prefix, communities)
    except BgpConfigError as exc:
        assert not valid, exc
        assert "BGPPeer tor" in str(exc) and "\n" not in str(exc)
        return
    if ann is None:  # an unusable next hop (loopback, multicast, ...): not announced
        return
    for line in (ann.command, ann.withdraw):
        assert refusal(line) == "", line
        matched, routes, descriptions = exabgp_command(line)
        assert matched[:1] == [line.split()[2] + " route"]
        assert descriptions == [[f"neighbor {peer_address}"]]
        [route] = routes
        # compared as addresses: ExaBGP writes an IPv4-mapped address dotted (::ffff:0.0.0.0), Python 3.11 does not
        assert ip_network(str(route.nlri.cidr)) == ip_network(prefix)
        assert ip_address(str(route.nlri.nexthop)) == ip_address(next_hop)
    [route] = exabgp_command(ann.command)[1]
    attributes = route.extensive()
    for c in communities:
        assert f" {c}" in attributes


@PROPERTY
@given(st.one_of(st.text(), st.builds(lambda v, i, t: f"neighbor 10.1.1.1 announce route {v}{i}{t}",
                                      PREFIX4, st.sampled_from(INJECTIONS), st.text(max_size=12))))
def test_sink_writes_only_single_well_formed_commands(line: str):
    written: list[bytes] = []

    class Transport:
        def write(self, data: bytes) -> None:
            written.append(data)

        def close(self) -> None:
            pass

    sink = CommandSink()
    sink.attach(Transport())
    sent = sink.send(line)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in line) or not line.isascii():
        assert not sent
    if not sent:
        assert written == [] and sink.refused == 1
        return
    assert written == [(line + "\n").encode("ascii")]
    matched, routes, descriptions = exabgp_command(line)
    assert matched, line
    assert len(descriptions) == 1
    if " route " in line:
        assert len(routes) == 1
