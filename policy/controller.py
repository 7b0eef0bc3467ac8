"""The policy dataplane facade: the incremental engine's changes → ipset and iptables writes, per IP family.

Families: `PolicyOptions.ip_families` (None, the default: IPv4 and, where ip6tables and the kernel's IPv6 are
there, IPv6 — whether or not any pod has an IPv6 address: a pod without one still gets IPv6 anti-spoofing, so it
cannot speak IPv6 unpoliced). Both families use the same backend and writer kind; each has its own filter table
(the same chain names), and its own kernel ipsets (calc's family-neutral sets split by IpSetSpec.for_family).
A family that is available but not active is swept by full applies (what an earlier configuration left).

Two kinds of apply:
- **incremental** (every event): the engine's changes since the last apply, rendered for the changed chains
  only, per family, and diffed against what the last successful apply wrote (trusted, not read back): ipset
  add/del lines of both families (fill-and-swap for large changes), then the changed IPv4 chains in one
  `iptables-restore --noflush`, then the changed IPv6 chains in one `ip6tables-restore --noflush`, then the ipsets
  destroyed once no rule references them. Nothing changed: nothing is run.
- **full** (the first apply, after a failure, and on the periodic read-back `force_readback`): the whole
  desired state against what the kernel holds (ipset save, iptables-save and ip6tables-save), sweeping what is
  ours and unwanted in each family. This is the drift repair.

Each step is atomic (one restore or one commit); the order keeps every rule's sets in place before the rule and
until after it is gone. An apply is planned (`plan`, pure: engine + trusted state) and then executed (`execute`,
I/O only; a thread), so the engine is only ever touched by its owner. A failed execute raises PolicyApplyError,
keeps the kernel in its last good state, and makes the next apply a full one. `sync(inputs)` loads a whole
snapshot into a fresh engine and applies it in full (tests, benchmarks, the agent's first apply).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from policy import names
from policy.calc import Calculation, IpSetSpec, PolicyBudget, PolicyInputs, member_family, unknown_pod_warning
from policy.dataplane.ipsets import IpsetDataplane, kernel_members, normalise
from policy.dataplane.iptables import (
    FAMILY_TOOLS,
    Op,
    TableState,
    active_families,
    detect_backend,
    diff,
    family_available,
    hook_ops,
    read_chains,
    read_table,
)
from policy.dataplane.runner import CommandError
from policy.dataplane.writers import Writer, make_writer
from policy.incremental import Changes, PolicyEngine
from policy.render import HOOKS, RenderedRule, RenderOptions, Ruleset, hooks, render, render_chains
from routed import failpoints
from routed.api_types import InvalidPolicy, PolicyReport
from routed.backoff import Backoff
from routed.config import PolicyOptions
from routed.errors import Code, RoutedError
from routed.model import Endpoint

log = logging.getLogger(__name__)

SWAP_THRESHOLD = 500  # set changes above this are written into a temporary set and swapped in
Chains = dict[str, list[RenderedRule]]
KernelSets = dict[str, tuple[str, set[str]]]  # kernel set name -> (kind, normalised members)


@dataclass
class ApplyReport:
    ok: bool
    full: bool = False  # a full apply (kernel read back) rather than an incremental one
    changed: bool = False  # anything written to the kernel
    duration_s: float = 0.0
    attempts: int = 0
    iptables_ops: int = 0  # both families
    ipset_ops: int = 0
    rules: int = 0  # in every active family's table (hooks included)
    chains: int = 0
    ipsets: int = 0
    members: int = 0
    endpoints: int = 0
    invalid: list[InvalidPolicy] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    writer: str = ""
    backend: str = ""
    families: tuple[int, ...] = ()
    family_ops: dict[int, int] = field(default_factory=dict)  # iptables ops per family

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PolicyApplyError(RoutedError):
    """The calculation or the kernel apply failed; the last good dataplane stays. `.report` says how far it got."""

    code = Code.POLICY_APPLY_FAILED

    def __init__(self, report: ApplyReport) -> None:
        super().__init__(f"policy not applied: {report.error}")
        self.report = report


@dataclass
class Applied:
    """What the last successful apply left in one family: our chains and our kernel sets."""

    chains: Chains
    sets: KernelSets


@dataclass
class FamilyPlan:
    """One family's part of an apply. full: `ruleset` is the whole desired table; incremental: the ops, and
    what the chains and sets become (set deltas by kernel name; None: gone)."""

    family: int
    ruleset: Ruleset | None = None
    ops: list[Op] = field(default_factory=list)
    chains: dict[str, list[RenderedRule] | None] = field(default_factory=dict)
    sets: dict[str, tuple[set[str], set[str]] | None] = field(default_factory=dict)
    new_sets: dict[str, str] = field(default_factory=dict)  # created: kernel name -> kind


@dataclass(frozen=True)
class EngineView:
    """What an apply reports about the engine, copied on the event loop when it is planned: the thread that
    executes the plan never reads the engine, which the loop keeps changing."""

    endpoints: int = 0
    warnings: tuple[str, ...] = ()
    invalid: tuple[InvalidPolicy, ...] = ()

    @classmethod
    def of(cls, engine: PolicyEngine) -> EngineView:
        return cls(len(engine.ep_plans), tuple(unknown_pod_warning(e) for e in engine.ep_plans.values()
                                               if e.unknown_pod),
                   tuple(p.as_report() for p in engine.problems()))


@dataclass(frozen=True)
class DropChains:
    """One endpoint's chains whose DROP rules count its drops (copied on the loop for the counters thread)."""

    pod_key: str
    chains: tuple[str, str]


