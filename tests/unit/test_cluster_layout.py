"""The cluster's layout in etcd: a push writes what differs and no more, keys keep file
order, the stored items make the policy again, and the items hash follows each write."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isoebpf import pipeline
from isoebpf.cluster import edit
from isoebpf.cluster import layout as laid
from isoebpf.cluster.layout import ItemsHash, Layout, Plan, spread
from isoebpf.cluster.store import canonical_policy
from isoebpf.errors import PolicyError
from isoebpf.ir.compiler import compile_policy, digest_of
from isoebpf.policy import parse
from isoebpf.policy.model import Policy
from tests.policygen import random_policy

LAYOUT = Layout()
BASE = """\
version: 1
default: deny
overlays:
  it: {subnets: [10.250.0.0/16]}
  hr: {subnets: [192.168.0.0/16, "fd00:4852::/48"]}
  lab: {subnets: [172.20.0.0/16], isolated: true}
exceptions:
  - {from: 10.250.7.0/24, to: 192.168.9.0/24}
allow:
"""
RULES = [f"  - {{from: hr, to: it, ports: [tcp/{port}]}}" for port in range(80, 90)]


def policy(rules: list[str], base: str = BASE) -> Policy:
    return parse.loads(base + "\n".join(rules) + "\n", "p.yaml")


def written(stored: dict[str, str], plan: Plan) -> dict[str, str]:
    after = {**stored, **plan.puts}
    for key in plan.deletes:
        del after[key]
    return after


def rule_keys(stored: dict[str, str]) -> list[str]:
    return sorted(k for k in stored if k.startswith(LAYOUT.item("allow", "")))


def test_positions_sort_as_placed_and_leave_room_everywhere() -> None:
    first = spread("", None, 5)
    assert first == sorted(first) and len(set(first)) == 5
    for low, high in [("", first[0]), (first[1], first[2]), (first[-1], None), ("5", "51"), ("5", "500001")]:
        between = spread(low, high, 3)
        assert low < between[0] < between[1] < between[2] and (high is None or between[2] < high)
        assert all(p and not p.endswith("0") for p in between)


@given(st.lists(st.integers(min_value=0), min_size=1, max_size=60))
@settings(max_examples=200, deadline=None)
def test_inserting_anywhere_keeps_the_order(choices: list[int]) -> None:
    order = spread("", None, 2)
    for choice in choices:
        at = choice % (len(order) + 1)
        low = order[at - 1] if at else ""
        high = order[at] if at < len(order) else None
        order.insert(at, spread(low, high, 1)[0])
    assert order == sorted(order) and len(set(order)) == len(order)


def test_a_first_push_writes_every_item_and_a_second_nothing() -> None:
    first = laid.plan(LAYOUT, {}, policy(RULES))
    assert len(first.puts) == 1 + 3 + 1 + len(RULES) and not first.deletes
    assert first.counts["allow"] == (len(RULES), 0, 0)
    again = laid.plan(LAYOUT, written({}, first), policy(RULES))
    assert not again and again.summary() == "no change"


@pytest.mark.parametrize(("change", "puts", "deletes"), [
    (lambda r: [*r[:4], "  - {from: hr, to: it, ports: [tcp/8080]}", *r[5:]], 1, 0),  # one rule changed
    (lambda r: [*r[:4], "  - {from: it, to: hr}", *r[4:]], 1, 0),  # one inserted
    (lambda r: [*r[:4], *r[5:]], 0, 1),  # one removed
    (lambda r: [*r, "  - {from: it, to: lab, ports: [icmp]}"], 1, 0),  # one appended
    (lambda r: ["  - {from: it, to: lab, ports: [icmp]}", *r], 1, 0),  # one prepended
])
def test_a_one_rule_change_writes_one_key(change: Callable[[list[str]], list[str]], puts: int,
                                          deletes: int) -> None:
    stored = written({}, laid.plan(LAYOUT, {}, policy(RULES)))
    plan = laid.plan(LAYOUT, stored, policy(change(RULES)))
    assert (len(plan.puts), len(plan.deletes)) == (puts, deletes)
    after = written(stored, plan)
    order = [after[k] for k in rule_keys(after)]
    assert order == [laid.canonical(v) for v in laid.parts(policy(change(RULES))).allow]


def test_an_overlay_change_writes_that_overlay_only() -> None:
    stored = written({}, laid.plan(LAYOUT, {}, policy(RULES)))
    plan = laid.plan(LAYOUT, stored, policy(RULES, BASE.replace("isolated: true", "isolated: false")))
    assert list(plan.puts) == [LAYOUT.item("overlays", "lab")] and not plan.deletes


def test_the_stored_items_make_the_policy_again_with_its_digest() -> None:
    wanted = policy(RULES)
    stored = written({}, laid.plan(LAYOUT, {}, wanted))
    text, line_keys = laid.document(LAYOUT, stored)
    again = pipeline.parse_policy(text, "etcd:/isoebpf/")
    assert compile_policy(again).digest == digest_of(canonical_policy(wanted))
    assert len(line_keys) == text.count("\n")
    assert {k for k in line_keys if k} == set(stored)


@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=0, max_value=2**32))
@settings(max_examples=60, deadline=None)
def test_any_policy_pushed_over_any_other_reads_back_as_itself(seed_a: int, seed_b: int) -> None:
    a = parse.loads(random_policy(random.Random(seed_a)).text, "a.yaml")
    b = parse.loads(random_policy(random.Random(seed_b)).text, "b.yaml")
    stored = written({}, laid.plan(LAYOUT, {}, a))
    plan = laid.plan(LAYOUT, stored, b)
    after = written(stored, plan)
    text, _ = laid.document(LAYOUT, after)
    again = pipeline.parse_policy(text, "etcd")
    assert digest_of(again) == digest_of(canonical_policy(b))
    assert not laid.plan(LAYOUT, after, b)
    # The hash an agent keeps by following the writes is the hash of the items.
    followed = ItemsHash(stored.items())
    for key, text in plan.puts.items():
        followed.put(key, text, stored.get(key))
    for key in plan.deletes:
        followed.delete(key, stored[key])
    assert followed.hex() == ItemsHash(after.items()).hex()


def test_a_bad_item_is_refused_at_its_key() -> None:
    stored = written({}, laid.plan(LAYOUT, {}, policy(RULES)))
    bad = rule_keys(stored)[3]
    stored[bad] = laid.canonical({"from": "hr", "to": "10.250.1.5/16"})
    text, line_keys = laid.document(LAYOUT, stored)
    with pytest.raises(PolicyError) as refused:
        pipeline.parse_policy(text, "etcd")
    said = [str(d) for d in laid.located(refused.value.diagnostics, line_keys)]
    assert said and all(s.startswith(f"etcd:{bad}:1:") for s in said), said


def test_items_that_are_no_policy_are_said_so() -> None:
    with pytest.raises(laid.NotAPolicy, match="no policy stored"):
        laid.document(LAYOUT, {})
    with pytest.raises(laid.NotAPolicy, match="does not hold JSON"):
        laid.document(LAYOUT, {LAYOUT.header: "{}", LAYOUT.item("allow", "5"): "{nope"})


def test_a_prefix_must_be_a_directory() -> None:
    with pytest.raises(ValueError):
        Layout("isoebpf")
    assert Layout("/c2/").node_of("/c2/nodes/n1/alive") == ("n1", "alive")
    assert dataclasses.replace(LAYOUT).head == "/isoebpf/policy/head"


@given(st.lists(st.tuples(st.sampled_from(["insert", "delete", "change"]), st.integers(0, 50),
                          st.integers(1, 65535)), min_size=1, max_size=8))
@settings(max_examples=100, deadline=None)
def test_a_change_of_rules_alone_spliced_in_is_the_policy_read_whole(ops: list[tuple[str, int, int]]) -> None:
    rules = list(RULES)
    before = policy(rules)
    stored = written({}, laid.plan(LAYOUT, {}, before))
    for op, at, port in ops:
        at %= len(rules) + (op == "insert")
        if op == "insert":
            rules.insert(at, f"  - {{from: it, to: hr, ports: [udp/{port}]}}")
        elif rules and op == "delete":
            del rules[at % len(rules)]
        elif rules:
            rules[at % len(rules)] = f"  - {{from: hr, to: 10.250.{port % 256}.0/24}}"
    plan = laid.plan(LAYOUT, stored, policy(rules))
    after = written(stored, plan)
    made = edit.edit(LAYOUT, before, rule_keys(stored), edit.frame(LAYOUT, stored), after,
                     {*plan.puts, *plan.deletes}, "etcd")
    whole = pipeline.parse_policy(laid.document(LAYOUT, after)[0], "etcd")
    assert [(r.src.text, r.dst.text, r.ports) for r in made.policy.rules] == \
        [(r.src.text, r.dst.text, r.ports) for r in whole.rules]
    assert made.rule_keys == rule_keys(after)
    kept = [i for i in range(len(before.rules)) if i not in made.edit.removed]
    assert len(kept) + len(made.edit.added) == len(made.policy.rules)


def test_a_bad_rule_spliced_in_is_refused_at_its_key() -> None:
    before = policy(RULES)
    stored = written({}, laid.plan(LAYOUT, {}, before))
    key = rule_keys(stored)[2]
    after = {**stored, key: laid.canonical({"from": "hr", "to": "10.99.0.0/16"})}
    with pytest.raises(PolicyError) as refused:
        edit.edit(LAYOUT, before, rule_keys(stored), edit.frame(LAYOUT, stored), after, {key}, "etcd")
    assert all(str(d).startswith(f"etcd:{key}:1:") for d in refused.value.diagnostics)
