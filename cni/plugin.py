"""`routed-cni`: the thin CNI executable the container runtime runs.

Stdlib only (keep startup small): parse the CNI environment and stdin, answer VERSION locally, forward every other
verb to the node agent's unix socket (local API method "cni"), print the Result or a spec error JSON on stdout.
Exit 0 on success, 1 on error. Logs go to the netconf's `logFile` (never fatal if it cannot be written).

Startup is the plugin's whole cost, so it imports as little as it can: no `typing`, no `logging` (a small line
logger below writes the same format), `routed.constants` only when the netconf has no socketPath. Installed
through `python -m cni.launcher DEST`, it runs as `python -IS` (no site: the venv's .pth hooks cost ~15 ms).
"""

from __future__ import annotations

import _socket
import os
import sys
import time

from cni import fastjson
from cni.request import (
    LATEST_VERSION,
    SUPPORTED_VERSIONS,
    CniRequest,
    check_command,
    decode_netconf,
    parse_env,
    validate_netconf,
    version_for_errors,
)
from routed.errors import NotAvailable, RoutedError, TryAgainLater

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, TextIO

DEFAULT_LOG_FILE = "/var/log/routed/cni.log"
CONNECT_TIMEOUT = 5.0
ANSWER_TIMEOUT = 120.0  # an ADD waits for IPAM, wiring and policy; the runtime has its own deadline


class LineLog:
    """Appends `time level pid context message` lines to one file; every failure to write is swallowed."""

    def __init__(self) -> None:
        self.path = ""
        self.ctx = "cmd=- container=- ifname=- pod=-/-"

    def _write(self, level: str, msg: str, args: tuple[object, ...]) -> None:
        if not self.path:
            return
        try:
            text = msg % args if args else msg
            now = time.time()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now * 1000) % 1000:03d}"
            with open(self.path, "a") as f:
                f.write(f"{stamp} {level} pid={os.getpid()} {self.ctx} {text}\n")
        except Exception:  # a full disk or a bad path never fails the CNI call
            pass

    def info(self, msg: str, *args: object) -> None:
        self._write("INFO", msg, args)

    def warning(self, msg: str, *args: object) -> None:
        self._write("WARNING", msg, args)

    def exception(self, msg: str, *args: object) -> None:
        import traceback

        self._write("ERROR", msg + "\n" + traceback.format_exc().rstrip(), args)


log = LineLog()


def setup_logging(conf: Mapping[str, Any], req: CniRequest | None) -> None:
    """Every line names the container, ifname and pod. An unusable path only disables logging."""
    path = conf.get("logFile") if isinstance(conf.get("logFile"), str) else DEFAULT_LOG_FILE
    log.path = path or ""
    if req is not None:
        log.ctx = (
            f"cmd={req.command} container={req.container_id or '-'} ifname={req.ifname or '-'} "
            f"pod={req.pod_namespace or '-'}/{req.pod_name or '-'}"
        )
    if log.path:
        try:
            os.makedirs(os.path.dirname(log.path) or ".", exist_ok=True)
        except OSError:
            log.path = ""


def call_agent(socket_path: str, params: dict[str, Any]) -> dict[str, Any]:
    """One request line, one response line. Raises OSError when the agent is unreachable or goes silent."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)  # not `socket`: it imports selectors and enum
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(socket_path)
        sock.settimeout(ANSWER_TIMEOUT)
        sock.sendall(fastjson.dumps({"method": "cni", "params": params}).encode() + b"\n")
        chunks: list[bytes] = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                break
    finally:
        sock.close()
    if not chunks:
        raise ConnectionError("the agent closed the connection without answering")
    response = fastjson.loads(b"".join(chunks))
    if not isinstance(response, dict):
        raise ConnectionError("the agent sent a malformed answer")
    return response


def run(environ: Mapping[str, str], stdin: bytes, out: TextIO) -> int:
    """The whole plugin, testable in-process. Returns the exit code; writes only the CNI answer to `out`."""
    conf: dict[str, Any] = {}
    req: CniRequest | None = None
    try:
        command = check_command(environ.get("CNI_COMMAND", ""))
        if command == "VERSION":
            conf = decode_netconf(stdin) if stdin.strip() else {}
            requested = conf.get("cniVersion")
            version = requested if isinstance(requested, str) and requested else LATEST_VERSION
            out.write(fastjson.dumps({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}) + "\n")
            return 0
        conf = decode_netconf(stdin)
        req = parse_env(environ)
        setup_logging(conf, req)
        validate_netconf(command, conf)
        req.config = conf
        return forward(req, out)
    except RoutedError as exc:
        if req is None:
            setup_logging(conf, None)
        log.warning("error %d: %s %s", exc.code, exc.msg, exc.details)
        out.write(fastjson.dumps(exc.to_cni(version_for_errors(conf))) + "\n")
        return 1
    except Exception as exc:  # a bug: the runtime gets 999, the log gets the traceback
        log.exception("unexpected failure")
        err = RoutedError(f"routed-cni failed unexpectedly: {type(exc).__name__}: {exc}", "see the log file")
        out.write(fastjson.dumps(err.to_cni(version_for_errors(conf))) + "\n")
        return 1


def forward(req: CniRequest, out: TextIO) -> int:
    socket_path = req.config.get("socketPath")
    if not socket_path:
        from routed.constants import DEFAULT_SOCKET  # imports typing: only paid when needed

        socket_path = DEFAULT_SOCKET
    started = time.monotonic()
    try:
        response = call_agent(socket_path, req.to_params())
    except (OSError, ValueError) as exc:
        if req.command == "STATUS":
            raise NotAvailable(f"the routed agent is not reachable at {socket_path}", str(exc)) from None
        raise TryAgainLater(f"the routed agent is not reachable at {socket_path}; try again later", str(exc)) from None
    elapsed = (time.monotonic() - started) * 1000
    if "error" in response:
        err = response["error"] or {}
        log.info("agent %s answered in %.1f ms with an error", socket_path, elapsed)
        raise RoutedError.from_json(err)
    result = response.get("result")
    if req.command == "ADD":
        text = fastjson.dumps(result) + "\n"
        ips = [ip.get("address") for ip in (result or {}).get("ips", [])]
        log.info("ADD ok via %s in %.1f ms: %s", socket_path, elapsed, ips)  # one line per successful call
        out.write(text)
    else:
        log.info("%s ok via %s in %.1f ms", req.command, socket_path, elapsed)
    return 0


def main() -> int:
    try:
        stdin = sys.stdin.buffer.read()
    except OSError:
        stdin = b""
    code = run(os.environ, stdin, sys.stdout)
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
