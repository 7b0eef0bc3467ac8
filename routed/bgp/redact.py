"""Text from ExaBGP made safe to publish: the configured passwords taken out, control characters escaped, echoed
config lines elided. Pure.

ExaBGP's own output (its log lines, the error it prints for a config it refuses) is the one place a password
could come back from: routed gives it passwords only as base64, but a refused line is echoed as ExaBGP read it.
The speaker passes every line through `Redactor.clean` before it is logged, kept in `log_tail`, or becomes a
peer's `lastError` or the reason ExaBGP exited (readiness, `/readyz`, status, RoutedNodeStatus); the BGP
component passes what it publishes through it once more.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable

REDACTED = "<redacted>"
FRAGMENT_MIN = 4  # a piece of a multi-line password this long is redacted on its own (lines are read one by one)
KEEP_CONFIGS = 2  # the secrets of this many configurations are known (ExaBGP may still run the previous one)
_CONFIG_ECHO = re.compile(r"(\bline \d+:).*")  # ExaBGP quoting the config line it refused
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str, limit: int = 1000) -> str:
    """`text` with every control character escaped (`\\n`, `\\x1b`, ...) and cut to `limit` characters."""
    out = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return out if len(out) <= limit else out[:limit] + "…"


def elide_config_lines(text: str) -> str:
    """ExaBGP's `line N: <tokens>` echo of a config line, without the tokens (a reason never quotes the config)."""
    return _CONFIG_ECHO.sub(r"\1 <config line not shown>", text)


def secret_forms(secret: str) -> set[str]:
    """Every spelling of `secret` that may show in a line of text: as is, its base64 (padded or not, as the
    config has it), repr- and JSON-escaped, and each of its pieces between control characters."""
    forms = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    try:
        encoded = base64.b64encode(secret.encode("utf-8")).decode("ascii")
    except UnicodeEncodeError:
        encoded = ""
    if encoded:
        forms |= {encoded, encoded.rstrip("=")}
    pieces = [p for p in re.split(r"[\x00-\x1f\x7f-\x9f]+", secret) if p.strip()]
    if len(pieces) > 1 or (pieces and pieces[0] != secret):
        forms |= {p for p in pieces if len(p) >= FRAGMENT_MIN}
    return {f for f in forms if f}


class Redactor:
    """Knows the passwords of the last configurations; `redact` replaces each of their spellings."""

    def __init__(self) -> None:
        self._configs: list[frozenset[str]] = []
        self._pattern: re.Pattern[str] | None = None

    def remember(self, secrets: Iterable[str | None]) -> None:
        """The passwords of the configuration being applied (those of the previous one stay known)."""
        current = frozenset(s for s in secrets if s)
        if self._configs and self._configs[-1] == current:
            return
        self._configs = [*self._configs, current][-KEEP_CONFIGS:]
        forms: set[str] = set()
        for config in self._configs:
            for secret in config:
                forms |= secret_forms(secret)
        ordered = sorted(forms, key=len, reverse=True)  # longest first: a form inside another goes with it
        self._pattern = re.compile("|".join(re.escape(f) for f in ordered)) if ordered else None

    def redact(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(REDACTED, text)

    def clean(self, text: str, limit: int = 1000) -> str:
        """Safe to log or publish: redacted, control characters escaped, config echoes elided, cut short."""
        return printable(elide_config_lines(self.redact(text)), limit)
