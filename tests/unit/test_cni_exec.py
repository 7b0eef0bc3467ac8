"""The agent side of one CNI invocation (cni/exec.py) with a recording handler: parsing, validation, the
result bytes and every error code, mapped once."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from cni.exec import decode_params, encode_params, run_invocation
from cni.request import CniRequest
from routed.errors import Code, RoutedError

ADD_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0",
           "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1", "CNI_PATH": "/opt/cni/bin"}


class Handler:
    def __init__(self, result: Any = None, error: Exception | None = None) -> None:
        self.result, self.error = result, error
        self.requests: list[CniRequest] = []

    async def __call__(self, req: CniRequest) -> Any:
        self.requests.append(req)
        if self.error is not None:
            raise self.error
        return self.result


def invoke(handler: Handler, env: dict[str, str], conf: Any) -> tuple[int, Any]:
    raw = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    code, out = asyncio.run(run_invocation(handler, env, raw))
    return code, (json.loads(out) if out.strip() else None)


def netconf(version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "k8s", "type": "routed-cni", **extra}


def test_params_round_trip_any_bytes():
    env, stdin = decode_params(encode_params({**ADD_ENV, "PATH": "/bin"}, b"\xff{\"x\":1}\n"))
    assert env == ADD_ENV and stdin == b"\xff{\"x\":1}\n"
    with pytest.raises(RoutedError) as bad:
        decode_params({"env": "not base64!", "stdin": ""})
    assert bad.value.code == Code.MALFORMED_REQUEST


def test_add_reaches_the_handler_parsed_and_prints_its_result():
    handler = Handler({"cniVersion": "1.0.0", "ips": [{"address": "10.88.0.9/32"}]})
    code, out = invoke(handler, ADD_ENV, netconf())
    assert code == 0 and out["ips"][0]["address"] == "10.88.0.9/32"
    req = handler.requests[0]
    assert (req.command, req.container_id, req.netns, req.ifname) == ("ADD", "c1", "/var/run/netns/x", "eth0")
    assert req.pod_namespace == "default" and req.pod_name == "web-1" and req.config["name"] == "k8s"


def test_del_prints_nothing_on_success():
    assert invoke(Handler(None), {**ADD_ENV, "CNI_COMMAND": "DEL"}, netconf()) == (0, None)


def test_version_is_answered_without_the_handler():
    handler = Handler()
    assert invoke(handler, {"CNI_COMMAND": "VERSION"}, {"cniVersion": "1.0.0"}) == (
        0, {"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]})
    assert invoke(handler, {"CNI_COMMAND": "VERSION"}, b"")[1]["cniVersion"] == "1.1.0"
    assert handler.requests == []


def test_handler_errors_keep_their_code_in_the_requested_version():
    handler = Handler(error=RoutedError("no free address left in pod CIDR 10.88.0.0/24", code=Code.IPAM_EXHAUSTED))
    code, out = invoke(handler, ADD_ENV, netconf("0.4.0"))
    assert code == 1 and out == {"cniVersion": "0.4.0", "code": 111,
                                 "msg": "no free address left in pod CIDR 10.88.0.0/24"}


def test_invalid_invocations_never_reach_the_handler():
    handler = Handler()
    code, out = invoke(handler, {"CNI_COMMAND": "ADD"}, netconf())
    assert code == 1 and out["code"] == Code.INVALID_ENV and "CNI_CONTAINERID" in out["msg"]
    code, out = invoke(handler, ADD_ENV, b"{oops")
    assert code == 1 and out["code"] == Code.DECODE_FAILURE
    code, out = invoke(handler, ADD_ENV, netconf("9.9.9"))
    assert code == 1 and out["code"] == Code.INCOMPATIBLE_VERSION and out["cniVersion"] == "1.1.0"
    code, out = invoke(handler, ADD_ENV, netconf(ipam={"type": "host-local"}))
    assert code == 1 and out["code"] == Code.UNSUPPORTED_FIELD
    code, out = invoke(handler, {k: v for k, v in ADD_ENV.items() if k != "CNI_COMMAND"}, netconf())
    assert code == 1 and out["code"] == Code.INVALID_ENV and "CNI_COMMAND" in out["msg"]
    assert handler.requests == []


def test_a_bug_is_999_with_the_traceback_in_the_log_not_on_stdout(caplog):
    with caplog.at_level(logging.ERROR, logger="cni.exec"):
        code, out = invoke(Handler(error=KeyError("ips")), ADD_ENV, netconf())
    assert code == 1 and out["code"] == Code.UNEXPECTED and "Traceback" not in json.dumps(out)
    assert any(r.exc_info for r in caplog.records)
