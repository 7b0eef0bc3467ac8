"""Pod sandbox latency in a real containerd: `crictl runp` and `stopp`+`rmp` with routed (the static routed-cni
and the agent) against the reference ptp + host-local plugins, in the same containerd, interleaved (the
reference through a second runtime handler whose CNI configuration directory holds the ptp conflist).

The agent runs as a process in the node namespace with policy and BGP off (the reference has neither), so this
is the CNI path a kubelet waits for: containerd's libcni, the plugin, IPAM, wiring.

    .venv/bin/python bench/sandbox_latency.py [--cycles 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from routed import netns  # noqa: E402
from routed.constants import cni_shim_path  # noqa: E402
from tests.agent_process import AgentProcess, manifest, node_object  # noqa: E402
from tests.helpers import run_and_expect  # noqa: E402

PREFIX = "rtd-sbx-"
ENV = REPO / "scripts" / "containerd-env"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    subprocess.run(["bash", str(ENV), "build"], check=True)
    bindir = subprocess.run(["bash", str(ENV), "bindir"], capture_output=True, text=True, check=True).stdout.strip()
    netns.delete_all(PREFIX)
    run = uuid.uuid4().hex[:6]
    node, up = f"{PREFIX}{run}-node", f"{PREFIX}{run}-up"
    work = Path(tempfile.mkdtemp(prefix=PREFIX))
    ctd, cni_bin, conf, ref_conf = work / "containerd", work / "cni-bin", work / "net.d", work / "net.d-ref"
    for d in (cni_bin, conf, ref_conf):
        d.mkdir(parents=True)
    agent: AgentProcess | None = None
    try:
        for ns in (node, up):
            netns.create(ns)
        netns.veth(node, "up0", up, "dn0")
        netns.ns_run(node, ["ip", "addr", "add", "192.168.79.2/24", "dev", "up0"])
        netns.ns_run(up, ["ip", "addr", "add", "192.168.79.1/24", "dev", "dn0"])
        netns.ns_run(node, ["ip", "route", "add", "default", "via", "192.168.79.1"])
        netns.sysctl(node, "net.ipv4.ip_forward", "1")
        shutil.copy(cni_shim_path(), cni_bin / "routed-cni")
        for plugin in ("ptp", "host-local"):
            shutil.copy(f"/usr/lib/cni/{plugin}", cni_bin / plugin)
        sock = str(work / "agent" / "agent.sock")
        (conf / "10-routed.conflist").write_text(json.dumps({"cniVersion": "1.1.0", "name": "routed", "plugins": [
            {"type": "routed-cni", "socketPath": sock}]}))
        (ref_conf / "10-ptp.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "ref", "plugins": [
            {"type": "ptp", "ipMasq": False, "ipam": {"type": "host-local", "subnet": "10.91.0.0/16",
                                                      "dataDir": str(work / "host-local")}}]}))
        subprocess.run(["bash", str(ENV), "start", "--dir", str(ctd), "--netns", node, "--cni-bin-dir", str(cni_bin),
                        "--cni-conf-dir", str(conf), "--alt-cni-conf-dir", str(ref_conf)], check=True,
                       capture_output=True)
        manifests = work / "manifests"
        manifests.mkdir()
        (manifests / "node.yaml").write_text(manifest(node_object("sbx", "10.90.0.0/16", "192.168.79.2")))
        agent = AgentProcess(node, str(work / "agent"), "sbx", {"manifest_dir": str(manifests),
                                                                  "policy": {"enabled": False},
                                                                  "bgp": {"enabled": False}}).start()
        run_and_expect(agent.status, {"ready": True}, timeout=60, ignore=(OSError,)).check("agent ready")

        def crictl(*a: str) -> str:
            out = subprocess.run([f"{bindir}/crictl", "--config", str(ctd / "crictl.yaml"), *a], capture_output=True,
                                 text=True)
            if out.returncode != 0:
                raise RuntimeError(f"crictl {' '.join(a)}: {out.stderr}")
            return out.stdout.strip()

        def cycle(name: str, runtime: str) -> tuple[float, float]:
            config = work / f"{name}.json"
            config.write_text(json.dumps({"metadata": {"name": name, "namespace": "bench", "uid": name}, "linux": {}}))
            t0 = time.perf_counter()
            pod = crictl("runp", *(["--runtime", runtime] if runtime else []), str(config))
            t1 = time.perf_counter()
            crictl("stopp", pod)
            crictl("rmp", pod)
            return t1 - t0, time.perf_counter() - t1

        times: dict[str, dict[str, list[float]]] = {k: {"runp": [], "teardown": []} for k in ("routed", "ptp")}
        sides = [("routed", ""), ("ptp", "runc-alt")]
        for i in range(args.cycles + 3):  # 3 warm-up rounds, not counted
            for name, runtime in (sides if i % 2 == 0 else list(reversed(sides))):
                t_run, t_down = cycle(f"{name}-{i}", runtime)
                if i >= 3:
                    times[name]["runp"].append(t_run)
                    times[name]["teardown"].append(t_down)
    finally:
        if agent is not None:
            agent.stop()
        subprocess.run(["bash", str(ENV), "stop", "--dir", str(ctd)], capture_output=True)
        for ns in (node, up):
            netns.delete(ns)
        shutil.rmtree(work, ignore_errors=True)
    figures = {name: {k: {"p50_s": statistics.median(v), "p95_s": pct(v, 0.95)} for k, v in t.items()}
               for name, t in times.items()}
    ratios = {k: figures["routed"][k]["p50_s"] / figures["ptp"][k]["p50_s"] for k in ("runp", "teardown")}
    if args.json:
        print(json.dumps({"cycles": args.cycles, "figures": figures, "ratios_p50": ratios}, indent=1))
        return 0
    print(f"{args.cycles} sandboxes each, interleaved, one containerd (ms)")
    print(f"{'':10} {'runp p50':>9} {'runp p95':>9} {'stop+rm p50':>12} {'stop+rm p95':>12}")
    for name, f in figures.items():
        print(f"{name:10} {f['runp']['p50_s'] * 1000:>9.1f} {f['runp']['p95_s'] * 1000:>9.1f} "
              f"{f['teardown']['p50_s'] * 1000:>12.1f} {f['teardown']['p95_s'] * 1000:>12.1f}")
    print(f"ratio routed/ptp p50: runp {ratios['runp']:.2f}, stopp+rmp {ratios['teardown']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
