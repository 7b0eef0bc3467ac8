"""ToR failure with and without BFD, in one run: a dual-homed 2-node lab (FRR ToRs), a 50 pps ping between pods
on the two nodes, then the ToR that carries the ping hangs (every daemon SIGSTOPped, links up, forwarding off
in its namespace — see routed/lab/failover.py). Reported per run: the longest gap in replies and the packets
lost; the baseline is the same lab without `--bfd`, where only the BGP hold time (9 s) ends the outage.

    .venv/bin/python bench/bfd_failover.py [--window 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from routed.lab import failover  # noqa: E402
from routed.lab.lab import Lab  # noqa: E402
from tests.helpers import holds_for, run_and_expect  # noqa: E402

LAB = "bfdbench"
EXAMPLE = REPO / "examples" / "lab" / "two-nodes.yaml"
SRC, DST = "demo/client-1", "demo/web-2"


def one_run(bfd: bool, window: float) -> dict[str, object]:
    lab = Lab(LAB)
    try:
        lab.up(nodes=2, files=[str(EXAMPLE)], tor="frr", tors=2, bfd=bfd)
        if bfd:
            from tests.topo.test_lab_bfd import all_up

            run_and_expect(lambda: all_up(lab), True, timeout=30).check("BFD Up everywhere")
        ping = failover.Ping(lab, SRC, DST)
        tor = failover.carrying_tor(lab, lab.state().pods[SRC].node)
        frozen_at = time.monotonic()
        pids = failover.freeze_tor(lab, tor)
        try:
            # the ping keeps going for the window: an outage longer than it shows as the whole window
            holds_for(lambda: ping.proc.poll() is None, True, seconds=window).check("ping kept running")
            outage = ping.stop()
        finally:
            if ping.proc.poll() is None:
                ping.proc.kill()
            failover.thaw_tor(lab, tor, pids)
        return {"bfd": bfd, "tor": tor, "window_s": window, "frozen_after_s": round(time.monotonic() - frozen_at, 1),
                "sent": outage.sent, "received": outage.received, "lost": outage.lost,
                "longest_gap_s": outage.longest_gap_s}
    finally:
        lab.down(quiet=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=15.0, help="seconds of ping after the ToR hangs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    baseline = one_run(False, args.window)
    with_bfd = one_run(True, args.window)
    ratio = (float(with_bfd["longest_gap_s"]) / float(baseline["longest_gap_s"])  # type: ignore[arg-type]
             if baseline["longest_gap_s"] else float("nan"))
    if args.json:
        print(json.dumps({"baseline": baseline, "bfd": with_bfd, "ratio": ratio}))
        return
    for row in (baseline, with_bfd):
        print(f"{'with BFD   ' if row['bfd'] else 'without BFD'}  hung {row['tor']}: longest gap "
              f"{row['longest_gap_s']:.2f} s, lost {row['lost']}/{row['sent']} packets at 50 pps")
    print(f"ratio BFD / hold time: {ratio:.3f}")


if __name__ == "__main__":
    main()
