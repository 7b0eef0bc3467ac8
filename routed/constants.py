"""Identifiers that mark kernel objects as ours, shared by every module that writes or sweeps them."""

import os
import sys
from typing import Final

# Route protocol numbers (see /etc/iproute2/rt_protos; 0-4 and 8-19 are taken by the kernel and daemons).
ROUTE_PROTO_LOCAL: Final[int] = 201  # per-pod /32 routes and the pod-CIDR blackhole, owned by the CNI side
ROUTE_PROTO_BGP: Final[int] = 202  # routes learned over BGP, owned by the route table manager

HOST_VETH_PREFIX: Final[str] = "rtd"  # host side of every pod veth: "rtd" + 11 hex chars
NETNS_PREFIX: Final[str] = "rtd-"  # every network namespace made by the lab or a test

DEFAULT_STATE_DIR: Final[str] = "/var/lib/routed"
DEFAULT_RUN_DIR: Final[str] = "/var/run/routed"
DEFAULT_SOCKET: Final[str] = "/var/run/routed/agent.sock"


def cni_shim_path() -> str:
    """The static routed-cni built from cni/shim/routed-cni.c: next to this interpreter (.venv/bin by
    scripts/bootstrap, /opt/routed/bin in the image), unless ROUTED_CNI_SHIM names another file."""
    return os.environ.get("ROUTED_CNI_SHIM") or os.path.join(os.path.dirname(sys.executable), "routed-cni")
