"""BgpManager: the facade the agent calls. Desired state in (`update`), speaker + route table underneath.

Kernel routes (protocol ROUTE_PROTO_BGP, IPv4 and IPv6 alike) learned in a previous run are kept until every
peer has sent End-of-RIB for every negotiated family after (re)connecting, or `startup_hold` seconds passed;
then stale ones are removed. During that hold the route table merges with the kernel's next hops, except those
known to be gone (`routed.routes.Gone`): retracted in this run (withdrawn, replaced, the peer's session down or
BFD Down) or the address of a peer whose BFD went Down; those go at once.
`update` raises when it cannot apply (the caller retries the same inputs: nothing is cached before success);
the route loop (supervised task `bgp-routes`) retries failed kernel writes with the shared backoff, a wait that
a new change ends early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from routed import failpoints
from routed.api_types import BgpRoute, BgpStatus
from routed.backoff import Backoff
from routed.bgp import bfd
from routed.bgp.bfd_net import BfdPeer, BfdService
from routed.bgp.config import Resolution, SpeakerConfig, resolve
from routed.bgp.services import advertisements
from routed.bgp.speaker import FAILURES_NOT_READY, Speaker
from routed.config import BgpOptions
from routed.errors import Code, RoutedError
from routed.model import Node
from routed.routes import ApplyResult, Gone, RouteTable
from routed.supervisor import Liveness, Supervisor

log = logging.getLogger(__name__)

APPLY_RETRY_MIN = 0.5
APPLY_RETRY_MAX = 10.0
DEFAULT_STARTUP_HOLD = 120.0


class BgpUpdateError(RoutedError):
    code = Code.BGP_UPDATE_FAILED


@dataclass(frozen=True)
class BgpInputs:
    node: Node
    nodes: list[Node]
    peers: list[dict[str, Any]]
    configs: list[dict[str, Any]]
    secrets: dict[str, dict[str, Any]]  # "ns/name" -> Secret object
    services: list[dict[str, Any]] = field(default_factory=list)
    endpoint_slices: list[dict[str, Any]] = field(default_factory=list)


class BgpManager:
    def __init__(self, node_name: str, state_dir: str, run_dir: str, options: BgpOptions,
                 supervisor: Supervisor | None = None) -> None:
        self.node_name = node_name
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.options = options
        self.supervisor = supervisor or Supervisor()
        self.speaker = Speaker(run_dir, exabgp=options.exabgp, listen_port=options.listen_port,
                               supervisor=self.supervisor)
        self.routes = RouteTable()
        self.config: SpeakerConfig | None = None
        self.errors: list[str] = []
        self._last_inputs: BgpInputs | None = None
        self._started = time.monotonic()  # the start-up hold runs from here (again from `start`)
        self._synced = False  # every peer sent End-of-RIB (or the hold expired): stale kernel routes may go
        self.startup_hold = DEFAULT_STARTUP_HOLD
        self.apply_errors = 0
        self.route_applies = 0
        self.installed: dict[str, frozenset[str]] = {}
        self.bfd = BfdService(self._on_bfd_change, supervisor=self.supervisor)
        self.bfd_error = ""

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._started = time.monotonic()
        await self.speaker.start()
        try:
            self.installed = await self.routes.kernel()
        except OSError as e:
            log.warning("cannot read kernel routes: %s", e)
        if self.installed:
            log.info("%d BGP routes from a previous run kept until peers send End-of-RIB", len(self.installed))
        self.supervisor.spawn("bgp-routes", self._route_loop, required=True)

    async def update(self, inputs: BgpInputs) -> None:
        """Resolve this node's BGP config and hand it to the speaker; raises BgpUpdateError on failure (the same
        inputs are applied again on the next call: they are remembered only once applied)."""
        if inputs == self._last_inputs:
            return
        previous_errors = self.errors
        try:
            failpoints.hit("bgp.update")
            res: Resolution = resolve(inputs.node, inputs.nodes, inputs.peers, inputs.configs, inputs.secrets)
            self.errors = res.errors
            if res.config is not None and res.config != self.config:
                self.speaker.configure(res.config)
                self._configure_bfd(res.config)
                self.config = res.config
                self.startup_hold = float(min(max(res.config.graceful_restart_time, 10), DEFAULT_STARTUP_HOLD))
            service_errors: list[str] = []  # an invalid Service IP is left out and named, the others announced
            if self.config is not None:
                self.speaker.set_service_routes(advertisements(
                    inputs.node.name, self.config.services, inputs.services, inputs.endpoint_slices, service_errors))
            self.errors = res.errors + service_errors
        except RoutedError as exc:
            raise BgpUpdateError(f"BGP update failed: {exc.msg}", exc.details) from exc
        except OSError as exc:
            raise BgpUpdateError(f"BGP update failed: {exc}") from exc
        finally:
            for e in self.errors:
                if e not in previous_errors:
                    log.warning("BGP config: %s", e)
        self._last_inputs = inputs

    def _configure_bfd(self, cfg: SpeakerConfig) -> None:
        wanted = [BfdPeer(p.address, p.bfd.min_rx_ms, p.bfd.min_tx_ms, p.bfd.multiplier)
                  for p in cfg.peers if p.bfd is not None]
        try:
            self.bfd.configure(wanted)
            self.bfd_error = ""
        except OSError as exc:  # UDP 3784 taken (another BFD daemon on the node?): raise, so update retries
            self.bfd_error = f"BFD: {exc}"
            raise
        enabled = {p.address for p in wanted}
        self.speaker.bfd_states = {a: s for a, s in self.speaker.bfd_states.items() if a in enabled}
        for address in enabled:
            self.speaker.bfd_states.setdefault(address, bfd.STATE_NAMES[bfd.DOWN])
        for address in list(self.speaker.bfd_down_peers):
            if address not in enabled:  # BFD switched off for it: its routes count again
                self.speaker.bfd_up(address)

    def _on_bfd_change(self, peer: str, old: int, new: int, diag: int) -> None:
        self.speaker.bfd_states[peer] = bfd.STATE_NAMES[new]
        if new == bfd.UP:
            self.speaker.bfd_up(peer)
        elif old == bfd.UP:
            self.speaker.bfd_down(peer, bfd.DIAG_NAMES.get(diag, str(diag)))

    def resync(self) -> None:
        """The periodic resync: re-resolve on the next update and re-apply the learned routes to the kernel."""
        self._last_inputs = None
        self.speaker.changed.set()

    async def stop(self, graceful: bool = True) -> None:
        await self.bfd.stop()  # AdminDown first: the peers do not count our going away as a failure
        await self.speaker.stop(graceful=graceful)
        await self.supervisor.stop_task("bgp-routes")
        if graceful:
            try:
                n = await self.routes.flush()
                log.info("BGP stopped: %d learned routes removed", n)
            except OSError as e:
                log.warning("cannot flush BGP routes: %s", e)
        await self.routes.close()

    # -- route programming ------------------------------------------------------------------------
    def _check_synced(self) -> bool:
        if self._synced:
            return True
        if self.config is not None and self.config.peers and all(
            self.speaker.peers.get(p.address) is not None and self.speaker.peers[p.address].eor_received
            for p in self.config.peers
        ):
            log.info("every peer sent End-of-RIB: stale routes of the previous run may go")
            self._synced = True
        elif time.monotonic() - self._started > self.startup_hold:
            log.info("startup hold of %.0fs over: stale routes of the previous run may go", self.startup_hold)
            self._synced = True
        elif self.config is not None and not self.config.peers:
            self._synced = True
        return self._synced

    async def apply_routes(self) -> ApplyResult:
        """One pass of the route loop: the learned routes to the kernel. During the start-up hold the kernel's
        next hops are merged in, except those known to be gone (retracted, or a BFD-down peer's address)."""
        prune = self._check_synced()
        desired = self.speaker.desired_routes()
        gone = None
        if prune:
            self.speaker.rib.forget_retracted()
        else:
            gone = Gone(self.speaker.retracted_routes(), frozenset(self.speaker.bfd_down_peers))
        res = await self.routes.apply(desired, prune=prune, gone=gone)
        self.route_applies += 1
        return res

    async def _route_loop(self, liveness: Liveness) -> None:
        backoff = Backoff(base=APPLY_RETRY_MIN, cap=APPLY_RETRY_MAX)
        while True:
            try:
                await asyncio.wait_for(self.speaker.changed.wait(), timeout=1.0 if not self._synced else None)
            except TimeoutError:
                pass
            self.speaker.changed.clear()
            with liveness.busy("programming BGP routes"):
                res = await self.apply_routes()
            if res.errors:
                self.apply_errors += 1
                await backoff.sleep(self.speaker.changed)  # a new change ends the wait: retried at once
                self.speaker.changed.set()
            else:
                backoff.reset()
            with contextlib.suppress(OSError):
                self.installed = await self.routes.kernel()

    # -- views ------------------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        if self.config is None:
            if self.errors:
                return False, "; ".join(self.errors)
            return False, "no BGP configuration for this node yet"
        if not self.config.peers:
            return True, "no BGP peers"
        sp = self.speaker
        if sp.failures >= FAILURES_NOT_READY:
            return False, f"ExaBGP keeps failing ({sp.failures} times): {sp.last_exit}"
        if not sp.running:
            return False, "ExaBGP not running" + (f": {sp.last_exit}" if sp.last_exit else "")
        if not sp.connected:
            return False, "ExaBGP API bridge not connected"
        return True, "ok"

    def status(self) -> BgpStatus:
        ok, why = self.ready()
        cfg = self.config
        return BgpStatus(
            enabled=True, node=self.node_name, ready=ok, reason=why, asNumber=cfg.asn if cfg else None,
            routerID=cfg.router_id if cfg else None, podCIDRs=list(cfg.pod_cidrs) if cfg else [],
            communities=list(cfg.communities) if cfg else [], exabgpPid=self.speaker.pid(),
            exabgpRestarts=self.speaker.restarts, exabgpReloads=self.speaker.reloads, synced=self._synced,
            errors=list(self.errors) + ([self.bfd_error] if self.bfd_error else []), updateError="",
            peers=[self.speaker.peer_status(st) for st in self.speaker.peers.values()], bfd=self.bfd.status(),
            serviceRoutes=len(self.speaker.service_routes), routesInstalled=len(self.installed),
            routeConflicts=list(self.routes.last.conflicts),
            routeErrors=dict(self.routes.last.errors),
        )

    def advertised(self, peer: str | None = None) -> list[BgpRoute]:
        """What ExaBGP reported it sent (prefix, nexthop, as_path, communities) per established peer."""
        peers = [peer] if peer else sorted(self.speaker.peers)
        out: list[BgpRoute] = []
        for p in peers:
            for route in self.speaker.out.advertised(p):
                source = self.speaker.route_source(route.get("prefix", ""))
                out.append({**route, "source": source} if source else route)
        return out

    def received(self, peer: str | None = None) -> list[BgpRoute]:
        peers = [peer] if peer else sorted(self.speaker.rib.peers)
        out: list[BgpRoute] = []
        for p in peers:
            out += self.speaker.rib.received(p)
        return out

    def metrics_snapshot(self) -> dict[str, Any]:
        """Flat metric name → value, or name → {label value: value} for per-peer metrics."""
        sp = self.speaker
        per_state = {a: (1 if st.state == "established" else 0) for a, st in sp.peers.items()}
        bfd_sessions = self.bfd.status()
        bfd_counts = self.bfd.counters
        return {
            "routed_bgp_ready": 1 if self.ready()[0] else 0,
            "routed_bgp_sessions_established": sum(per_state.values()),
            "routed_bgp_peers": len(sp.peers),
            "routed_bgp_peer_established": per_state,
            "routed_bgp_peer_received_prefixes": {a: len(sp.rib.peers.get(a, {})) for a in sp.peers},
            "routed_bgp_peer_accepted_prefixes": {a: sp.rib.accepted_count(a) for a in sp.peers},
            "routed_bgp_peer_advertised_prefixes": {a: len(sp.out.peers.get(a, {})) for a in sp.peers},
            "routed_bgp_peer_max_prefix_exceeded_total": dict(sp.rib.max_prefix_hits),
            "routed_bgp_exabgp_starts_total": sp.restarts,
            "routed_bgp_updates_received_total": sp.counters["updates_received"],
            "routed_bgp_updates_sent_total": sp.counters["updates_sent"],
            "routed_bgp_routes_installed": len(self.installed),
            "routed_bgp_route_apply_errors_total": self.apply_errors,
            "routed_bgp_config_errors": len(self.errors),
            "routed_bgp_service_prefixes": len(self.speaker.service_routes),
            "routed_bfd_session_up": {b["peer"]: (1 if b["state"] == "up" else 0) for b in bfd_sessions},
            "routed_bfd_session_downs_total": {b["peer"]: b["downs"] for b in bfd_sessions},
            "routed_bfd_packets_received_total": bfd_counts["packets_in"],
            "routed_bfd_packets_sent_total": bfd_counts["packets_out"],
            "routed_bfd_packets_dropped_total": sum(v for k, v in bfd_counts.items() if k.startswith("dropped_")),
        }
