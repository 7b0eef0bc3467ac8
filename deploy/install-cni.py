#!/usr/bin/env python3
"""Install the CNI executable and network config on the host (the DaemonSet's init container runs this).

- the static `routed-cni` (cni/shim/routed-cni.c: no runtime dependency, so any host runs it) is copied to
  BIN_DIR through a temporary file, fsync'ed and renamed over the old one;
- then the conflist goes to CONF_DIR the same way, so a runtime never sees a config whose plugin is missing,
  nor a half-written file. Unchanged files are left alone (nothing is rewritten on a restart).

Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("install-cni")

PLUGIN_NAME = "routed-cni"
CONFLIST_NAME = "10-routed.conflist"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int) -> bool:
    """Write `data` to `path` via temp file + fsync + rename. False if it already had exactly this content."""
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return True


def default_plugin() -> str:
    """The image's static routed-cni, next to the interpreter running this (/opt/routed/bin)."""
    return os.path.join(os.path.dirname(sys.executable), PLUGIN_NAME)


def install(bin_dir: Path, conf_dir: Path, conflist: bytes, plugin: Path) -> None:
    json.loads(conflist)  # never install a config the runtime cannot parse
    binary = plugin.read_bytes()  # and never a plugin that is not there
    bin_dir.mkdir(parents=True, exist_ok=True)
    conf_dir.mkdir(parents=True, exist_ok=True)
    changed = atomic_write(bin_dir / PLUGIN_NAME, binary, 0o755)
    log.info("%s %s", bin_dir / PLUGIN_NAME, "installed" if changed else "unchanged")
    changed = atomic_write(conf_dir / CONFLIST_NAME, conflist, 0o644)
    log.info("%s %s", conf_dir / CONFLIST_NAME, "installed" if changed else "unchanged")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", default="/host/opt/cni/bin", help="CNI bin dir as mounted here")
    parser.add_argument("--conf-dir", default="/host/etc/cni/net.d")
    parser.add_argument("--conflist", required=True, help="conflist file to install")
    parser.add_argument("--plugin", default=default_plugin(), help="the static routed-cni to install")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="install-cni: %(message)s")
    install(Path(args.bin_dir), Path(args.conf_dir), Path(args.conflist).read_bytes(), Path(args.plugin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
