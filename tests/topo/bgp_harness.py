"""An agent-like process for BGP tests and the bench: runs BgpManager inside a node namespace.

    python tests/topo/bgp_harness.py SPEC.json STATUS.json

SPEC holds {"node_name", "run_dir", "state_dir", "objects": [Node/BGPPeer/BGPConfiguration/Secret dicts]}
and is re-read when it changes; STATUS gets {"ready", "status", "advertised", "received", "pid", ...}
rewritten a few times a second. SIGTERM: graceful stop; SIGINT: stop without withdrawing (crash-like).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from routed.bgp.manager import BgpInputs, BgpManager
from routed.config import BgpOptions
from routed.model import Node


def inputs_from(spec: dict) -> BgpInputs | None:
    objs = spec.get("objects") or []
    nodes = [Node.from_k8s(o) for o in objs if o.get("kind") == "Node"]
    me = [n for n in nodes if n.name == spec["node_name"]]
    if not me:
        return None
    secrets = {f"{(o['metadata'].get('namespace') or 'default')}/{o['metadata']['name']}": o
               for o in objs if o.get("kind") == "Secret"}
    return BgpInputs(
        node=me[0], nodes=nodes,
        peers=[o for o in objs if o.get("kind") == "BGPPeer"],
        configs=[o for o in objs if o.get("kind") == "BGPConfiguration"],
        secrets=secrets,
    )


async def main(spec_path: str, status_path: str) -> None:
    spec = json.load(open(spec_path))
    mgr = BgpManager(spec["node_name"], spec["state_dir"], spec["run_dir"], BgpOptions(**spec.get("options", {})))
    await mgr.start()
    stop = asyncio.Event()
    graceful = {"value": True}

    def on_signal(g: bool) -> None:
        graceful["value"] = g
        stop.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, on_signal, True)
    loop.add_signal_handler(signal.SIGINT, on_signal, False)
    mtime = 0.0
    while not stop.is_set():
        try:
            m = os.stat(spec_path).st_mtime
            if m != mtime:
                mtime = m
                spec = json.load(open(spec_path))
                inputs = inputs_from(spec)
                if inputs is not None:
                    await mgr.update(inputs)
        except (OSError, ValueError) as e:
            logging.warning("spec: %s", e)
        ok, why = mgr.ready()
        tmp = status_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"time": time.time(), "pid": os.getpid(), "ready": ok, "reason": why,
                       "status": mgr.status(), "advertised": mgr.advertised(), "received": mgr.received(),
                       "metrics": mgr.metrics_snapshot()}, f)
        os.replace(tmp, status_path)
        try:
            await asyncio.wait_for(stop.wait(), float(spec.get("status_interval", 0.2)))
        except TimeoutError:
            pass
    await mgr.stop(graceful=graceful["value"])


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("RTD_LOG", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2]))
