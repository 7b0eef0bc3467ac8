"""The BGP speaker: ExaBGP as a supervised child, driven over its API through routed.bgp.bridge.

- ExaBGP runs with a generated config in the run dir, in its own process group, under `setpriv --pdeathsig KILL`
  (no preexec_fn: forking a threaded process must not run Python code before exec), so an agent crash kills it
  without a NOTIFICATION: peers that are graceful-restart helpers keep our routes while we come back.
- Its stdout (logs) and the bridge socket are read continuously; its exit is noticed at once (we await it) and
  it is restarted with the shared backoff. The loop doing that is the supervised task `exabgp`.
- Announcements are per peer and always carry an explicit next hop of the prefix's family
  (`neighbor X announce route P next-hop N community [...]`, N from PeerConfig.next_hop: never ExaBGP's
  `next-hop self`, which cannot cross families and sends 0.0.0.0); a prefix of a family the session does not
  carry, or has no next hop for, is not announced. Withdrawals name the same next hop. On every session up the
  peer's announcements are replayed and End-of-RIB is sent for every negotiated family (manual-eor).
- What ExaBGP receives: its config from routed.bgp.exabgp_conf (a peer with a value outside the grammar is left
  out and named in `refused`; written 0600 in a 0700 directory, routed.private_files), commands built by
  routed.bgp.announce and written only through one routed.bgp.commands.CommandSink. What comes back (its log
  lines, the reason it exited) goes through routed.bgp.redact before it is logged or shown anywhere.
- Per family where it matters: the negotiated families are ours ∩ those of the peer's OPEN; End-of-RIB is
  tracked per family (received and sent), and a family's End-of-RIB drops that family's stale routes (graceful
  restart); the stale timer ends only when every negotiated family has sent one.
- Received updates go into the Rib (filters, max-prefix, GR staleness); `changed` is set whenever the
  learned routes may have changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routed.api_types import BgpPeerStatus
from routed.backoff import Backoff
from routed.bgp import announce, exabgp_conf
from routed.bgp.announce import Announcement
from routed.bgp.commands import CommandSink
from routed.bgp.config import BgpConfigError, PeerConfig, SpeakerConfig, first_addresses
from routed.bgp.redact import Redactor
from routed.bgp.rib import AdjRibOut, Filters, Message, Rib, parse_message
from routed.bgp.services import CONFIG_FIELDS, Advertisement
from routed.private_files import private_dir, write_private
from routed.supervisor import Liveness, Supervisor

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # an ExaBGP that ran this long resets the backoff
FAILURES_NOT_READY = 3
RELOAD_ATTEMPTS = 3
RELOAD_CONFIRM_SECONDS = 5.0
RELOAD_CONFIRMED = "loaded new configuration successfully"


AFI_FAMILY = {"ipv4": 4, "ipv6": 6}


def default_exabgp() -> str:
    return str(Path(sys.executable).parent / "exabgp")


def restart_key(cfg: SpeakerConfig) -> tuple[object, ...]:
    """What only a restart can change: the listening sockets come from ExaBGP's environment, not its config
    (the node's first address of each family). Everything else (peers added, removed or changed, their
    families and next hops, timers, router id) goes through a reload."""
    return (cfg.listen, first_addresses(cfg.local_addresses) if cfg.listen else ())


def _unicast_families(names: tuple[str, ...]) -> tuple[int, ...]:
    """("ipv4 unicast", "ipv6 unicast", "ipv4 flow") -> (4, 6)."""
    out: list[int] = []
    for name in names:
        afi, _, safi = name.partition(" ")
        if safi == "unicast" and afi in AFI_FAMILY:
            out.append(AFI_FAMILY[afi])
    return tuple(sorted(set(out)))


def child_command(argv: list[str]) -> list[str]:
    """`argv` run so that it is SIGKILLed when the agent dies (util-linux setpriv sets PR_SET_PDEATHSIG, then
    execs: nothing runs between our fork and exec)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv not found: ExaBGP will outlive a crashed agent until the next start kills it")
        return argv
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]


