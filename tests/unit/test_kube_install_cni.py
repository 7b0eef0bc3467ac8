"""deploy/install-cni.py: plugin library + launcher + conflist, atomic and idempotent."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
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


def _source(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(ROOT / "cni", src / "cni", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "routed").mkdir()
    for name in ("__init__.py", "constants.py", "errors.py"):
        shutil.copy(ROOT / "routed" / name, src / "routed" / name)
    return src


def _version(plugin: Path) -> dict[str, Any]:
    out = subprocess.run([str(plugin)], env={"CNI_COMMAND": "VERSION", "PATH": os.environ["PATH"]},
                         input="", capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_install_runs_and_is_idempotent(tmp_path: Path) -> None:
    m = _mod()
    bin_dir, conf_dir, src = tmp_path / "bin", tmp_path / "net.d", _source(tmp_path)
    m.install(bin_dir, conf_dir, CONFLIST, src, str(bin_dir), sys.executable)
    plugin = bin_dir / "routed-cni"
    assert "1.1.0" in _version(plugin)["supportedVersions"]
    assert (conf_dir / "10-routed.conflist").read_bytes() == CONFLIST
    before = plugin.stat().st_ino, (conf_dir / "10-routed.conflist").stat().st_ino
    m.install(bin_dir, conf_dir, CONFLIST, src, str(bin_dir), sys.executable)
    assert (plugin.stat().st_ino, (conf_dir / "10-routed.conflist").stat().st_ino) == before  # untouched
    assert len(list((bin_dir / ".routed-cni").iterdir())) == 1
    assert not [p for p in bin_dir.iterdir() if p.name.startswith(".routed-cni.")]  # no temp files left


def test_upgrade_switches_launcher_and_prunes(tmp_path: Path) -> None:
    m = _mod()
    bin_dir, conf_dir, src = tmp_path / "bin", tmp_path / "net.d", _source(tmp_path)
    versions = []
    for i in range(3):
        (src / "cni" / "names.py").write_text((ROOT / "cni" / "names.py").read_text() + f"\n# build {i}\n")
        os.utime(src / "cni" / "names.py")
        m.install(bin_dir, conf_dir, CONFLIST, src, str(bin_dir), sys.executable)
        text = (bin_dir / "routed-cni").read_text()
        versions.append(text.split(".routed-cni/")[1].split("'")[0])
        _version(bin_dir / "routed-cni")
    assert len(set(versions)) == 3
    libs = {p.name for p in (bin_dir / ".routed-cni").iterdir()}
    assert versions[2] in libs and versions[0] not in libs and len(libs) == 2


def test_launcher_path_is_the_hosts(tmp_path: Path) -> None:
    m = _mod()
    m.install(tmp_path / "host" / "opt" / "cni" / "bin", tmp_path / "conf", CONFLIST, _source(tmp_path),
              "/opt/cni/bin", "/usr/bin/python3")
    text = (tmp_path / "host" / "opt" / "cni" / "bin" / "routed-cni").read_text()
    assert text.startswith("#!/usr/bin/python3 -IS\n") and "'/opt/cni/bin/.routed-cni/" in text


def test_bad_conflist_installs_nothing(tmp_path: Path) -> None:
    m = _mod()
    with pytest.raises(json.JSONDecodeError):
        m.install(tmp_path / "bin", tmp_path / "conf", b"{not json", _source(tmp_path), str(tmp_path / "bin"),
                  sys.executable)
    assert not (tmp_path / "bin").exists() and not (tmp_path / "conf").exists()
