from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from routed.cache import CacheChange, ClusterCache
from routed.datastore import manifest
from routed.datastore.base import Event
from routed.datastore.manifest import WATCH_MASK, ManifestDatastore, TreeWatch, WatchBatch
from tests.helpers import holds_for, run_and_expect

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


NP = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: x}
spec: {podSelector: {}}
"""


def write_atomically(path: Path, text: str) -> None:
    """How writers write: a temporary file (ignored: its name starts with "."), renamed over the manifest."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def keys(events: list[Event]) -> list[tuple[str, str, str]]:
    return sorted((e.type, e.kind, e.key) for e in events)


class Running:
    """A store's run() on its own event loop in a thread, so the test polls with run_and_expect."""

    def __init__(self, store: ManifestDatastore) -> None:
        self.store = store
        self.events: list[Event] = []
        self.loop = asyncio.new_event_loop()
        self.task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self.task = asyncio.current_task()  # type: ignore[assignment]

        async def sink(events: list[Event]) -> None:
            self.events.extend(events)

        with contextlib.suppress(asyncio.CancelledError):
            await self.store.run(sink, asyncio.Event())

    def __enter__(self) -> Running:
        self.thread.start()
        run_and_expect(lambda: self.store.watching, "inotify", 5).check("watching with inotify")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(5)
        self.loop.close()

    def call(self, fn: Any) -> None:
        self.loop.call_soon_threadsafe(fn)

    def objects(self) -> dict[str, dict[str, Any]]:
        """What was delivered, folded: "Kind key" -> the object."""
        out: dict[str, dict[str, Any]] = {}
        for e in list(self.events):
            if e.type == "DELETED":
                out.pop(f"{e.kind} {e.key}", None)
            else:
                out[f"{e.kind} {e.key}"] = e.obj
        return out


def start_watch(root: Path) -> tuple[ManifestDatastore, TreeWatch]:
    """A store and its watch, driven one step at a time (what run() does in a thread, made deterministic)."""
    store = ManifestDatastore(str(root))
    watch = TreeWatch(str(root))
    store.watch_step(watch, full=True)
    return store, watch


def record_reads(watch: TreeWatch) -> list[WatchBatch]:
    """Keep what each read of the inotify queue held (to show what the kernel did and did not report)."""
    batches: list[WatchBatch] = []
    read = watch.read

    def recording() -> WatchBatch:
        batches.append(read())
        return batches[-1]

    watch.read = recording  # type: ignore[method-assign]
    return batches


def count_scans(store: ManifestDatastore) -> list[int]:
    scans: list[int] = []
    scan = store.scan

    def counting() -> list[Event]:
        scans.append(1)
        return scan()

    store.scan = counting  # type: ignore[method-assign]
    return scans


def test_inotify_delivers_changes_without_polling(tmp_path):
    store = ManifestDatastore(str(tmp_path), poll_interval=60)  # polling would take a minute
    with Running(store) as running:
        scans = count_scans(store)  # a full re-stat would show here
        write_atomically(tmp_path / "pods.yaml", POD)
        run_and_expect(running.objects, {"Pod x/a": {"kind": "Pod"}}, 5).check("the pod delivered")
        assert scans == []


def test_directory_created_and_filled_before_its_watch_exists_is_scanned(tmp_path):
    (tmp_path / "Pod").mkdir()
    (tmp_path / "Pod" / "a.yaml").write_text(POD)
    store, watch = start_watch(tmp_path)
    try:
        batches = record_reads(watch)
        # All of it before the watcher read the directory's IN_CREATE, so before it could watch NetworkPolicy/:
        # the kernel reports the directory and nothing of the file.
        (tmp_path / "NetworkPolicy").mkdir()
        write_atomically(tmp_path / "NetworkPolicy" / "np.yaml", NP)
        assert keys(store.watch_step(watch)) == [("ADDED", "NetworkPolicy", "x/np")]
        assert batches[0].new_dirs == {str(tmp_path / "NetworkPolicy")} and batches[0].files == set()
        assert store.watch_step(watch) == []  # nothing twice
        write_atomically(tmp_path / "NetworkPolicy" / "np.yaml", NP.replace("{}", "{matchLabels: {a: b}}"))
        assert keys(store.watch_step(watch)) == [("MODIFIED", "NetworkPolicy", "x/np")]  # now it is watched
    finally:
        watch.close()


def test_directory_of_manifests_moved_into_the_tree_is_scanned_and_watched(tmp_path):
    root, staging = tmp_path / "manifests", tmp_path / "staging"
    root.mkdir()
    (staging / "Pod").mkdir(parents=True)
    (staging / "Pod" / "a.yaml").write_text(POD)
    (staging / "NetworkPolicy" / "deep").mkdir(parents=True)
    (staging / "NetworkPolicy" / "deep" / "np.yaml").write_text(NP)
    store = ManifestDatastore(str(root), poll_interval=60)
    with Running(store) as running:
        os.rename(staging, root / "batch")  # one IN_MOVED_TO|IN_ISDIR; nothing about the files inside
        run_and_expect(running.objects, {"Pod x/a": {}, "NetworkPolicy x/np": {}}, 5).check("moved-in objects")
        write_atomically(root / "batch" / "NetworkPolicy" / "deep" / "np.yaml", NP.replace("{}", "{matchLabels: {a: b}}"))
        run_and_expect(running.objects, {"NetworkPolicy x/np": {"spec": {"podSelector": {"matchLabels": {"a": "b"}}}}},
                       5).check("a change below the moved-in directory")


