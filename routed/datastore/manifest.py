"""Manifest-directory datastore: Kubernetes-shaped YAML files in a directory tree, watched for changes.

Every `*.yaml`, `*.yml` and `*.json` file below the directory is read (multi-document files and `kind: List`
are fine; names starting with "." are skipped, so editors' and writers' temporary files are ignored). Changes
are watched with inotify(7) (the inotify_simple library), so an idle agent costs nothing; if inotify cannot be used
the directory is polled (stat only) instead.

inotify is not recursive: `TreeWatch` keeps one watch per directory. A directory that appears (created, or
moved in with its files) is watched first and then scanned, so what was written into it before its watch
existed is found by the scan and anything later by the watch; a directory that goes (deleted, moved out) drops
its watches and the objects of its files. An event queue overflow, a directory that vanished while its watch
was added, or the top directory's own watch going all re-add every watch and scan everything; a watch that
cannot be added for another reason (the watch limit) falls back to polling.

A change to one file costs O(that file): its objects are re-parsed and compared with what that file held
before; each object remembers which files define it, and the last file in path order wins on duplicates. A file
that fails to parse is reported and its previous objects are kept, so a half-written edit never deletes
anything; a directory that cannot be read delivers nothing (the agent keeps its last state) and is retried with
backoff. `resync()` (the periodic resync) re-stats every file; `refresh_soon()` (a CNI ADD waiting for its
pod) lists the tree without stat-ing known files, at most once per REFRESH_INTERVAL however often it is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import inotify_simple
import yaml

from routed import validation
from routed.backoff import Backoff
from routed.datastore.base import KINDS, Datastore, DatastoreUnavailable, Event, EventSink, object_key

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
FileStamp = tuple[int, int, int]  # inode, size, mtime_ns
ObjectId = tuple[str, str]  # kind, key
FileObjects = dict[ObjectId, dict[str, Any]]

DEBOUNCE = 0.02  # s: the events of a burst are read as one batch
REFRESH_INTERVAL = 0.25  # s: under inotify, refresh_soon() lists the tree at most this often

# inotify(7): linux/inotify.h
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
_MAX_READS = 256  # per round: a writer that never stops cannot keep a round from ending
VANISHED = (errno.ENOENT, errno.ENOTDIR)  # a path that went away while we looked at it


def _invalid_name(item: dict[str, Any]) -> str:
    """Why the object's name or namespace is not one kube-apiserver would accept ("" when it is): nothing
    stands between a manifest file and the cache but this (routed/validation.py)."""
    meta = item.get("metadata")
    if not isinstance(meta, dict):
        return "metadata is not a mapping"
    try:
        validation.check_dns_subdomain(meta.get("name"), "metadata.name")
        if meta.get("namespace") is not None:
            validation.check_dns_label(meta.get("namespace"), "metadata.namespace")
    except validation.InvalidValue as e:
        return e.msg
    return ""


def parse_documents(text: str, source: str) -> list[dict[str, Any]]:
    """Objects of the kinds we watch from one file's text (List objects are flattened). An object whose name or
    namespace kube-apiserver would refuse is left out with a warning; the file's other objects are kept."""
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
            if item["kind"] not in KINDS:
                continue
            why = _invalid_name(item)
            if why:
                log.warning("%s: a %s left out: %s", source, validation.display_name(item["kind"]), why)
                continue
            objects.append(item)
    return objects


# libyaml's C loader when present (several times faster on big files), else the pure-Python safe loader
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def is_manifest(path: str) -> bool:
    name = os.path.basename(path)
    return name.endswith(SUFFIXES) and not name.startswith(".")


