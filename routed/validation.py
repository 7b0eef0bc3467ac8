"""The one boundary for untrusted text: every address, CIDR, community, AS number and name that comes from a
cluster object (the Kubernetes API or the manifest directory alike) is checked here before it enters the typed
model, and comes out in its canonical form.

Pure and stdlib only. Every check raises `InvalidValue` (a `ValueError`, so pydantic validators report it as a
field error) naming the field (`what`); the offending text is shown escaped (`shown()`: ASCII, no control
characters, truncated), never raw, so an error can go to a log line, an Event or the node status as it is.

- `parse_ip` / `parse_cidr`: plain ASCII addresses only. Python's `ipaddress` alone is not validation: it keeps an
  IPv6 scope ID (`fe80::1%<anything but % and />`, newlines and spaces included) and `str()` gives it back.
  Here a '%', whitespace, control or non-ASCII characters are refused, and so are IPv4-mapped IPv6 addresses
  unless the caller allows them. The result is `str()` of the parsed value (lowercase, compressed IPv6;
  a CIDR's host bits cleared unless `strict`).
- Patterns are matched with `re.fullmatch` and `re.ASCII` (never `$`, which matches before a trailing newline;
  never a bare `\\d`, which matches non-ASCII digits). Their source strings (`*_RE`) are also what the CRDs'
  `pattern`s are generated from (scripts/kube_crds.py), so the apiserver refuses the same text first.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

from routed.errors import Code, RoutedError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_IP_LENGTH = 45  # the longest IPv6 text form (with an embedded IPv4 address)
MAX_CIDR_LENGTH = MAX_IP_LENGTH + 4  # "/128"
ASN_MAX = 4294967295  # 32-bit AS numbers (RFC 6793); 0 is reserved
TCP_MD5_KEY_MAX = 80  # bytes: the Linux kernel's TCP_MD5SIG_MAXKEYLEN

# Pattern sources (no anchors: they are used with re.fullmatch here and wrapped in ^(?:...)$ for the CRDs).
U16_RE = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
COMMUNITY_RE = rf"{U16_RE}:{U16_RE}"  # RFC 1997 'asn:value', 16 bits each
LARGE_COMMUNITY_RE = r"[0-9]{1,10}:[0-9]{1,10}:[0-9]{1,10}"  # RFC 8092 'a:b:c', 32 bits each (range checked)
ANY_COMMUNITY_RE = rf"(?:{COMMUNITY_RE}|{LARGE_COMMUNITY_RE})"
ASN_RE = r"[0-9]{1,10}"  # range checked: 1..ASN_MAX
DNS_LABEL_RE = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"  # RFC 1123 label, at most 63
DNS_SUBDOMAIN_RE = rf"{DNS_LABEL_RE}(?:\.{DNS_LABEL_RE})*"  # at most 253
LABEL_NAME_RE = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"  # a label key's name part / a label value
LABEL_KEY_RE = rf"(?:{DNS_SUBDOMAIN_RE}/)?{LABEL_NAME_RE}"
LABEL_VALUE_RE = rf"(?:{LABEL_NAME_RE})?"
SECRET_KEY_RE = r"[-._a-zA-Z0-9]+"  # a Secret's data key, at most 253

DNS_LABEL_MAX = 63
DNS_SUBDOMAIN_MAX = 253
LABEL_NAME_MAX = 63
LABEL_KEY_MAX = DNS_SUBDOMAIN_MAX + 1 + LABEL_NAME_MAX
SECRET_KEY_MAX = 253


def _compiled(source: str) -> re.Pattern[str]:
    return re.compile(source, re.ASCII)


_COMMUNITY = _compiled(COMMUNITY_RE)
_LARGE_COMMUNITY = _compiled(LARGE_COMMUNITY_RE)
_ASN = _compiled(ASN_RE)
_DNS_LABEL = _compiled(DNS_LABEL_RE)
_DNS_SUBDOMAIN = _compiled(DNS_SUBDOMAIN_RE)
_LABEL_NAME = _compiled(LABEL_NAME_RE)
_SECRET_KEY = _compiled(SECRET_KEY_RE)
_IP_CHARS = _compiled(r"[0-9A-Fa-f.:]+")
_PREFIX_LENGTH = _compiled(r"0|[1-9][0-9]{0,2}")
_IP_TEXT = _compiled(r"[0-9A-Fa-f.:]+")
_CIDR_TEXT = _compiled(r"[0-9A-Fa-f.:]+(?:/(?:0|[1-9][0-9]{0,2}))?")
_CONTROL = _compiled(r"[\x00-\x1f\x7f]")


class InvalidValue(RoutedError, ValueError):
    """A field of a cluster object does not validate; the message names the field, never the raw text."""

    code = Code.INVALID_VALUE

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason


def shown(value: object, limit: int = 48) -> str:
    """`value` for an error message: an ASCII repr without control characters, at most `limit` characters of
    the text (then '...'). Never use it for secrets."""
    if not isinstance(value, str):
        return type(value).__name__
    text = value if len(value) <= limit else value[:limit]
    return ascii(text) + ("..." if len(value) > limit else "")


def _plain_text(text: object, what: str, max_length: int) -> str:
    """The common gate: a str, not empty, not too long, printable ASCII without whitespace."""
    if not isinstance(text, str):
        raise InvalidValue(what, f"must be a string, got {type(text).__name__}")
    if not text:
        raise InvalidValue(what, "must not be empty")
    if not text.isascii():
        raise InvalidValue(what, f"non-ASCII character in {shown(text)}")
    if _CONTROL.search(text):
        raise InvalidValue(what, f"control character in {shown(text)}")
    if " " in text:
        raise InvalidValue(what, f"whitespace in {shown(text)}")
    if len(text) > max_length:
        raise InvalidValue(what, f"longer than {max_length} characters ({shown(text)})")
    return text


def _address_text(text: object, what: str, max_length: int, kind: str) -> str:
    """The address part of the gate: plain text of hex digits, '.' and ':' (and one '/' for a CIDR)."""
    fast = _IP_TEXT if kind == "address" else _CIDR_TEXT
    if isinstance(text, str) and len(text) <= max_length and fast.fullmatch(text):
        return text  # the common case, in one match (it excludes everything the checks below name)
    plain = _plain_text(text, what, max_length)
    if "%" in plain:
        raise InvalidValue(what, f"scope IDs ('%') are not allowed ({shown(plain)})")
    body, slash, length = plain.partition("/") if kind == "CIDR" else (plain, "", "")
    if not _IP_CHARS.fullmatch(body) or (slash and not _PREFIX_LENGTH.fullmatch(length)):
        raise InvalidValue(what, f"{shown(plain)} is not an IP {kind}")
    return plain


def address(text: object, what: str, *, family: int | None = None, allow_ipv4_mapped: bool = False) -> Address:
    """The parsed address (see `parse_ip`)."""
    plain = _address_text(text, what, MAX_IP_LENGTH, "address")
    try:
        addr = ipaddress.ip_address(plain)
    except ValueError:
        raise InvalidValue(what, f"{shown(plain)} is not an IP address") from None
    if family is not None and addr.version != family:
        raise InvalidValue(what, f"{addr} is not an IPv{family} address")
    if not allow_ipv4_mapped and isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        raise InvalidValue(what, f"IPv4-mapped IPv6 address {addr} is not allowed (use the IPv4 address)")
    return addr


def parse_ip(text: object, what: str, *, family: int | None = None, allow_ipv4_mapped: bool = False) -> str:
    """`text` as a canonical IP address, or InvalidValue naming `what`. `family` 4 or 6 requires that family."""
    return str(address(text, what, family=family, allow_ipv4_mapped=allow_ipv4_mapped))


def network(text: object, what: str, *, strict: bool = False, family: int | None = None,
            allow_ipv4_mapped: bool = False) -> Network:
    """The parsed network (see `parse_cidr`). A bare address is a host network (/32, /128)."""
    plain = _address_text(text, what, MAX_CIDR_LENGTH, "CIDR")
    try:
        net = ipaddress.ip_network(plain, strict=strict)
    except ValueError as exc:
        reason = "has host bits set" if "host bits set" in str(exc) else "is not an IP CIDR"
        raise InvalidValue(what, f"{shown(plain)} {reason}") from None
    if family is not None and net.version != family:
        raise InvalidValue(what, f"{net} is not an IPv{family} CIDR")
    if not allow_ipv4_mapped and isinstance(net, ipaddress.IPv6Network) and \
            net.network_address.ipv4_mapped is not None and net.prefixlen >= 96:
        raise InvalidValue(what, f"IPv4-mapped IPv6 CIDR {net} is not allowed (use the IPv4 CIDR)")
    return net


def parse_cidr(text: object, what: str, *, strict: bool = False, family: int | None = None,
               allow_ipv4_mapped: bool = False) -> str:
    """`text` as a canonical CIDR ('10.0.0.0/8', '2001:db8::/32'), or InvalidValue naming `what`. `strict`
    refuses host bits (otherwise they are cleared)."""
    return str(network(text, what, strict=strict, family=family, allow_ipv4_mapped=allow_ipv4_mapped))


def kept(values: Iterable[object], parse: Callable[[object, str], str], what: Callable[[int], str],
         refused: Callable[[str], None]) -> list[str]:
    """What `parse` accepts of `values`, canonical; each refused one is passed to `refused` as a message
    "<what(i)>: <reason>" (`what` is called only then: this runs for every pod of the cluster)."""
    out = []
    for i, value in enumerate(values):
        try:
            out.append(parse(value, ""))
        except InvalidValue as exc:
            refused(f"{what(i)}: {exc.reason}")
    return out


def ip_family(text: str) -> int:
    """4 or 6 for an address or CIDR that already passed `parse_ip` / `parse_cidr`."""
    return 6 if ":" in text else 4


def parse_community(text: object, what: str) -> str:
    """A standard ('asn:value', 0..65535 each) or large ('a:b:c', 0..4294967295 each) community, canonical
    (no leading zeros)."""
    plain = _plain_text(text, what, 32)
    if _COMMUNITY.fullmatch(plain):
        return ":".join(str(int(x)) for x in plain.split(":"))
    if _LARGE_COMMUNITY.fullmatch(plain) and all(int(x) <= ASN_MAX for x in plain.split(":")):
        return ":".join(str(int(x)) for x in plain.split(":"))
    raise InvalidValue(what, f"community {shown(plain)} is neither 'asn:value' (16-bit each) nor 'a:b:c' (large, "
                       "32-bit each)")


def parse_communities(values: object, what: str, max_items: int | None = None) -> list[str]:
    if not isinstance(values, list):
        raise InvalidValue(what, "must be a list")
    if max_items is not None and len(values) > max_items:
        raise InvalidValue(what, f"more than {max_items} communities")
    return [parse_community(c, f"{what}[{i}]") for i, c in enumerate(values)]


def parse_asn(value: object, what: str) -> int:
    """An AS number 1..4294967295: an int, or (a label value) its ASCII decimal text."""
    if isinstance(value, bool):
        raise InvalidValue(what, "must be an AS number, got a boolean")
    if isinstance(value, str):
        if not _ASN.fullmatch(value):
            raise InvalidValue(what, f"{shown(value)} is not an AS number")
        value = int(value)
    if not isinstance(value, int):
        raise InvalidValue(what, f"must be an AS number, got {type(value).__name__}")
    if not 1 <= value <= ASN_MAX:
        raise InvalidValue(what, f"AS number {value} out of range 1..{ASN_MAX}")
    return value


PROTOCOLS = ("TCP", "UDP", "SCTP")


def parse_port(value: object, what: str) -> int:
    """A port number 1..65535: an int (what kube-apiserver stores), or its ASCII decimal text (a manifest)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(what, f"must be a port number, got {type(value).__name__}")
    if not 1 <= value <= 65535:
        raise InvalidValue(what, f"port {value} out of range 1..65535")
    return value


