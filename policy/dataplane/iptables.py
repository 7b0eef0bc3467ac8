"""Read back our chains (iptables-save / ip6tables-save), diff them against the rendered ruleset by hash comments
only, and turn the difference into a list of operations that every writer applies in one atomic commit.

Both families use the same backend (legacy or nft): `FAMILY_TOOLS[family][backend]` is its save/restore pair.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field

from policy import names
from policy.dataplane.runner import CommandError, run
from policy.render import RenderedRule, Ruleset

log = logging.getLogger(__name__)

TABLE = "filter"
BUILTINS = ("INPUT", "FORWARD", "OUTPUT")
_HASH_RE = re.compile(r'--comment "?' + re.escape(names.COMMENT_PREFIX) + r'([a-z0-9]+)"?')
_COUNTER_RE = re.compile(r"^\[(\d+):(\d+)\]\s+")


@dataclass(frozen=True)
class ActualRule:
    hash: str | None  # None: not one of ours
    packets: int = 0
    bytes: int = 0
    text: str = ""


@dataclass
class TableState:
    chains: dict[str, list[ActualRule]] = field(default_factory=dict)

    def ours(self) -> list[str]:
        return [c for c in self.chains if c.startswith(names.PREFIX)]


def parse_save(text: str, table: str = TABLE) -> TableState:
    state = TableState()
    in_table = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            in_table = line[1:] == table
            continue
        if not in_table or not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            state.chains.setdefault(line[1:].split()[0], [])
            continue
        packets = byts = 0
        m = _COUNTER_RE.match(line)
        if m:
            packets, byts = int(m.group(1)), int(m.group(2))
            line = line[m.end():]
        if not line.startswith("-A "):
            continue
        chain = line.split()[1]
        h = _HASH_RE.search(line)
        state.chains.setdefault(chain, []).append(ActualRule(h.group(1) if h else None, packets, byts, line))
    return state


# -- backend -------------------------------------------------------------------------------------------
FAMILY_TOOLS: dict[int, dict[str, tuple[str, str]]] = {
    family: {backend: (f"{tool}-{backend}-save", f"{tool}-{backend}-restore") for backend in ("legacy", "nft")}
    for family, tool in ((4, "iptables"), (6, "ip6tables"))
}
TOOLS = FAMILY_TOOLS[4]
IPV6_KERNEL = "/proc/net/if_inet6"  # present when the kernel (this namespace) has IPv6


def tools(backend: str, family: int = 4) -> tuple[str, str]:
    """(save, restore) of `family` for `backend`."""
    return FAMILY_TOOLS[family][backend]


def family_available(backend: str, family: int) -> bool:
    """Whether this node can hold `family`'s rules: the tools are installed (IPv6: and the kernel has IPv6)."""
    if family == 6 and not os.path.exists(IPV6_KERNEL):
        return False
    return all(shutil.which(tool) for tool in tools(backend, family))


def active_families(backend: str, configured: Iterable[int] | None) -> tuple[int, ...]:
    """The families to police: the configured ones, or (None) IPv4 and, where it is available, IPv6."""
    if configured is not None:
        return tuple(sorted(set(configured)))
    return tuple(f for f in (4, 6) if f == 4 or family_available(backend, f))


def _rule_lines(save_cmd: str) -> tuple[int, bool]:
    try:
        out = run([save_cmd], timeout=30)
    except (CommandError, OSError):
        return 0, False
    lines = [ln for ln in out.splitlines() if ln.startswith("-A ")]
    ours = any(f"-j {names.PREFIX}" in ln or ln.split()[1].startswith(names.PREFIX) for ln in lines)
    return len(lines), ours


def _backend_lines(backend: str) -> tuple[int, bool]:
    """Rule lines and whether any is ours, over both families' tables of `backend`."""
    found = [_rule_lines(tools(backend, f)[0]) for f in FAMILY_TOOLS if shutil.which(tools(backend, f)[0])]
    return sum(n for n, _ in found), any(ours for _, ours in found)


