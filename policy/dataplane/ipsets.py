"""ipsets via `ipset restore`, two-phase: create/update before rules reference sets, destroy after.

Large membership changes are written into a temporary set and swapped in, so readers never see a
half-filled set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from policy import names
from policy.calc import IpSetSpec
from policy.dataplane.runner import run

log = logging.getLogger(__name__)

SWAP_THRESHOLD = 500  # membership changes above this are applied by fill-and-swap
MAXELEM = 1048576


@dataclass
class ActualSet:
    name: str
    kind: str
    members: set[str]


def normalise(kind: str, member: str) -> str:
    if kind == "hash:net":
        text, _, flag = member.partition(" ")
        if text.endswith("/32"):
            text = text[:-3]
        return f"{text} {flag}".strip()
    return member


def parse_save(text: str, prefix: str = names.PREFIX) -> dict[str, ActualSet]:
    sets: dict[str, ActualSet] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[1].startswith(prefix):
            continue
        if parts[0] == "create":
            sets[parts[1]] = ActualSet(parts[1], parts[2], set())
        elif parts[0] == "add" and parts[1] in sets:
            s = sets[parts[1]]
            flag = " nomatch" if "nomatch" in parts[3:] else ""
            s.members.add(normalise(s.kind, parts[2] + flag))
    return sets


class IpsetDataplane:
    def __init__(self, ipset: str = "ipset") -> None:
        self.ipset = ipset
        self.ops_written = 0

    def read(self) -> dict[str, ActualSet]:
        return parse_save(run([self.ipset, "save"]))

    @staticmethod
    def create_line(name: str, kind: str) -> str:
        return f"create {name} {kind} family inet hashsize 1024 maxelem {MAXELEM}"

    def swap_lines(self, name: str, kind: str, members: set[str]) -> list[str]:
        """Fill a temporary set and swap it in: readers never see a half-filled set. (`restore -exist` keeps a
        temporary set a crash left behind, so it is flushed first.)"""
        tmp = names.tmp_ipset_name(name)
        return ([self.create_line(tmp, kind), f"flush {tmp}"] + [f"add {tmp} {m}" for m in sorted(members)]
                + [f"swap {name} {tmp}", f"destroy {tmp}"])

    def phase1_script(self, desired: Mapping[str, IpSetSpec], actual: Mapping[str, ActualSet]) -> list[str]:
        lines: list[str] = []
        for name, spec in desired.items():
            want = {normalise(spec.kind, m) for m in spec.members}
            have = actual.get(name)
            if have is not None and have.kind != spec.kind:
                log.warning("ipset %s has type %s, want %s: refilling", name, have.kind, spec.kind)
                have = None
                lines.append(f"flush {name}")
            if have is None and name not in actual:
                lines.append(self.create_line(name, spec.kind))
                lines += [f"add {name} {m}" for m in sorted(want)]
                continue
            current = have.members if have is not None else set()
            added, removed = want - current, current - want
            if len(added) + len(removed) > SWAP_THRESHOLD:
                tmp = names.tmp_ipset_name(name)
                lines += [f"destroy {tmp}"] if tmp in actual else []
                lines += self.swap_lines(name, spec.kind, want)
            else:
                # removals first: a `nomatch` entry and its plain twin cannot coexist
                lines += [f"del {name} {m}" for m in sorted(removed)]
                lines += [f"add {name} {m}" for m in sorted(added)]
        return lines

    def phase2_script(self, desired: Mapping[str, IpSetSpec], actual: Mapping[str, ActualSet]) -> list[str]:
        return [f"destroy {name}" for name in sorted(actual) if name not in desired]

    def restore(self, lines: list[str]) -> None:
        if not lines:
            return
        run([self.ipset, "restore", "-exist"], stdin="\n".join(lines) + "\n")
        self.ops_written += len(lines)
