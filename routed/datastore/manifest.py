"""Manifest-directory datastore: Kubernetes-shaped YAML files in a directory tree, watched for changes.

Every `*.yaml`, `*.yml` and `*.json` file below the directory is read (multi-document files and `kind: List`
are fine; names starting with "." are skipped, so editors' and writers' temporary files are ignored). Changes
are watched with inotify through `watchfiles` (its Rust notify backend; maintained, and it batches bursts), so
an idle agent costs nothing; if inotify cannot be used the directory is polled (stat only) instead.

A change to one file costs O(that file): its objects are re-parsed and compared with what that file held
before; each object remembers which files define it, and the last file in path order wins on duplicates. A file
that fails to parse is reported and its previous objects are kept, so a half-written edit never deletes
anything; a directory that cannot be read delivers nothing (the agent keeps its last state) and is retried with
backoff. `resync()` (the periodic resync) re-stats every file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from routed.backoff import Backoff
from routed.datastore.base import KINDS, Datastore, DatastoreUnavailable, Event, EventSink, object_key

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
FileStamp = tuple[int, int, int]  # inode, size, mtime_ns
ObjectId = tuple[str, str]  # kind, key
FileObjects = dict[ObjectId, dict[str, Any]]


def parse_documents(text: str, source: str) -> list[dict[str, Any]]:
    """Objects of the kinds we watch from one file's text (List objects are flattened)."""
    objects: list[dict[str, Any]] = []
    for doc in yaml.load_all(text, Loader=_Loader):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ValueError(f"{source}: a document is not a mapping")
        items = doc.get("items") if doc.get("kind") == "List" else [doc]
        for item in items or []:
            if not isinstance(item, dict) or not item.get("kind"):
                raise ValueError(f"{source}: an object has no kind")
            if not (item.get("metadata") or {}).get("name"):
                raise ValueError(f"{source}: a {item['kind']} has no metadata.name")
            if item["kind"] in KINDS:
                objects.append(item)
    return objects


# libyaml's C loader when present (several times faster on big files), else the pure-Python safe loader
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def is_manifest(path: str) -> bool:
    name = os.path.basename(path)
    return name.endswith(SUFFIXES) and not name.startswith(".")


