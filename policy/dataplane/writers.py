"""iptables writers behind one interface: `iptables-restore --noflush` (default) and python-iptables."""

from __future__ import annotations

import abc
import logging

from policy.dataplane.iptables import TOOLS, Op, restore_script
from policy.dataplane.runner import run

log = logging.getLogger(__name__)


class Writer(abc.ABC):
    name = ""

    @abc.abstractmethod
    def apply(self, ops: list[Op]) -> None:
        """Apply every operation in one atomic commit of the filter table."""


class RestoreWriter(Writer):
    name = "restore"

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def apply(self, ops: list[Op]) -> None:
        if not ops:
            return
        run([TOOLS[self.backend][1], "--noflush", "-w", "5"], stdin=restore_script(ops))


def make_writer(kind: str, backend: str) -> Writer:
    if kind == "iptc":
        from policy.dataplane.iptc_writer import IptcWriter  # lazy: importing iptc costs ~230 ms

        return IptcWriter()
    return RestoreWriter(backend)