def detect_backend(preference: str = "auto") -> str:
    """Like Calico's Auto: where our chains already are (either family), else whichever has more rules, else
    nft. Both families always use the same backend."""
    if preference in TOOLS:
        return preference
    counts = {b: _backend_lines(b) for b in TOOLS if shutil.which(TOOLS[b][0])}
    with_ours = [b for b, (_, ours) in counts.items() if ours]
    if len(with_ours) == 1:
        return with_ours[0]
    if counts.get("legacy", (0, False))[0] > counts.get("nft", (0, False))[0]:
        return "legacy"
    return "nft" if "nft" in counts else "legacy"


def read_chains(backend: str, chains: Iterable[str], family: int = 4) -> TableState:
    """Just these (built-in) chains of the filter table, one `iptables -S CHAIN` each: the cheap hook check reads
    a few rules rather than the whole table."""
    command = tools(backend, family)[0].removesuffix("-save")
    text = "".join(run([command, "-w", "5", "-t", TABLE, "-S", chain], timeout=30) for chain in chains)
    return parse_save(f"*{TABLE}\n{text}")


def hook_ops(hooks: dict[str, RenderedRule], actual: TableState) -> list[Op]:
    """What puts each hook back at position 1 of its built-in chain, once (nothing when all are in place)."""
    return diff(Ruleset(hooks=dict(hooks)), actual, sweep=False)


def read_table(backend: str, counters: bool = False, family: int = 4) -> TableState:
    cmd = [tools(backend, family)[0], "-t", TABLE]
    if counters:
        cmd.append("-c")
    return parse_save(run(cmd))


# -- diff ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    kind: str  # new_chain | replace | append | delete | insert | flush | delete_chain
    chain: str
    position: int = 0  # 1-based, for replace/delete/insert
    line: str = ""  # full `-A chain ...` text (with our comment) for replace/append/insert
    hash: str = ""
    body: str = ""


def diff(desired: Ruleset, actual: TableState, sweep: bool = True) -> list[Op]:
    """Operations turning `actual` into `desired`, touching only chains/rules whose hashes differ."""
    ops: list[Op] = []
    for chain in desired.chains:
        if chain not in actual.chains:
            ops.append(Op("new_chain", chain))
    for chain, rules in desired.chains.items():
        have = actual.chains.get(chain, [])
        for i, rule in enumerate(rules):
            if i < len(have):
                if have[i].hash != rule.hash:
                    ops.append(Op("replace", chain, i + 1, rule.line(chain), rule.hash, rule.body))
            else:
                ops.append(Op("append", chain, 0, rule.line(chain), rule.hash, rule.body))
        for pos in range(len(have), len(rules), -1):
            ops.append(Op("delete", chain, pos))
    for builtin, hook in desired.hooks.items():
        have = actual.chains.get(builtin, [])
        ours = [i for i, r in enumerate(have) if r.hash is not None]
        if ours == [0] and have[0].hash == hook.hash:
            continue
        for i in sorted(ours, reverse=True):
            ops.append(Op("delete", builtin, i + 1))
        ops.append(Op("insert", builtin, 1, hook.line(builtin), hook.hash, hook.body))
    if sweep:
        for builtin in BUILTINS:
            if builtin in desired.hooks:
                continue
            have = actual.chains.get(builtin, [])
            for i in sorted((i for i, r in enumerate(have) if r.hash is not None), reverse=True):
                ops.append(Op("delete", builtin, i + 1))
        obsolete = [c for c in actual.ours() if c not in desired.chains]
        ops += [Op("flush", c) for c in obsolete]
        ops += [Op("delete_chain", c) for c in obsolete]
    return ops


def restore_script(ops: list[Op]) -> str:
    out = [f"*{TABLE}"]
    for op in ops:
        if op.kind == "new_chain":
            out.append(f":{op.chain} - [0:0]")
    for op in ops:
        if op.kind == "replace":
            out.append(f"-R {op.chain} {op.position} " + op.line.split(" ", 2)[2])
        elif op.kind == "append":
            out.append(op.line)
        elif op.kind == "insert":
            out.append(f"-I {op.chain} {op.position} " + op.line.split(" ", 2)[2])
        elif op.kind == "delete":
            out.append(f"-D {op.chain} {op.position}")
        elif op.kind == "flush":
            out.append(f"-F {op.chain}")
        elif op.kind == "delete_chain":
            out.append(f"-X {op.chain}")
    out.append("COMMIT")
    return "\n".join(out) + "\n"
