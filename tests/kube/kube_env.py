"""A real kube-apiserver + etcd for tests/kube (scripts/kube-testenv), and helpers around it.

The environment is started once per pytest process (a singleton, stopped at exit) on free loopback ports;
test modules wrap `get_env()` / `get_deployed()` in their own fixtures (no conftest.py in this tree).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from routed.datastore.base import Event
from routed.datastore.kube import KubeDatastore
from tests.helpers import run_and_expect

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kube-testenv"
AGENT_SA = "system:serviceaccount:routed-system:routed"


def _free_port_pair() -> int:
    """A port p with p and p+1 free on 127.0.0.1 (etcd client + peer)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class KubeEnv:
    dir: Path
    api_port: int
    etcd_port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> str:
        return str(self.dir / "admin.kubeconfig")

    @property
    def bindir(self) -> Path:
        return Path(self._script("bindir").stdout.strip())

    def _script(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), *args], env=self.env, capture_output=True, text=True, check=check, timeout=timeout
        )

    def start(self) -> None:
        self._script("start", "--dir", str(self.dir))

    def stop(self, component: str = "all", kill: bool = False) -> None:
        self._script("stop", "--dir", str(self.dir), "--component", component, *(["--kill"] if kill else []))

    def kubectl(
        self, *args: str, kubeconfig: str = "", input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / "kubectl"), "--kubeconfig", kubeconfig or self.kubeconfig, *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def api(self, kubeconfig: str = "") -> k8s.ApiClient:
        return k8s_config.new_client_from_config(config_file=kubeconfig or self.kubeconfig)

    def write_token_kubeconfig(self, name: str, token: str) -> str:
        path = self.dir / f"{name}.kubeconfig"
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "t", "cluster": {
                "server": f"https://127.0.0.1:{self.api_port}",
                "certificate-authority": str(self.dir / "pki" / "ca.crt")}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": "t", "user": name}}],
            "current-context": name,
        }
        path.write_text(json.dumps(cfg))
        path.chmod(0o600)
        return str(path)

    def etcd_revision(self) -> int:
        body = json.dumps({"key": base64.b64encode(b"/registry/").decode(), "limit": 1}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.etcd_port}/v3/kv/range", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(json.loads(resp.read())["header"]["revision"])

    def etcd_compact(self) -> int:
        """Compact etcd at its current revision (every older resourceVersion becomes unusable)."""
        rev = self.etcd_revision()
        body = json.dumps({"revision": rev, "physical": True}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.etcd_port}/v3/kv/compaction", data=body, method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
        return rev


_ENV: KubeEnv | None = None


def _build_or_skip() -> None:
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} missing")
    proc = subprocess.run([str(SCRIPT), "build"], capture_output=True, text=True, timeout=3 * 3600)
    if proc.returncode != 0:
        pytest.skip(
            "kube-apiserver/kubectl could not be built on this machine (scripts/kube-testenv build):\n"
            + proc.stderr[-2000:]
        )


def sweep_leftovers() -> None:
    """Stop environments of earlier test runs that died without cleaning up (their owner process is gone)."""
    for d in Path(tempfile.gettempdir()).glob("rtd-kube-*"):
        owner = d / "owner.pid"
        if not owner.exists():
            continue
        try:
            alive = Path(f"/proc/{int(owner.read_text())}").exists()
        except ValueError:
            alive = False
        if alive:
            continue
        subprocess.run([str(SCRIPT), "stop", "--dir", str(d)], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)


def get_env() -> KubeEnv:
    global _ENV
    if _ENV is not None:
        return _ENV
    _build_or_skip()
    sweep_leftovers()
    tmp = Path(tempfile.mkdtemp(prefix="rtd-kube-"))
    (tmp / "owner.pid").write_text(str(os.getpid()))
    etcd_port = int(os.environ.get("KUBE_TESTENV_ETCD_PORT") or _free_port_pair())
    api_port = int(os.environ.get("KUBE_TESTENV_API_PORT") or _free_port())
    env = dict(os.environ, KUBE_TESTENV_API_PORT=str(api_port), KUBE_TESTENV_ETCD_PORT=str(etcd_port))
    kenv = KubeEnv(dir=tmp, api_port=api_port, etcd_port=etcd_port, env=env)
    try:
        kenv.start()
    except subprocess.CalledProcessError as e:
        kenv.stop()
        pytest.fail(f"kube-testenv start failed:\n{e.stdout}\n{e.stderr}")

    def cleanup() -> None:
        kenv.stop()
        if not os.environ.get("KUBE_TESTENV_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)
    _ENV = kenv
    return kenv


_DEPLOYED = False


def get_deployed() -> KubeEnv:
    """The environment with deploy/ applied (CRDs established)."""
    global _DEPLOYED
    env = get_env()
    if not _DEPLOYED:
        apply_deploy(env)
        _DEPLOYED = True
    return env


def apply_deploy(env: KubeEnv) -> subprocess.CompletedProcess[str]:
    proc = env.kubectl("apply", "-k", str(ROOT / "deploy"))
    env.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                "crd/bgppeers.routed.dev", "crd/bgpconfigurations.routed.dev", "crd/routednodestatuses.routed.dev")
    return proc


