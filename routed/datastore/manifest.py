"""Manifest-directory datastore: Kubernetes-shaped YAML files in a directory tree, watched for changes.

Every `*.yaml`, `*.yml` and `*.json` file below the directory is read (multi-document files and `kind: List`
are fine). The directory is polled (stat only) and changed files are re-parsed; the union of objects is diffed
against what was delivered before. A file that fails to parse is reported and its previous objects are kept,
so a half-written edit never deletes anything; a directory that cannot be read delivers nothing (the agent
keeps its last state) and is retried with backoff.
"""

from __future__ import annotations

import asyncio
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


def parse_documents(text: str, source: str) -> list[dict[str, Any]]:
    """Objects of the kinds we watch from one file's text (List objects are flattened)."""
    objects: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(text):
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


class ManifestDatastore(Datastore):
    kind = "manifest"

    def __init__(self, directory: str, poll_interval: float = 0.25) -> None:
        self.directory = Path(directory)
        self.poll_interval = poll_interval
        self._stamps: dict[str, FileStamp] = {}
        self._file_objects: dict[str, list[dict[str, Any]]] = {}
        self._delivered: dict[ObjectId, dict[str, Any]] = {}
        self.file_errors: dict[str, str] = {}  # file -> last parse error
        self.directory_error = ""
        self._wake = asyncio.Event()

    async def run(self, sink: EventSink, synced: asyncio.Event) -> None:
        backoff = Backoff(base=self.poll_interval, cap=10.0)
        while True:
            try:
                events = await asyncio.to_thread(self.scan)
            except DatastoreUnavailable as exc:
                if str(exc) != self.directory_error:
                    log.error("manifest datastore: %s (retrying with backoff; keeping what was read before)", exc)
                self.directory_error = str(exc)
                await backoff.sleep(self._wake)
                self._wake.clear()
                continue
            if self.directory_error:
                log.info("manifest directory %s readable again", self.directory)
                self.directory_error = ""
            backoff.reset()
            if events or not synced.is_set():
                await sink(events)
            synced.set()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)
            except TimeoutError:
                pass

    def refresh_soon(self) -> None:
        self._wake.set()

    def errors(self) -> dict[str, str]:
        out = dict(self.file_errors)
        if self.directory_error:
            out["directory"] = self.directory_error
        return out

    def scan(self) -> list[Event]:
        """Re-read changed files; the events that turn what was delivered into what the files say now.
        Raises DatastoreUnavailable when the directory itself cannot be read (nothing is delivered then)."""
        current = self._stat_files()
        changed = [path for path, stamp in current.items() if self._stamps.get(path) != stamp]
        removed = [path for path in self._stamps if path not in current]
        if not changed and not removed:
            return []
        for path in removed:
            self._file_objects.pop(path, None)
            self.file_errors.pop(path, None)
        for path in changed:
            try:
                self._file_objects[path] = parse_documents(Path(path).read_text(), path)
                self.file_errors.pop(path, None)
            except (OSError, ValueError, yaml.YAMLError) as exc:
                log.error("manifest %s ignored, keeping its previous objects: %s", path, exc)
                self.file_errors[path] = str(exc)
        self._stamps = current
        return self._diff()

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
                if not name.endswith(SUFFIXES) or name.startswith("."):
                    continue
                path = os.path.join(root, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                stamps[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return stamps

    def _diff(self) -> list[Event]:
        desired: dict[ObjectId, dict[str, Any]] = {}
        for path in sorted(self._file_objects):
            for obj in self._file_objects[path]:
                kind = obj["kind"]
                desired[(kind, object_key(kind, obj))] = obj  # a later file wins on duplicates
        events: list[Event] = []
        for oid, obj in desired.items():
            previous = self._delivered.get(oid)
            if previous is None:
                events.append(Event("ADDED", oid[0], oid[1], obj))
            elif previous != obj:
                events.append(Event("MODIFIED", oid[0], oid[1], obj))
        for oid, obj in self._delivered.items():
            if oid not in desired:
                events.append(Event("DELETED", oid[0], oid[1], obj))
        self._delivered = desired
        return events
