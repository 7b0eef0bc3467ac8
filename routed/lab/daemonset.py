"""deploy/daemonset.yaml as the containerd lab runs it (routed/lab/cri.py): each container's securityContext in
CRI terms, translated as a kubelet translates it, and its volume mounts with their volumes' kinds. The lab reads
the manifest rather than repeating it, so a hardening setting added there is tried by the lab's tests.

Translation (kubelet, pkg/securitycontext and kuberuntime): `privileged`; `capabilities.add/drop` as given;
`readOnlyRootFilesystem` → `readonly_rootfs`; `allowPrivilegeEscalation: false` → `no_new_privs` (unset: no
no_new_privs); `seccompProfile` of the container, else of the pod → `seccomp.profile_type` (the pod's also goes
to the sandbox). Pure: reads the manifest only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from routed.lab.errors import LabError

DAEMONSET = Path(__file__).resolve().parents[2] / "deploy" / "daemonset.yaml"
SECCOMP_PROFILE_TYPES = {"RuntimeDefault": 0, "Unconfined": 1}  # runtime.v1.SecurityProfile.ProfileType
VOLUME_KINDS = ("hostPath", "emptyDir", "configMap")


@dataclass(frozen=True)
class Mount:
    volume: str
    path: str  # in the container
    read_only: bool
    kind: str  # one of VOLUME_KINDS
    host_path: str = ""  # a hostPath volume's path on the node
    propagation: str = ""  # mountPropagation ("" = None)


@dataclass(frozen=True)
class Container:
    name: str
    security_context: dict[str, Any]  # CRI LinuxContainerSecurityContext, crictl's JSON field names
    mounts: tuple[Mount, ...]


@dataclass(frozen=True)
class PodSpec:
    containers: dict[str, Container]  # init containers and containers by name
    sandbox_security_context: dict[str, Any]  # the part of CRI LinuxSandboxSecurityContext the pod spec sets


def _seccomp(profile: Any, where: str) -> dict[str, Any] | None:
    if profile is None:
        return None
    kind = profile.get("type") if isinstance(profile, dict) else None
    if kind not in SECCOMP_PROFILE_TYPES:
        raise LabError(f"{where}: seccompProfile type {kind!r} is not one the lab runs",
                       "use " + " or ".join(SECCOMP_PROFILE_TYPES))
    return {"profile_type": SECCOMP_PROFILE_TYPES[kind]}


def security_context(container: dict[str, Any], pod_seccomp: dict[str, Any] | None) -> dict[str, Any]:
    """A container's securityContext as the kubelet hands it to the runtime (without namespaces and paths)."""
    name = container.get("name", "?")
    sc = container.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    out: dict[str, Any] = {
        "privileged": bool(sc.get("privileged", False)),
        "capabilities": {"add_capabilities": list(caps.get("add") or []),
                         "drop_capabilities": list(caps.get("drop") or [])},
        "readonly_rootfs": bool(sc.get("readOnlyRootFilesystem", False)),
        "no_new_privs": sc.get("allowPrivilegeEscalation") is False,
    }
    seccomp = _seccomp(sc.get("seccompProfile"), f"container {name}") or pod_seccomp
    if seccomp is not None:
        out["seccomp"] = seccomp
    return out


def _mounts(container: dict[str, Any], volumes: dict[str, dict[str, Any]]) -> tuple[Mount, ...]:
    out = []
    for m in container.get("volumeMounts") or []:
        volume = volumes.get(m["name"])
        kind = next((k for k in VOLUME_KINDS if volume and k in volume), "")
        if not kind:
            raise LabError(f"container {container.get('name')}: volume {m['name']!r} is none of {VOLUME_KINDS}")
        host_path = str(volume[kind].get("path", "")) if kind == "hostPath" and volume else ""
        out.append(Mount(m["name"], m["mountPath"], bool(m.get("readOnly", False)), kind, host_path,
                         str(m.get("mountPropagation") or "")))
    return tuple(out)


def load(path: Path = DAEMONSET) -> PodSpec:
    """The DaemonSet's pod template, container by container."""
    try:
        ds = yaml.safe_load(path.read_text())
        spec = ds["spec"]["template"]["spec"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise LabError(f"cannot read the DaemonSet's pod template from {path}: {exc}") from exc
    pod_seccomp = _seccomp((spec.get("securityContext") or {}).get("seccompProfile"), "pod")
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    containers = {
        c["name"]: Container(c["name"], security_context(c, pod_seccomp), _mounts(c, volumes))
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    }
    return PodSpec(containers, {"seccomp": pod_seccomp} if pod_seccomp is not None else {})
