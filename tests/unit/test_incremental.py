"""Compiling a change: the same tables as compiling afresh, numbered as before, and a
delta that holds exactly what changed."""

from __future__ import annotations

import random
from typing import Any

import netaddr
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import policies
from isoebpf import pipeline
from isoebpf.backends.iptables.layout import NET, SET_TYPES, render
from isoebpf.ir.compiler import RANK_GAP, Compiler, Delta, Numbering, RuleEdit, compile_policy
from isoebpf.ir.evaluate import Classifier, decide
from isoebpf.ir.tables import IR
from isoebpf.policy import parse
from isoebpf.policy.model import Policy
from tests.policygen import random_first_packet, random_policy

Tables = dict[str, dict[Any, Any]]


def by_identity(ir: IR) -> dict[str, Any]:
    """What an IR says with its numbering taken out: classes by network, rules by name."""
    net = {c.class_id: str(c.network) for c in ir.classes}
    name = {r.id: r.name for r in ir.rules}
    overlay = {o.id: o.name for o in ir.overlays}
    return {
        "classes": sorted((str(c.network), overlay[c.overlay_id]) for c in ir.classes),
        "exceptions": sorted((net[e.src_class], net[e.dst_class], name[e.rule]) for e in ir.exceptions),
        "allowed": sorted((net[a.src_class], net[a.dst_class], a.proto, a.port, a.match_bits, name[a.rule])
                          for a in ir.allowed),
        "rules": [(r.name, r.text, r.line) for r in ir.rules],
        "overlays": [(o.name, o.isolated, name[o.hairpin_rule] if o.hairpin_rule else None)
                     for o in ir.overlays],
        "header": (ir.default_action, ir.deny_action, ir.timeouts, ir.interfaces, ir.digest),
    }


def tables(ir: IR) -> Tables:
    return {
        "classes": {(c.network.version, c.network.value, c.network.prefixlen): (c.class_id, c.overlay_id)
                    for c in ir.classes},
        "exceptions": {(e.src_class, e.dst_class): e.rule for e in ir.exceptions},
        "allowed": {(a.match_bits, a.src_class, a.dst_class, a.proto, a.port): a.rule for a in ir.allowed},
    }


def applied(before: Tables, delta: Delta) -> Tables:
    after = {name: dict(table) for name, table in before.items()}
    for name, deleted, written in (
            ("classes", delta.classes_deleted, delta.classes_written),
            ("exceptions", delta.exceptions_deleted, delta.exceptions_written),
            ("allowed", delta.allowed_deleted, delta.allowed_written)):
        for key in deleted:
            assert key in after[name], f"{name}: deleting {key}, which is not there"
            del after[name][key]
        after[name].update(written)
    return after


def endpoint(rng: random.Random, policy: Policy) -> str:
    overlay = rng.choice(policy.overlays)
    if rng.random() < 0.3:
        return overlay.name
    base = rng.choice(overlay.subnets)
    width = 32 if base.version == 4 else 128
    length = rng.randint(base.prefixlen, min(base.prefixlen + 10, width))
    offset = rng.getrandbits(length - base.prefixlen) << (width - length)
    return repr(str(netaddr.IPNetwork(f"{netaddr.IPAddress(base.first + offset, base.version)}/{length}")))


def edited(rng: random.Random, text: str, policy: Policy) -> str:
    """`text` with a few allow rules removed, repeated, added or moved; now and then an
    exception too (which compiles afresh)."""
    head, marker, rules = text.partition("allow:\n")
    lines = rules.splitlines() if marker else []
    for _ in range(rng.randint(1, 4)):
        pick = rng.random()
        if pick < 0.3 and lines:
            del lines[rng.randrange(len(lines))]
        elif pick < 0.4 and lines:
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(lines))
        elif pick < 0.45 and len(lines) > 1:
            lines.insert(rng.randrange(len(lines)), lines.pop())
        elif pick < 0.5:
            head = head.replace("version: 1\n", "version: 1\nexceptions:\n"
                                f"  - {{from: {endpoint(rng, policy)}, to: {endpoint(rng, policy)}}}\n")
            head = head.replace("\nexceptions:\n", "\n", 1) if head.count("exceptions:") > 1 else head
        else:
            ports = rng.choice(["", ", ports: [tcp/80]", ", ports: [udp/5000-5010, icmp]", ", ports: [any]",
                                f", ports: [tcp/{rng.randint(1, 65535)}]"])
            lines.insert(rng.randrange(len(lines) + 1),
                         f"  - {{from: {endpoint(rng, policy)}, to: {endpoint(rng, policy)}{ports}}}")
    return head + ("allow:\n" + "\n".join(lines) + "\n" if lines else "")


