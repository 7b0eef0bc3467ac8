"""A minimal stand-in for the node agent: the local API with the CNI service only.

    ip netns exec rtd-cni-host-X .venv/bin/python tests/netns/cni_harness.py \
        --socket S --state-dir D --pod-cidr 10.88.0.0/24 [--mtu N] [--log-file F]

Serves the API methods `cni`, `ipam.show` and `endpoints.list`; stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cni.exec import answer, decode_params, run_invocation
from cni.server import CniService
from cni.store import endpoint_to_dict
from routed.api import ApiServer
from routed.model import Endpoint


class TestHooks:
    """Endpoint hooks for tests: refuse pods named in --fail-pod, record what was added and removed."""

    def __init__(self, fail_pods: list[str], record: str) -> None:
        self.fail_pods = set(fail_pods)
        self.record = record

    def _note(self, what: str, endpoint: Endpoint) -> None:
        if self.record:
            with open(self.record, "a") as f:
                f.write(f"{what} {endpoint.container_id} {endpoint.host_ifname} {','.join(endpoint.ips)}\n")

    async def endpoint_added(self, endpoint: Endpoint) -> None:
        self._note("added", endpoint)
        if endpoint.pod_name in self.fail_pods:
            raise RuntimeError(f"test hook refuses pod {endpoint.pod_name}")

    async def endpoint_removed(self, endpoint: Endpoint) -> None:
        self._note("removed", endpoint)


async def serve(args: argparse.Namespace) -> None:
    cidrs = list(args.pod_cidr or [])
    hooks = TestHooks(args.fail_pod or [], args.hook_record) if (args.fail_pod or args.hook_record) else None
    service = CniService("harness", args.state_dir, lambda: cidrs, mtu=args.mtu, hooks=hooks)
    api = ApiServer(args.socket)
    async def cni(params: dict) -> dict:
        environ, stdin = decode_params(params)
        return answer(*await run_invocation(service.handle, environ, stdin))

    api.register("cni", cni)

    async def ipam_show(_: dict) -> dict:
        return service.ipam_show()

    async def endpoints_list(_: dict) -> list:
        return [endpoint_to_dict(ep) for ep in service.endpoints()]

    api.register("ipam.show", ipam_show)
    api.register("endpoints.list", endpoints_list)
    await service.start()
    await api.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await api.stop()
    await service.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--pod-cidr", action="append")
    parser.add_argument("--mtu", type=int, default=None)
    parser.add_argument("--log-file", default="")
    parser.add_argument("--fail-pod", action="append", help="endpoint_added raises for this K8S_POD_NAME")
    parser.add_argument("--hook-record", default="", help="append endpoint hook calls to this file")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        filename=args.log_file or None,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
