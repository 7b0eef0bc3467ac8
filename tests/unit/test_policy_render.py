from __future__ import annotations

from policy import names
from policy.calc import calculate
from policy.dataplane.iptables import diff, parse_save, restore_script
from policy.render import RenderOptions, hash_rules, render
from tests.unit.test_policy_calc import POLICIES, world


def test_name_lengths():
    calc = calculate(world(100, POLICIES, 10))
    ruleset = render(calc)
    assert all(c.startswith("rtd") and len(c) <= names.MAX_CHAIN for c in ruleset.chains)
    assert all(s.startswith("rtd") and len(s) <= names.MAX_IPSET for s in calc.ipsets)


def test_hashes_deterministic_and_chained():
    a = render(calculate(world(100, POLICIES, 10)))
    b = render(calculate(world(100, POLICIES, 10)))
    assert a.chains == b.chains and a.hooks == b.hooks
    r1 = hash_rules("rtd-x", ["-j ACCEPT", "-j DROP"])
    r2 = hash_rules("rtd-x", ["-j RETURN", "-j DROP"])
    assert r1[1].hash != r2[1].hash  # depends on the previous rule
    assert hash_rules("rtd-y", ["-j ACCEPT"])[0].hash != r1[0].hash  # and on the chain


def test_fail_closed_dispatch_and_anti_spoofing():
    ruleset = render(calculate(world(10, POLICIES, 2)))
    assert ruleset.chains[names.CHAIN_FROM_DISPATCH][-1].body == "-i rtd+ -j DROP"
    assert ruleset.chains[names.CHAIN_TO_DISPATCH][-1].body == "-o rtd+ -j DROP"
    fw = [c for c in ruleset.chains if c.startswith("rtd-fw-")][0]
    assert any(r.body.startswith("! -s ") and r.body.endswith("-j DROP") for r in ruleset.chains[fw])


def test_deny_log_rules():
    ruleset = render(calculate(world(10, POLICIES, 2)), RenderOptions(deny_log=True, nflog_group=7))
    text = " ".join(r.body for rules in ruleset.chains.values() for r in rules)
    assert "--nflog-group 7" in text and "DENY-I" in text
    ruleset = render(calculate(world(10, POLICIES, 2)), RenderOptions(deny_log=True, log_mode="log"))
    assert any("--log-prefix" in r.body for rules in ruleset.chains.values() for r in rules)


def _as_saved(ruleset) -> str:
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [f":{c} - [0:0]" for c in ruleset.chains]
    for b, hook in ruleset.hooks.items():
        lines.append(hook.line(b))
    for c, rules in ruleset.chains.items():
        lines += [r.line(c) for r in rules]
    return "\n".join([*lines, "COMMIT"])


def test_diff_only_touches_changed_rules():
    old = render(calculate(world(10, POLICIES, 3)))
    assert diff(old, parse_save(_as_saved(old))) == []
    new = render(calculate(world(10, POLICIES[:1], 3)))
    ops = diff(new, parse_save(_as_saved(old)))
    assert ops and all(op.chain not in (names.CHAIN_FORWARD, names.CHAIN_INPUT) for op in ops)
    script = restore_script(ops)
    assert script.startswith("*filter") and script.rstrip().endswith("COMMIT")
    assert "-X " in script  # the removed policy's chain is deleted


def test_sweep_foreign_builtin_rules_untouched():
    saved = "*filter\n:FORWARD ACCEPT [0:0]\n:rtd-old - [0:0]\n-A FORWARD -s 1.1.1.1/32 -j ACCEPT\n" \
            "-A FORWARD -m comment --comment \"rtd:zz\" -j rtd-old\nCOMMIT\n"
    ops = diff(render(calculate(world(5, POLICIES, 1))), parse_save(saved))
    deletes = [op for op in ops if op.kind == "delete" and op.chain == "FORWARD"]
    assert [op.position for op in deletes] == [2]
    assert any(op.kind == "delete_chain" and op.chain == "rtd-old" for op in ops)