@dataclass
class PeerState:
    address: str
    asn: int
    name: str
    state: str = "idle"  # idle | connected | established | down
    since: float = field(default_factory=time.time)
    last_error: str = ""
    gr_time: int = 0  # peer's restart time from its OPEN (0: no graceful restart)
    families: tuple[int, ...] = (4,)  # what we offer (PeerConfig.families)
    peer_families: tuple[int, ...] | None = None  # unicast families of the peer's OPEN (None: not seen yet)
    eor_received_families: set[int] = field(default_factory=set)
    eor_sent_families: set[int] = field(default_factory=set)
    ups: int = 0
    updates_received: int = 0
    announced: dict[str, Announcement] = field(default_factory=dict)  # prefix -> what was sent

    def set_state(self, state: str, now: float) -> None:
        if state != self.state:
            self.state = state
            self.since = now

    @property
    def negotiated(self) -> tuple[int, ...]:
        """The families of the session: ours and the peer's (ours until its OPEN is seen)."""
        if self.peer_families is None:
            return self.families
        return tuple(f for f in self.families if f in self.peer_families)

    @property
    def eor_received(self) -> bool:
        """End-of-RIB received for every negotiated family."""
        return set(self.negotiated) <= self.eor_received_families

    @property
    def eor_sent(self) -> bool:
        return bool(self.eor_sent_families) and set(self.negotiated) <= self.eor_sent_families


