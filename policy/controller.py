"""The facade the agent calls (blocking; the agent runs it in a thread): compute, diff, apply, report.

`sync` makes one attempt and raises PolicyApplyError when it fails (the caller retries with the shared
backoff: policy/component.py); `ensure_endpoint`, on the CNI ADD path, makes up to 1 + `apply_retries`
quick attempts because a pod is waiting for it. The kernel keeps the last good state after a failure.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from policy import names
from policy.calc import Calculation, PolicyInputs, calculate
from policy.dataplane.ipsets import ActualSet, IpsetDataplane, normalise
from policy.dataplane.iptables import TableState, detect_backend, diff, read_table
from policy.dataplane.writers import Writer, make_writer
from policy.render import RenderOptions, Ruleset, render
from routed import failpoints
from routed.api_types import InvalidPolicy, PolicyReport
from routed.backoff import Backoff
from routed.config import PolicyOptions
from routed.errors import Code, RoutedError

log = logging.getLogger(__name__)


@dataclass
class ApplyReport:
    ok: bool
    changed: bool = False  # anything written to the kernel
    duration_s: float = 0.0
    attempts: int = 0
    iptables_ops: int = 0
    ipset_ops: int = 0
    rules: int = 0
    chains: int = 0
    ipsets: int = 0
    members: int = 0
    endpoints: int = 0
    invalid: list[InvalidPolicy] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    writer: str = ""
    backend: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PolicyApplyError(RoutedError):
    """The calculation or the kernel apply failed; the last good dataplane stays. `.report` says how far it got."""

    code = Code.POLICY_APPLY_FAILED

    def __init__(self, report: ApplyReport) -> None:
        super().__init__(f"policy not applied: {report.error}")
        self.report = report


class PolicyController:
    def __init__(self, options: PolicyOptions, node_name: str) -> None:
        self.options = options
        self.node_name = node_name
        self.render_options = RenderOptions(
            deny_log=options.deny_log,
            log_mode=options.deny_log_mode,
            nflog_group=options.nflog_group,
        )
        backend = options.iptables_backend
        if options.iptables_writer == "iptc" and options.deny_log and self.render_options.log_mode == "nflog":
            # building an NFLOG target through python-iptables corrupts memory (segfault): use LOG
            log.warning("python-iptables writer: deny logging uses LOG instead of NFLOG")
            self.render_options = RenderOptions(True, "log", self.render_options.nflog_group)
        if options.iptables_writer == "iptc":
            if backend == "nft":
                log.warning("python-iptables writes legacy tables only: using the legacy backend")
            backend = "legacy"
        self.backend = detect_backend(backend)
        self._writer: Writer | None = None
        self.ipsets = IpsetDataplane()
        self._lock = threading.Lock()
        self._last: ApplyReport | None = None
        self._last_ok_time: float | None = None
        self._ready = False
        self._ruleset: Ruleset | None = None
        self._calc: Calculation | None = None
        self.failures = 0  # consecutive failed syncs
        self.endpoint_backoff = Backoff(base=0.05, cap=1.0)  # the CNI ADD path's quick retries
        # ipset membership is trusted from the last successful apply for this long, then re-read from the
        # kernel (dumping 30,000 members costs ~0.3 s); iptables is always read back (cheap, and it is
        # the ownership/atomicity check).
        self.ipset_resync_s = 30.0
        self._sets_cache: dict[str, ActualSet] | None = None
        self._sets_read_at = 0.0

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            self._writer = make_writer(self.options.iptables_writer, self.backend)
        return self._writer

    # -- public API -------------------------------------------------------------------------------------
    def sync(self, inputs: PolicyInputs) -> ApplyReport:
        """Compute and apply once; raises PolicyApplyError on failure."""
        with self._lock:
            return self._sync(inputs)

    def ensure_endpoint(self, inputs: PolicyInputs) -> ApplyReport:
        """CNI ADD path: a sync (unchanged chains are not rewritten, so it is cheap), retried a few times quickly."""
        self.endpoint_backoff.reset()
        for attempt in range(max(0, self.options.apply_retries) + 1):
            try:
                return self.sync(inputs)
            except PolicyApplyError:
                if attempt >= self.options.apply_retries:
                    raise
                self.endpoint_backoff.wait()
        raise AssertionError("unreachable")

    def force_readback(self) -> None:
        """The next apply reads everything back from the kernel (the periodic resync: repair drift)."""
        self._sets_cache = None

    def report(self) -> PolicyReport:
        last = self._last
        return PolicyReport(
            enabled=True, node=self.node_name, ready=self._ready, writer=self.options.iptables_writer,
            backend=self.backend, invalidPolicies=list(last.invalid) if last else [],
            rules=last.rules if last else 0, chains=last.chains if last else 0, ipsets=last.ipsets if last else 0,
            members=last.members if last else 0, endpoints=last.endpoints if last else 0,
            lastApplyTime=self._last_ok_time, lastApplySeconds=last.duration_s if last else None,
            lastError=(last.error or "") if last else "", failures=self.failures,
            warnings=list(last.warnings) if last else [],
        )

    def drop_counters(self) -> dict[str, int]:
        """Packets dropped per endpoint (pod key): the counters of the DROP rules of its chains."""
        with self._lock:
            if self._calc is None or self._ruleset is None:
                return {}
            state = read_table(self.backend, counters=True)
            result: dict[str, int] = {}
            for ep in self._calc.endpoints:
                total = 0
                for chain in (ep.from_chain, ep.to_chain):
                    drop_hashes = {r.hash for r in self._ruleset.chains.get(chain, []) if r.body.endswith("-j DROP")}
                    total += sum(r.packets for r in state.chains.get(chain, []) if r.hash in drop_hashes)
                result[ep.pod_key] = total
            return result

    def remove_all(self) -> None:
        with self._lock:
            empty = Ruleset()
            state = read_table(self.backend)
            ops = diff(empty, state, sweep=True)
            if ops:
                self.writer.apply(ops)
            actual = self.ipsets.read()
            self.ipsets.restore(self.ipsets.phase2_script({}, actual))
            self._sets_cache = None
            self._ruleset = None
            self._calc = None
            self._ready = False

    # -- internals --------------------------------------------------------------------------------------
    def _apply_once(self, calc: Calculation, ruleset: Ruleset, report: ApplyReport) -> None:
        failpoints.hit("policy.apply")
        now = time.monotonic()
        if self._sets_cache is not None and now - self._sets_read_at < self.ipset_resync_s:
            actual_sets = self._sets_cache
        else:
            actual_sets = self.ipsets.read()
            self._sets_read_at = now
        self._sets_cache = None  # until this apply is known to have succeeded
        phase1 = self.ipsets.phase1_script(calc.ipsets, actual_sets)
        self.ipsets.restore(phase1)
        state: TableState = read_table(self.backend)
        ops = diff(ruleset, state, sweep=True)
        self.writer.apply(ops)
        phase2 = self.ipsets.phase2_script(calc.ipsets, actual_sets)
        self.ipsets.restore(phase2)
        self._sets_cache = {
            name: ActualSet(name, spec.kind, {normalise(spec.kind, m) for m in spec.members})
            for name, spec in calc.ipsets.items()
        }
        report.iptables_ops += len(ops)
        report.ipset_ops += len(phase1) + len(phase2)

    def _sync(self, inputs: PolicyInputs) -> ApplyReport:
        start = time.monotonic()
        report = ApplyReport(ok=False, writer=self.options.iptables_writer, backend=self.backend)
        try:
            calc = calculate(inputs)
            ruleset = render(calc, self.render_options)
        except Exception as exc:  # a bug in calculation must not take the agent down
            log.exception("policy calculation failed")
            report.error = f"calculation failed: {exc}"
            return self._finish(report, start)
        report.invalid = [p.as_report() for p in calc.problems]
        report.warnings = list(calc.warnings)
        report.rules = ruleset.rule_count()
        report.chains = len(ruleset.chains)
        report.ipsets = len(calc.ipsets)
        report.members = sum(len(s.members) for s in calc.ipsets.values())
        report.endpoints = len(calc.endpoints)
        for problem in calc.problems:
            log.warning("invalid NetworkPolicy %s (failing closed for %s): %s", problem.key,
                        "/".join(problem.fail_closed), "; ".join(problem.reasons))
        report.attempts = 1
        try:
            self._apply_once(calc, ruleset, report)
            report.ok = True
        except Exception as exc:
            report.error = str(exc)
        report.changed = report.iptables_ops + report.ipset_ops > 0
        if report.ok:
            self._ruleset, self._calc = ruleset, calc
            self._last_ok_time = time.time()
        return self._finish(report, start)

    def _finish(self, report: ApplyReport, start: float) -> ApplyReport:
        report.duration_s = time.monotonic() - start
        self._ready = report.ok
        self._last = report
        if not report.ok:
            self.failures += 1
            raise PolicyApplyError(report)
        self.failures = 0
        return report


__all__ = ["ApplyReport", "PolicyApplyError", "PolicyController", "PolicyInputs", "names"]
