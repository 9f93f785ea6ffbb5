"""Backends stage, shared floor: per-rule counts that survive policy updates: pure arithmetic, no kernel.

An update restarts some of a backend's counters (eBPF: the new generation
counts in a zeroed slot; iptables: our rules are rewritten, and the sets that
changed refilled). What a rule had counted by then is carried into the record
of the new policy, under the name the same rule has there (the same identity,
ir.rule_identities), and `status` reports live + carried. So a rule that stays
never counts less than before; a rule that goes takes its count with it, and
a new rule starts at 0.

Used by both backends' status and updates; reads only `ir.tables.rule_identities`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..ir.tables import rule_identities

Count = tuple[int, int]  # packets, bytes
# Rule name in the policy in force -> [packets, bytes] counted before its counters
# restarted (JSON in the state record, hence lists). Rules that carry nothing are left out.
Carried = dict[str, list[int]]


def totals(live: Mapping[str, Count], carried: Mapping[str, Sequence[int]]) -> dict[str, Count]:
    """Rule name -> what it counted in all: its live counters plus what it carries."""
    found = dict(live)
    for name, (packets, nbytes) in carried.items():
        now = found.get(name, (0, 0))
        found[name] = (now[0] + packets, now[1] + nbytes)
    return found


def carry(before: Mapping[str, Count], old_rules: Sequence[tuple[str, str]],
          new_rules: Sequence[tuple[str, str]], kept: Mapping[str, Count] | None = None) -> Carried:
    """What each of `new_rules` carries once an update replaced `old_rules`, both
    (name, text) in rule order.

    `before`: each old rule's total (live + carried) when its counters were
    replaced, by old name; rules it leaves out carry nothing. `kept`: what the
    kernel goes on counting through the update, by the name it counts under
    afterwards (iptables: elements of sets the update left alone; it may be
    negative for a count derived by subtraction). It is not carried again: a
    rule's live counters will show it.
    """
    # Only rules of a counted rule's text can be it (ir.rule_identities): of a 100k-rule
    # policy, the identities of those alone are worth making.
    texts = {text for name, text in old_rules if name in before}
    by_identity = {identity: before[name] for name, identity
                   in rule_identities(r for r in old_rules if r[1] in texts).items()
                   if name in before}
    kept = kept or {}
    carried: Carried = {}
    for name, identity in rule_identities(r for r in new_rules if r[1] in texts).items():
        if identity not in by_identity:
            continue
        had, staying = by_identity[identity], kept.get(name, (0, 0))
        # Never below 0: counts the kernel kept under a name that now means another
        # rule (two rules alike enough to have the same set elements) stay where they are.
        packets, nbytes = max(0, had[0] - staying[0]), max(0, had[1] - staying[1])
        if packets or nbytes:
            carried[name] = [packets, nbytes]
    return carried


def report(rules: Iterable[tuple[str, str]], live: Mapping[str, Count],
           carried: Mapping[str, Sequence[int]]) -> list[dict[str, Any]]:
    """The counters `status` shows for these (name, text) rules, in order: each
    rule's live count plus what it carries, and its identity (metrics label it)."""
    listed = list(rules)
    identities = rule_identities(listed)
    counted = totals(live, carried)
    return [{"rule": name, "text": text, "identity": identities[name],
             "packets": counted.get(name, (0, 0))[0], "bytes": counted.get(name, (0, 0))[1]}
            for name, text in listed]
