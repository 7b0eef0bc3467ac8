"""Run the iptables/ipset tools of the namespace this process is in (the agent's node namespace)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

from routed.errors import Code, RoutedError

log = logging.getLogger(__name__)


class CommandError(RoutedError):
    """An iptables/ipset tool exited non-zero (its stderr is in the message)."""

    code = Code.COMMAND_FAILED

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(cmd)} failed ({returncode}): {stderr.strip()[:2000]}")
        self.returncode = returncode
        self.stderr = stderr


def run(cmd: Sequence[str], stdin: str | None = None, timeout: float = 60.0, check: bool = True) -> str:
    proc = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stderr or proc.stdout)
    return proc.stdout