class Speaker:
    def __init__(self, run_dir: str, exabgp: str = "", listen_port: int = 0,
                 supervisor: Supervisor | None = None) -> None:
        self.supervisor = supervisor or Supervisor()
        self.run_dir = run_dir
        self.exabgp = exabgp or default_exabgp()
        self.listen_port = listen_port
        self.socket_path = os.path.join(run_dir, "exabgp-api.sock")
        self.conf_dir = os.path.join(run_dir, "exabgp")  # 0700: the config holds the MD5 passwords
        self.conf_path = os.path.join(self.conf_dir, "exabgp.conf")  # 0600
        self.legacy_conf_path = os.path.join(run_dir, "exabgp.conf")  # where older versions wrote it, 0644
        self.pid_path = os.path.join(run_dir, "exabgp.pid")
        self.cfg: SpeakerConfig | None = None
        self.rib = Rib()
        self.out = AdjRibOut()
        self.peers: dict[str, PeerState] = {}
        self.changed = asyncio.Event()  # learned routes or EoR state changed
        self.restarts = 0
        self.failures = 0  # consecutive short-lived runs
        self.last_exit = ""
        self.log_tail: deque[str] = deque(maxlen=200)
        self._proc: asyncio.subprocess.Process | None = None
        self.commands = CommandSink()  # the only writer of ExaBGP's API
        self.redactor = Redactor()  # every line of ExaBGP's output passes through it
        self.refused: dict[str, str] = {}  # peer address -> why it is not in ExaBGP's config (exabgp_conf)
        self.config_refusals: list[str] = []  # every peer refused by the renderer (duplicates included)
        self.announce_errors: dict[str, str] = {}  # peer address -> why an announcement to it was not built
        self._server: asyncio.AbstractServer | None = None
        self._restart = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._reload_done = asyncio.Event()
        self.reloads = 0
        self.bfd_down_peers: set[str] = set()  # BFD went Down: the session was torn down, its routes are not used
        self.bfd_states: dict[str, str] = {}  # peer -> BFD state name, for peers with BFD enabled
        self.service_routes: dict[str, Advertisement] = {}  # Service prefixes to announce (routed/bgp/services.py)
        self._stopping = False
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started_at = time.time()
        self.counters: dict[str, int] = {"updates_received": 0, "updates_sent": 0}

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        private_dir(self.conf_dir)
        self._kill_leftover()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.legacy_conf_path)  # world-readable, with the passwords of an older version
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._server = await asyncio.start_unix_server(self._on_bridge, path=self.socket_path)
        os.chmod(self.socket_path, 0o600)
        self.supervisor.spawn("exabgp", self._supervise, required=True)
        self.supervisor.spawn("exabgp-reload", self._reload, required=False)

    def _kill_leftover(self) -> None:
        """An ExaBGP of a previous run that survived (it should not: PDEATHSIG) — only if it is ours."""
        try:
            pid = int(Path(self.pid_path).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if self.conf_path.encode() in cmdline or self.legacy_conf_path.encode() in cmdline:
            log.warning("killing leftover ExaBGP pid %d", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def stop(self, graceful: bool = True) -> None:
        self._stopping = True
        self.supervisor.retire("exabgp")  # its loop ends once ExaBGP is gone: expected now
        if graceful and self.commands.connected:
            for peer in self.peers.values():
                for ann in peer.announced.values():
                    self._send(ann.withdraw)
                peer.announced.clear()
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and any(
                self.out.peers.get(p.address) for p in self.peers.values() if p.state == "established"
            ):
                await asyncio.sleep(0.05)
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await self.supervisor.stop_task("exabgp-reload")
        await self.supervisor.stop_task("exabgp")
        for t in list(self._tasks):
            t.cancel()
        for h in self._timers.values():
            h.cancel()
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    # -- configuration ----------------------------------------------------------------------------
    def configure(self, cfg: SpeakerConfig) -> None:
        """Apply `cfg`. BgpConfigError (nothing changed) when a node-wide value cannot be given to ExaBGP; a peer
        whose values cannot is left out of ExaBGP's config and named in `refused` (the others are configured)."""
        old = self.cfg
        rendered = None
        if old is None or old.session_key() != cfg.session_key():
            rendered = exabgp_conf.render_config(cfg, self.socket_path)
        exabgp_conf.environment(cfg, self.listen_port, self.pid_path)  # its values checked before anything changes
        self.redactor.remember(p.password for p in cfg.peers)
        self.cfg = cfg
        self.rib.set_filters(Filters(
            own_asn=cfg.asn, own_cidrs=cfg.pod_cidrs, own_addresses=cfg.local_addresses,
            accept_default=cfg.accept_default,
            max_prefixes={p.address: p.max_prefixes for p in cfg.peers if p.max_prefixes},
        ))
        wanted = {p.address: p for p in cfg.peers}
        for addr in list(self.peers):
            if addr not in wanted:
                del self.peers[addr]
                self.rib.clear(addr)
                self.out.clear(addr)
        for addr, p in wanted.items():
            st = self.peers.get(addr)
            if st is None:
                self.peers[addr] = PeerState(address=addr, asn=p.asn, name=p.name, families=p.families)
            else:
                st.asn, st.name, st.families = p.asn, p.name, p.families
        if rendered is not None:
            self._set_refused(rendered)
            write_private(os.path.join(private_dir(self.conf_dir), "exabgp.conf"), rendered.text)
            if old is not None and self.running and restart_key(old) == restart_key(cfg):
                # peers added, removed or changed: ExaBGP's reload keeps every unchanged session up
                log.info("ExaBGP config written (%d peers); reloading ExaBGP", len(cfg.peers))
                self._reload_wanted.set()
            else:
                log.info("ExaBGP config written (%d peers); (re)starting ExaBGP", len(cfg.peers))
                self._restart.set()
        else:
            self._sync_announcements()
        self.changed.set()

    async def _reload(self, liveness: Liveness) -> None:
        """The supervised task `exabgp-reload`: SIGUSR1 (ExaBGP re-reads its config, keeps unchanged peers and
        re-establishes changed ones), then check that it took effect: ExaBGP logs "loaded new configuration
        successfully" for each reload it performs, and drops a reload that arrives while it is busy, so an
        unconfirmed one is sent again; after RELOAD_ATTEMPTS the speaker restarts ExaBGP instead."""
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            for attempt in range(1, RELOAD_ATTEMPTS + 1):
                proc = self._proc
                if proc is None or proc.returncode is not None:
                    break  # it is being (re)started: the new process reads the new config
                self._reload_done.clear()
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGUSR1)
                try:
                    await asyncio.wait_for(self._reload_done.wait(), RELOAD_CONFIRM_SECONDS)
                except TimeoutError:
                    log.warning("ExaBGP did not confirm reload %d/%d", attempt, RELOAD_ATTEMPTS)
                    continue
                self.reloads += 1
                log.info("ExaBGP reloaded its configuration (%d peers)", len(self.cfg.peers) if self.cfg else 0)
                break
            else:
                log.error("ExaBGP ignored %d reloads: restarting it", RELOAD_ATTEMPTS)
                self._restart.set()

    def _set_refused(self, rendered: exabgp_conf.Rendered) -> None:
        for _, why in rendered.refused:
            if why not in self.config_refusals:
                log.error("BGP: %s", why)
        self.config_refusals = [why for _, why in rendered.refused]
        self.refused = {addr: why for addr, why in rendered.refused if addr not in rendered.peers}

    def errors(self) -> list[str]:
        """Peers left out of ExaBGP's config and announcements not built, each naming its peer."""
        return sorted(set(self.config_refusals) | set(self.announce_errors.values()))

    def set_service_routes(self, routes: dict[str, Advertisement]) -> None:
        """The Service prefixes to announce from now on (announced and withdrawn over the API, per peer)."""
        if routes != self.service_routes:
            self.service_routes = routes
            self._sync_announcements()

    def route_source(self, prefix: str) -> str:
        adv = self.service_routes.get(prefix)
        if adv is None:
            return ""
        if adv.services:
            return "Service " + ", ".join(adv.services)
        return CONFIG_FIELDS.get(adv.kind, adv.kind)

    def desired_announcements(self, peer: PeerConfig) -> dict[str, Announcement]:
        """Prefix -> announcement for one peer: pod CIDRs and Service prefixes of the families the session
        carries, each with the peer's explicit next hop of the prefix's family (none: not announced).
        A prefix whose command cannot be built (a value outside routed.bgp.grammar) is left out and the first
        such error is kept in `announce_errors` by peer."""
        assert self.cfg is not None
        out: dict[str, Announcement] = {}
        errors: list[str] = []
        wanted: list[tuple[str, tuple[str, ...]]] = [(cidr, self.cfg.communities) for cidr in self.cfg.pod_cidrs]
        wanted += [(prefix, self.cfg.communities + adv.communities) for prefix, adv in sorted(self.service_routes.items())]
        for prefix, communities in wanted:
            try:
                ann = announce.announcement(peer, prefix, communities)
            except BgpConfigError as exc:
                errors.append(exc.msg)
                continue
            if ann is not None:  # None: config.resolve reported a missing next hop by BGPPeer name
                out[ann.prefix] = ann
        if errors:
            if self.announce_errors.get(peer.address) != errors[0]:
                log.error("BGP: %s%s", errors[0], f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
            self.announce_errors[peer.address] = errors[0]
        else:
            self.announce_errors.pop(peer.address, None)
        return out

    def _sync_announcements(self, only: str | None = None, replay: bool = False) -> None:
        """Bring each peer's announcements to the desired set (replay: resend everything)."""
        if self.cfg is None or not self.commands.connected:
            return
        for p in self.cfg.peers:
            if (only is not None and p.address != only) or p.address in self.refused:
                continue
            st = self.peers[p.address]
            want = self.desired_announcements(p)
            for prefix, ann in list(st.announced.items()):
                if prefix not in want:
                    self._send(ann.withdraw)
                    del st.announced[prefix]
            for prefix, ann in want.items():
                old = st.announced.get(prefix)
                if replay or old is None or old.command != ann.command:
                    self._send(ann.command)
                    st.announced[prefix] = ann

    def _send(self, line: str) -> None:
        self.commands.send(line)

    # -- ExaBGP process ---------------------------------------------------------------------------
    async def _supervise(self, liveness: Liveness) -> None:
        backoff = Backoff(base=BACKOFF_MIN, cap=BACKOFF_MAX)
        while not self._stopping:
            if self.cfg is None or not self.cfg.peers:
                self._restart.clear()
                await self._restart.wait()
                continue
            self._restart.clear()
            started = time.monotonic()
            try:
                env = dict(os.environ)
                env.update(exabgp_conf.environment(self.cfg, self.listen_port, self.pid_path))
                self._proc = await asyncio.create_subprocess_exec(
                    *child_command([self.exabgp, self.conf_path]), env=env, cwd=self.run_dir,
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT, process_group=0,
                )
            except BgpConfigError as e:  # configure() checked the same values: not expected
                self.last_exit = e.msg
                log.error("%s", self.last_exit)
                self.failures += 1
            except OSError as e:
                self.last_exit = f"cannot start {self.exabgp}: {e}"
                log.error("%s", self.last_exit)
                self.failures += 1
            else:
                self.restarts += 1
                log.info("ExaBGP started, pid %d", self._proc.pid)
                reader = asyncio.create_task(self._read_logs(self._proc))
                waiter = asyncio.create_task(self._proc.wait())
                restart = asyncio.create_task(self._restart.wait())
                done, _ = await asyncio.wait({waiter, restart}, return_when=asyncio.FIRST_COMPLETED)
                if restart in done and self._proc.returncode is None:
                    # config change: kill hard (no NOTIFICATION) so GR helpers keep our routes
                    with contextlib.suppress(ProcessLookupError):
                        self._proc.kill()
                restart.cancel()
                await self._proc.wait()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(reader, 2.0)
                code = self._proc.returncode
                self._on_exabgp_gone()
                if self._stopping:
                    return
                if restart in done:
                    backoff.reset()
                    self.failures = 0
                    continue
                ran = time.monotonic() - started
                self.last_exit = self.redactor.clean(f"ExaBGP exited with {code} after {ran:.1f}s: " + " | ".join(
                    list(self.log_tail)[-3:]), 600)
                log.warning("%s", self.last_exit)
                if ran > STABLE_AFTER:
                    backoff.reset()
                    self.failures = 0
                else:
                    self.failures += 1
            await backoff.sleep(self._restart)

    async def _read_logs(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            text = self.redactor.clean(line.decode("utf-8", errors="replace").rstrip())
            if not text:
                continue
            self.log_tail.append(text)
            log.debug("exabgp: %s", text)
            self._note_log(text)

    def _note_log(self, text: str) -> None:
        if RELOAD_CONFIRMED in text:
            self._reload_done.set()
        low = text.lower()
        for addr, st in self.peers.items():
            if addr in text and any(w in low for w in ("fail", "error", "refused", "timed out", "timeout",
                                                        "closing", "notification")):
                st.last_error = text.split(None, 1)[-1][:300]  # `text` is clean (redacted, escaped)

    def _on_exabgp_gone(self) -> None:
        self._proc = None
        self.commands.detach()
        now = time.time()
        for st in self.peers.values():
            if st.state in ("established", "connected"):
                self._peer_down(st, "ExaBGP restarted", now)
            st.announced.clear()

    # -- bridge -----------------------------------------------------------------------------------
    async def _on_bridge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.commands.attach(writer)
        log.info("ExaBGP API bridge connected")
        for st in self.peers.values():
            st.announced.clear()
        self._sync_announcements(replay=True)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    self.handle(parse_message(line), time.time())
                except Exception:
                    log.exception("cannot handle ExaBGP message %r", line[:300])
        finally:
            self.commands.detach(writer)
            writer.close()

    # -- messages ---------------------------------------------------------------------------------
    def handle(self, msg: Message, now: float) -> None:
        st = self.peers.get(msg.peer) if msg.peer else None
        if msg.type == "state" and st is not None:
            if msg.state == "up":
                st.set_state("established", now)
                st.ups += 1
                st.eor_received_families.clear()
                st.last_error = ""
                for lost in set(st.families) - set(st.negotiated):  # no End-of-RIB will come for these
                    if self.rib.drop_stale(st.address, lost):
                        log.info("peer %s: IPv%d not negotiated, its stale routes dropped", st.address, lost)
                self._sync_announcements(only=st.address, replay=True)
                self._send_eor(st)
            elif msg.state == "down":
                st.last_error = self.redactor.clean(msg.reason, 300) if msg.reason else st.last_error
                self._peer_down(st, msg.reason, now)
            elif msg.state == "connected":
                st.set_state("connected", now)
        elif msg.type == "open" and st is not None and msg.direction == "receive":
            st.gr_time = msg.gr_time or 0
            st.peer_families = _unicast_families(msg.families or ("ipv4 unicast",))
        elif msg.type == "notification" and st is not None:
            st.last_error = self.redactor.clean(f"notification: {msg.reason}", 300)
        elif msg.type == "update" and st is not None:
            if msg.direction == "send":
                if msg.eor is None:
                    self.out.record(msg, now)
                    self.counters["updates_sent"] += 1
                return
            st.updates_received += 1
            self.counters["updates_received"] += 1
            if msg.eor is not None:
                afi, safi = msg.eor
                eor_family = AFI_FAMILY.get(afi) if safi == "unicast" else None
                if eor_family is not None:
                    st.eor_received_families.add(eor_family)
                    dropped = self.rib.drop_stale(st.address, eor_family)
                    if dropped:
                        log.info("peer %s End-of-RIB %s %s: %d stale routes dropped", st.address, afi, safi, dropped)
                if st.eor_received:  # every negotiated family: nothing stale is left to wait for
                    self._cancel_timer(st.address)
                    self.rib.drop_stale(st.address)
            for prefix in msg.withdraw:
                self.rib.withdraw(st.address, prefix)
            for route in msg.announce:
                self.rib.announce(st.address, route, now)
            self.changed.set()

    # -- BFD ------------------------------------------------------------------------------------
    def bfd_down(self, address: str, diag: str) -> None:
        """BFD declared the peer down: its learned routes go now (also stale ones kept for graceful restart:
        the forwarding plane is what failed), the BGP session is torn down through ExaBGP's API, and routes
        from this peer stay out of the kernel until BFD is Up again."""
        self.bfd_down_peers.add(address)
        self._cancel_timer(address)
        self.rib.clear(address)
        st = self.peers.get(address)
        if st is not None:
            st.last_error = f"BFD down ({diag})"
            if st.state == "established":
                self._send(announce.teardown(address))
        self.changed.set()

    def bfd_up(self, address: str) -> None:
        if address in self.bfd_down_peers:
            self.bfd_down_peers.discard(address)
            self.changed.set()

    def desired_routes(self) -> dict[str, frozenset[str]]:
        """Kernel routes from the RIB, leaving out peers that BFD holds down (ECMP siblings stay)."""
        return self.rib.desired(exclude=self.bfd_down_peers)

    def retracted_routes(self) -> dict[str, frozenset[str]]:
        """prefix -> next hops known to be gone: retracted in the RIB (withdrawn, session down, stale dropped,
        BFD down) or learned from a peer that BFD holds down. Desired routes win over these."""
        out = {p: set(h) for p, h in self.rib.retracted().items()}
        for p, hops in self.rib.desired(exclude=set(self.rib.peers) - self.bfd_down_peers).items():
            out.setdefault(p, set()).update(hops)
        return {p: frozenset(h) for p, h in out.items()}

    def _send_eor(self, st: PeerState) -> None:
        """End-of-RIB for every negotiated family (the announcements were just replayed)."""
        for family in st.negotiated:
            self._send(announce.end_of_rib(st.address, family))
            st.eor_sent_families.add(family)

    def _peer_down(self, st: PeerState, reason: str, now: float) -> None:
        st.set_state("down", now)
        st.eor_sent_families.clear()
        st.peer_families = None
        self.out.clear(st.address)
        gr = st.gr_time or (self.cfg.graceful_restart_time if self.cfg else 0)
        # a NOTIFICATION (clean close) ends graceful restart; a lost connection keeps stale routes
        clean = "notification" in (reason or "").lower() or "shutdown" in (reason or "").lower()
        if st.gr_time and not clean:
            n = self.rib.mark_stale(st.address)
            if n:
                log.info("peer %s down (%s): keeping %d routes as stale for %ds", st.address, reason, n, gr)
                self._set_timer(st.address, gr)
        else:
            self.rib.clear(st.address)
        self.changed.set()

    def _set_timer(self, peer: str, seconds: float) -> None:
        self._cancel_timer(peer)
        loop = asyncio.get_running_loop()
        self._timers[peer] = loop.call_later(seconds, self._stale_expired, peer)

    def _cancel_timer(self, peer: str) -> None:
        h = self._timers.pop(peer, None)
        if h is not None:
            h.cancel()

    def _stale_expired(self, peer: str) -> None:
        self._timers.pop(peer, None)
        n = self.rib.drop_stale(peer)
        if n:
            log.info("peer %s: graceful-restart timer expired, %d stale routes dropped", peer, n)
            self.changed.set()

    # -- views ------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def connected(self) -> bool:
        return self.commands.connected

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def peer_status(self, st: PeerState) -> BgpPeerStatus:
        pc = self.cfg.peer(st.address) if self.cfg else None
        error = self.refused.get(st.address) or self.announce_errors.get(st.address) or st.last_error
        if st.state != "established" and pc is not None and pc.password and not error:
            error = "session not established; TCP-MD5 is configured: a password mismatch looks like this"
        elif st.state != "established" and not error and self.last_exit and not self.running:
            error = self.last_exit
        return BgpPeerStatus(
            address=st.address, name=st.name, asNumber=st.asn, state=st.state, since=st.since,
            received=len(self.rib.peers.get(st.address, {})), accepted=self.rib.accepted_count(st.address),
            advertised=len(self.out.peers.get(st.address, {})), eorReceived=st.eor_received, eorSent=st.eor_sent,
            gracefulRestartTime=st.gr_time, maxPrefixes=pc.max_prefixes if pc else None,
            maxPrefixExceeded=self.rib.max_prefix_hits.get(st.address, 0), md5=bool(pc and pc.password),
            lastError=error, bfd=self.bfd_states.get(st.address, ""),
        )
