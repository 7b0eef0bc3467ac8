"""Kubernetes label selectors (matchLabels + matchExpressions), parsed once, matched many times.

Pure: no I/O. An empty selector ({}) selects everything; `None` (absent) is handled by the callers,
because its meaning depends on where it appears.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from routed.errors import Code, RoutedError

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY_RE = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE_RE = re.compile(rf"^({_NAME})?$")


class SelectorError(RoutedError, ValueError):
    """A selector that Kubernetes would reject; the message says which part and why."""

    code = Code.POLICY_INVALID


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # one of OPERATORS
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist

    def canonical(self) -> str:
        return f"{self.key} {self.operator} ({','.join(self.values)})"


@dataclass(frozen=True)
class Selector:
    """A parsed label selector; requirements are sorted so equal selectors compare and hash equal."""

    requirements: tuple[Requirement, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def canonical(self) -> str:
        """A stable text form: the identity of ipsets built from this selector."""
        return "&".join(r.canonical() for r in self.requirements) or "all()"


def _check_key(key: object, where: str) -> str:
    if not isinstance(key, str) or not key:
        raise SelectorError(f"{where}: label key must be a non-empty string, got {key!r}")
    if not _KEY_RE.match(key):
        raise SelectorError(f"{where}: invalid label key {key!r}")
    return key


def _check_value(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise SelectorError(f"{where}: label value must be a string, got {value!r}")
    if len(value) > 63 or not _VALUE_RE.match(value):
        raise SelectorError(f"{where}: invalid label value {value!r}")
    return value


def parse_selector(obj: Any, where: str = "selector") -> Selector:
    """Parse a LabelSelector dict. `None` or {} gives the empty selector (everything)."""
    if obj is None:
        return Selector()
    if not isinstance(obj, Mapping):
        raise SelectorError(f"{where}: must be a mapping, got {type(obj).__name__}")
    unknown = set(obj) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise SelectorError(f"{where}: unknown field(s) {sorted(unknown)}")
    reqs: set[Requirement] = set()
    match_labels = obj.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        raise SelectorError(f"{where}.matchLabels: must be a mapping")
    for key, value in match_labels.items():
        k = _check_key(key, f"{where}.matchLabels")
        v = _check_value(value, f"{where}.matchLabels[{key}]")
        reqs.add(Requirement(k, "In", (v,)))
    exprs = obj.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise SelectorError(f"{where}.matchExpressions: must be a list")
    for i, expr in enumerate(exprs):
        here = f"{where}.matchExpressions[{i}]"
        if not isinstance(expr, Mapping):
            raise SelectorError(f"{here}: must be a mapping")
        key = _check_key(expr.get("key"), here)
        op = expr.get("operator")
        if op not in OPERATORS:
            raise SelectorError(f"{here}: unknown operator {op!r} (want one of {', '.join(OPERATORS)})")
        values = expr.get("values") or []
        if not isinstance(values, list):
            raise SelectorError(f"{here}: values must be a list")
        if op in ("In", "NotIn") and not values:
            raise SelectorError(f"{here}: operator {op} needs at least one value")
        if op in ("Exists", "DoesNotExist") and values:
            raise SelectorError(f"{here}: operator {op} takes no values")
        vals = tuple(sorted({_check_value(v, f"{here}.values") for v in values}))
        reqs.add(Requirement(key, op, vals))
    return Selector(tuple(sorted(reqs, key=lambda r: (r.key, r.operator, r.values))))


def selector_from_labels(labels: Mapping[str, str]) -> Selector:
    """Equality selector: convenience for tests and callers building selectors in code."""
    return parse_selector({"matchLabels": dict(labels)})
