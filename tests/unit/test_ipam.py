"""IPAM: allocation policy, release, duplicate ADD, exhaustion, GC, concurrency (threads and processes)."""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from cni.ipam import AlreadyAllocated, Ipam, IpamError, IpamExhausted


@pytest.fixture
def ipam(tmp_path: Path) -> Ipam:
    return Ipam(str(tmp_path))


def test_first_allocation_skips_network_address_and_uses_first_usable(ipam: Ipam) -> None:
    assert ipam.allocate(["10.88.0.0/24"], "c1", "eth0") == ["10.88.0.1"]
    assert ipam.allocate(["10.88.0.0/24"], "c2", "eth0") == ["10.88.0.2"]


def test_never_hands_out_broadcast_and_exhaustion_names_the_cidr(ipam: Ipam) -> None:
    got = [ipam.allocate(["10.9.0.0/29"], f"c{i}", "eth0")[0] for i in range(6)]
    assert got == [f"10.9.0.{i}" for i in range(1, 7)]
    with pytest.raises(IpamExhausted, match=r"10\.9\.0\.0/29"):
        ipam.allocate(["10.9.0.0/29"], "c7", "eth0")
    # the failed attempt kept nothing
    assert len(ipam.show()["allocations"]) == 6


def test_round_robin_does_not_reuse_a_released_address_at_once(ipam: Ipam) -> None:
    a = ipam.allocate(["10.88.0.0/24"], "a", "eth0")
    ipam.release("a", "eth0")
    b = ipam.allocate(["10.88.0.0/24"], "b", "eth0")
    assert a != b
    assert ipam.get("a", "eth0") == []


def test_release_after_wraparound_reuses_freed_addresses(ipam: Ipam) -> None:
    for i in range(6):
        ipam.allocate(["10.9.0.0/29"], f"c{i}", "eth0")
    ipam.release("c2", "eth0")
    assert ipam.allocate(["10.9.0.0/29"], "new", "eth0") == ["10.9.0.3"]


def test_duplicate_add_fails_without_leaking_or_disturbing(ipam: Ipam) -> None:
    first = ipam.allocate(["10.88.0.0/24"], "c1", "eth0")
    with pytest.raises(AlreadyAllocated, match="c1"):
        ipam.allocate(["10.88.0.0/24"], "c1", "eth0")
    assert ipam.get("c1", "eth0") == first
    assert len(ipam.show()["allocations"]) == 1
    # same container, another interface is a different attachment
    assert ipam.allocate(["10.88.0.0/24"], "c1", "net1") != first


def test_release_missing_is_fine(ipam: Ipam) -> None:
    assert ipam.release("nope", "eth0") == []


def test_one_address_per_family_dual_stack(ipam: Ipam) -> None:
    got = ipam.allocate(["fd00:10::/64", "10.88.0.0/24", "10.99.0.0/24"], "c1", "eth0")
    assert got == ["10.88.0.1", "fd00:10::1"]
    assert ipaddress.ip_address(got[1]).version == 6


def test_small_prefixes(ipam: Ipam) -> None:
    assert ipam.allocate(["10.1.1.4/31"], "a", "eth0") == ["10.1.1.4"]
    assert ipam.allocate(["10.1.1.4/31"], "b", "eth0") == ["10.1.1.5"]
    assert ipam.allocate(["10.1.1.9/32"], "c", "eth0") == ["10.1.1.9"]


def test_no_cidr_and_bad_cidr(ipam: Ipam) -> None:
    with pytest.raises(IpamError, match="no pod CIDR"):
        ipam.allocate([], "a", "eth0")
    with pytest.raises(IpamError, match="invalid pod CIDR"):
        ipam.allocate(["10.1.1.0/33"], "a", "eth0")


def test_gc_releases_everything_not_valid(ipam: Ipam) -> None:
    for c in ("a", "b", "c"):
        ipam.allocate(["10.88.0.0/24"], c, "eth0")
    removed = ipam.gc([("b", "eth0"), ("zzz", "eth0")])
    assert sorted(r["containerId"] for r in removed) == ["a", "c"]
    assert [a["containerId"] for a in ipam.show()["allocations"]] == ["b"]


def test_show_shape_and_persistence(tmp_path: Path) -> None:
    Ipam(str(tmp_path)).allocate(["10.88.0.0/24"], "c1", "eth0")
    shown = Ipam(str(tmp_path)).show(["10.88.0.0/24"])  # a new instance reads the same store
    assert shown == {"cidrs": ["10.88.0.0/24"],
                     "pools": [{"cidr": "10.88.0.0/24", "family": 4, "size": 254, "allocated": 1}],
                     "allocations": [{"ip": "10.88.0.1", "containerId": "c1", "ifname": "eth0"}]}
    doc = json.loads((tmp_path / "ipam" / "allocations.json").read_text())
    assert "10.88.0.1" in doc["allocations"]


def test_corrupt_store_is_reported(tmp_path: Path) -> None:
    ipam = Ipam(str(tmp_path))
    (tmp_path / "ipam" / "allocations.json").write_text("{not json")
    with pytest.raises(IpamError, match="corrupt"):
        ipam.allocate(["10.88.0.0/24"], "c1", "eth0")


def test_concurrent_threads_get_distinct_addresses(tmp_path: Path) -> None:
    # separate Ipam instances per thread: the agent and the flock must both hold up
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            ip = Ipam(str(tmp_path)).allocate(["10.88.0.0/24"], f"t{i}", "eth0")[0]
            with lock:
                results.append(ip)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    shared = Ipam(str(tmp_path))
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    threads += [
        threading.Thread(target=lambda i=i: results.append(shared.allocate(["10.88.0.0/24"], f"s{i}", "eth0")[0]))
        for i in range(40)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(results) == 80
    assert len(set(results)) == 80
    assert len(Ipam(str(tmp_path)).show()["allocations"]) == 80


def _proc_worker(state_dir: str, n: int, tag: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    ipam = Ipam(state_dir)
    out.put([ipam.allocate(["10.77.0.0/22"], f"{tag}-{i}", "eth0")[0] for i in range(n)])


def test_concurrent_processes_get_distinct_addresses(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_proc_worker, args=(str(tmp_path), 25, f"p{i}", queue)) for i in range(6)]
    for p in procs:
        p.start()
    got: list[str] = []
    for _ in procs:
        got.extend(queue.get(timeout=60))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(got) == 150
    assert len(set(got)) == 150
    assert len(Ipam(str(tmp_path)).show()["allocations"]) == 150


def test_ipv6_only_and_exhaustion_per_cidr(tmp_path: Path) -> None:
    ipam = Ipam(str(tmp_path))
    assert ipam.allocate(["fd00:20::/126"], "c1", "eth0") == ["fd00:20::1"]
    ipam.allocate(["fd00:20::/126"], "c2", "eth0")
    ipam.allocate(["fd00:20::/126"], "c3", "eth0")
    with pytest.raises(IpamExhausted, match=r"pod CIDR fd00:20::/126 \(3 allocated\)"):
        ipam.allocate(["10.88.0.0/24", "fd00:20::/126"], "c4", "eth0")
    # nothing of the failed dual-stack ADD is kept: its IPv4 address is free again
    assert ipam.get("c4", "eth0") == []
    pools = {p["cidr"]: p for p in ipam.show(["10.88.0.0/24", "fd00:20::/126"])["pools"]}
    assert pools["fd00:20::/126"] == {"cidr": "fd00:20::/126", "family": 6, "size": 3, "allocated": 3}
    assert pools["10.88.0.0/24"]["allocated"] == 0
