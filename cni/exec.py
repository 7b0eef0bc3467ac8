"""One CNI invocation, agent side: the CNI_* environment and stdin exactly as the runtime gave them to the static
`routed-cni` shim (cni/shim/routed-cni.c) → the exit status and the bytes to print.

This is the only implementation of the CNI contract: parsing (cni/request.py), validation, the result in the
requested cniVersion's shape (cni/result.py via the CNI service) and every error code (routed/errors.py, mapped
here once). The shim only answers VERSION itself and checks that the environment names what a command needs.

Local API method `cni`: params `{"env": base64(NUL-separated "KEY=VALUE"), "stdin": base64(bytes)}`, result
`{"exitCode": int, "stdout": base64(bytes)}`. `encode_params` builds the params (tests, benchmarks, tools).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypedDict

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
from routed.errors import Code, RoutedError

log = logging.getLogger(__name__)

Handler = Callable[[CniRequest], Awaitable[Any]]


class CniAnswer(TypedDict):
    exitCode: int
    stdout: str  # base64


def encode_params(environ: Mapping[str, str], stdin: bytes | str) -> dict[str, str]:
    """The `cni` method's params for an invocation (what the shim sends)."""
    raw_env = b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items() if k.startswith("CNI_"))
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return {"env": base64.b64encode(raw_env).decode(), "stdin": base64.b64encode(data).decode()}


def decode_params(params: Mapping[str, Any]) -> tuple[dict[str, str], bytes]:
    try:
        raw_env = base64.b64decode(str(params.get("env", "")), validate=True)
        stdin = base64.b64decode(str(params.get("stdin", "")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RoutedError("malformed CNI invocation", str(exc), code=Code.MALFORMED_REQUEST) from None
    environ: dict[str, str] = {}
    for item in raw_env.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            environ[key] = value
    return environ, stdin


def _context(environ: Mapping[str, str]) -> str:
    args = dict(p.partition("=")[::2] for p in environ.get("CNI_ARGS", "").split(";") if "=" in p)
    return (f"{environ.get('CNI_COMMAND', '-')} {environ.get('CNI_CONTAINERID', '-')}/{environ.get('CNI_IFNAME', '-')}"
            f" pod {args.get('K8S_POD_NAMESPACE', '-')}/{args.get('K8S_POD_NAME', '-')}")


async def run_invocation(handle: Handler, environ: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
    """(exit status, stdout) of one CNI call; `handle` serves a validated request (the CNI service)."""
    started = time.perf_counter()
    conf: dict[str, Any] = {}
    try:
        command = check_command(environ.get("CNI_COMMAND", ""))
        if command == "VERSION":
            conf = decode_netconf(stdin) if stdin.strip() else {}
            requested = conf.get("cniVersion")
            version = requested if isinstance(requested, str) and requested else LATEST_VERSION
            return 0, _line({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)})
        conf = decode_netconf(stdin)
        req = parse_env(environ)
        validate_netconf(command, conf)
        req.config = conf
        result = await handle(req)
    except RoutedError as exc:
        log.warning("CNI %s: error %d: %s %s", _context(environ), exc.code, exc.msg, exc.details)
        return 1, _line(exc.to_cni(version_for_errors(conf)))
    except Exception as exc:  # a bug: the runtime gets 999, the agent's log the traceback
        log.exception("CNI %s failed unexpectedly", _context(environ))
        err = RoutedError(f"routed-cni failed unexpectedly: {type(exc).__name__}: {exc}", "see the agent log")
        return 1, _line(err.to_cni(version_for_errors(conf)))
    log.info("CNI %s ok in %.1f ms", _context(environ), (time.perf_counter() - started) * 1000)
    return 0, _line(result) if result is not None else b""


def answer(code: int, stdout: bytes) -> CniAnswer:
    return CniAnswer(exitCode=code, stdout=base64.b64encode(stdout).decode())


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
