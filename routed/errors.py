"""The one error model: `RoutedError(msg, details, code=...)` and the table of codes it carries.

Stdlib only and cheap to import (the CNI path imports it). Codes 1-99 are the CNI spec's (SPEC.md, "Error"),
100+ are routed's own (the spec leaves them to plugins). Every domain error derives from `RoutedError` and
names its code once, as a class attribute; boundaries map errors exactly once:

- the local API answers `{"error": err.to_json()}` (routed/api.py);
- a CNI answer is `err.to_cni(cniVersion)` (cni/exec.py), exit status 1;
- the CLI exits with `cli_exit_status(err)` (routed/cli.py).

Handlers raise; they never build error dicts or write numeric codes.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    # CNI spec
    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    NOT_AVAILABLE = 50  # STATUS: the plugin cannot serve ADDs now
    LIMITED_CONNECTIVITY = 51
    # routed: the local API
    NOT_FOUND = 102  # a named object (pod, peer) is unknown
    NOT_RUNNING = 103  # the component serving the method is disabled or not started
    UNKNOWN_METHOD = 104
    NO_ANSWER = 105  # the agent closed the connection without answering
    MALFORMED_REQUEST = 106
    # routed: CNI
    ALREADY_EXISTS = 110  # a second ADD for the same containerId+ifname
    IPAM_EXHAUSTED = 111
    WIRING_FAILED = 112  # netlink/sysctl work failed (the ADD was rolled back)
    CHECK_FAILED = 113  # CHECK found the interface/address/routes missing or different
    HOOK_FAILED = 114  # an endpoint hook (policy) refused the endpoint; the ADD was rolled back
    # routed: other domains
    POLICY_INVALID = 120  # a NetworkPolicy or selector does not validate
    POLICY_APPLY_FAILED = 121  # iptables/ipset writes failed (the last good state stays)
    BGP_CONFIG_INVALID = 130
    BGP_UPDATE_FAILED = 131
    DATASTORE_UNAVAILABLE = 140  # kubeconfig, API server or manifest directory unusable
    COMMAND_FAILED = 141  # an external command (ip, iptables-restore, ...) failed
    NETNS_FAILED = 142
    INVALID_VALUE = 143  # a field of a cluster object does not validate (routed/validation.py)
    LAB_FAILED = 150
    INJECTED_FAULT = 160  # a failpoint fired (tests only)
    UNEXPECTED = 999


class RoutedError(Exception):
    """An error with a code from `Code`, a message for people and optional details (a cause, a hint)."""

    code: Code = Code.UNEXPECTED

    def __init__(self, msg: str, details: str = "", *, code: Code | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, object]:
        """The local API's error object."""
        return {"code": int(self.code), "msg": self.msg, "details": self.details}

    def to_cni(self, cni_version: str) -> dict[str, object]:
        """The CNI spec's error JSON (printed on stdout, exit status 1)."""
        out: dict[str, object] = {"cniVersion": cni_version, "code": int(self.code), "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    @classmethod
    def from_json(cls, data: object) -> RoutedError:
        """An error object received from the local API (unknown codes keep their number as UNEXPECTED)."""
        if not isinstance(data, dict):
            return cls(f"malformed error answer: {data!r}")
        raw = data.get("code", Code.UNEXPECTED)
        try:
            code = Code(int(raw))
        except (TypeError, ValueError):
            code = Code.UNEXPECTED
        return cls(str(data.get("msg", "")), str(data.get("details", "") or ""), code=code)


class RoutedOSError(RoutedError, OSError):
    """A RoutedError that is also an OSError with its errno (netlink, namespaces): `except OSError` still works."""

    def __init__(self, errno: int, strerror: str) -> None:
        OSError.__init__(self, errno, strerror)
        self.msg = strerror
        self.details = ""

    def __str__(self) -> str:
        return self.msg


# ---- the CNI errors raised by more than one module (the others live next to their domain) ----------


class TryAgainLater(RoutedError):
    """The agent is starting or the node is not ready for pods yet; the runtime retries the call."""

    code = Code.TRY_AGAIN_LATER


class NotAvailable(RoutedError):
    """CNI STATUS: this node's agent cannot set up pods now (the message says why)."""

    code = Code.NOT_AVAILABLE


# ---- boundaries ----------------------------------------------------------------------------------

# `routed` CLI exit status per error: 1 the agent answered with an error, 2 what was asked for does not exist,
# 3 the agent is unreachable or not serving it (argparse itself exits 2 on usage errors).
_CLI_EXIT = {Code.NOT_FOUND: 2, Code.NOT_RUNNING: 3, Code.NO_ANSWER: 3, Code.TRY_AGAIN_LATER: 3}
CLI_EXIT_UNREACHABLE = 3


def cli_exit_status(err: RoutedError) -> int:
    return _CLI_EXIT.get(err.code, 1)
