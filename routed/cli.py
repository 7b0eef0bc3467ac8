"""`routed` command line: the agent itself, views on a running agent, and the lab."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from routed.constants import DEFAULT_SOCKET


def _add_agent_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the node agent")
    p.add_argument("--config", help="YAML config file (ROUTED_* environment variables override it)")
    p.add_argument("--node", dest="node_name", help="this node's name (ROUTED_NODE_NAME)")
    p.add_argument("--datastore", choices=["manifest", "kube"])
    p.add_argument("--manifest-dir", dest="manifest_dir")
    p.add_argument("--kubeconfig")
    p.add_argument("--state-dir", dest="state_dir")
    p.add_argument("--socket", dest="socket_path")
    p.add_argument("--http-listen", dest="http_listen", help="host:port for /healthz /readyz /metrics; '' disables")
    p.add_argument("--log-file", dest="log_file")
    p.add_argument("--log-level", dest="log_level")
    p.add_argument("--mtu", type=int)


def _add_view_parsers(sub: argparse._SubParsersAction) -> None:
    def with_socket(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", default=os.environ.get("ROUTED_SOCKET", DEFAULT_SOCKET), help="agent socket")
        p.add_argument("--lab-node", help="talk to this lab node's agent instead of --socket")
        p.add_argument("--lab", default="lab", help="lab name for --lab-node")
        p.add_argument("-o", "--output", choices=["table", "json"], default="table")
        return p

    with_socket(sub.add_parser("status", help="agent and BGP session status"))
    ipam = sub.add_parser("ipam", help="IP address management").add_subparsers(dest="ipam_cmd", required=True)
    with_socket(ipam.add_parser("show", help="list allocations"))
    routes = sub.add_parser("routes", help="BGP routes").add_subparsers(dest="routes_cmd", required=True)
    for name, text in (("advertised", "routes as actually sent, per peer"), ("received", "routes learned")):
        rp = with_socket(routes.add_parser(name, help=text))
        rp.add_argument("--peer", help="only this peer address")
    pol = sub.add_parser("policy", help="NetworkPolicy views").add_subparsers(dest="policy_cmd", required=True)
    ex = with_socket(pol.add_parser("explain", help="why a flow is allowed or denied"))
    ex.add_argument("--from", dest="src", required=True, help="NS/POD or IP")
    ex.add_argument("--to", dest="dst", required=True, help="NS/POD or IP")
    ex.add_argument("--port", type=int, required=True)
    ex.add_argument("--protocol", default="tcp")
    ex.add_argument("--family", type=int, choices=[4, 6], default=None,
                    help="the IP family of the flow between two pods (default: from an IP given, else IPv4)")
    show = with_socket(pol.add_parser("show", help="policies selecting a pod, per direction"))
    show.add_argument("pod", help="NS/POD")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_agent_parser(sub)
    _add_view_parsers(sub)
    from routed.lab.cli import add_lab_parser

    add_lab_parser(sub)
    return parser


def _socket_for(args: argparse.Namespace) -> str:
    if getattr(args, "lab_node", None):
        from routed.lab.state import LabPaths

        return LabPaths(args.lab).node_socket(args.lab_node)
    return str(args.socket)


def _call(args: argparse.Namespace, method: str, params: dict[str, Any] | None = None) -> Any:
    """One local API call; an error answer or an unreachable agent ends the CLI (routed.errors.cli_exit_status)."""
    from routed.api import call
    from routed.errors import CLI_EXIT_UNREACHABLE, RoutedError, cli_exit_status

    path = _socket_for(args)
    try:
        return call(path, method, params)
    except RoutedError as exc:
        print(f"routed: {exc.msg}{': ' + exc.details if exc.details else ''}", file=sys.stderr)
        sys.exit(cli_exit_status(exc))
    except OSError as exc:
        print(f"routed: cannot reach the agent at {path}: {exc}", file=sys.stderr)
        sys.exit(CLI_EXIT_UNREACHABLE)


def _run_view(args: argparse.Namespace) -> int:
    from routed import views

    render: Callable[[Any], str]
    if args.command == "status":
        data = _call(args, "status")
        render = views.render_status
    elif args.command == "ipam":
        data = _call(args, "ipam.show")
        render = views.render_ipam
    elif args.command == "routes":
        data = _call(args, f"bgp.{args.routes_cmd}", {"peer": args.peer})
        render = views.render_routes
    elif args.policy_cmd == "explain":
        params = {"from": args.src, "to": args.dst, "port": args.port, "protocol": args.protocol}
        if args.family:
            params["family"] = args.family
        data = _call(args, "policy.explain", params)
        render = views.render_explain
    else:
        data = _call(args, "policy.show", {"pod": args.pod})
        render = views.render_policy_show
    if args.output == "json":
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(render(data))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "agent":
        from routed.agent import run_agent
        from routed.config import load_config

        overrides = {
            k: getattr(args, k)
            for k in (
                "node_name", "datastore", "manifest_dir", "kubeconfig", "state_dir", "socket_path",
                "http_listen", "log_file", "log_level", "mtu",
            )
        }
        try:
            config = load_config(args.config, overrides)
        except ValueError as exc:
            sys.exit(f"routed agent: invalid configuration: {exc}")
        return run_agent(config)
    if args.command == "lab":
        from routed.lab.cli import run_lab

        return run_lab(args)
    return _run_view(args)


if __name__ == "__main__":
    sys.exit(main())