def parse_protocol(value: object, what: str) -> str:
    """TCP, UDP or SCTP (absent: TCP)."""
    protocol = "TCP" if value is None or value == "" else value.upper() if isinstance(value, str) and value.isascii() else value
    if protocol not in PROTOCOLS:
        raise InvalidValue(what, f"{shown(protocol)} is not one of {', '.join(PROTOCOLS)}")
    return str(protocol)


_PORT_NAME = re.compile(r"(?=[a-z0-9-]*[a-z])[a-z0-9](?:-?[a-z0-9])*", re.ASCII)


def check_port_name(text: object, what: str) -> str:
    """An IANA service name (RFC 6335): at most 15 lowercase alphanumerics and single inner '-', one letter."""
    if not isinstance(text, str):
        raise InvalidValue(what, f"must be a string, got {type(text).__name__}")
    if len(text) > 15 or not _PORT_NAME.fullmatch(text):
        raise InvalidValue(what, f"{shown(text)} is not a port name (IANA service name, at most 15 characters)")
    return text


def _matching(pattern: re.Pattern[str], text: object, what: str, max_length: int, kind: str) -> str:
    if not isinstance(text, str):
        raise InvalidValue(what, f"must be a string, got {type(text).__name__}")
    if len(text) > max_length or not pattern.fullmatch(text):
        raise InvalidValue(what, f"{shown(text)} is not {kind} (at most {max_length} characters)")
    return text