def test_directory_moved_out_drops_its_objects_and_its_watches(tmp_path):
    root = tmp_path / "manifests"
    (root / "NetworkPolicy").mkdir(parents=True)
    (root / "NetworkPolicy" / "np.yaml").write_text(NP)
    (root / "a.yaml").write_text(POD)
    store = ManifestDatastore(str(root), poll_interval=60)
    with Running(store) as running:
        run_and_expect(running.objects, {"NetworkPolicy x/np": {}, "Pod x/a": {}}, 5).check("first sync")
        os.rename(root / "NetworkPolicy", tmp_path / "away")  # IN_MOVED_FROM|IN_ISDIR only
        run_and_expect(running.objects, lambda objs: "NetworkPolicy x/np" not in objs and "Pod x/a" in objs,
                       5).check("the moved-out policy deleted")
        write_atomically(tmp_path / "away" / "np.yaml", NP)  # outside the tree now: its old watch must be gone
        holds_for(running.objects, lambda objs: "NetworkPolicy x/np" not in objs, 0.5).check("nothing from outside")


def test_queue_overflow_forces_a_full_scan(tmp_path):
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to overflow it quickly")
    (tmp_path / "Pod").mkdir()
    store, watch = start_watch(tmp_path)
    try:
        batches, scans = record_reads(watch), count_scans(store)
        for i in range(limit // 2 + 1):  # 3 events each (create, close, delete): the queue overflows
            noise = tmp_path / f"noise-{i}"
            noise.touch()
            noise.unlink()
        write_atomically(tmp_path / "Pod" / "a.yaml", POD)  # its events are dropped: the queue is full
        assert keys(store.watch_step(watch)) == [("ADDED", "Pod", "x/a")]
        assert batches[0].lost and str(tmp_path / "Pod" / "a.yaml") not in batches[0].files
        assert scans == [1]
        write_atomically(tmp_path / "Pod" / "a.yaml", POD.replace("pod: a", "pod: b"))
        assert keys(store.watch_step(watch)) == [("MODIFIED", "Pod", "x/a")]  # still watched after re-watching
    finally:
        watch.close()


def test_watch_add_failure_forces_a_full_scan_or_polling(tmp_path):
    store, watch = start_watch(tmp_path)
    try:
        add, failures = watch.inotify.add_watch, [errno.ENOENT]

        def flaky(path: str, mask: int = WATCH_MASK) -> int:
            if path.endswith("NetworkPolicy") and failures:
                code = failures.pop()
                raise OSError(code, os.strerror(code), path)
            return add(path, mask)

        watch.inotify.add_watch = flaky  # type: ignore[method-assign]
        scans = count_scans(store)
        (tmp_path / "NetworkPolicy").mkdir()
        write_atomically(tmp_path / "NetworkPolicy" / "np.yaml", NP)
        assert keys(store.watch_step(watch)) == [("ADDED", "NetworkPolicy", "x/np")]
        assert failures == [] and scans == [1]  # the failed add: everything re-watched and scanned
        write_atomically(tmp_path / "NetworkPolicy" / "np.yaml", NP.replace("{}", "{matchLabels: {a: b}}"))
        assert keys(store.watch_step(watch)) == [("MODIFIED", "NetworkPolicy", "x/np")]

        failures.append(errno.ENOSPC)  # the watch limit: run() falls back to polling
        os.rename(tmp_path / "NetworkPolicy", tmp_path / "moved")
        os.rename(tmp_path / "moved", tmp_path / "NetworkPolicy")
        with pytest.raises(OSError, match="No space"):
            store.watch_step(watch)
    finally:
        watch.close()


def test_refresh_finds_what_no_event_reported(tmp_path):
    (tmp_path / "Pod").mkdir()
    store, watch = start_watch(tmp_path)
    try:
        watch.drop_tree(str(tmp_path / "Pod"))  # as if its watch were lost
        write_atomically(tmp_path / "Pod" / "a.yaml", POD)
        assert store.watch_step(watch) == []  # no event
        assert keys(store.watch_step(watch, refresh=True)) == [("ADDED", "Pod", "x/a")]
        assert str(tmp_path / "Pod") in watch.dirs.values()  # and watched again
    finally:
        watch.close()


def test_refresh_soon_under_inotify_is_coalesced(tmp_path):
    store = ManifestDatastore(str(tmp_path), poll_interval=60)
    refreshes: list[int] = []
    refresh_tree = store.refresh_tree

    def counting(watch: TreeWatch) -> list[Event]:
        refreshes.append(1)
        return refresh_tree(watch)

    store.refresh_tree = counting  # type: ignore[method-assign]
    with Running(store) as running:
        for _ in range(50):  # a CNI ADD waiting for its pod asks every 50 ms; fifty at once here
            running.call(store.refresh_soon)
        run_and_expect(lambda: len(refreshes), lambda n: n >= 1, 5).check("a refresh")
        holds_for(lambda: len(refreshes), lambda n: n <= 2, 0.6).check("coalesced")
