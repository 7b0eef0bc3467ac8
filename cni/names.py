"""Deterministic names for kernel objects the CNI side creates. Stdlib only (used by the thin plugin too)."""

from __future__ import annotations

import hashlib

from routed.constants import HOST_VETH_PREFIX

HOST_VETH_HASH_LEN = 11  # "rtd" + 11 hex = 14 chars, within IFNAMSIZ-1 (15)


def host_veth_name(container_id: str, ifname: str) -> str:
    """Host side of a pod veth: "rtd" + the first 11 hex chars of sha1(containerId + ":" + ifname)."""
    digest = hashlib.sha1(f"{container_id}:{ifname}".encode(), usedforsecurity=False).hexdigest()
    return HOST_VETH_PREFIX + digest[:HOST_VETH_HASH_LEN]


def is_host_veth_name(name: str) -> bool:
    """True for names this module generates (prefix + exactly 11 lowercase hex chars)."""
    rest = name[len(HOST_VETH_PREFIX):]
    return (
        name.startswith(HOST_VETH_PREFIX)
        and len(rest) == HOST_VETH_HASH_LEN
        and all(c in "0123456789abcdef" for c in rest)
    )


def attachment_key(container_id: str, ifname: str) -> str:
    """Key of one attachment in the IPAM and endpoint stores: "<len(containerId)>.<containerId>.<ifname>".

    The length prefix makes it unambiguous for any two strings (no separator has to be absent from either), so
    ("a_b", "c") and ("a", "b_c") never share a key. File-name safe for validated attachments (cni/request.py:
    container ids are [A-Za-z0-9_.-], ifnames hold no '/'; the key never is "." or "..").
    """
    return f"{len(container_id)}.{container_id}.{ifname}"


def legacy_attachment_key(container_id: str, ifname: str) -> str:
    """The key before IPAM store version 2 (ambiguous: "a_b" + "c" == "a" + "b_c"); only to migrate old state."""
    return f"{container_id}_{ifname}"
