"""Parsing and validation of a CNI invocation (environment + netconf), in the agent (cni/exec.py).

Every problem is a RoutedError with the CNI spec's code; the shim forwards the invocation untouched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from routed.errors import Code, RoutedError

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
VERBS: tuple[str, ...] = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
VERBS_1_1: tuple[str, ...] = ("GC", "STATUS")  # added in spec 1.1.0

# What each verb needs from the environment (CNI_PATH is never required: routed-cni executes no plugins).
REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),  # the netns may already be gone
    "GC": (),
    "STATUS": (),
    "VERSION": (),
}

_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ID_CHARS = _ALNUM | frozenset("_.-")
VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"


class CniRequest:
    """One CNI call."""

    __slots__ = ("command", "container_id", "netns", "ifname", "args", "path", "config")

    def __init__(
        self,
        command: str,
        container_id: str = "",
        netns: str = "",
        ifname: str = "",
        args: dict[str, str] | None = None,
        path: str = "",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args: dict[str, str] = args or {}
        self.path = path
        self.config: dict[str, Any] = config or {}

    @property
    def cni_version(self) -> str:
        return str(self.config.get("cniVersion", LATEST_VERSION))

    @property
    def pod_namespace(self) -> str:
        return self.args.get("K8S_POD_NAMESPACE", "")

    @property
    def pod_name(self) -> str:
        return self.args.get("K8S_POD_NAME", "")


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS: "K1=V1;K2=V2". An empty string is fine; a pair without "=" is invalid."""
    out: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RoutedError(f"CNI_ARGS is invalid: {pair!r} is not KEY=VALUE", code=Code.INVALID_ENV)
        out[key] = value
    return out


def validate_container_id(value: str) -> str | None:
    if not value or value[0] not in _ALNUM or not _ID_CHARS.issuperset(value):  # no `re`: startup cost
        return "must start with a letter or digit and contain only letters, digits, '_', '.', '-'"
    return None


def validate_ifname(value: str) -> str | None:
    if not value or len(value) > 15:
        return "must be 1-15 characters"
    if value in (".", "..") or any(c in value for c in "/:") or any(c.isspace() for c in value):
        return "must not be '.' or '..' nor contain '/', ':' or whitespace"
    return None


def check_command(command: str) -> str:
    if not command:
        raise RoutedError("CNI_COMMAND is not set", "invalid environment: CNI_COMMAND", code=Code.INVALID_ENV)
    if command not in VERBS:
        raise RoutedError(f"CNI_COMMAND={command!r} is not one of {', '.join(VERBS)}", "invalid environment: CNI_COMMAND", code=Code.INVALID_ENV)
    return command


def parse_env(environ: Mapping[str, str]) -> CniRequest:
    """Build a request from the CNI_* variables; names every missing or invalid variable at once."""
    command = check_command(environ.get("CNI_COMMAND", ""))
    problems: list[str] = []
    for var in REQUIRED_ENV[command]:
        if not environ.get(var):
            problems.append(f"{var} is not set")
    container_id = environ.get("CNI_CONTAINERID", "")
    if container_id and (why := validate_container_id(container_id)):
        problems.append(f"CNI_CONTAINERID {why}")
    ifname = environ.get("CNI_IFNAME", "")
    if ifname and (why := validate_ifname(ifname)):
        problems.append(f"CNI_IFNAME {why}")
    if problems:
        names = sorted({p.split(" ", 1)[0] for p in problems})
        raise RoutedError("; ".join(problems), "invalid environment: " + ", ".join(names), code=Code.INVALID_ENV)
    return CniRequest(
        command=command,
        container_id=container_id,
        netns=environ.get("CNI_NETNS", ""),
        ifname=ifname,
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
        path=environ.get("CNI_PATH", ""),
    )


def decode_netconf(raw: bytes | str) -> dict[str, Any]:
    try:
        conf = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RoutedError("failed to decode the network configuration on stdin", str(exc), code=Code.DECODE_FAILURE) from None
    if not isinstance(conf, dict):
        raise RoutedError("the network configuration on stdin is not a JSON object", code=Code.DECODE_FAILURE)
    return conf


def version_for_errors(conf: Mapping[str, Any]) -> str:
    """The cniVersion to put on an error: the requested one if we speak it, else our latest."""
    version = conf.get("cniVersion")
    return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else LATEST_VERSION


def validate_netconf(command: str, conf: Mapping[str, Any]) -> None:
    """Spec-level checks of the network configuration for `command` (VERSION accepts anything)."""
    if command == "VERSION":
        return
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise RoutedError("network configuration has no cniVersion", code=Code.INVALID_CONFIG)
    if version not in SUPPORTED_VERSIONS:
        raise RoutedError(f"cniVersion {version!r} is not supported",
            "supported: " + ", ".join(SUPPORTED_VERSIONS), code=Code.INCOMPATIBLE_VERSION)
    if command in VERBS_1_1 and version != "1.1.0":
        raise RoutedError(f"{command} needs cniVersion 1.1.0, the configuration says {version}", code=Code.INCOMPATIBLE_VERSION)
    if not isinstance(conf.get("name"), str) or not conf.get("name"):
        raise RoutedError("network configuration has no name", code=Code.INVALID_CONFIG)
    if "type" in conf and not isinstance(conf["type"], str):
        raise RoutedError("'type' must be a string", code=Code.INVALID_CONFIG)
    if "ipam" in conf:
        raise RoutedError("'ipam' is not supported: routed allocates pod addresses from the node's pod CIDR itself",
            "remove the ipam section", code=Code.UNSUPPORTED_FIELD)
    mtu = conf.get("mtu")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 65535):
        raise RoutedError(f"'mtu' must be an integer between 576 and 65535, got {mtu!r}", code=Code.INVALID_CONFIG)
    for key in ("socketPath", "logFile"):
        if key in conf and not isinstance(conf[key], str):
            raise RoutedError(f"{key!r} must be a string", code=Code.INVALID_CONFIG)
    for key in ("dns", "prevResult", "runtimeConfig", "args"):
        if key in conf and not isinstance(conf[key], dict):
            raise RoutedError(f"{key!r} must be an object", code=Code.INVALID_CONFIG)
    if command == "CHECK" and "prevResult" not in conf:
        raise RoutedError("CHECK needs prevResult in the network configuration", code=Code.INVALID_CONFIG)
    if command == "GC" and VALID_ATTACHMENTS_KEY in conf:
        attachments = conf[VALID_ATTACHMENTS_KEY]
        if not isinstance(attachments, list) or not all(
            isinstance(a, dict) and isinstance(a.get("containerID"), str) and isinstance(a.get("ifname"), str)
            for a in attachments
        ):
            raise RoutedError(f"{VALID_ATTACHMENTS_KEY!r} must be a list of {{containerID, ifname}} objects", code=Code.INVALID_CONFIG)
