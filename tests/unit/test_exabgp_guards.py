"""The guards around ExaBGP: the redactor of its output, the command sink, the private config file, and how the
speaker uses them (a refused peer is left out and named, a hostile next hop never becomes a line, ExaBGP's own
words about a password never reach a log, a reason or the status)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import stat

import pytest

from routed.bgp.commands import CommandSink, refusal
from routed.bgp.config import PeerConfig, SpeakerConfig
from routed.bgp.redact import REDACTED, Redactor, elide_config_lines, printable
from routed.bgp.speaker import Speaker
from routed.private_files import private_dir, write_private

PASSWORD = 'tor-"secret"\nprocess pwn { run sh; }'


class Transport:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.lines += data.decode("ascii").splitlines()

    def close(self) -> None:
        self.closed = True


# -- redactor ----------------------------------------------------------------------------------------------
def test_redactor_replaces_every_spelling_of_a_password():
    r = Redactor()
    r.remember(["hunter2-long", None, PASSWORD])
    b64 = base64.b64encode(PASSWORD.encode()).decode()
    for text in (f"invalid syntax line 5: \"{'hunter2-long'}\"", f"md5-password {b64};", f"key {b64.rstrip('=')} x",
                 f"value {PASSWORD!r}", 'json "tor-\\"secret\\"\\nprocess pwn { run sh; }"',
                 "piece: process pwn { run sh; } here", 'first line: tor-"secret"'):
        assert REDACTED in r.redact(text), text
        out = r.clean(text)
        assert "hunter2" not in out and b64 not in out and "process pwn" not in out and 'tor-"secret"' not in out


def test_redactor_keeps_the_previous_configs_passwords_then_forgets():
    r = Redactor()
    r.remember(["first-password"])
    r.remember(["second-password"])
    assert r.redact("first-password second-password") == f"{REDACTED} {REDACTED}"
    r.remember(["third-password"])
    assert r.redact("first-password") == "first-password"  # two configurations back: no longer in use


def test_clean_escapes_control_characters_and_elides_config_lines():
    assert printable("a\nb\x1b[2Jc") == "a\\nb\\x1b[2Jc"
    assert elide_config_lines("line 6: md5-password abc ;") == "line 6: <config line not shown>"
    assert Redactor().clean("x" * 2000, 100) == "x" * 100 + "…"


# -- command sink ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line", [
    "neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2",
    "neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2 community [ 65000:100 1:2 ]",
    "neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2 large-community [ 1:2:3 ]",
    "neighbor 10.1.1.1 announce route fd00:1::/64 next-hop fd00::2 community [ 1:1 ] large-community [ 4:5:6 ]",
    "neighbor 10.1.1.1 withdraw route 10.244.1.0/24 next-hop 10.1.1.2",
    "neighbor fd00::1 announce eor ipv6 unicast", "neighbor 10.1.1.1 teardown 6",
])
def test_sink_writes_the_commands_routed_builds(line):
    sink, transport = CommandSink(), Transport()
    sink.attach(transport)
    assert sink.send(line) and transport.lines == [line] and sink.sent == 1 and sink.refused == 0


@pytest.mark.parametrize("line, why", [
    ("neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2\nannounce route 8.8.8.8/32 next-hop 1.1.1.1",
     "control character"),
    ("neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2\r", "control character"),
    ("neighbor 2001:db8::1%x announce eor ipv6 unicast", "not a command"),
    ("neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop ١٠.1.1.2", "non-ASCII"),
    ("neighbor 10.1.1.1 announce route 10.244.1.1/24 next-hop 10.1.1.2", "not a CIDR"),  # host bits
    ("neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 2001:db8::1", "not an IPv4 address"),
    ("neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2 community [ 70000:1 ]", "not a community"),
    ("neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2 ; announce route 8.8.8.8/32 next-hop self",
     "not a command"),
    ("neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop self", "not a command"),
    ("shutdown", "not a command"), ("neighbor 10.01.1.1 teardown 6", "not an IP address"),
    ("neighbor 2001:DB8::1 teardown 6", "not a command"), ("neighbor 10.1.1.1 teardown 0", "subcode"),
])
def test_sink_refuses_anything_else_logged_escaped_and_counted(line, why, caplog):
    sink, transport = CommandSink(), Transport()
    sink.attach(transport)
    with caplog.at_level(logging.ERROR, logger="routed.bgp.commands"):
        assert not sink.send(line)
    assert transport.lines == [] and sink.refused == 1 and sink.sent == 0
    assert why in refusal(line) and why in sink.last_refusal
    [record] = caplog.records
    assert "\n" not in record.getMessage() and "\r" not in record.getMessage()
    assert len(record.getMessage()) < 320


def test_sink_without_transport_writes_nothing_and_detach_keeps_a_newer_connection():
    sink = CommandSink()
    assert not sink.send("neighbor 10.1.1.1 teardown 6") and sink.sent == 0
    old, new = Transport(), Transport()
    sink.attach(old)
    sink.attach(new)
    assert old.closed and sink.transport is new
    sink.detach(old)  # the old bridge's reader ending must not drop the new one
    assert sink.transport is new
    sink.detach()
    assert new.closed and not sink.connected


# -- private files -----------------------------------------------------------------------------------------
def test_config_dir_and_file_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        d = private_dir(str(tmp_path / "exabgp"))
        write_private(os.path.join(d, "exabgp.conf"), "secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(d, "exabgp.conf")).st_mode) == 0o600
    assert os.listdir(d) == ["exabgp.conf"]


def test_an_untrusted_config_dir_is_replaced(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    (loose / "old.conf").write_text("x")
    os.chmod(loose, 0o755)
    private_dir(str(loose))
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700 and os.listdir(loose) == []
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    private_dir(str(link))
    assert not link.is_symlink() and link.is_dir() and target.exists()


# -- the speaker -------------------------------------------------------------------------------------------
def speaker_with(tmp_path, peers: tuple[PeerConfig, ...], pod_cidrs=("10.244.1.0/24",)) -> Speaker:
    sp = Speaker(str(tmp_path))
    sp.configure(SpeakerConfig(node_name="n1", asn=65001, router_id="10.1.1.2", pod_cidrs=pod_cidrs,
                               local_addresses=("10.1.1.2", "fd00:1::2"), peers=peers))
    sp.commands.attach(Transport())
    return sp


def up(sp: Speaker, peer: str) -> None:
    import json

    from routed.bgp.rib import parse_message

    sp.handle(parse_message(json.dumps({"type": "state", "neighbor": {"address": {"peer": peer}, "state": "up"}})),
              1.0)


def test_a_peer_with_a_bad_password_is_left_out_named_and_the_others_kept(tmp_path):
    good = PeerConfig(address="10.1.1.1", asn=65100, name="tor-a", families=(4,), next_hops=((4, "10.1.1.2"),))
    bad = PeerConfig(address="10.1.2.1", asn=65100, name="tor-b", families=(4,), password=PASSWORD,
                     next_hops=((4, "10.1.2.2"),))
    sp = speaker_with(tmp_path, (good, bad))
    conf = open(sp.conf_path).read()
    assert "neighbor 10.1.1.1 {" in conf and "10.1.2.1" not in conf and "pwn" not in conf
    assert stat.S_IMODE(os.stat(sp.conf_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sp.conf_path)).st_mode) == 0o700
    [error] = sp.errors()
    assert "BGPPeer tor-b" in error and "control character" in error and "secret" not in error
    status = {p.address: sp.peer_status(p) for p in sp.peers.values()}
    assert "BGPPeer tor-b" in status["10.1.2.1"]["lastError"]
    up(sp, "10.1.1.1")
    up(sp, "10.1.2.1")  # cannot happen (ExaBGP does not know it); nothing is sent to it anyway
    lines = sp.commands.transport.lines
    assert lines[0].startswith("neighbor 10.1.1.1 announce route 10.244.1.0/24")
    assert not [line for line in lines if "10.1.2.1 announce route" in line]


def test_a_hostile_next_hop_never_becomes_a_line(tmp_path):
    """The issue's ipv6NextHop: a scope id holding a newline and a second command."""
    injected = "2001:db8::1%x\nannounce route 8.8.8.8/32 next-hop 10.0.0.66"
    peer = PeerConfig(address="10.1.1.1", asn=65100, name="tor-a", families=(4, 6),
                      next_hops=((4, "10.1.1.2"), (6, injected)))
    sp = speaker_with(tmp_path, (peer,), pod_cidrs=("10.244.1.0/24", "fd00:244:1::/64"))
    up(sp, "10.1.1.1")
    lines = sp.commands.transport.lines
    assert not [line for line in lines if "8.8.8.8" in line]
    assert "neighbor 10.1.1.1 announce route 10.244.1.0/24 next-hop 10.1.1.2" in lines  # IPv4 still announced
    [error] = sp.errors()
    assert "BGPPeer tor-a" in error and "IPv6 next hop" in error and "\n" not in error


