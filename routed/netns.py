"""Named network namespaces for the lab and the tests (always `rtd-…`), driven with iproute2.

Only ever touches namespaces whose name starts with NETNS_PREFIX; the root namespace is never changed:
veth pairs are created directly inside a named namespace and their peer is placed in another one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence

from routed.constants import NETNS_PREFIX
from routed.errors import Code, RoutedError

log = logging.getLogger(__name__)
NETNS_DIR = "/var/run/netns"


class NetnsError(RoutedError):
    code = Code.NETNS_FAILED


def _check_name(name: str) -> None:
    if not name.startswith(NETNS_PREFIX):
        raise NetnsError(f"refusing to touch namespace {name!r}: not ours (prefix {NETNS_PREFIX!r})")


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def run(cmd: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ns_cmd(name: str, cmd: Sequence[str]) -> list[str]:
    _check_name(name)
    return ["ip", "netns", "exec", name, *cmd]


def ns_run(name: str, cmd: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return run(ns_cmd(name, cmd), check=check, timeout=timeout)


def exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def create(name: str) -> None:
    """Create the namespace with loopback up (removing a leftover of the same name first)."""
    _check_name(name)
    if exists(name):
        delete(name)
    run(["ip", "netns", "add", name])
    ns_run(name, ["ip", "link", "set", "lo", "up"])


def attach(name: str, path: str) -> None:
    """Name an existing network namespace (e.g. a CRI sandbox's, given as a path): a bind mount under
    /var/run/netns, as `ip netns add` makes; `detach` removes the name and leaves the namespace alone."""
    _check_name(name)
    if exists(name):
        detach(name)
    os.makedirs(NETNS_DIR, exist_ok=True)
    open(netns_path(name), "w").close()
    try:
        run(["mount", "--bind", path, netns_path(name)])
    except Exception:
        os.unlink(netns_path(name))
        raise


def detach(name: str) -> None:
    """Drop our name of a namespace without touching its processes (a CRI pod: the runtime owns them)."""
    _check_name(name)
    if exists(name):
        run(["ip", "netns", "delete", name], check=False)


def pids(name: str) -> list[int]:
    _check_name(name)
    proc = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.strip().isdigit()]


def kill_processes(name: str, grace: float = 2.0) -> None:
    """Stop the processes that run inside one of our namespaces (all of them were started by us)."""
    targets = pids(name)
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while targets and time.monotonic() < deadline:
        targets = [p for p in targets if _alive(p)]
        if targets:
            time.sleep(0.05)
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def delete(name: str) -> None:
    _check_name(name)
    if not exists(name):
        return
    kill_processes(name)
    run(["ip", "netns", "delete", name], check=False)


def list_ours(prefix: str = NETNS_PREFIX) -> list[str]:
    if not prefix.startswith(NETNS_PREFIX):
        raise NetnsError(f"prefix {prefix!r} is not ours")
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def delete_all(prefix: str) -> list[str]:
    """Remove every namespace under `prefix` (a crashed run's leftovers). Returns what was removed."""
    removed = list_ours(prefix)
    for name in removed:
        delete(name)
    return removed


def veth(ns_a: str, if_a: str, ns_b: str, if_b: str, mtu: int | None = None) -> None:
    """A veth pair with one end in each namespace, both up. Never created in the root namespace."""
    _check_name(ns_a)
    _check_name(ns_b)
    cmd = ["ip", "-n", ns_a, "link", "add", if_a]
    if mtu:
        cmd += ["mtu", str(mtu)]
    cmd += ["type", "veth", "peer", "name", if_b, "netns", ns_b]
    run(cmd)
    run(["ip", "-n", ns_a, "link", "set", if_a, "up"])
    run(["ip", "-n", ns_b, "link", "set", if_b, "up"])


def sysctl(name: str, key: str, value: str) -> None:
    ns_run(name, ["sysctl", "-qw", f"{key}={value}"])
