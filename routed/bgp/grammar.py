"""The only tokens routed ever gives ExaBGP (in its config file or over its API), checked where they are used.

Pure. Each check takes what is about to be written and returns it unchanged when it is exactly one token of
ExaBGP's grammar in canonical form, else raises ValueError saying why (values shown repr-escaped and cut short,
never a password). They are the renderer's and the command sink's own defence: whatever the model layer let
through, a newline, a space, a quote, a brace, a semicolon, a scope id (`ipaddress` keeps `%anything`) or a
non-ASCII digit cannot reach ExaBGP.
"""

from __future__ import annotations

import ipaddress
import re

ASN_MAX = 4294967295
_ADDRESS = re.compile(r"[0-9a-f:.]{2,45}", re.ASCII)  # canonical IPv4/IPv6 text: lower-case hex, no scope id
_PREFIX = re.compile(r"([0-9a-f:.]{2,45})/([0-9]{1,3})", re.ASCII)
_COMMUNITY = re.compile(r"([0-9]{1,5}):([0-9]{1,5})", re.ASCII)
_LARGE_COMMUNITY = re.compile(r"([0-9]{1,10}):([0-9]{1,10}):([0-9]{1,10})", re.ASCII)
_PATH = re.compile(r"/[A-Za-z0-9._/+-]{0,4095}", re.ASCII)
SHOWN_MAX = 64


def shown(value: object, limit: int = SHOWN_MAX) -> str:
    """A value for an error message or a log line: repr-escaped (no control character survives), cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def address(value: object, family: int | None = None) -> str:
    """`value` when it is the canonical text of an IPv4 or IPv6 address (of `family` if given)."""
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise ValueError(f"{shown(value)} is not an IP address")
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{shown(value)} is not an IP address") from None
    if str(parsed) != value:
        raise ValueError(f"{shown(value)} is not in canonical form ({parsed})")
    if family is not None and parsed.version != family:
        raise ValueError(f"{shown(value)} is not an IPv{family} address")
    return value


def ipv4(value: object) -> str:
    return address(value, 4)


def prefix(value: object) -> str:
    """`value` when it is a canonical CIDR (address/length, no host bits set)."""
    if not isinstance(value, str) or not _PREFIX.fullmatch(value):
        raise ValueError(f"{shown(value)} is not a CIDR")
    try:
        parsed = ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise ValueError(f"{shown(value)} is not a CIDR") from None
    if str(parsed) != value:
        raise ValueError(f"{shown(value)} is not in canonical form ({parsed})")
    return value


def family_of(value: str) -> int:
    """4 or 6 for a value that passed `address` or `prefix`."""
    return 6 if ":" in value else 4


def integer(value: object, low: int, high: int, what: str) -> int:
    """`value` when it is an int (not a bool) in low..high."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} {shown(value)} is not a whole number in {low}..{high}")
    return value


def asn(value: object) -> int:
    return integer(value, 1, ASN_MAX, "AS number")


def community(value: object) -> str:
    """A standard (`a:b`, 16 bits each) or large (`a:b:c`, 32 bits each) community."""
    if isinstance(value, str):
        std = _COMMUNITY.fullmatch(value)
        if std and all(int(part) <= 0xFFFF for part in std.groups()):
            return value
        large = _LARGE_COMMUNITY.fullmatch(value)
        if large and all(int(part) <= ASN_MAX for part in large.groups()):
            return value
    raise ValueError(f"{shown(value)} is not a community (a:b or a:b:c)")


def is_large_community(value: str) -> bool:
    return value.count(":") == 2


def path(value: object) -> str:
    """An absolute file path of plain characters (the bridge's interpreter and socket in the `run` line)."""
    if not isinstance(value, str) or not _PATH.fullmatch(value):
        raise ValueError(f"{shown(value)} is not a plain absolute path")
    return value
