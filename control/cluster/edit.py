"""Cluster stage: a version that changes only allow rules, made from the version in force
and the rules that changed, at the cost of those rules. Pure.

An agent that knows which keys changed since the version it enforces (cluster.follow
counts them) need not read the whole policy again: when they are all allow rules,
those rules alone are checked, in a document of the header, the overlays and
them (so their errors are located at their keys as a full read's are), and
spliced into the rules in force at their keys' places.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from .. import pipeline
from ..errors import PolicyError
from ..ir.compiler import RuleEdit
from ..policy.check import Networks
from ..policy.model import AllowRule, Policy
from .layout import Layout, document, located


@dataclass(frozen=True)
class Spliced:
    """The version after a change of rules, and where the change was, as the compiler
    takes it (Compiler.update's hint)."""

    policy: Policy
    rule_keys: list[str]  # the key of each of policy.rules
    edit: RuleEdit


def rules_only(layout: Layout, changed: Collection[str]) -> bool:
    under = layout.item("allow", "")
    return all(key.startswith(under) for key in changed)


def frame(layout: Layout, items: Mapping[str, str]) -> dict[str, str]:
    """The items every rule is checked against: the header and the overlays."""
    header, overlays = layout.header, layout.item("overlays", "")
    return {k: t for k, t in items.items() if k == header or k.startswith(overlays)}


def edit(layout: Layout, policy: Policy, rule_keys: list[str], framing: Mapping[str, str],
         items: Mapping[str, str], changed: Collection[str], path: str,
         networks: Networks | None = None) -> Spliced:
    """`policy` (its rules at `rule_keys`, checked against `framing`: `frame` of the
    items it was read from) with the allow rules of `changed` keys as `items` now has
    them: checked (PolicyError, located by line_keys), then spliced."""
    present = sorted(k for k in changed if k in items)
    text, line_keys = document(layout, {**framing, **{k: items[k] for k in present}})
    try:
        checked = pipeline.parse_policy(text, path, networks)
    except PolicyError as err:
        raise PolicyError(located(err.diagnostics, line_keys)) from err
    fresh: dict[str, AllowRule] = dict(zip(present, checked.rules, strict=True))

    keys = list(rule_keys)
    rules = list(policy.rules)
    removed = []
    for key in sorted((k for k in changed if _at(keys, k) is not None), reverse=True):
        index = _at(keys, key)
        assert index is not None
        removed.append(index)
        del keys[index], rules[index]
    for key in present:
        index = bisect.bisect_left(keys, key)
        keys.insert(index, key)
        rules.insert(index, fresh[key])
    added = [bisect.bisect_left(keys, key) for key in present]
    return Spliced(dataclasses.replace(policy, rules=tuple(rules)), keys,
                   RuleEdit(tuple(sorted(removed)), tuple(added)))


def _at(keys: list[str], key: str) -> int | None:
    index = bisect.bisect_left(keys, key)
    return index if index < len(keys) and keys[index] == key else None