def check_dns_label(text: object, what: str) -> str:
    """An RFC 1123 label: lowercase alphanumerics and '-', at most 63 (a namespace name)."""
    return _matching(_DNS_LABEL, text, what, DNS_LABEL_MAX, "a DNS-1123 label")


def check_dns_subdomain(text: object, what: str) -> str:
    """An RFC 1123 subdomain: DNS labels joined by '.', at most 253 (most object names, node names)."""
    return _matching(_DNS_SUBDOMAIN, text, what, DNS_SUBDOMAIN_MAX, "a DNS-1123 subdomain")


def check_label_key(text: object, what: str) -> str:
    """A Kubernetes label key: [prefix/]name, the prefix a DNS subdomain, the name at most 63 characters."""
    if not isinstance(text, str):
        raise InvalidValue(what, f"must be a string, got {type(text).__name__}")
    prefix, slash, name = text.rpartition("/")
    if slash:
        check_dns_subdomain(prefix, f"{what} (prefix of {shown(text)})")
    _matching(_LABEL_NAME, name, what, LABEL_NAME_MAX, "a label key")
    return text


def check_label_value(text: object, what: str) -> str:
    """A Kubernetes label value: empty, or alphanumerics with '-', '_', '.' inside, at most 63."""
    if text == "":
        return ""
    return _matching(_LABEL_NAME, text, what, LABEL_NAME_MAX, "a label value")


