"""Suite-wide pytest setup: the `requires_root` marker and `--pause-on-error` (as FRR's topotests have).

- Tests marked `requires_root` (and every `netns`, `topo` or `kube` test, which all build namespaces) are
  skipped unless run as root.
- `--pause-on-error`: when a test fails, stop before its fixtures tear the topology down, print the `rtd-…`
  namespaces that exist, and wait for Enter, so the lab can be inspected (`ip netns exec`, `routed lab status`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Generator
from typing import Any

import pytest

ROOT_MARKERS = ("requires_root", "netns", "topo", "kube")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--pause-on-error", action="store_true", default=False,
                     help="on a failure, wait for Enter before tearing the test's topology down")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_root: needs root (network namespaces, iptables, daemons)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root for network namespaces")
    for item in items:
        if any(item.get_closest_marker(m) for m in ROOT_MARKERS):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed or not item.config.getoption("--pause-on-error"):
        return
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    ours = [line.split()[0] for line in namespaces if line.startswith("rtd-")]
    print(f"\n--pause-on-error: {item.nodeid} failed; namespaces up: {' '.join(ours) or 'none'}")
    try:
        input("press Enter to tear down and continue... ")
    except EOFError:
        pass
    if capture is not None:
        capture.resume_global_capture()
