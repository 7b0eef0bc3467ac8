"""deploy/daemonset.yaml: the hardening it promises, how the containerd lab translates it (routed/lab/daemonset.py,
as a kubelet does), that the lab provides every hostPath it mounts, and that deploy/README.md explains every
capability it grants."""

from __future__ import annotations

from pathlib import Path

import pytest

from routed.lab import cri, daemonset
from routed.lab.errors import LabError

REPO = Path(__file__).resolve().parents[2]


def test_the_agent_is_hardened_as_documented() -> None:
    agent = daemonset.load().containers["agent"].security_context
    assert agent == {
        "privileged": False,
        "capabilities": {"add_capabilities": ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "NET_BIND_SERVICE"],
                         "drop_capabilities": ["ALL"]},
        "readonly_rootfs": True, "no_new_privs": True, "seccomp": {"profile_type": 0}}  # 0: RuntimeDefault


def test_install_cni_runs_with_no_capability_at_all() -> None:
    init = daemonset.load().containers["install-cni"].security_context
    assert init["capabilities"] == {"add_capabilities": [], "drop_capabilities": ["ALL"]}
    assert init["readonly_rootfs"] and init["no_new_privs"] and init["seccomp"] == {"profile_type": 0}
    assert daemonset.load().sandbox_security_context == {"seccomp": {"profile_type": 0}}


def test_the_agent_writes_only_to_its_volumes() -> None:
    mounts = {m.path: m for m in daemonset.load().containers["agent"].mounts}
    assert mounts["/tmp"].kind == "emptyDir" and mounts["/etc/routed"].read_only
    writable = {p for p, m in mounts.items() if not m.read_only}
    assert writable == {"/var/lib/routed", "/var/run/routed", "/var/log/routed", "/var/run/netns",
                        "/run/xtables.lock", "/tmp"}


def test_the_lab_provides_every_host_path_the_daemonset_mounts() -> None:
    for container in daemonset.load().containers.values():
        for m in container.mounts:
            if m.kind == "hostPath":
                assert m.host_path in cri.HOST_PATHS or m.host_path == cri.NETNS_HOST_PATH, (container.name, m)


def test_the_api_would_accept_no_new_privs_beside_sys_admin() -> None:
    """kube-apiserver refuses allowPrivilegeEscalation: false with an added "CAP_SYS_ADMIN" (spelled so)."""
    for container in daemonset.load().containers.values():
        if container.security_context["no_new_privs"]:
            assert "CAP_SYS_ADMIN" not in container.security_context["capabilities"]["add_capabilities"]
            assert not container.security_context["privileged"]


def test_every_granted_capability_is_explained_in_the_docs() -> None:
    granted = {c for container in daemonset.load().containers.values()
               for c in container.security_context["capabilities"]["add_capabilities"]}
    for doc in ("deploy/README.md", "README.md"):
        text = (REPO / doc).read_text()
        missing = [c for c in sorted(granted) if f"`{c}`" not in text]
        assert not missing, f"{doc} does not explain {missing}"


def write(tmp_path: Path, pod_context: str, container_context: str, volume: str = "emptyDir: {}") -> Path:
    path = tmp_path / "ds.yaml"
    path.write_text(f"""
spec:
  template:
    spec:
      securityContext: {pod_context}
      containers:
        - name: c
          securityContext: {container_context}
          volumeMounts: [{{name: v, mountPath: /v, mountPropagation: HostToContainer}}]
      volumes: [{{name: v, {volume}}}]
""")
    return path


def test_translation_follows_the_kubelet(tmp_path: Path) -> None:
    spec = daemonset.load(write(tmp_path, "{seccompProfile: {type: RuntimeDefault}}",
                                "{seccompProfile: {type: Unconfined}}"))
    c = spec.containers["c"]
    assert c.security_context["seccomp"] == {"profile_type": 1}  # the container's profile wins over the pod's
    assert c.security_context["no_new_privs"] is False  # allowPrivilegeEscalation unset: no no_new_privs
    assert c.security_context["readonly_rootfs"] is False
    assert c.mounts == (daemonset.Mount("v", "/v", False, "emptyDir", "", "HostToContainer"),)
    bare = daemonset.load(write(tmp_path, "{}", "{allowPrivilegeEscalation: true}")).containers["c"]
    assert "seccomp" not in bare.security_context and not bare.security_context["no_new_privs"]


@pytest.mark.parametrize("pod,container,volume,what", [
    ("{seccompProfile: {type: Localhost}}", "{}", "emptyDir: {}", "seccompProfile"),
    ("{}", "{}", "secret: {secretName: x}", "volume 'v'"),
])
def test_what_the_lab_cannot_run_is_refused_by_name(tmp_path: Path, pod, container, volume, what) -> None:
    with pytest.raises(LabError, match=what):
        daemonset.load(write(tmp_path, pod, container, volume))
