from __future__ import annotations

import asyncio
import os

from routed.cache import CacheChange, ClusterCache
from routed.datastore import manifest
from routed.datastore.base import Event
from routed.datastore.manifest import ManifestDatastore

POD = """apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {pod: a}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80, name: http}]}]}
status: {podIPs: [{ip: 10.244.1.5}]}
"""


def test_add_modify_delete_and_bad_file_keeps_objects(tmp_path):
    store = ManifestDatastore(str(tmp_path))
    (tmp_path / "pods.yaml").write_text(POD + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"
                                        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: ignored}\n")
    events = store.scan()
    assert sorted((e.type, e.kind, e.key) for e in events) == [("ADDED", "Namespace", "x"), ("ADDED", "Pod", "x/a")]
    assert store.scan() == []  # nothing changed

    (tmp_path / "pods.yaml").write_text(POD.replace("pod: a", "pod: b"))
    os.utime(tmp_path / "pods.yaml", ns=(1, 1))
    events = store.scan()
    assert sorted((e.type, e.kind) for e in events) == [("DELETED", "Namespace"), ("MODIFIED", "Pod")]

    (tmp_path / "pods.yaml").write_text("kind: Pod\nmetadata: {name: [broken\n")
    assert store.scan() == []  # a half-written file deletes nothing
    assert store.errors()

    (tmp_path / "pods.yaml").unlink()
    events = store.scan()
    assert [(e.type, e.key) for e in events] == [("DELETED", "x/a")]


def test_cache_views_and_listeners(tmp_path):
    (tmp_path / "a.yaml").write_text(POD)
    store = ManifestDatastore(str(tmp_path))
    cache = ClusterCache()
    seen: list[CacheChange] = []

    async def listener(change: CacheChange) -> None:
        seen.append(change)

    cache.subscribe(listener)
    events = store.scan()
    asyncio.run(cache.apply(events + events))  # the repeat changes nothing: not passed on
    pod = cache.pod("x", "a")
    assert pod is not None and pod.ips == ("10.244.1.5",) and pod.ports[0].name == "http"
    assert [(c.kinds, [(e.type, e.key) for e in c.events]) for c in seen] == [(frozenset({"Pod"}), [("ADDED", "x/a")])]
    asyncio.run(cache.apply(store.scan()))
    assert len(seen) == 1  # no change, no call


def test_typed_views_follow_changes(tmp_path):
    (tmp_path / "a.yaml").write_text(POD)
    store = ManifestDatastore(str(tmp_path))
    cache = ClusterCache()
    asyncio.run(cache.apply(store.scan()))
    first = cache.pods()
    assert [p.labels for p in first] == [{"pod": "a"}]
    first.clear()  # a caller's list is its own
    assert len(cache.pods()) == 1
    (tmp_path / "a.yaml").write_text(POD.replace("pod: a", "pod: b"))
    os.utime(tmp_path / "a.yaml", ns=(2, 2))
    asyncio.run(cache.apply(store.scan()))
    assert [p.labels for p in cache.pods()] == [{"pod": "b"}]


def test_duplicates_across_files_last_path_wins_and_one_file_costs_one_file(tmp_path):
    store = ManifestDatastore(str(tmp_path))
    (tmp_path / "a.yaml").write_text(POD)
    (tmp_path / "b.yaml").write_text(POD.replace("pod: a", "pod: from-b"))
    events = store.scan()
    assert [(e.type, e.obj["metadata"]["labels"]["pod"]) for e in events] == [("ADDED", "from-b")]
    parsed = []
    original = manifest.parse_documents

    def counting(text: str, source: str) -> list:
        parsed.append(source)
        return original(text, source)

    manifest.parse_documents = counting  # type: ignore[assignment]
    try:
        (tmp_path / "b.yaml").unlink()
        events = store.rescan({str(tmp_path / "b.yaml")})
        assert [(e.type, e.obj["metadata"]["labels"]["pod"]) for e in events] == [("MODIFIED", "a")]
        (tmp_path / "c.yaml").write_text(POD.replace("name: a,", "name: c,"))
        events = store.rescan({str(tmp_path / "c.yaml")})
        assert [(e.type, e.key) for e in events] == [("ADDED", "x/c")]
        assert parsed == [str(tmp_path / "c.yaml")]  # nothing else re-read
    finally:
        manifest.parse_documents = original  # type: ignore[assignment]


def test_inotify_delivers_changes_without_polling(tmp_path):
    async def scenario() -> tuple[list[Event], str, int]:
        store = ManifestDatastore(str(tmp_path), poll_interval=60)  # polling would take a minute
        seen: list[Event] = []

        async def sink(events: list[Event]) -> None:
            seen.extend(events)

        synced = asyncio.Event()
        task = asyncio.create_task(store.run(sink, synced))
        await asyncio.wait_for(synced.wait(), 5)
        scans = []
        store.scan = lambda: scans.append(1) or []  # type: ignore[method-assign]  # a full re-stat would show here
        await asyncio.sleep(0.3)
        (tmp_path / ".pods.yaml.tmp").write_text(POD)
        os.replace(tmp_path / ".pods.yaml.tmp", tmp_path / "pods.yaml")  # how writers write: temp file + rename
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        task.cancel()
        return seen, store.watching, len(scans)

    seen, watching, scans = asyncio.run(scenario())
    assert watching == "inotify" and scans == 0
    assert [(e.type, e.key) for e in seen] == [("ADDED", "x/a")]