@dataclass
class ApplyPlan:
    """What one apply will do: the ipset lines of both families around each family's table operations."""

    full: bool
    calc: Calculation | None = None
    view: EngineView = field(default_factory=EngineView)
    families: dict[int, FamilyPlan] = field(default_factory=dict)
    ipset_before: list[str] = field(default_factory=list)
    ipset_after: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.full and not (self.ipset_before or self.ipset_after
                                      or any(f.ops for f in self.families.values()))


def budget_of(options: PolicyOptions) -> PolicyBudget:
    """The configured budget (routed.config.PolicyBudgetOptions) as the calculation takes it."""
    return PolicyBudget(**options.budget.model_dump())


def family_sets(calc: Calculation, families: tuple[int, ...]) -> dict[str, IpSetSpec]:
    """The kernel sets of `calc` in every active family: kernel name -> that family's spec."""
    out: dict[str, IpSetSpec] = {}
    for family in families:
        for spec in calc.ipsets.values():
            fspec = spec.for_family(family)
            out[fspec.name] = fspec
    return out


def kernel_sets(desired: Mapping[str, IpSetSpec], family: int) -> KernelSets:
    """What writing `desired` leaves in the kernel for `family` (members as `ipset save` shows them)."""
    return {name: (spec.kind, kernel_members(spec))
            for name, spec in desired.items() if spec.family == family}


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
        self.families = active_families(self.backend, options.ip_families)
        # available but not policed (configured off): swept by full applies, what an earlier configuration left
        self.sweep_families = tuple(f for f in FAMILY_TOOLS if f not in self.families
                                    and family_available(self.backend, f))
        for family in self.sweep_families:
            log.warning("IPv%d is not policed on this node (ip_families %s): pods' IPv%d traffic is not filtered",
                        family, list(self.families), family)
        self._writers: dict[int, Writer] = {}
        self.ipsets = IpsetDataplane()
        self.engine = PolicyEngine(budget=budget_of(options))
        self._lock = threading.Lock()  # one execute at a time (drop counters read the trusted state too)
        self._applied: dict[int, Applied] | None = None  # per family; None: unknown (the next apply is full)
        self._last: ApplyReport | None = None
        self._last_ok_time: float | None = None
        self._ready = False
        self.failures = 0  # consecutive failed applies
        self.endpoint_backoff = Backoff(base=0.05, cap=1.0)  # the CNI ADD path's quick retries

    def writer_for(self, family: int) -> Writer:
        if family not in self._writers:
            self._writers[family] = make_writer(self.options.iptables_writer, self.backend, family)
        return self._writers[family]

    @property
    def writer(self) -> Writer:
        """The IPv4 writer (creating it imports python-iptables for the iptc writer)."""
        return self.writer_for(4)

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

    def report(self) -> PolicyReport:
        last = self._last
        return PolicyReport(
            enabled=True, node=self.node_name, ready=self._ready, writer=self.options.iptables_writer,
            backend=self.backend, invalidPolicies=[p.as_report() for p in self.engine.problems()],
            rules=last.rules if last else 0, chains=last.chains if last else 0, ipsets=last.ipsets if last else 0,
            members=last.members if last else 0, endpoints=last.endpoints if last else 0,
            lastApplyTime=self._last_ok_time, lastApplySeconds=last.duration_s if last else None,
            lastError=(last.error or "") if last else "", failures=self.failures,
            warnings=list(last.warnings) if last else [],
        )

    def drop_chains(self) -> list[DropChains]:
        """Each endpoint's counted chains, copied (call on the loop, hand the copy to `drop_counters`)."""
        return [DropChains(ep.pod_key, (ep.from_chain, ep.to_chain)) for ep in self.engine.ep_plans.values()]

    def drop_counters(self, endpoints: list[DropChains] | None = None) -> dict[str, int]:
        """Packets dropped per endpoint (pod key): the counters of the DROP rules of its chains, both families.
        `endpoints`: the copy from `drop_chains` (a thread must not read the engine); None: take it now."""
        endpoints = self.drop_chains() if endpoints is None else endpoints
        with self._lock:
            if self._applied is None:
                return {}
            result = {ep.pod_key: 0 for ep in endpoints}
            for family, applied in self._applied.items():
                state = read_table(self.backend, counters=True, family=family)
                for ep in endpoints:
                    result[ep.pod_key] += _drops(applied.chains, state, ep.chains)
            return result

    def check_hooks(self) -> int:
        """Put our jumps back at the top of FORWARD and INPUT in every policed family if anything flushed them,
        moved them or inserted ahead of them (kube-proxy, firewalld and Docker insert their own); reads only
        those chains. Returns the operations written (0: all in place). Nothing is checked before the first
        full apply (it writes them). Raises PolicyApplyError on failure, which makes the next apply a full one."""
        with self._lock:
            if self._applied is None:
                return 0
            written = 0
            try:
                for family in self.families:
                    ops = hook_ops(hooks(), read_chains(self.backend, HOOKS, family))
                    if ops:
                        log.warning("IPv%d: our hook was not first in %s (flushed, or a rule inserted ahead): "
                                    "restoring it", family, ", ".join(sorted({op.chain for op in ops})))
                        self.writer_for(family).apply(ops)
                        written += len(ops)
            except Exception as exc:
                self.force_readback()
                raise PolicyApplyError(ApplyReport(ok=False, error=f"hook check failed: {exc}")) from exc
            return written

    def remove_all(self) -> None:
        """Remove our chains and hooks from every family's table, then our ipsets."""
        with self._lock:
            report = ApplyReport(ok=True)
            for family in self.families:
                self._apply_ops(family, diff(Ruleset(), read_table(self.backend, family=family), sweep=True), report)
            for family in self.sweep_families:
                self._sweep(family, report)
            self.ipsets.restore(self.ipsets.phase2_script({}, self.ipsets.read()))
            self.force_readback()
            self._ready = False

    # -- planning (no I/O) ------------------------------------------------------------------------------
    def plan(self) -> ApplyPlan:
        """The next apply (call on the loop that owns the engine). A planning failure puts the changes back and
        makes the next apply a full one (nothing taken is lost), and raises PolicyApplyError."""
        start = time.monotonic()
        changes = self.engine.take_changes()
        try:
            failpoints.hit("policy.plan")
            plan = self._plan_full() if self._applied is None else self._plan_incremental(changes, self._applied)
            plan.view = EngineView.of(self.engine)
        except Exception as exc:
            changes.merge(self.engine.changes)
            self.engine.changes = changes
            self.force_readback()
            log.exception("policy apply not planned")
            report = ApplyReport(ok=False, error=f"planning failed: {exc}", writer=self.options.iptables_writer,
                                 backend=self.backend, families=self.families)
            self._finish(report, start, EngineView())
            raise AssertionError("unreachable") from exc  # _finish raised PolicyApplyError
        return plan

    def _plan_full(self) -> ApplyPlan:
        calc = self.engine.calculation()
        return ApplyPlan(full=True, calc=calc, families={
            f: FamilyPlan(f, ruleset=render(calc, self.render_options, f)) for f in self.families})

    def _plan_incremental(self, changes: Changes, applied: dict[int, Applied]) -> ApplyPlan:
        plan = ApplyPlan(full=False)
        for family in self.families:
            fplan = plan.families[family] = FamilyPlan(family)
            if not self._plan_sets(changes, applied[family].sets, plan, fplan):
                return self._plan_full()  # a set of the same name but another type: only a full apply fixes it
            self._plan_chains(changes, applied[family].chains, fplan)
        return plan

    def _plan_sets(self, changes: Changes, applied_sets: KernelSets, plan: ApplyPlan, fplan: FamilyPlan) -> bool:
        """This family's ipset lines for the changed sets into `plan`; False: a full apply is needed."""
        family = fplan.family
        destroys: list[tuple[bool, str]] = []  # (not a list:set, kernel name): a list:set goes before its members
        specs = {name: self.engine.set_spec(name) for name in changes.sets}
        # a list:set is created after the sets it holds
        for name, delta in sorted(changes.sets.items(), key=lambda item: (_is_list(specs[item[0]]), item[0])):
            spec = specs[name]
            kname = names.family_ipset_name(name, family)
            have = applied_sets.get(kname)
            if spec is None:
                if have is not None:
                    destroys.append((have[0] != "list:set", kname))
                    fplan.sets[kname] = None
                continue
            if have is not None and have[0] != spec.kind:
                return False
            if have is None:
                members = kernel_members(spec.for_family(family))
                plan.ipset_before += [self.ipsets.create_line(kname, spec.kind, family, len(members))] + [
                    f"add {kname} {m}" for m in sorted(members)]
                fplan.new_sets[kname] = spec.kind
                fplan.sets[kname] = (members, set())
                continue
            added, removed = _member_delta(spec, family, have[1], delta)
            if not added and not removed:
                continue
            fplan.sets[kname] = (added, removed)
            if len(added) + len(removed) > SWAP_THRESHOLD:
                plan.ipset_before += self.ipsets.swap_lines(kname, spec.kind, (have[1] | added) - removed, family)
            else:  # removals first: a `nomatch` entry and its plain twin cannot coexist
                plan.ipset_before += [f"del {kname} {m}" for m in sorted(removed)]
                plan.ipset_before += [f"add {kname} {m}" for m in sorted(added)]
        plan.ipset_after += [f"destroy {kname}" for _, kname in sorted(destroys)]
        return True

    def _plan_chains(self, changes: Changes, applied: Chains, fplan: FamilyPlan) -> None:
        drops: list[str] = []
        rendered = render_chains(self.engine, changes.chains, self.render_options, fplan.family)
        for chain, rules in sorted(rendered.items()):
            old = applied.get(chain)
            if rules is None:
                if old is not None:
                    drops.append(chain)
                    fplan.chains[chain] = None
                continue
            ops = chain_ops(chain, old, rules)
            if ops:
                fplan.ops += ops
                fplan.chains[chain] = rules
        # after every rule that jumped to them is gone; all flushed before any is deleted (they jump to each other)
        fplan.ops += [Op("flush", c) for c in drops] + [Op("delete_chain", c) for c in drops]

    # -- executing (I/O) ---------------------------------------------------------------------------------
    def execute(self, plan: ApplyPlan) -> ApplyReport:
        with self._lock:
            start = time.monotonic()
            report = ApplyReport(ok=False, full=plan.full, attempts=1, writer=self.options.iptables_writer,
                                 backend=self.backend, families=self.families)
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
            return self._finish(report, start, plan.view)

    def _apply_ops(self, family: int, ops: list[Op], report: ApplyReport) -> None:
        self.writer_for(family).apply(ops)
        report.iptables_ops += len(ops)
        report.family_ops[family] = report.family_ops.get(family, 0) + len(ops)

    def _execute_full(self, plan: ApplyPlan, report: ApplyReport) -> None:
        assert plan.calc is not None
        calc = plan.calc
        desired = family_sets(calc, tuple(plan.families))
        actual_sets = self.ipsets.read()
        phase1 = self.ipsets.phase1_script(desired, actual_sets)
        self.ipsets.restore(phase1)
        for i, (family, fplan) in enumerate(sorted(plan.families.items())):
            assert fplan.ruleset is not None
            if i:
                failpoints.hit("policy.between_families")
            self._apply_ops(family, diff(fplan.ruleset, read_table(self.backend, family=family), sweep=True), report)
        for family in self.sweep_families:
            self._sweep(family, report)
        phase2 = self.ipsets.phase2_script(desired, actual_sets)
        self.ipsets.restore(phase2)
        report.ipset_ops += len(phase1) + len(phase2)
        self._applied = {family: Applied(dict(fplan.ruleset.chains), kernel_sets(desired, family))
                         for family, fplan in plan.families.items() if fplan.ruleset is not None}
        for problem in calc.problems:
            log.warning("invalid NetworkPolicy %s (failing closed for %s): %s", problem.key,
                        "/".join(problem.fail_closed), "; ".join(problem.reasons))

    def _sweep(self, family: int, report: ApplyReport) -> None:
        """Remove our chains from the table of a family that is not policed (what an earlier configuration left)."""
        try:
            state = read_table(self.backend, family=family)
        except (CommandError, OSError) as exc:
            log.warning("cannot read the IPv%d table to sweep it: %s", family, exc)
            return
        self._apply_ops(family, diff(Ruleset(), state, sweep=True), report)

    def _execute_incremental(self, plan: ApplyPlan, report: ApplyReport) -> None:
        assert self._applied is not None
        self.ipsets.restore(plan.ipset_before)
        for i, (family, fplan) in enumerate(sorted(plan.families.items())):
            if i:
                failpoints.hit("policy.between_families")
            self._apply_ops(family, fplan.ops, report)
        self.ipsets.restore(plan.ipset_after)
        report.ipset_ops += len(plan.ipset_before) + len(plan.ipset_after)
        for family, fplan in plan.families.items():
            _record(self._applied[family], fplan)

    def _finish(self, report: ApplyReport, start: float, view: EngineView) -> ApplyReport:
        report.duration_s = time.monotonic() - start
        if self._applied is not None:
            families = self._applied.values()
            report.rules = sum(sum(len(r) for r in a.chains.values()) + len(HOOKS) for a in families)
            report.chains = sum(len(a.chains) for a in families)
            report.ipsets = sum(len(a.sets) for a in families)
            report.members = sum(len(m) for a in families for _, m in a.sets.values())
        report.endpoints = view.endpoints
        report.warnings = list(view.warnings)
        report.invalid = list(view.invalid)
        self._ready = report.ok
        self._last = report
        if not report.ok:
            self.failures += 1
            log.error("policy not applied, keeping the last good state: %s", report.error)
            raise PolicyApplyError(report)
        self.failures = 0
        self._last_ok_time = time.time()
        return report


