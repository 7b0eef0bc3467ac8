"""Netlink sockets inside another network namespace without forking.

setns(2) with CLONE_NEWNET changes the namespace of the calling *thread* only; a socket keeps the namespace it
was created in. So: enter the target netns in this thread, create the socket, return to the original netns.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import socket

from routed.errors import Code, RoutedOSError

log = logging.getLogger(__name__)
CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetnsGone(RoutedOSError):
    """The netns path does not exist (or is not a network namespace)."""

    code = Code.UNKNOWN_CONTAINER


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_netns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsGone(2, f"network namespace {path} does not exist") from None


def netlink_socket_in(netns_fd: int) -> socket.socket:
    """An rtnetlink socket living in the namespace `netns_fd` refers to."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(netns_fd)
        except OSError as exc:
            raise NetnsGone(exc.errno or 22, f"cannot enter network namespace: {exc}") from None
        try:
            return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
        finally:
            try:
                _setns(own)
            except OSError:
                # This thread now lives in the pod's netns; later node-side work on it (sysctls) would land in the
                # wrong place. Never observed (we hold an fd to our own netns); stop rather than mis-wire.
                log.critical("cannot return to the node network namespace; exiting")
                os._exit(70)
    finally:
        os.close(own)
