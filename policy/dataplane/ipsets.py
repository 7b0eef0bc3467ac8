"""ipsets via `ipset restore`, two-phase: create/update before rules reference sets, destroy after.

Large membership changes are written into a temporary set and swapped in, so readers never see a
half-filled set. Sets of both families live in one kernel namespace: the desired sets passed in are already
per family (IpSetSpec.for_family: `family inet` or `family inet6`, that family's name and members only), and one
restore writes both families' lines.

bitmap:port (a rule's ports) and list:set (a rule's peer sets) have no family of their own: each family has its
copy under its own name (`rtd-…`, `rtd6-…`), and reading back takes the family from the name. A list:set is
created after the sets it holds and destroyed before them. `ipset save` lists a bitmap:port set port by port;
its members are compared as merged runs ("80-90").
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from policy import names
from policy.calc import IpSetSpec
from policy.dataplane.runner import run

log = logging.getLogger(__name__)

SWAP_THRESHOLD = 500  # membership changes above this are applied by fill-and-swap
MAXELEM = 1048576
INET = {4: "inet", 6: "inet6"}
LIST_MIN_SIZE = 8  # list:set's own default


@dataclass
class ActualSet:
    name: str
    kind: str
    members: set[str]
    family: int = 4


def _canonical_v6(addr: str) -> str:
    """The libc text form, which is what `ipset save` prints (C: ~20x faster than ipaddress, no cache needed
    for 100,000s of members)."""
    return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, addr))


def _canonical(addr: str) -> str:
    """IPv6 addresses as `ipset save` prints them (compressed, lower case); IPv4 unchanged."""
    if ":" not in addr:
        return addr
    text, slash, plen = addr.partition("/")
    return _canonical_v6(text) + slash + plen


def normalise(kind: str, member: str) -> str:
    """A member as `ipset save` shows it: hash:net single hosts (/32, /128) without the prefix length, IPv6
    addresses compressed."""
    if kind == "hash:net":
        text, _, flag = member.partition(" ")
        if text.endswith("/128" if ":" in text else "/32"):
            text = text.rpartition("/")[0]
        return f"{_canonical(text)} {flag}".strip()
    if kind == "hash:ip,port":
        ip, comma, rest = member.partition(",")
        return _canonical(ip) + comma + rest
    if kind in ("bitmap:port", "list:set"):
        return member  # port runs as the calculation merged them; set names
    return _canonical(member)


def kernel_members(spec: IpSetSpec) -> set[str]:
    """The members of `spec` as `ipset save` shows them (what the kernel set holds once written)."""
    return {normalise(spec.kind, m) for m in spec.members}


def set_family(name: str, create_options: list[str]) -> int:
    """A set's family: its `family` option, or (bitmap:port, list:set have none) its name's."""
    if "family" in create_options:
        return 6 if "inet6" in create_options else 4
    return 6 if name.startswith(names.IPSET_V6_PREFIX) else 4


def port_run_members(ports: list[int]) -> set[str]:
    """bitmap:port members as merged runs ("80", "5000-5100")."""
    runs: list[list[int]] = []
    for port in sorted(set(ports)):
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return {str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs}


def parse_save(text: str, prefix: str = names.PREFIX) -> dict[str, ActualSet]:
    sets: dict[str, ActualSet] = {}
    ports: dict[str, list[int]] = {}  # bitmap:port sets, port by port as saved
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[1].startswith(prefix):
            continue
        if parts[0] == "create":
            sets[parts[1]] = ActualSet(parts[1], parts[2], set(), set_family(parts[1], parts[3:]))
        elif parts[0] == "add" and parts[1] in sets:
            s = sets[parts[1]]
            if s.kind == "bitmap:port":
                lo, _, hi = parts[2].partition("-")
                ports.setdefault(s.name, []).extend(range(int(lo), int(hi or lo) + 1))
                continue
            flag = " nomatch" if "nomatch" in parts[3:] else ""
            s.members.add(normalise(s.kind, parts[2] + flag))
    for name, saved in ports.items():
        sets[name].members = port_run_members(saved)
    return sets


class IpsetDataplane:
    def __init__(self, ipset: str = "ipset") -> None:
        self.ipset = ipset
        self.ops_written = 0

    def read(self) -> dict[str, ActualSet]:
        return parse_save(run([self.ipset, "save"]))

    @staticmethod
    def create_line(name: str, kind: str, family: int = 4, size: int = 0) -> str:
        """size: how many members a list:set will hold."""
        if kind == "bitmap:port":
            return f"create {name} bitmap:port range 0-65535"
        if kind == "list:set":
            return f"create {name} list:set size {max(LIST_MIN_SIZE, size)}"
        return f"create {name} {kind} family {INET[family]} hashsize 1024 maxelem {MAXELEM}"

    def swap_lines(self, name: str, kind: str, members: set[str], family: int = 4) -> list[str]:
        """Fill a temporary set and swap it in: readers never see a half-filled set. (`restore -exist` keeps a
        temporary set a crash left behind, so it is flushed first.)"""
        tmp = names.tmp_ipset_name(name)
        return ([self.create_line(tmp, kind, family, len(members)), f"flush {tmp}"]
                + [f"add {tmp} {m}" for m in sorted(members)] + [f"swap {name} {tmp}", f"destroy {tmp}"])

    def phase1_script(self, desired: Mapping[str, IpSetSpec], actual: Mapping[str, ActualSet]) -> list[str]:
        """desired: per-family sets (kernel name -> spec with `family` set)."""
        lines: list[str] = []
        # a list:set after the sets it holds
        for name, spec in sorted(desired.items(), key=lambda item: item[1].kind == "list:set"):
            family = spec.family or 4
            want = kernel_members(spec)
            have = actual.get(name)
            if have is not None and (have.kind, have.family) != (spec.kind, family):
                log.warning("ipset %s has type %s (IPv%d), want %s (IPv%d): refilling", name, have.kind, have.family,
                            spec.kind, family)
                have = None
                lines.append(f"flush {name}")
            if have is None and name not in actual:
                lines.append(self.create_line(name, spec.kind, family, len(want)))
                lines += [f"add {name} {m}" for m in sorted(want)]
                continue
            current = have.members if have is not None else set()
            added, removed = want - current, current - want
            if len(added) + len(removed) > SWAP_THRESHOLD:
                tmp = names.tmp_ipset_name(name)
                lines += [f"destroy {tmp}"] if tmp in actual else []
                lines += self.swap_lines(name, spec.kind, want, family)
            else:
                # removals first: a `nomatch` entry and its plain twin cannot coexist
                lines += [f"del {name} {m}" for m in sorted(removed)]
                lines += [f"add {name} {m}" for m in sorted(added)]
        return lines

    def phase2_script(self, desired: Mapping[str, IpSetSpec], actual: Mapping[str, ActualSet]) -> list[str]:
        """Destroy what is not desired, each list:set before the sets it holds."""
        gone = sorted((actual[name].kind != "list:set", name) for name in actual if name not in desired)
        return [f"destroy {name}" for _, name in gone]

    def restore(self, lines: list[str]) -> None:
        if not lines:
            return
        run([self.ipset, "restore", "-exist"], stdin="\n".join(lines) + "\n")
        self.ops_written += len(lines)