def _is_list(spec: IpSetSpec | None) -> bool:
    return spec is not None and spec.kind == "list:set"


def _member_delta(spec: IpSetSpec, family: int, current: set[str],
                  delta: tuple[set[str], set[str]] | None) -> tuple[set[str], set[str]]:
    """(added, removed) kernel members of `family`'s set: from the engine's delta, or (None) in full."""
    if delta is None:
        want = kernel_members(spec.for_family(family))
        return want - current, current - want
    added = {n for m in delta[0] if member_family(m) == family and (n := normalise(spec.kind, m)) not in current}
    removed = {n for m in delta[1] if member_family(m) == family and (n := normalise(spec.kind, m)) in current}
    return added, removed


def _record(applied: Applied, fplan: FamilyPlan) -> None:
    """Fold what an incremental apply wrote into the trusted state of its family."""
    for chain, rules in fplan.chains.items():
        if rules is None:
            applied.chains.pop(chain, None)
        else:
            applied.chains[chain] = rules
    for name, delta in fplan.sets.items():
        if delta is None:
            applied.sets.pop(name, None)
            continue
        if name in fplan.new_sets:
            applied.sets[name] = (fplan.new_sets[name], set())
        members = applied.sets[name][1]
        members -= delta[1]
        members |= delta[0]


def _drops(applied: Chains, state: TableState, chains: tuple[str, ...]) -> int:
    """Packets counted by the DROP rules (as we wrote them) of `chains`."""
    total = 0
    for chain in chains:
        drop_hashes = {r.hash for r in applied.get(chain, []) if r.body.endswith("-j DROP")}
        total += sum(r.packets for r in state.chains.get(chain, []) if r.hash in drop_hashes)
    return total


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
