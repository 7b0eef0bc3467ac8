"""iptables writers behind one interface: `iptables-restore --noflush` / `ip6tables-restore --noflush` (default)
and python-iptables; one writer per IP family, the same backend for both."""

from __future__ import annotations

import abc
import logging

from policy.dataplane.iptables import Op, restore_script, tools
from policy.dataplane.runner import run

log = logging.getLogger(__name__)


class Writer(abc.ABC):
    name = ""
    family = 4

    @abc.abstractmethod
    def apply(self, ops: list[Op]) -> None:
        """Apply every operation in one atomic commit of this family's filter table."""


class RestoreWriter(Writer):
    name = "restore"

    def __init__(self, backend: str, family: int = 4) -> None:
        self.backend = backend
        self.family = family

    def apply(self, ops: list[Op]) -> None:
        if not ops:
            return
        run([tools(self.backend, self.family)[1], "--noflush", "-w", "5"], stdin=restore_script(ops))


def make_writer(kind: str, backend: str, family: int = 4) -> Writer:
    if kind == "iptc":
        from policy.dataplane.iptc_writer import IptcWriter  # lazy: importing iptc costs ~230 ms

        return IptcWriter(family)
    return RestoreWriter(backend, family)
