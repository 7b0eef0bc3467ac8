from __future__ import annotations

import pytest

from policy.selectors import SelectorError, parse_selector


def test_empty_selects_everything():
    assert parse_selector({}).matches({}) and parse_selector(None).matches({"a": "b"})
    assert parse_selector({}).is_empty


def test_match_labels_and_expressions():
    sel = parse_selector({
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["fe", "be"]},
            {"key": "env", "operator": "NotIn", "values": ["dev"]},
            {"key": "team", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"},
        ],
    })
    base = {"app": "web", "tier": "fe", "team": "x"}
    assert sel.matches(base)
    assert sel.matches({**base, "env": "prod"})
    assert not sel.matches({**base, "env": "dev"})
    assert not sel.matches({**base, "legacy": "1"})
    assert not sel.matches({k: v for k, v in base.items() if k != "team"})
    assert not sel.matches({**base, "tier": "db"})
    assert not sel.matches({**base, "app": "db"})


def test_notin_matches_missing_key():
    assert parse_selector({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["x"]}]}).matches({})


def test_canonical_is_order_independent():
    a = parse_selector({"matchLabels": {"a": "1", "b": "2"}})
    b = parse_selector({"matchExpressions": [{"key": "b", "operator": "In", "values": ["2"]}],
                        "matchLabels": {"a": "1"}})
    assert a == b and a.canonical() == b.canonical()


@pytest.mark.parametrize("bad,fragment", [
    ({"matchExpressions": [{"key": "a", "operator": "Like", "values": ["x"]}]}, "unknown operator"),
    ({"matchExpressions": [{"key": "a", "operator": "In"}]}, "at least one value"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}, "takes no values"),
    ({"matchLabels": {"bad key!": "x"}}, "invalid label key"),
    ({"matchLabels": {"a": "-bad"}}, "invalid label value"),
    ({"matchLabels": ["a"]}, "must be a mapping"),
    ({"foo": {}}, "unknown field"),
    ("app=web", "must be a mapping"),
])
def test_invalid_selectors(bad, fragment):
    with pytest.raises(SelectorError, match=fragment):
        parse_selector(bad)