def test_changes_compile_to_what_compiling_afresh_gives_with_a_delta_of_what_changed() -> None:
    steps = 0

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        nonlocal steps
        generated = random_policy(rng)
        text = generated.text
        compiler = Compiler(parse.loads(text))
        for _ in range(5):
            before = tables(compiler.ir)
            text = edited(rng, text, compiler.policy)
            try:
                policy = parse.loads(text)
            except Exception:  # an edit the contract refuses (an overlapping exception end, say)
                continue
            delta = compiler.update(policy)
            fresh = compile_policy(policy)
            assert by_identity(compiler.ir) == by_identity(fresh), text
            if delta is not None:
                assert applied(before, delta) == tables(compiler.ir), text
                assert delta.numbering == Numbering.of(compiler.ir), text  # what the backend records
            classifier, reference = Classifier(compiler.ir), Classifier(fresh)
            for _ in range(20):
                pkt = random_first_packet(rng, generated)
                ours, theirs = decide(classifier, pkt), decide(reference, pkt)
                assert (ours.action, compiler.ir.rule(ours.rule).name) == \
                    (theirs.action, fresh.rule(theirs.rule).name), f"{pkt}\n{text}"
            steps += 1

    check()
    assert steps >= 300


def test_a_one_rule_change_touches_only_that_rules_entries() -> None:
    rules = 2000
    compiler = Compiler(pipeline.loads(policies.scaled_policy(rules)).policy)
    kept = {c.network: c.class_id for c in compiler.ir.classes}
    delta = compiler.update(parse.loads(policies.changed_policy(rules)))
    assert delta is not None
    assert (len(delta.allowed_written), len(delta.allowed_deleted)) == (1, 1)
    assert not (delta.classes_written or delta.classes_deleted or delta.exceptions_written)
    assert {c.network: c.class_id for c in compiler.ir.classes} == kept


def test_a_rule_inserted_first_renumbers_nothing_and_splits_only_its_classes() -> None:
    text = policies.scaled_policy(500)
    compiler = Compiler(parse.loads(text))
    rule_ids = {r.text: r.id for r in compiler.ir.rules}
    inserted = text.replace("allow:\n", "allow:\n  - {from: 10.100.200.7, to: 10.101.3.128/25, ports: [udp/53]}\n")
    delta = compiler.update(parse.loads(inserted))
    assert delta is not None
    assert sorted(str(compiler.nets[k]) for k in delta.classes_written) == ["10.100.200.7/32",
                                                                            "10.101.3.128/25"]
    assert not delta.classes_deleted and not delta.allowed_deleted
    # The /25 splits off 10.101.3.0/24, so the fillers allowing to that /24 allow to it
    # too: their entries for the new class, and the new rule's own.
    covering = sum(f.dst == "10.101.3.0/24" for f in policies.fillers(policies.filler_count(500)))
    assert covering == 2 and len(delta.allowed_written) == 1 + covering
    assert all(rule_ids[r.text] == r.id for r in compiler.ir.rules if r.text in rule_ids)
    back = compiler.update(parse.loads(text))
    assert back is not None and len(back.classes_deleted) == 2
    assert len(back.allowed_deleted) == 1 + covering and not back.allowed_written


def test_compiling_afresh_under_a_numbering_keeps_the_ids_of_what_stays() -> None:
    text = policies.scaled_policy(300)
    before = Compiler(parse.loads(text))
    changed = parse.loads(text.replace("allow:\n", "allow:\n  - {from: fa, to: fb, ports: [tcp/22]}\n")
                          .replace("exceptions:\n", "exceptions:\n  - {from: 10.100.0.1, to: fb}\n"))
    ir = compile_policy(changed, before.numbering())
    assert by_identity(ir) == by_identity(compile_policy(changed))
    kept = {c.network: c.class_id for c in before.ir.classes}
    assert all(kept[c.network] == c.class_id for c in ir.classes if c.network in kept)
    ids = {r.text: r.id for r in before.ir.rules if r.name.startswith("allow:")}
    assert all(ids[r.text] == r.id for r in ir.rules if r.text in ids and r.name.startswith("allow:"))


def test_the_iptables_layout_does_not_depend_on_the_numbering() -> None:
    """An IR compiled as a change (ids kept, so not in file order) renders as the same
    policy compiled afresh: lines in rule order, whatever the ids."""
    checked = 0

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        nonlocal checked
        text = random_policy(rng).text
        compiler = Compiler(parse.loads(text))
        for _ in range(3):
            text = edited(rng, text, compiler.policy)
            try:
                policy = parse.loads(text)
            except Exception:  # an edit the contract refuses
                continue
            compiler.update(policy)
            for set_types in (SET_TYPES, (NET,)):
                assert render(compiler.ir, set_types=set_types) == \
                    render(compile_policy(policy), set_types=set_types), text
            checked += 1

    check()
    assert checked >= 50


