"""CNI error codes (SPEC.md "Error" section) plus routed's own codes (100+ are plugin-specific).

Stdlib only, no typing import (startup cost): shared by the thin plugin and the agent-side handler.
"""

from __future__ import annotations

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51

# routed-specific (the spec reserves 100+ for plugins; 104-106 are used by the local API itself)
ALREADY_EXISTS = 110  # a second ADD for the same containerId+ifname
IPAM_EXHAUSTED = 111
WIRING_FAILED = 112  # netlink/sysctl work failed (the ADD was rolled back)
CHECK_FAILED = 113  # CHECK found the interface/address/routes missing or different
HOOK_FAILED = 114  # the agent's endpoint hook (e.g. policy) refused the endpoint
UNEXPECTED = 999


class CniError(Exception):
    """A CNI error with its spec code; `to_json` is the shape printed on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, object]:
        out: dict[str, object] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out
