"""python-iptables (libiptc / libip6tc) writer: legacy tables only, one commit per apply (atomic per table).

Imported lazily (iptc costs ~230 ms to import). Rule text is the same as the restore writer's; a small
tokenizer maps it onto iptc's match/target attributes, so both writers produce the same kernel state.
IPv4 uses iptc.Table/Rule, IPv6 iptc.Table6/Rule6: the same code otherwise.
"""

from __future__ import annotations

import logging
import os
import shlex
from typing import Any

os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")  # halves iptc's import time

import iptc

from policy.dataplane.iptables import TABLE, Op
from policy.dataplane.writers import Writer

log = logging.getLogger(__name__)

_RULE_ATTRS = {"-i": "in_interface", "-o": "out_interface", "-s": "src", "-d": "dst", "-p": "protocol"}


def build_rule(line: str, family: int = 4) -> iptc.Rule:
    """`-A chain <matches> -j TARGET ...` -> iptc.Rule (IPv6: iptc.Rule6)."""
    tokens = shlex.split(line)[2:]
    rule = iptc.Rule6() if family == 6 else iptc.Rule()
    current: Any = None
    negate = False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            negate = True
            i += 1
            continue
        if tok in _RULE_ATTRS:
            value = tokens[i + 1]
            setattr(rule, _RULE_ATTRS[tok], ("!" if negate else "") + value)
            negate = False
            i += 2
            continue
        if tok == "-m":
            current = rule.create_match(tokens[i + 1])
            i += 2
            continue
        if tok in ("-j", "-g"):
            current = rule.create_target(tokens[i + 1], goto=tok == "-g")
            i += 2
            continue
        if tok.startswith("--"):
            values = []
            j = i + 1
            while j < len(tokens) and not tokens[j].startswith("-") and tokens[j] != "!":
                values.append(tokens[j])
                j += 1
            name = tok[2:].replace("-", "_")
            if negate:
                values = ["!", *values]
                negate = False
            current.set_parameter(name, values if len(values) > 1 else (values[0] if values else ""))
            i = j
            continue
        raise ValueError(f"cannot translate token {tok!r} in {line!r}")
    return rule


def _entry(rule: iptc.Rule) -> Any:
    """The rule buffer after the extensions' final checks.

    Chain.append_rule() also calls each extension's `save` to cache parameters, which segfaults for
    NFLOG (libxt_NFLOG save on a python-built target); the kernel entry does not need that cache.
    """
    for match in rule.matches:
        match._final_check()
    if rule.target is not None:
        rule.target._final_check()
    return rule.rule


def _delete_num(table: iptc.Table, chain: str, index: int) -> None:
    rv = table._iptc.iptc_delete_num_entry(chain.encode(), index, table._handle)
    if rv != 1:
        raise iptc.IPTCError(f"can't delete entry {index} from chain {chain}: {table.strerror()}")


class IptcWriter(Writer):
    name = "iptc"

    def __init__(self, family: int = 4) -> None:
        self.family = family

    def _table(self) -> iptc.Table:
        return iptc.Table6(TABLE) if self.family == 6 else iptc.Table(TABLE)

    def apply(self, ops: list[Op]) -> None:
        if not ops:
            return
        table = self._table()
        table.autocommit = False
        table.refresh()
        try:
            for op in ops:
                if op.kind == "new_chain":
                    table.create_chain(op.chain)
            for op in ops:
                if op.kind in ("new_chain", "flush", "delete_chain"):
                    continue
                if op.kind == "replace":
                    table.replace_entry(op.chain, _entry(build_rule(op.line, self.family)), op.position - 1)
                elif op.kind == "append":
                    table.append_entry(op.chain, _entry(build_rule(op.line, self.family)))
                elif op.kind == "insert":
                    table.insert_entry(op.chain, _entry(build_rule(op.line, self.family)), op.position - 1)
                elif op.kind == "delete":
                    _delete_num(table, op.chain, op.position - 1)
            for op in ops:
                if op.kind == "flush":
                    iptc.Chain(table, op.chain).flush()
            for op in ops:
                if op.kind == "delete_chain":
                    table.delete_chain(op.chain)
            table.commit()
        finally:
            table.refresh()  # autocommit is off: drops anything uncommitted, re-reads the kernel
            table.autocommit = True