# ---- objects ---------------------------------------------------------------------------------------


def ensure_namespace(api: k8s.ApiClient, name: str) -> None:
    core = k8s.CoreV1Api(api)
    try:
        core.create_namespace({"metadata": {"name": name}})
    except k8s.ApiException as e:
        if e.status != 409:
            raise


def delete_namespace(api: k8s.ApiClient, name: str) -> None:
    """Delete and finalize (no namespace controller runs, so nothing else would)."""
    core = k8s.CoreV1Api(api)
    try:
        core.delete_namespace(name)
        core.replace_namespace_finalize(name, {"metadata": {"name": name}, "spec": {"finalizers": []}})
    except k8s.ApiException as e:
        if e.status != 404:
            raise


def ensure_node(api: k8s.ApiClient, name: str, address: str, pod_cidr: str) -> None:
    core = k8s.CoreV1Api(api)
    body = {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
    }
    try:
        core.create_node(body)
    except k8s.ApiException as e:
        if e.status != 409:
            raise
    core.patch_node_status(name, {"status": {"addresses": [{"type": "InternalIP", "address": address}]}})


def agent_token(api: k8s.ApiClient, node: str, pod_name: str = "") -> str:
    """A pod-bound token of the deploy/ ServiceAccount, as the kubelet would mount it into the agent pod on
    `node` (the apiserver embeds the node name, which the node-status admission policy checks)."""
    core = k8s.CoreV1Api(api)
    pod_name = pod_name or f"routed-{node}"
    pod = {
        "metadata": {"name": pod_name, "namespace": "routed-system", "labels": {"app.kubernetes.io/name": "routed"}},
        "spec": {
            "nodeName": node,
            "serviceAccountName": "routed",
            "hostNetwork": True,
            "containers": [{"name": "agent", "image": "routed:latest"}],
        },
    }
    try:
        created = core.create_namespaced_pod("routed-system", pod)
        uid = created.metadata.uid
    except k8s.ApiException as e:
        if e.status != 409:
            raise
        uid = core.read_namespaced_pod(pod_name, "routed-system").metadata.uid
    req = {
        "spec": {
            "audiences": ["https://kubernetes.default.svc"],
            "expirationSeconds": 3600,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": uid},
        }
    }
    resp = core.create_namespaced_service_account_token("routed", "routed-system", req)
    return resp.status.token


# ---- running a datastore in the background ---------------------------------------------------------


class DatastoreRunner:
    """Runs `KubeDatastore.run` in its own event loop thread; records every batch it delivers."""

    def __init__(self, ds: KubeDatastore) -> None:
        self.ds = ds
        self.events: list[Event] = []
        self.batches = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name="datastore-runner", daemon=True)
        self.error: BaseException | None = None

    async def _sink(self, batch: list[Event]) -> None:
        with self._lock:
            self.events.extend(batch)
            self.batches += 1

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._task = self._loop.create_task(self.ds.run(self._sink, self._synced))
        try:
            self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # surfaced by the tests
            self.error = e

    def start(self) -> DatastoreRunner:
        self._thread.start()
        return self

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def since(self, mark: int) -> list[Event]:
        with self._lock:
            return list(self.events[mark:])

    def mark(self) -> int:
        with self._lock:
            return len(self.events)

    def wait_event(
        self, mark: int, etype: str, kind: str, key: str, pred: Callable[[Event], bool] | None = None,
        timeout: float = 30.0,
    ) -> Event:
        def find() -> Event | None:
            for ev in self.since(mark):
                if ev.type == etype and ev.kind == kind and ev.key == key and (pred is None or pred(ev)):
                    return ev
            return None

        return run_and_expect(find, bool, timeout).check(f"{etype} {kind} {key}")

    def stop(self) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout=15)
        self.ds.close()
