"""`routed lab …`: the lab's command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from routed.views import peer_rows, table


def add_lab_parser(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="a cluster in network namespaces on this machine")
    lab.add_argument("--name", default=os.environ.get("ROUTED_LAB", "lab"), help="lab name (namespaces rtd-NAME-…)")
    cmds = lab.add_subparsers(dest="lab_cmd", required=True)
    up = cmds.add_parser("up", help="build the lab and start the agents")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("-f", "--filename", action="append", default=[], help="Kubernetes YAML to apply once up")
    up.add_argument("--tor", choices=["frr", "bird", "gobgp", "static"], default="frr",
                    help="ToR router: a real BGP router (FRR by default), or static routes and no BGP")
    up.add_argument("--tors", type=int, choices=[1, 2], default=1, help="2: every node dual-homed (ECMP)")
    up.add_argument("--bfd", action="store_true", help="BFD on every node-ToR session (FRR bfdd on the ToRs)")
    up.add_argument("--topology", choices=["as-per-node", "as-per-rack", "ibgp"], default="as-per-node")
    up.add_argument("--datastore", choices=["manifest", "kube"], default="manifest",
                    help="kube: a real kube-apiserver holds every object; agents use deploy/'s RBAC")
    up.add_argument("--ip-family", choices=["ipv4", "ipv6", "dual"], default="ipv4",
                    help="how uplinks, ToRs and pods are addressed (dual: every pod gets an IPv4 and an IPv6 address)")
    up.add_argument("--ipv6-over-ipv4", action="store_true",
                    help="dual: carry IPv6 unicast over the IPv4 BGP sessions (explicit IPv6 next hops) instead of "
                         "a session per family")
    up.add_argument("--runtime", choices=["process", "containerd"], default="process",
                    help="containerd: a real containerd per node runs the agent image and the pods (CRI sandboxes)")
    cmds.add_parser("down", help="remove the lab (and any leftovers of a crashed one)")
    st = cmds.add_parser("status", help="nodes, agents, ToR routes, pods")
    st.add_argument("-o", "--output", choices=["table", "json"], default="table")
    for name in ("apply", "delete"):
        p = cmds.add_parser(name, help=f"{name} Kubernetes objects (Namespace, Pod, NetworkPolicy, BGP…)")
        p.add_argument("-f", "--filename", action="append", required=True)
    mx = cmds.add_parser("matrix", help="which pod reaches which, by real connections")
    mx.add_argument("--ports", default="", help="comma-separated ports (default: every container port)")
    mx.add_argument("--protocols", default="", help="comma-separated: tcp,udp")
    mx.add_argument("--timeout", type=float, default=1.0)
    mx.add_argument("--json", action="store_true")
    mx.add_argument("--family", type=int, choices=[4, 6], default=None,
                    help="probe the pods' IPv4 or IPv6 addresses (default: the lab's first family)")
    cr = cmds.add_parser("crictl", help="crictl against a node's containerd (--runtime containerd)")
    cr.add_argument("node")
    cr.add_argument("cmd", nargs=argparse.REMAINDER)
    ex = cmds.add_parser("exec", help="run a command in a node, ToR or pod namespace")
    ex.add_argument("target", help="NODE, TOR or NS/POD")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)


def render_status(status: dict[str, Any]) -> str:
    out = [f"lab {status['lab']} (ToR: {status['tor']}, datastore: {status.get('datastore', 'manifest')}, "
           f"IP family: {status.get('ipFamily', 'ipv4')})", "", "NODES"]
    out.append(table(
        [{**n, "reasons": "" if n["ready"] else "; ".join(n["reasons"]),
          "addresses": n.get("addresses") or [n["address"]], "pod CIDRs": n.get("pod_cidrs") or [n["pod_cidr"]]}
         for n in status["nodes"]],
        ["name", "addresses", "pod CIDRs", "asn", "ready", "endpoints", "reasons"],
    ).rstrip())
    for tor in status["tors"]:
        out += ["", f"{tor['name'].upper()} ({tor['kind']}, AS {tor['asn']}) kernel routes"]
        rows = [
            {"dst": r.get("dst"), "via": r.get("gateway") or " ".join(h.get("gateway", "") for h in r.get("nexthops", [])),
             "dev": r.get("dev", ""), "protocol": r.get("protocol", "")}
            for r in tor["routes"]
        ]
        out.append(table(rows, ["dst", "via", "dev", "protocol"]).rstrip())
        if tor.get("sessions"):
            out += ["", f"{tor['name'].upper()} BGP sessions"]
            out.append(table(tor["sessions"], ["peer", "asn", "state", "prefixes"]).rstrip())
    for node in status["nodes"]:
        peers = (node.get("bgp") or {}).get("peers") or []
        if peers:
            out += ["", f"{node['name']} BGP sessions (agent side)"]
            out.append(table(peer_rows(peers), ["peer", "asn", "state", "since", "received", "advertised"]).rstrip())
    out += ["", "PODS", table(status["pods"], ["pod", "node", "ips", "ports"]).rstrip()]
    return "\n".join(out) + "\n"


def render_matrix(rows: list[dict[str, Any]]) -> str:
    """One truth table per port/protocol: '.' reachable, 'X' not (as in upstream netpol e2e output)."""
    if not rows:
        return "no pods with ports to probe\n"
    out: list[str] = []
    sources = sorted({r["from"] for r in rows})
    combos = sorted({(r["port"], r["protocol"]) for r in rows})
    for port, proto in combos:
        cells = {(r["from"], r["to"]): r["allowed"] for r in rows if r["port"] == port and r["protocol"] == proto}
        dests = sorted({to for (_src, to) in cells})
        width = max(len(x) for x in sources + dests + [f"{proto}/{port}"])
        out.append(f"{proto}/{port}".ljust(width) + "  " + " ".join(d.ljust(width) for d in dests))
        for src in sources:
            marks = [("." if cells.get((src, d)) else "X") if (src, d) in cells else "-" for d in dests]
            out.append(src.ljust(width) + "  " + " ".join(m.ljust(width) for m in marks))
        out.append("")
    allowed = sum(1 for r in rows if r["allowed"])
    out.append(f"{allowed}/{len(rows)} allowed")
    return "\n".join(out) + "\n"


def run_lab(args: argparse.Namespace) -> int:
    from routed.lab.lab import Lab, LabError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if os.geteuid() != 0:
        sys.exit("routed lab: needs root (network namespaces)")
    lab = Lab(args.name)
    try:
        if args.lab_cmd == "up":
            lab.up(args.nodes, args.filename, tor=args.tor, tors=args.tors, topology_kind=args.topology,
                   datastore=args.datastore, runtime=args.runtime, bfd=args.bfd, ip_family=args.ip_family,
                   ipv6_over_ipv4=args.ipv6_over_ipv4)
            sys.stdout.write(render_status(lab.status()))
            sys.stdout.write("\nlab is up: `routed lab matrix` probes every pod pair; `routed lab down` removes it\n")
        elif args.lab_cmd == "down":
            removed = lab.down(quiet=True)
            sys.stdout.write(f"lab {args.name} removed ({len(removed)} namespaces)\n")
        elif args.lab_cmd == "status":
            status = lab.status()
            sys.stdout.write(json.dumps(status, indent=2) + "\n" if args.output == "json" else render_status(status))
        elif args.lab_cmd in ("apply", "delete"):
            for file in args.filename:
                for line in getattr(lab, args.lab_cmd)(file):
                    sys.stdout.write(line + "\n")
        elif args.lab_cmd == "matrix":
            ports = [int(p) for p in args.ports.split(",") if p.strip()]
            protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
            rows = lab.matrix(ports or None, protocols or None, timeout=args.timeout, family=args.family)
            if args.json:
                keys = ("from", "to", "port", "protocol", "allowed")
                sys.stdout.write(json.dumps({"results": [{k: r[k] for k in keys} for r in rows]}, indent=1) + "\n")
            else:
                sys.stdout.write(render_matrix(rows))
        elif args.lab_cmd == "crictl":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            proc = lab.crictl(args.node, cmd)
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
            return proc.returncode
        elif args.lab_cmd == "exec":
            from routed import netns

            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                sys.exit("routed lab exec: give a command after --")
            argv = netns.ns_cmd(lab.pod_netns(args.target), cmd)
            os.execvp(argv[0], argv)
    except (LabError, ValueError, KeyError) as exc:
        sys.exit(f"routed lab: {exc}")
    return 0
