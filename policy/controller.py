"""The policy dataplane facade: the incremental engine's changes → ipset and iptables writes.

Two kinds of apply:
- **incremental** (every event): the engine's changes since the last apply, rendered for the changed chains
  only and diffed against what the last successful apply wrote (trusted, not read back): ipset add/del lines
  (fill-and-swap for large changes), the changed chains in one `iptables-restore --noflush`, ipsets destroyed
  after the rules stop referencing them. Nothing changed: nothing is run.
- **full** (the first apply, after a failure, and on the periodic read-back `force_readback`): the whole
  desired state against what the kernel holds (ipset save, iptables-save), sweeping what is ours and unwanted.
  This is the drift repair.

An apply is planned (`plan`, pure: engine + trusted state) and then executed (`execute`, I/O only; a thread),
so the engine is only ever touched by its owner. A failed execute raises PolicyApplyError, keeps the kernel in
its last good state (each step is atomic), and makes the next apply a full one. `sync(inputs)` loads a whole
snapshot into a fresh engine and applies it in full (tests, benchmarks, the agent's first apply).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from policy import names
from policy.calc import Calculation, PolicyInputs, problems_of, unknown_pod_warning
from policy.dataplane.ipsets import IpsetDataplane, normalise
from policy.dataplane.iptables import Op, detect_backend, diff, read_table
from policy.dataplane.writers import Writer, make_writer
from policy.incremental import Changes, PolicyEngine
from policy.render import HOOKS, RenderedRule, RenderOptions, Ruleset, render, render_chains
from routed import failpoints
from routed.api_types import InvalidPolicy, PolicyReport
from routed.backoff import Backoff
from routed.config import PolicyOptions
from routed.errors import Code, RoutedError
from routed.model import Endpoint

log = logging.getLogger(__name__)

SWAP_THRESHOLD = 500  # set changes above this are written into a temporary set and swapped in
Chains = dict[str, list[RenderedRule]]


@dataclass
class ApplyReport:
    ok: bool
    full: bool = False  # a full apply (kernel read back) rather than an incremental one
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


@dataclass
class ApplyPlan:
    """What one apply will do. full: `calc`/`ruleset` are the whole desired state; incremental: the lines."""

    full: bool
    calc: Calculation | None = None
    ruleset: Ruleset | None = None
    ipset_before: list[str] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    ipset_after: list[str] = field(default_factory=list)
    chains: dict[str, list[RenderedRule] | None] = field(default_factory=dict)  # what the chains become
    sets: dict[str, tuple[set[str], set[str]] | None] = field(default_factory=dict)  # set deltas (None: gone)
    new_sets: dict[str, str] = field(default_factory=dict)  # created: name -> kind

    @property
    def empty(self) -> bool:
        return not self.full and not (self.ipset_before or self.ops or self.ipset_after)


class PolicyController:
    def __init__(self, options: PolicyOptions, node_name: str) -> None:
        self.options = options
        self.node_name = node_name
        self.render_options = RenderOptions(deny_log=options.deny_log, log_mode=options.deny_log_mode,
                                            nflog_group=options.nflog_group)
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
        self.engine = PolicyEngine()
        self._lock = threading.Lock()  # one execute at a time (drop counters read the trusted state too)
        self._applied: Chains | None = None  # what the last successful apply left in our chains (None: unknown)
        self._applied_sets: dict[str, tuple[str, set[str]]] | None = None  # name -> (kind, members)
        self._last: ApplyReport | None = None
        self._last_ok_time: float | None = None
        self._ready = False
        self.failures = 0  # consecutive failed applies
        self.endpoint_backoff = Backoff(base=0.05, cap=1.0)  # the CNI ADD path's quick retries

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            self._writer = make_writer(self.options.iptables_writer, self.backend)
        return self._writer

    # -- public API -------------------------------------------------------------------------------------
    def sync(self, inputs: PolicyInputs) -> ApplyReport:
        """Load a whole snapshot into a fresh engine and apply it in full; raises PolicyApplyError."""
        self.engine = PolicyEngine.from_inputs(inputs)
        self.engine.take_changes()
        self.force_readback()
        return self.apply()

    def apply(self) -> ApplyReport:
        """Plan and execute (the engine's changes, or the whole state when a full apply is due)."""
        return self.execute(self.plan())

    def ensure_endpoint(self, endpoint: Endpoint) -> ApplyReport:
        """CNI ADD path for one caller: the endpoint into the engine, then an apply, retried a few times quickly."""
        self.engine.add_endpoint(endpoint)
        self.endpoint_backoff.reset()
        for attempt in range(max(0, self.options.apply_retries) + 1):
            try:
                return self.apply()
            except PolicyApplyError:
                if attempt >= self.options.apply_retries:
                    raise
                self.endpoint_backoff.wait()
        raise AssertionError("unreachable")

    def force_readback(self) -> None:
        """The next apply reads the kernel back and applies the whole desired state (drift repair)."""
        self._applied = None
        self._applied_sets = None

    def report(self) -> PolicyReport:
        last = self._last
        policies = sorted(self.engine.policies.values(), key=lambda p: (p.namespace, p.name))
        return PolicyReport(
            enabled=True, node=self.node_name, ready=self._ready, writer=self.options.iptables_writer,
            backend=self.backend, invalidPolicies=[p.as_report() for p in problems_of(policies)],
            rules=last.rules if last else 0, chains=last.chains if last else 0, ipsets=last.ipsets if last else 0,
            members=last.members if last else 0, endpoints=last.endpoints if last else 0,
            lastApplyTime=self._last_ok_time, lastApplySeconds=last.duration_s if last else None,
            lastError=(last.error or "") if last else "", failures=self.failures,
            warnings=list(last.warnings) if last else [],
        )

    def drop_counters(self) -> dict[str, int]:
        """Packets dropped per endpoint (pod key): the counters of the DROP rules of its chains."""
        with self._lock:
            if self._applied is None:
                return {}
            applied = self._applied
            state = read_table(self.backend, counters=True)
            result: dict[str, int] = {}
            for ep in self.engine.ep_plans.values():
                total = 0
                for chain in (ep.from_chain, ep.to_chain):
                    drop_hashes = {r.hash for r in applied.get(chain, []) if r.body.endswith("-j DROP")}
                    total += sum(r.packets for r in state.chains.get(chain, []) if r.hash in drop_hashes)
                result[ep.pod_key] = total
            return result

    def remove_all(self) -> None:
        with self._lock:
            ops = diff(Ruleset(), read_table(self.backend), sweep=True)
            if ops:
                self.writer.apply(ops)
            self.ipsets.restore(self.ipsets.phase2_script({}, self.ipsets.read()))
            self.force_readback()
            self._ready = False

    # -- planning (no I/O) ------------------------------------------------------------------------------
    def plan(self) -> ApplyPlan:
        changes = self.engine.take_changes()
        if self._applied is None or self._applied_sets is None:
            calc = self.engine.calculation()
            return ApplyPlan(full=True, calc=calc, ruleset=render(calc, self.render_options))
        return self._plan_incremental(changes, self._applied, self._applied_sets)

    def _plan_incremental(self, changes: Changes, applied: Chains,
                          applied_sets: dict[str, tuple[str, set[str]]]) -> ApplyPlan:
        plan = ApplyPlan(full=False)
        for name, delta in sorted(changes.sets.items()):
            spec = self.engine.set_spec(name)
            have = applied_sets.get(name)
            if spec is None:
                if have is not None:
                    plan.ipset_after.append(f"destroy {name}")
                    plan.sets[name] = None
                continue
            if have is not None and have[0] != spec.kind:  # same name, other type: only a full apply fixes it
                return ApplyPlan(full=True, calc=self.engine.calculation(),
                                 ruleset=render(self.engine.calculation(), self.render_options))
            if have is None:
                members = {normalise(spec.kind, m) for m in spec.members}
                plan.ipset_before += [self.ipsets.create_line(name, spec.kind)] + [
                    f"add {name} {m}" for m in sorted(members)]
                plan.new_sets[name] = spec.kind
                plan.sets[name] = (members, set())
                continue
            current = have[1]
            if delta is None:
                want_members = {normalise(spec.kind, m) for m in spec.members}
                added, removed = want_members - current, current - want_members
            else:
                added = {n for m in delta[0] if (n := normalise(spec.kind, m)) not in current}
                removed = {n for m in delta[1] if (n := normalise(spec.kind, m)) in current}
            if not added and not removed:
                continue
            plan.sets[name] = (added, removed)
            if len(added) + len(removed) > SWAP_THRESHOLD:
                plan.ipset_before += self.ipsets.swap_lines(name, spec.kind, (current | added) - removed)
            else:  # removals first: a `nomatch` entry and its plain twin cannot coexist
                plan.ipset_before += [f"del {name} {m}" for m in sorted(removed)]
                plan.ipset_before += [f"add {name} {m}" for m in sorted(added)]
        drops: list[str] = []
        for chain, rules in sorted(render_chains(self.engine, changes.chains, self.render_options).items()):
            old = applied.get(chain)
            if rules is None:
                if old is not None:
                    drops.append(chain)
                    plan.chains[chain] = None
                continue
            ops = chain_ops(chain, old, rules)
            if ops:
                plan.ops += ops
                plan.chains[chain] = rules
        # after every rule that jumped to them is gone; all flushed before any is deleted (they jump to each other)
        plan.ops += [Op("flush", c) for c in drops] + [Op("delete_chain", c) for c in drops]
        return plan

    # -- executing (I/O) ---------------------------------------------------------------------------------
    def execute(self, plan: ApplyPlan) -> ApplyReport:
        with self._lock:
            start = time.monotonic()
            report = ApplyReport(ok=False, full=plan.full, attempts=1, writer=self.options.iptables_writer,
                                 backend=self.backend)
            try:
                failpoints.hit("policy.apply")
                if plan.full:
                    self._execute_full(plan, report)
                elif not plan.empty:
                    self._execute_incremental(plan, report)
                report.ok = True
            except Exception as exc:
                report.error = str(exc)
                self.force_readback()  # whatever happened, the next apply compares with the kernel
            report.changed = report.iptables_ops + report.ipset_ops > 0
            return self._finish(report, start)

    def _execute_full(self, plan: ApplyPlan, report: ApplyReport) -> None:
        assert plan.calc is not None and plan.ruleset is not None
        calc, ruleset = plan.calc, plan.ruleset
        actual_sets = self.ipsets.read()
        phase1 = self.ipsets.phase1_script(calc.ipsets, actual_sets)
        self.ipsets.restore(phase1)
        ops = diff(ruleset, read_table(self.backend), sweep=True)
        self.writer.apply(ops)
        phase2 = self.ipsets.phase2_script(calc.ipsets, actual_sets)
        self.ipsets.restore(phase2)
        report.iptables_ops += len(ops)
        report.ipset_ops += len(phase1) + len(phase2)
        self._applied = dict(ruleset.chains)
        self._applied_sets = {name: (spec.kind, {normalise(spec.kind, m) for m in spec.members})
                              for name, spec in calc.ipsets.items()}
        for problem in calc.problems:
            log.warning("invalid NetworkPolicy %s (failing closed for %s): %s", problem.key,
                        "/".join(problem.fail_closed), "; ".join(problem.reasons))

    def _execute_incremental(self, plan: ApplyPlan, report: ApplyReport) -> None:
        assert self._applied is not None and self._applied_sets is not None
        self.ipsets.restore(plan.ipset_before)
        self.writer.apply(plan.ops)
        self.ipsets.restore(plan.ipset_after)
        report.iptables_ops += len(plan.ops)
        report.ipset_ops += len(plan.ipset_before) + len(plan.ipset_after)
        for chain, rules in plan.chains.items():
            if rules is None:
                self._applied.pop(chain, None)
            else:
                self._applied[chain] = rules
        for name, delta in plan.sets.items():
            if delta is None:
                self._applied_sets.pop(name, None)
                continue
            if name in plan.new_sets:
                self._applied_sets[name] = (plan.new_sets[name], set())
            members = self._applied_sets[name][1]
            members -= delta[1]
            members |= delta[0]

    def _finish(self, report: ApplyReport, start: float) -> ApplyReport:
        report.duration_s = time.monotonic() - start
        engine = self.engine
        if self._applied is not None and self._applied_sets is not None:
            report.rules = sum(len(r) for r in self._applied.values()) + len(HOOKS)
            report.chains = len(self._applied)
            report.ipsets = len(self._applied_sets)
            report.members = sum(len(m) for _, m in self._applied_sets.values())
        report.endpoints = len(engine.ep_plans)
        report.warnings = [unknown_pod_warning(e) for e in engine.ep_plans.values() if e.unknown_pod]
        policies = sorted(engine.policies.values(), key=lambda p: (p.namespace, p.name))
        report.invalid = [p.as_report() for p in problems_of(policies)]
        self._ready = report.ok
        self._last = report
        if not report.ok:
            self.failures += 1
            log.error("policy not applied, keeping the last good state: %s", report.error)
            raise PolicyApplyError(report)
        self.failures = 0
        self._last_ok_time = time.time()
        return report


def chain_ops(chain: str, old: list[RenderedRule] | None, new: list[RenderedRule]) -> list[Op]:
    """Operations turning chain `old` (None: absent) into `new`, comparing rule hashes; unchanged rules keep
    their counters."""
    ops: list[Op] = [Op("new_chain", chain)] if old is None else []
    have = old or []
    for i, rule in enumerate(new):
        if i < len(have):
            if have[i].hash != rule.hash:
                ops.append(Op("replace", chain, i + 1, rule.line(chain), rule.hash, rule.body))
        else:
            ops.append(Op("append", chain, 0, rule.line(chain), rule.hash, rule.body))
    ops += [Op("delete", chain, pos) for pos in range(len(have), len(new), -1)]
    return ops


__all__ = ["ApplyReport", "PolicyApplyError", "PolicyController", "PolicyInputs", "names"]
