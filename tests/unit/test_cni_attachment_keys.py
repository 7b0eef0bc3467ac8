"""Attachment keys (cni/names.py) cannot collide, in the IPAM and endpoint stores alike, and the state an older
agent left under the ambiguous `<containerId>_<ifname>` keys is migrated without losing an allocation."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from cni.ipam import STORE_VERSION, Ipam
from cni.names import attachment_key, legacy_attachment_key
from cni.store import EndpointStore, endpoint_to_dict
from routed.model import Endpoint

CIDR = ["10.88.0.0/24"]


def endpoint(container_id: str, ifname: str, ip: str) -> Endpoint:
    return Endpoint(container_id=container_id, ifname=ifname, netns="/var/run/netns/x", host_ifname="rtd0123456789a",
                    ips=(ip,), pod_namespace="default", pod_name=container_id)


def test_keys_that_used_to_collide_are_distinct() -> None:
    assert legacy_attachment_key("a_b", "c") == legacy_attachment_key("a", "b_c")  # the bug this fixes
    assert attachment_key("a_b", "c") != attachment_key("a", "b_c")
    assert attachment_key("a.b", "c") != attachment_key("a", "b.c")


@given(st.text(), st.text(), st.text(), st.text())
def test_equal_keys_mean_equal_attachments(c1: str, i1: str, c2: str, i2: str) -> None:
    assert (attachment_key(c1, i1) == attachment_key(c2, i2)) == ((c1, i1) == (c2, i2))


def test_ipam_keeps_look_alike_attachments_apart(tmp_path: Path) -> None:
    ipam = Ipam(str(tmp_path))
    first, second = ipam.allocate(CIDR, "a_b", "c"), ipam.allocate(CIDR, "a", "b_c")  # no AlreadyAllocated
    assert first != second
    assert ipam.release("a_b", "c") == first and ipam.get("a", "b_c") == second
    ipam.allocate(CIDR, "a_b", "c")
    ipam.gc([("a_b", "c")])
    assert ipam.get("a", "b_c") == [] and ipam.get("a_b", "c") != []


def test_endpoint_store_keeps_look_alike_attachments_apart(tmp_path: Path) -> None:
    store = EndpointStore(str(tmp_path))
    store.load()
    store.put(endpoint("a_b", "c", "10.88.0.1"))
    store.put(endpoint("a", "b_c", "10.88.0.2"))
    store.remove("a_b", "c")
    again = EndpointStore(str(tmp_path))
    again.load()
    assert [(e.container_id, e.ifname) for e in again.all()] == [("a", "b_c")]


def test_a_version_1_ipam_store_is_migrated_without_losing_allocations(tmp_path: Path) -> None:
    (tmp_path / "ipam").mkdir()
    owners = {"10.88.0.1": ("a_b", "c"), "10.88.0.2": ("a", "b_c"), "10.88.0.3": ("web", "eth0")}
    path = tmp_path / "ipam" / "allocations.json"
    path.write_text(json.dumps({"version": 1, "last": {"10.88.0.0/24": "10.88.0.3"}, "allocations": {
        ip: {"key": legacy_attachment_key(c, i), "containerId": c, "ifname": i, "cidr": CIDR[0]}
        for ip, (c, i) in owners.items()}}))
    ipam = Ipam(str(tmp_path))
    assert {ip: (a["containerId"], a["ifname"]) for a in ipam.show()["allocations"] for ip in [a["ip"]]} == owners
    doc = json.loads(path.read_text())  # written back at once, in the new scheme
    assert doc["version"] == STORE_VERSION == 2
    assert {ip: o["key"] for ip, o in doc["allocations"].items()} == {
        ip: attachment_key(c, i) for ip, (c, i) in owners.items()}
    assert ipam.get("a", "b_c") == ["10.88.0.2"] and ipam.get("a_b", "c") == ["10.88.0.1"]
    assert ipam.allocate(CIDR, "new", "eth0") == ["10.88.0.4"]  # round robin state kept too
    assert ipam.release("a", "b_c") == ["10.88.0.2"] and ipam.get("a_b", "c") == ["10.88.0.1"]


def test_endpoint_files_of_an_older_agent_are_renamed_so_del_removes_them(tmp_path: Path) -> None:
    folder = tmp_path / "endpoints"
    folder.mkdir()
    for c, i, ip in (("a_b", "c", "10.88.0.1"), ("web", "eth0", "10.88.0.2")):
        (folder / f"{legacy_attachment_key(c, i)}.json").write_text(json.dumps(endpoint_to_dict(endpoint(c, i, ip))))
    store = EndpointStore(str(tmp_path))
    store.load()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{attachment_key(c, i)}.json" for c, i in (("a_b", "c"), ("web", "eth0")))
    store.remove("a_b", "c")
    again = EndpointStore(str(tmp_path))
    again.load()
    assert [(e.container_id, e.ifname, e.ips) for e in again.all()] == [("web", "eth0", ("10.88.0.2",))]


def test_an_old_endpoint_file_beside_its_new_one_is_dropped(tmp_path: Path) -> None:
    store = EndpointStore(str(tmp_path))
    store.load()
    store.put(endpoint("web", "eth0", "10.88.0.9"))
    old = tmp_path / "endpoints" / f"{legacy_attachment_key('web', 'eth0')}.json"
    old.write_text(json.dumps(endpoint_to_dict(endpoint("web", "eth0", "10.88.0.1"))))
    again = EndpointStore(str(tmp_path))
    again.load()
    assert not old.exists() and [e.ips for e in again.all()] == [("10.88.0.9",)]