def test_exabgp_output_is_redacted_before_log_tail_reason_and_peer_error(tmp_path, caplog):
    peer = PeerConfig(address="10.1.1.1", asn=65100, name="tor-a", families=(4,), password="hunter2-long")
    sp = speaker_with(tmp_path, (peer,))
    b64 = base64.b64encode(b"hunter2-long").decode()

    class Proc:
        def __init__(self, lines: list[bytes]) -> None:
            self.stdout = asyncio.StreamReader()
            for line in lines:
                self.stdout.feed_data(line)
            self.stdout.feed_eof()

    lines = [b"configuration   problem parsing configuration file line 5\n",
             b'configuration   error message: invalid syntax line 5: "hunter2-long"\n',
             f"network   peer 10.1.1.1 connection failed, md5 {b64}\n".encode()]
    async def read() -> None:
        await sp._read_logs(Proc(lines))  # type: ignore[arg-type]

    with caplog.at_level(logging.DEBUG, logger="routed.bgp.speaker"):
        asyncio.run(read())
    everything = "\n".join(sp.log_tail) + sp.peers["10.1.1.1"].last_error + caplog.text
    assert "hunter2" not in everything and b64 not in everything
    assert "invalid syntax line 5: <config line not shown>" in sp.log_tail[1]
    assert REDACTED in sp.peers["10.1.1.1"].last_error