# -- inotify ---------------------------------------------------------------------------------------------------
class Inotify:
    """One inotify instance (inotify_simple), read without blocking. It may be closed from another thread while
    a read runs: a closed instance raises EBADF rather than touch a reused descriptor."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inotify: inotify_simple.INotify | None = inotify_simple.INotify(nonblocking=True)
        self.fd = self._inotify.fileno()

    def add_watch(self, path: str, mask: int = WATCH_MASK) -> int:
        with self._lock:
            try:
                return int(self._instance().add_watch(path, mask))
            except OSError as exc:
                raise OSError(exc.errno, f"inotify_add_watch: {os.strerror(exc.errno or 0)}", path) from exc

    def rm_watch(self, wd: int) -> None:
        """Stop a watch (one the kernel dropped already, its directory deleted, is fine)."""
        with self._lock, contextlib.suppress(OSError):
            self._instance().rm_watch(wd)

    def read(self) -> list[inotify_simple.Event]:
        """What is queued now."""
        events: list[inotify_simple.Event] = []
        with self._lock:
            for _ in range(_MAX_READS):
                batch = self._instance().read(timeout=0)
                if not batch:
                    break
                events += batch
        return events

    def close(self) -> None:
        with self._lock:
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
                self.fd = -1

    def _instance(self) -> inotify_simple.INotify:
        if self._inotify is None:
            raise OSError(errno.EBADF, "inotify instance closed")
        return self._inotify


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def _outermost(dirs: set[str]) -> list[str]:
    """These directories without those below another of them (watching and scanning one covers its tree)."""
    tops: list[str] = []
    for path in sorted(dirs):
        if not (tops and _within(path, tops[-1])):
            tops.append(path)
    return tops


@dataclass
class WatchBatch:
    """What one read of the inotify queue asks for."""

    files: set[str] = field(default_factory=set)  # manifests to re-read
    new_dirs: set[str] = field(default_factory=set)  # created or moved in: watch, then scan
    gone_dirs: set[str] = field(default_factory=set)  # deleted or moved out: unwatch, drop their objects
    lost: bool = False  # events were lost (queue overflow, the top directory's watch went): re-watch, scan all


class TreeWatch:
    """Every directory of one tree watched (inotify is not recursive): watch descriptor -> directory path."""

    def __init__(self, root: str, inotify: Inotify | None = None) -> None:
        self.root = root
        self.inotify = inotify if inotify is not None else Inotify()
        self.dirs: dict[int, str] = {}

    def fileno(self) -> int:
        return self.inotify.fd

    def close(self) -> None:
        self.inotify.close()

    def watch_tree(self, top: str) -> bool:
        """Watch top and every directory below it, each before it is listed (a subdirectory created meanwhile
        is listed or reported). False when a directory went away meanwhile (the caller then scans everything);
        any other failure (the watch limit, no permission) raises OSError."""
        try:
            self.dirs[self.inotify.add_watch(top)] = top
            entries = list(os.scandir(top))
        except OSError as exc:
            if exc.errno in VANISHED:
                return False
            raise
        complete = True
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                complete = self.watch_tree(entry.path) and complete
        return complete

    def drop_tree(self, top: str) -> None:
        """Unwatch top and every directory below it: a directory moved out keeps its watches (they follow the
        inode) and would report its files under their old paths."""
        for wd, path in list(self.dirs.items()):
            if _within(path, top):
                del self.dirs[wd]
                self.inotify.rm_watch(wd)

    def reset(self) -> bool:
        """Watch the whole tree afresh; False when it changed meanwhile (see watch_tree)."""
        self.drop_tree(self.root)
        return self.watch_tree(self.root)

    def read(self) -> WatchBatch:
        batch = WatchBatch()
        for event in self.inotify.read():
            self._classify(event, batch)
        return batch

    def _classify(self, event: inotify_simple.Event, batch: WatchBatch) -> None:
        if event.mask & IN_Q_OVERFLOW:
            batch.lost = True
            return
        directory = self.dirs.get(event.wd)
        if directory is None:
            return  # from a watch dropped already
        if event.mask & IN_IGNORED:
            del self.dirs[event.wd]
        if not event.name:  # the watched directory itself: the parent's event covers a subdirectory
            if directory == self.root and event.mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                batch.lost = True
            return
        path = os.path.join(directory, event.name)
        if event.mask & IN_ISDIR:
            if event.mask & (IN_CREATE | IN_MOVED_TO):
                batch.new_dirs.add(path)
            elif event.mask & (IN_DELETE | IN_MOVED_FROM):
                batch.gone_dirs.add(path)
        elif is_manifest(path):
            batch.files.add(path)


def _list_tree(root: str) -> tuple[set[str], set[str]]:
    """Directories and manifests below root, by name only (no stat): what refresh_soon() compares."""
    dirs: set[str] = set()
    files: set[str] = set()
    for top, _subdirs, names in os.walk(root):
        dirs.add(top)
        files.update(path for path in (os.path.join(top, name) for name in names) if is_manifest(path))
    return dirs, files


async def _first_of(events: list[asyncio.Event], timeout: float | None) -> None:
    """Until one of these events is set or the timeout passed."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


