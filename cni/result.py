"""CNI Result documents in the shape of the requested cniVersion. Stdlib only.

0.4.0: ips[] carry "version" ("4"/"6"); 1.0.0+: they do not. 1.1.0 interfaces may carry "mtu".
The host-side interface carries an empty "sandbox" (it lives on the host; Go's omitempty would drop the key, which
means the same to every parser), the pod interface's sandbox is the netns path.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

POD_GATEWAY_V4 = "169.254.1.1"  # answered by proxy ARP on the host veth
POD_GATEWAY_V6 = "fe80::1"  # a fixed link-local address on every host veth (cni/wiring.py)


def pod_gateway(version: int) -> str:
    return POD_GATEWAY_V4 if version == 4 else POD_GATEWAY_V6


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str
    mtu: int = 0
    sandbox: str = ""


def _iface(version: str, iface: Interface) -> dict[str, Any]:
    out: dict[str, Any] = {"name": iface.name, "mac": iface.mac}
    if version == "1.1.0" and iface.mtu:
        out["mtu"] = iface.mtu
    out["sandbox"] = iface.sandbox
    return out


def _ip_entry(version: str, address: str, index: int) -> dict[str, Any]:
    family = ipaddress.ip_interface(address).version
    entry: dict[str, Any] = {"address": address, "gateway": pod_gateway(family), "interface": index}
    if version == "0.4.0":
        entry["version"] = str(family)
    return entry


def _reshape_prev(version: str, prev: dict[str, Any]) -> dict[str, Any]:
    """prevResult converted to `version` as far as our fields go (ips[].version added/removed)."""
    prev = copy.deepcopy(prev)
    for ip in prev.get("ips") or []:
        if version == "0.4.0":
            if "version" not in ip and "address" in ip:
                ip["version"] = str(ipaddress.ip_interface(ip["address"]).version)
        else:
            ip.pop("version", None)
    return prev


def build_add_result(
    version: str,
    host: Interface,
    pod: Interface,
    addresses: Sequence[str],
    dns: dict[str, Any] | None = None,
    prev_result: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Our ADD result, appended to prevResult when we are not the first plugin of a chain."""
    base = _reshape_prev(version, prev_result) if prev_result else {}
    interfaces = list(base.get("interfaces") or [])
    interfaces.append(_iface(version, host))
    pod_index = len(interfaces)
    interfaces.append(_iface(version, pod))
    ips = list(base.get("ips") or [])
    routes = list(base.get("routes") or [])
    for address in addresses:
        iface = ipaddress.ip_interface(address)
        ips.append(_ip_entry(version, str(iface), pod_index))
        routes.append({"dst": "0.0.0.0/0" if iface.version == 4 else "::/0", "gw": pod_gateway(iface.version)})
    result: dict[str, Any] = {"cniVersion": version, "interfaces": interfaces, "ips": ips}
    if routes:
        result["routes"] = routes
    merged_dns = dns if dns else base.get("dns")
    if merged_dns:
        result["dns"] = copy.deepcopy(merged_dns)
    return result


def version_result(requested: str, supported: Sequence[str]) -> dict[str, Any]:
    return {"cniVersion": requested, "supportedVersions": list(supported)}
