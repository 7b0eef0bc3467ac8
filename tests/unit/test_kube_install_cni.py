"""deploy/install-cni.py: the static plugin, then the conflist; atomic and idempotent, nothing on bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFLIST = json.dumps({"cniVersion": "1.1.0", "name": "routed", "plugins": [{"type": "routed-cni"}]}).encode()


def _mod() -> Any:
    spec = importlib.util.spec_from_file_location("install_cni", ROOT / "deploy" / "install-cni.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _plugin(tmp: Path, content: bytes = b"\x7fELF static routed-cni v1") -> Path:
    path = tmp / "image" / "routed-cni"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_install_is_atomic_and_idempotent(tmp_path: Path) -> None:
    m = _mod()
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    m.install(bin_dir, conf_dir, CONFLIST, _plugin(tmp_path))
    plugin = bin_dir / "routed-cni"
    assert plugin.read_bytes() == _plugin(tmp_path).read_bytes() and plugin.stat().st_mode & 0o777 == 0o755
    assert (conf_dir / "10-routed.conflist").read_bytes() == CONFLIST
    before = plugin.stat().st_ino, (conf_dir / "10-routed.conflist").stat().st_ino
    m.install(bin_dir, conf_dir, CONFLIST, _plugin(tmp_path))
    assert (plugin.stat().st_ino, (conf_dir / "10-routed.conflist").stat().st_ino) == before  # untouched
    m.install(bin_dir, conf_dir, CONFLIST, _plugin(tmp_path, b"\x7fELF v2"))
    assert plugin.read_bytes() == b"\x7fELF v2" and plugin.stat().st_ino != before[0]  # replaced by a rename
    assert sorted(p.name for p in bin_dir.iterdir()) == ["routed-cni"]  # no temporary files left


def test_bad_conflist_or_missing_plugin_installs_nothing(tmp_path: Path) -> None:
    m = _mod()
    with pytest.raises(json.JSONDecodeError):
        m.install(tmp_path / "bin", tmp_path / "conf", b"{not json", _plugin(tmp_path))
    with pytest.raises(FileNotFoundError):
        m.install(tmp_path / "bin", tmp_path / "conf", CONFLIST, tmp_path / "nope")
    assert not (tmp_path / "bin").exists() and not (tmp_path / "conf").exists()


def test_default_plugin_is_next_to_the_interpreter() -> None:
    assert _mod().default_plugin().endswith("/routed-cni")