def edited_by_place(rng: random.Random, text: str, policy: Policy) -> tuple[str, RuleEdit]:
    """`text` with a few allow rules removed, added, repeated (a rule saying what another
    says) or changed in place (now and then in their ports alone), and the RuleEdit
    that says which."""
    head, marker, rules = text.partition("allow:\n")
    lines = rules.splitlines() if marker else []
    was: list[int | None] = list(range(len(lines)))  # each line's index before; None: added
    for _ in range(rng.randint(1, 4)):
        pick = rng.random()
        ports = rng.choice(["", ", ports: [tcp/80]", ", ports: [udp/5000-5010, icmp]", ", ports: [any]",
                            f", ports: [tcp/{rng.randint(1, 65535)}]"])
        if pick < 0.25 and lines:
            at = rng.randrange(len(lines))
            del lines[at], was[at]
        elif pick < 0.45 and lines:
            at = rng.randrange(len(lines) + 1)
            lines.insert(at, rng.choice(lines))
            was.insert(at, None)
        elif pick < 0.65 and lines:
            at = rng.randrange(len(lines))
            lines[at] = lines[at].split(", ports:")[0].rstrip("}") + ports + "}"
            was[at] = None
        else:
            at = rng.randrange(len(lines) + 1)
            lines.insert(at, f"  - {{from: {endpoint(rng, policy)}, to: {endpoint(rng, policy)}{ports}}}")
            was.insert(at, None)
    kept = {n for n in was if n is not None}
    edit = RuleEdit(tuple(n for n in range(len(policy.rules)) if n not in kept),
                    tuple(n for n, before in enumerate(was) if before is None))
    return head + ("allow:\n" + "\n".join(lines) + "\n" if lines else ""), edit


def test_changes_said_by_place_compile_to_what_compiling_afresh_under_their_numbering_gives() -> None:
    """Told which rules changed, the compiler reads no other rule: what it holds after
    any run of such changes (the IR read after some, not all) is the IR compiled
    afresh under its numbering, and the deltas add up to its tables."""
    checked = 0

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        nonlocal checked
        text = random_policy(rng).text
        compiler = Compiler(parse.loads(text))
        entries = tables(compiler.ir)
        for step in range(6):
            text, edit = edited_by_place(rng, text, compiler.policy)
            policy = parse.loads(text)
            delta = compiler.update(policy, edit)
            assert delta is not None
            entries = applied(entries, delta)
            assert len(delta.rules_new) == len(edit.added)
            if step < 5 and rng.random() < 0.5:
                continue  # read after the next change: the IR is made across two
            fresh = compile_policy(policy, compiler.numbering())
            assert compiler.ir == fresh and compiler.ir.digest == fresh.digest, text
            assert by_identity(compiler.ir) == by_identity(compile_policy(policy)), text
            assert entries == tables(compiler.ir), text
            assert delta.sizes["allowed"] == len(compiler.ir.allowed)
            checked += 1

    check()
    assert checked >= 250


def test_a_rule_kept_by_place_keeps_its_id_where_rules_of_its_text_come_and_go() -> None:
    text = policies.scaled_policy(50)
    twice = "  - {from: 10.100.0.1, to: 10.101.0.0/24, ports: [tcp/1000]}\n"
    compiler = Compiler(parse.loads(text.replace("allow:\n", "allow:\n" + twice + twice)))
    first, second = (r.id for r in compiler.ir.rules if r.name in ("allow:0", "allow:1"))
    delta = compiler.update(parse.loads(text.replace("allow:\n", "allow:\n" + twice)), RuleEdit((0,), ()))
    assert delta is not None and not delta.rules_new
    assert compiler.ir.rule(second).name == "allow:0" and first not in {r.id for r in compiler.ir.rules}
    # The text's first rule is now the one that was its second.
    assert compiler.numbering().rules["allow 10.100.0.1 -> 10.101.0.0/24 tcp/1000"] == second


def test_rules_inserted_at_one_place_again_and_again_keep_their_order() -> None:
    """Each insertion halves the gap between two ranks, until the rules are ranked afresh."""
    text = policies.scaled_policy(20)
    compiler = Compiler(parse.loads(text))
    head, _, rules = text.partition("allow:\n")
    lines = rules.splitlines()
    for n in range(RANK_GAP.bit_length() + 8):
        lines.insert(1, f"  - {{from: 10.100.0.{n + 1}, to: 10.101.7.0/24, ports: [tcp/{2000 + n}]}}")
        policy = parse.loads(head + "allow:\n" + "\n".join(lines) + "\n")
        assert compiler.update(policy, RuleEdit((), (1,))) is not None
    assert compiler.ir == compile_policy(policy, compiler.numbering())
    assert by_identity(compiler.ir) == by_identity(compile_policy(policy))


@pytest.mark.parametrize(("edit", "problem"), [
    (RuleEdit((), ()), "cannot make"),
    (RuleEdit((0,), (0, 0)), "not distinct"),
    (RuleEdit((5,), (5, 100)), "not distinct indexes below"),
    (RuleEdit((), (5,)), "is not the rule it keeps"),
])
def test_an_edit_that_visibly_does_not_fit_is_refused(edit: RuleEdit, problem: str) -> None:
    text = policies.scaled_policy(30)
    compiler = Compiler(parse.loads(text))
    changed = text.replace("allow:\n", "allow:\n  - {from: 10.100.0.9, to: 10.101.3.0/24, ports: [udp/53]}\n")
    before = compiler.ir
    with pytest.raises(ValueError, match=problem):
        compiler.update(parse.loads(changed), edit)
    assert compiler.ir is before, "a refused edit changes nothing"