class ManifestDatastore(Datastore):
    kind = "manifest"

    def __init__(self, directory: str, poll_interval: float = 0.25, inotify: bool = True) -> None:
        self.directory = Path(directory)
        self.poll_interval = poll_interval
        self.inotify = inotify
        self._stamps: dict[str, FileStamp] = {}
        self._file_objects: dict[str, FileObjects] = {}
        self._owners: dict[ObjectId, set[str]] = {}  # object -> files defining it
        self._delivered: dict[ObjectId, dict[str, Any]] = {}
        self.file_errors: dict[str, str] = {}  # file -> last parse error
        self.directory_error = ""
        self.watching = ""  # "inotify" | "polling" (what the last run used)
        self._wake = asyncio.Event()

    # -- running -----------------------------------------------------------------------------------------
    async def run(self, sink: EventSink, synced: asyncio.Event) -> None:
        backoff = Backoff(base=min(self.poll_interval, 1.0), cap=10.0)
        while True:  # until the directory can be read: the first full scan
            try:
                events = await asyncio.to_thread(self.scan)
                break
            except DatastoreUnavailable as exc:
                self._unavailable(exc)
                await backoff.sleep(self._wake)
                self._wake.clear()
        self._available()
        await sink(events)
        synced.set()
        while True:
            try:
                if self.inotify:
                    await self._watch(sink)
                await self._poll(sink)
            except DatastoreUnavailable as exc:
                self._unavailable(exc)
                await backoff.sleep(self._wake)
                self._wake.clear()

    async def _watch(self, sink: EventSink) -> None:
        """inotify: re-read just the files that changed; returns (to polling) if inotify cannot be used. A
        refresh_soon() is served within a second by a full re-stat (the watch wakes up once a second)."""
        try:
            from watchfiles import awatch
        except ImportError:  # pragma: no cover - a dependency of the package
            log.warning("watchfiles is not installed: polling %s", self.directory)
            return
        self.watching = "inotify"
        try:
            async for batch in awatch(self.directory, debounce=50, step=10, recursive=True, rust_timeout=1000,
                                      yield_on_timeout=True):
                paths = {p for _, p in batch if is_manifest(p)}
                if self._wake.is_set():
                    self._wake.clear()
                    await self._deliver(sink, await asyncio.to_thread(self.scan))
                elif paths:
                    await self._deliver(sink, await asyncio.to_thread(self.rescan, paths))
                if not self.directory.is_dir():
                    raise DatastoreUnavailable(f"manifest directory {self.directory} went away")
        except (OSError, RuntimeError) as exc:  # inotify limits, a vanished directory: fall back to polling
            log.warning("cannot watch %s with inotify (%s): polling it", self.directory, exc)

    async def _poll(self, sink: EventSink) -> None:
        self.watching = "polling"
        while True:
            await self._deliver(sink, await asyncio.to_thread(self.scan))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)

    async def _deliver(self, sink: EventSink, events: list[Event]) -> None:
        self._available()
        if events:
            await sink(events)

    def _unavailable(self, exc: DatastoreUnavailable) -> None:
        if str(exc) != self.directory_error:
            log.error("manifest datastore: %s (retrying with backoff; keeping what was read before)", exc)
        self.directory_error = str(exc)

    def _available(self) -> None:
        if self.directory_error:
            log.info("manifest directory %s readable again", self.directory)
            self.directory_error = ""

    def refresh_soon(self) -> None:
        """Polling: scan now. With inotify changes arrive on their own, so this costs nothing (a CNI ADD asks
        while it waits for its pod: re-stating 10,000 files for it would only slow it down)."""
        if self.watching != "inotify":
            self._wake.set()

    def resync(self) -> None:
        self._wake.set()  # a full re-stat, also when watching with inotify

    def errors(self) -> dict[str, str]:
        out = dict(self.file_errors)
        if self.directory_error:
            out["directory"] = self.directory_error
        return out

    # -- reading -------------------------------------------------------------------------------------------
    def scan(self) -> list[Event]:
        """Stat every file; re-read those that changed or went. Raises DatastoreUnavailable when the directory
        itself cannot be read (nothing is delivered then)."""
        current = self._stat_files()
        changed = {p for p, stamp in current.items() if self._stamps.get(p) != stamp}
        changed |= {p for p in self._stamps if p not in current}
        return self._reread(changed, current)

    def rescan(self, paths: set[str]) -> list[Event]:
        """Re-read just these files (inotify said they changed)."""
        stamps: dict[str, FileStamp | None] = {}
        for path in paths:
            try:
                st = os.stat(path)
                stamps[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                stamps[path] = None
        current = {**self._stamps, **{p: s for p, s in stamps.items() if s is not None}}
        for path, stamp in stamps.items():
            if stamp is None:
                current.pop(path, None)
        return self._reread({p for p, s in stamps.items() if self._stamps.get(p) != s}, current)

    def _reread(self, paths: set[str], current: dict[str, FileStamp]) -> list[Event]:
        affected: set[ObjectId] = set()
        for path in sorted(paths):
            if path in current:
                try:
                    objects = parse_documents(Path(path).read_text(), path)
                except (OSError, ValueError, yaml.YAMLError) as exc:
                    log.error("manifest %s ignored, keeping its previous objects: %s", path, exc)
                    self.file_errors[path] = str(exc)
                    continue
                new: FileObjects = {(o["kind"], object_key(o["kind"], o)): o for o in objects}  # later wins
            else:
                new = {}
            self.file_errors.pop(path, None)
            affected |= self._replace_file(path, new)
        self._stamps = current
        return self._events_for(affected)

    def _replace_file(self, path: str, new: FileObjects) -> set[ObjectId]:
        """Record what one file defines now; the objects whose definition may have changed."""
        old = self._file_objects.get(path, {})
        if new:
            self._file_objects[path] = new
        else:
            self._file_objects.pop(path, None)
        for oid in old.keys() - new.keys():
            owners = self._owners.get(oid, set())
            owners.discard(path)
            if not owners:
                self._owners.pop(oid, None)
        for oid in new:
            self._owners.setdefault(oid, set()).add(path)
        return old.keys() | new.keys()

    def _events_for(self, affected: set[ObjectId]) -> list[Event]:
        """One event per object whose winning definition (the last file in path order) differs from what was
        delivered."""
        events: list[Event] = []
        for oid in sorted(affected):
            owners = self._owners.get(oid)
            want = self._file_objects[max(owners)][oid] if owners else None
            have = self._delivered.get(oid)
            if want is None:
                if have is not None:
                    del self._delivered[oid]
                    events.append(Event("DELETED", oid[0], oid[1], have))
            elif have is None:
                self._delivered[oid] = want
                events.append(Event("ADDED", oid[0], oid[1], want))
            elif have != want:
                self._delivered[oid] = want
                events.append(Event("MODIFIED", oid[0], oid[1], want))
        return events

    def _stat_files(self) -> dict[str, FileStamp]:
        stamps: dict[str, FileStamp] = {}
        if not self.directory.is_dir():
            raise DatastoreUnavailable(f"manifest directory {self.directory} does not exist or is not a directory")
        if not os.access(self.directory, os.R_OK | os.X_OK):
            raise DatastoreUnavailable(f"manifest directory {self.directory} is not readable")

        def unreadable(exc: OSError) -> None:
            raise DatastoreUnavailable(f"manifest directory {exc.filename or self.directory}: {exc.strerror}")

        for root, _dirs, files in os.walk(self.directory, onerror=unreadable):
            for name in files:
                path = os.path.join(root, name)
                if not is_manifest(path):
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                stamps[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return stamps
