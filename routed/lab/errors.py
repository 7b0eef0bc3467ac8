"""The lab's one error family: setting up or driving the lab failed (routers, pods, the cluster store)."""

from __future__ import annotations

from routed.errors import Code, RoutedError


class LabError(RoutedError):
    code = Code.LAB_FAILED