# -- the datastore ---------------------------------------------------------------------------------------------
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
        self._wake = asyncio.Event()  # polling: scan now; inotify: a resync (re-watch and scan everything)
        self._refresh = asyncio.Event()  # inotify: refresh_soon() asked for a listing
        self._next_refresh = 0.0  # loop time before which a listing waits (coalescing)

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
        """inotify: re-read just what changed; returns (to polling) if inotify cannot be used."""
        try:
            watch = TreeWatch(str(self.directory))
        except OSError as exc:
            log.warning("cannot use inotify (%s): polling %s", exc, self.directory)
            return
        try:
            await self._watch_rounds(sink, watch)
        except OSError as exc:  # the watch limit, a directory that cannot be watched: poll instead
            log.warning("cannot watch %s with inotify (%s): polling it", self.directory, exc)
        finally:
            watch.close()

    async def _watch_rounds(self, sink: EventSink, watch: TreeWatch) -> None:
        self._refresh.clear()
        full, refresh = True, False  # watching starts with a full scan: what changed before the watches existed
        while True:
            events = await asyncio.to_thread(self.watch_step, watch, full, refresh)
            self.watching = "inotify"
            await self._deliver(sink, events)
            full, refresh = await self._next_round(watch)

    async def _next_round(self, watch: TreeWatch) -> tuple[bool, bool]:
        """Wait for inotify events, a resync or a due refresh; returns (full, refresh) for the next step."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd = watch.fileno()

        def ready() -> None:  # level-triggered: stop listening until the queue has been read
            loop.remove_reader(fd)
            readable.set()

        loop.add_reader(fd, ready)
        try:
            while not (readable.is_set() or self._wake.is_set() or self._refresh_due(loop)):
                waiting = self._refresh.is_set()  # asked, not due yet: wake up when it is
                await _first_of([readable, self._wake] + ([] if waiting else [self._refresh]),
                                timeout=max(0.0, self._next_refresh - loop.time()) if waiting else None)
            if readable.is_set():
                await asyncio.sleep(DEBOUNCE)
        finally:
            loop.remove_reader(fd)
        full = self._wake.is_set()
        self._wake.clear()
        refresh = self._refresh_due(loop)
        if refresh:
            self._refresh.clear()
            self._next_refresh = loop.time() + REFRESH_INTERVAL
        return full, refresh

    def _refresh_due(self, loop: asyncio.AbstractEventLoop) -> bool:
        return self._refresh.is_set() and loop.time() >= self._next_refresh

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
        """Polling: scan now. inotify: list the tree soon (refresh_tree: no stat of known files). A CNI ADD asks
        every 50 ms while it waits for its pod, so requests are coalesced: one listing per REFRESH_INTERVAL."""
        if self.watching == "inotify":
            self._refresh.set()
        else:
            self._wake.set()

    def resync(self) -> None:
        self._wake.set()  # a full re-stat; under inotify every watch is re-added too

    def errors(self) -> dict[str, str]:
        out = dict(self.file_errors)
        if self.directory_error:
            out["directory"] = self.directory_error
        return out

    # -- watching (each step runs in a thread) ---------------------------------------------------------------
    def watch_step(self, watch: TreeWatch, full: bool = False, refresh: bool = False) -> list[Event]:
        """One round of the inotify watch: read the queued events and return what they changed. `full` (watching
        starts, a resync) and lost events re-watch and scan everything; `refresh` lists the tree."""
        batch = watch.read()
        if full or batch.lost:
            return self._rewatch(watch)
        events: list[Event] = []
        for top in _outermost(batch.gone_dirs):
            watch.drop_tree(top)
            events += self._forget_tree(top)
        for top in _outermost(batch.new_dirs):
            if not watch.watch_tree(top):  # it changed while we added its watches
                return events + self._rewatch(watch)
            events += self._scan_tree(top)
        if refresh:
            events += self.refresh_tree(watch)
        return events + self.rescan(batch.files)

    def refresh_tree(self, watch: TreeWatch) -> list[Event]:
        """The cheap rescan: list the tree by name; watch and scan a directory without a watch, re-read a
        manifest that appeared or went without an event."""
        dirs, files = _list_tree(str(self.directory))
        events: list[Event] = []
        for top in _outermost(dirs - set(watch.dirs.values())):
            if not watch.watch_tree(top):
                return events + self._rewatch(watch)
            events += self._scan_tree(top)
        return events + self.rescan(files.symmetric_difference(self._stamps))

    def _rewatch(self, watch: TreeWatch) -> list[Event]:
        """Watch every directory afresh, then scan everything (raises DatastoreUnavailable if the top
        directory went)."""
        if not watch.reset():
            log.info("manifest directory %s changed while being watched: scanning all of it", self.directory)
        return self.scan()

    def _forget_tree(self, top: str) -> list[Event]:
        """A directory went (deleted, moved out): re-read the files known below it (the objects of those gone go)."""
        return self.rescan({path for path in self._stamps if _within(path, top)})

    # -- reading -------------------------------------------------------------------------------------------
    def scan(self) -> list[Event]:
        """Stat every file; re-read those that changed or went. Raises DatastoreUnavailable when the directory
        itself cannot be read (nothing is delivered then)."""
        if not self.directory.is_dir():
            raise DatastoreUnavailable(f"manifest directory {self.directory} does not exist or is not a directory")
        if not os.access(self.directory, os.R_OK | os.X_OK):
            raise DatastoreUnavailable(f"manifest directory {self.directory} is not readable")
        return self._scan_tree(str(self.directory))

    def _scan_tree(self, top: str) -> list[Event]:
        """Stat every file below top; re-read those that changed, appeared or went."""
        found = self._stat_files(top)
        current = {p: s for p, s in self._stamps.items() if not _within(p, top)} | found
        changed = {p for p, stamp in found.items() if self._stamps.get(p) != stamp}
        changed |= {p for p in self._stamps if _within(p, top) and p not in found}
        return self._reread(changed, current)

    def rescan(self, paths: set[str]) -> list[Event]:
        """Re-read just these files (inotify said they changed)."""
        stamps: dict[str, FileStamp | None] = {}
        for path in paths:
            try:
                st = os.stat(path)
                stamps[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
            except (FileNotFoundError, NotADirectoryError):
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

    def _stat_files(self, top: str) -> dict[str, FileStamp]:
        """Stamps of the manifests below top (a directory that went away meanwhile holds none)."""

        def unreadable(exc: OSError) -> None:
            if exc.errno not in VANISHED:
                raise DatastoreUnavailable(f"manifest directory {exc.filename or top}: {exc.strerror}")

        stamps: dict[str, FileStamp] = {}
        for root, _dirs, files in os.walk(top, onerror=unreadable):
            for name in files:
                path = os.path.join(root, name)
                if not is_manifest(path):
                    continue
                try:
                    st = os.stat(path)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                stamps[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return stamps