def check_secret_key(text: object, what: str) -> str:
    """A key of a Secret's data: alphanumerics, '-', '_', '.', at most 253."""
    return _matching(_SECRET_KEY, text, what, SECRET_KEY_MAX, "a Secret key")


def check_tcp_md5_key(value: str, what: str) -> str:
    """A TCP MD5 (RFC 2385) key: 1..80 bytes of UTF-8 without control characters (a trailing newline, as
    `kubectl create secret --from-file` gives for a file written by `echo`, included). The message names
    `what` and never the value."""
    size = len(value.encode())
    if size == 0:
        raise InvalidValue(what, "the password is empty")
    if size > TCP_MD5_KEY_MAX:
        raise InvalidValue(what, f"the password is {size} bytes; the kernel's TCP MD5 key limit is "
                           f"{TCP_MD5_KEY_MAX}")
    for i, c in enumerate(value):
        if not c.isprintable():  # C0/C1 controls, DEL, line and paragraph separators
            where = "a trailing newline" if value[i:] in ("\n", "\r\n") else f"a control character at position {i}"
            raise InvalidValue(what, f"the password contains {where} (value not shown)")
    return value


_DISPLAY_NAME = _compiled(r"[A-Za-z0-9][-A-Za-z0-9_.:/]{0,252}")


def display_name(text: object) -> str:
    """An object name for a message: as it is when it is plain (letters, digits, '-', '_', '.', ':', '/'),
    else escaped by `shown()` (a name from a manifest file can hold anything)."""
    if isinstance(text, str) and _DISPLAY_NAME.fullmatch(text):
        return text
    return shown(text)
