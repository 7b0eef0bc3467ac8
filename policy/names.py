"""Deterministic names for our chains and ipsets: prefix `rtd` + stable hash, within kernel limits.

Chains keep their names in both families' tables (iptables and ip6tables are separate). ipsets share one kernel
namespace across families, so each set of the calculation has one name per family: IPv4 keeps the
calculation's name (`rtd-s-…`, `rtd-host-ips`), IPv6 replaces the `rtd-` prefix by `rtd6-` (`rtd6-s-…`,
`rtd6-host-ips`): deterministic, still under the `rtd` prefix the agent sweeps, within the 31-character limit.
"""

from __future__ import annotations

import base64
import functools
import hashlib

PREFIX = "rtd"
MAX_CHAIN = 28
MAX_IPSET = 31
COMMENT_PREFIX = "rtd:"

# Fixed chains (hooked from the built-in chains of the filter table).
CHAIN_FORWARD = "rtd-FORWARD"
CHAIN_INPUT = "rtd-INPUT"
CHAIN_FROM_DISPATCH = "rtd-from-wl-dispatch"
CHAIN_TO_DISPATCH = "rtd-to-wl-dispatch"
IPSET_HOST = "rtd-host-ips"
IPSET_TMP_PREFIX = "rtd-tmp-"
IPSET_V6_PREFIX = "rtd6-"
FAMILIES = (4, 6)


def short_hash(text: str, length: int = 16) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest).decode().lower().rstrip("=")[:length]


def _checked(name: str, limit: int) -> str:
    if len(name) > limit:
        raise ValueError(f"name {name!r} longer than {limit}")
    return name


@functools.lru_cache(maxsize=65536)
def policy_chain(policy_key: str, direction: str) -> str:
    kind = "pi" if direction == "Ingress" else "pe"
    return _checked(f"{PREFIX}-{kind}-{short_hash(policy_key, 20)}", MAX_CHAIN)


@functools.lru_cache(maxsize=65536)
def endpoint_chain(host_ifname: str, direction: str) -> str:
    """direction: 'from' (traffic the workload sends) or 'to' (traffic it receives)."""
    kind = "fw" if direction == "from" else "tw"
    return _checked(f"{PREFIX}-{kind}-{short_hash(host_ifname, 20)}", MAX_CHAIN)


def ipset_name(kind: str, identity: str) -> str:
    """kind: one letter ('s' selector, 'n' ipBlocks, 'p' named port, 'o' ports, 'l' list of sets). Names of short
    identities (selectors, named ports) are remembered: the same ones are asked for by every plan."""
    if len(identity) <= 512:
        return _short_ipset_name(kind, identity)
    return _checked(f"{PREFIX}-{kind}-{short_hash(identity, 24)}", MAX_IPSET)


@functools.lru_cache(maxsize=65536)
def _short_ipset_name(kind: str, identity: str) -> str:
    return _checked(f"{PREFIX}-{kind}-{short_hash(identity, 24)}", MAX_IPSET)


def family_ipset_name(name: str, family: int) -> str:
    """The kernel name of the calculation's set `name` in `family` (4: unchanged; 6: `rtd-…` -> `rtd6-…`)."""
    if family == 4:
        return name
    if family != 6 or not name.startswith(PREFIX + "-"):
        raise ValueError(f"no IPv{family} name for ipset {name!r}")
    return _checked(IPSET_V6_PREFIX + name[len(PREFIX) + 1:], MAX_IPSET)


def tmp_ipset_name(name: str) -> str:
    return _checked(IPSET_TMP_PREFIX + short_hash(name, 20), MAX_IPSET)


def rule_hash(chain: str, previous: str, rule: str) -> str:
    return short_hash(f"{chain}\0{previous}\0{rule}", 16)
