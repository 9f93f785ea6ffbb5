"""Rule identity and the counts an update carries: who is the same rule, and what it keeps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.core import Metric

from isoebpf import pipeline
from isoebpf.backends import counts
from isoebpf.backends.iptables import backend as iptables_backend
from isoebpf.backends.iptables.layout import FULL, Layout, build
from isoebpf.backends.iptables.saved import Element, SavedSet
from isoebpf.ir.tables import IR, rule_identities
from isoebpf.service.agent import Stats
from isoebpf.service.metrics import StatusCollector

POLICY = """\
version: 1
overlays:
  it: {subnets: [10.250.0.0/16]}
  hr: {subnets: [192.168.0.0/16]}
  lab: {subnets: [172.20.0.0/16], isolated: true}
exceptions:
  - {from: 10.250.7.0/24, to: 192.168.9.0/24}
allow:
  - {from: hr, to: it, ports: [tcp/80]}
  - {from: it, to: lab, ports: [udp/53]}
"""
RULE_ABOVE = "  - {from: lab, to: hr, ports: [tcp/22]}\n"
FIRST_ALLOW = "  - {from: hr, to: it, ports: [tcp/80]}\n"


def named(text: str) -> list[tuple[str, str]]:
    """The (name, text) rules a policy compiles to, in rule order."""
    return [(r.name, r.text) for r in pipeline.loads(text).ir.rules]


def with_rule_above(text: str) -> str:
    return text.replace("allow:\n", "allow:\n" + RULE_ABOVE)


def test_identities_name_what_each_rule_is() -> None:
    assert rule_identities(named(POLICY)) == {
        "unfiltered": "unfiltered", "established": "established", "default": "default",
        "fragment": "fragment", "malformed": "malformed",
        "exception:0": "exception 10.250.7.0/24 -> 192.168.9.0/24 unfiltered",
        "hairpin:it": "hairpin it", "hairpin:hr": "hairpin hr",
        "allow:0": "allow hr -> it tcp/80", "allow:1": "allow it -> lab udp/53",
    }


def test_inserting_a_rule_renames_the_others_but_keeps_their_identity() -> None:
    before = rule_identities(named(POLICY))
    after = rule_identities(named(with_rule_above(POLICY)))
    assert after["allow:1"] == before["allow:0"] and after["allow:2"] == before["allow:1"]
    assert set(after.values()) - set(before.values()) == {"allow lab -> hr tcp/22"}


def test_equal_rules_are_told_apart_by_occurrence() -> None:
    twice = POLICY.replace(FIRST_ALLOW, FIRST_ALLOW * 2)
    identities = rule_identities(named(twice))
    assert identities["allow:0"] == "allow hr -> it tcp/80"
    assert identities["allow:1"] == "allow hr -> it tcp/80 #2"
    # A rule of another text between them changes neither.
    between = POLICY.replace(FIRST_ALLOW, FIRST_ALLOW + RULE_ABOVE + FIRST_ALLOW)
    assert rule_identities(named(between))["allow:2"] == "allow hr -> it tcp/80 #2"
    # An exception and an allow rule are never the same rule, whatever their texts.
    assert rule_identities([("exception:0", "x"), ("allow:0", "x")]) == {
        "exception:0": "exception x", "allow:0": "allow x"}


def test_identities_of_the_rules_of_some_texts_are_theirs_among_all() -> None:
    """What lets counts.carry look at the rules of counted texts alone."""
    rules = named(with_rule_above(POLICY.replace(FIRST_ALLOW, FIRST_ALLOW * 3)))
    every = rule_identities(rules)
    for text in {text for _, text in rules}:
        alone = rule_identities([rule for rule in rules if rule[1] == text])
        assert alone == {name: every[name] for name in alone}, text


def test_a_rule_inserted_above_carries_nothing_and_the_others_keep_their_counts() -> None:
    old, new = named(POLICY), named(with_rule_above(POLICY))
    before = {"allow:0": (5, 500), "allow:1": (2, 200), "default": (9, 900)}
    assert counts.carry(before, old, new) == {"allow:1": [5, 500], "allow:2": [2, 200],
                                              "default": [9, 900]}


def test_a_removed_rule_takes_its_count_with_it() -> None:
    old = named(POLICY)
    new = named(POLICY.replace(FIRST_ALLOW, ""))
    carried = counts.carry({"allow:0": (5, 500), "allow:1": (2, 200)}, old, new)
    assert carried == {"allow:0": [2, 200]}, "it -> lab is allow:0 now; hr -> it is gone"


def test_reordered_rules_keep_their_own_counts() -> None:
    second = "  - {from: it, to: lab, ports: [udp/53]}\n"
    swapped = POLICY.replace(FIRST_ALLOW + second, second + FIRST_ALLOW)
    carried = counts.carry({"allow:0": (5, 500), "allow:1": (2, 200)}, named(POLICY),
                           named(swapped))
    assert carried == {"allow:0": [2, 200], "allow:1": [5, 500]}


def test_equal_rules_keep_their_counts_in_order() -> None:
    twice = POLICY.replace(FIRST_ALLOW, FIRST_ALLOW * 2)
    carried = counts.carry({"allow:0": (5, 500), "allow:1": (7, 700)}, named(twice),
                           named(with_rule_above(twice)))
    assert carried == {"allow:1": [5, 500], "allow:2": [7, 700]}


def test_an_edited_rule_is_another_rule() -> None:
    edited = POLICY.replace("tcp/80]", "tcp/80, tcp/443]")
    assert counts.carry({"allow:0": (5, 500)}, named(POLICY), named(edited)) == {}


def test_what_the_kernel_keeps_is_not_carried_again() -> None:
    old, new = named(POLICY), named(with_rule_above(POLICY))
    # iptables: allow:0's elements in an unchanged set keep 3 packets, under its new name;
    # `unfiltered` is derived by subtracting them, so it "keeps" less than nothing.
    before = {"allow:0": (5, 500), "unfiltered": (4, 400)}
    kept = {"allow:1": (3, 300), "unfiltered": (-1, -100)}
    assert counts.carry(before, old, new, kept) == {"allow:1": [2, 200], "unfiltered": [5, 500]}
    # Derived as 0, kept below 0: carried is what makes the total 0 again.
    assert counts.carry({"unfiltered": (0, 0)}, old, new, {"unfiltered": (-1, -100)}) == {
        "unfiltered": [1, 100]}
    # Kept beyond its total under a name that now means another rule: that rule carries 0.
    assert counts.carry({"allow:0": (5, 500)}, old, new, {"allow:1": (6, 600)}) == {}


def test_status_reports_live_plus_carried_with_identities() -> None:
    rules = named(POLICY)
    counters = counts.report(rules, {"allow:0": (1, 100), "default": (2, 200)},
                             {"allow:0": [5, 500], "allow:1": [3, 300]})
    by_name = {c["rule"]: c for c in counters}
    assert [c["rule"] for c in counters] == [name for name, _ in rules]
    assert by_name["allow:0"] == {"rule": "allow:0", "text": "hr -> it tcp/80",
                                  "identity": "allow hr -> it tcp/80", "packets": 6, "bytes": 600}
    assert (by_name["allow:1"]["packets"], by_name["default"]["packets"]) == (3, 2)
    assert by_name["established"]["packets"] == 0


def samples(metric: Metric) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.values()): s.value for s in metric.samples if s.name.endswith("_total")}


def test_rule_metrics_are_labelled_with_the_identity() -> None:
    record = {"counters": counts.report(named(with_rule_above(POLICY)), {}, {"allow:1": [5, 500]})}
    collected = {m.name: m for m in StatusCollector(lambda: record, Stats(), lambda: "deny").collect()}
    packets = samples(collected["isoebpf_rule_packets"])
    assert packets[("allow:1", "allow hr -> it tcp/80")] == 5
    assert samples(collected["isoebpf_rule_bytes"])[("allow:1", "allow hr -> it tcp/80")] == 500
    assert "identity" in collected["isoebpf_rule_packets"].documentation


def test_cluster_metrics_say_whether_etcd_answers_and_the_version_in_force() -> None:
    def collected(stats: Stats) -> dict[str, Any]:
        return {m.name: m for m in StatusCollector(lambda: {}, stats, lambda: "deny").collect()}

    assert "isoebpf_etcd_connected" not in collected(Stats())  # a file agent: no cluster
    cut_off = collected(Stats(etcd_connected=False, cluster_version=7))
    assert cut_off["isoebpf_etcd_connected"].samples[0].value == 0
    assert cut_off["isoebpf_cluster_version"].samples[0].value == 7
    assert collected(Stats(etcd_connected=True))["isoebpf_etcd_connected"].samples[0].value == 1


# -- the iptables backend's carry, in the full layout (the kernel here may lack its set types) --

def in_force(layout: Layout, packets: dict[str, int]) -> iptables_backend._State:
    """The kernel holding `layout`, where the first rule line or set element named after
    each rule in `packets` counted that many packets (of 1 byte each), and nothing else."""
    left = dict(packets)

    def counted(name: str | None) -> tuple[int, int]:
        count = left.pop(name, 0) if name else 0
        return count, count

    families = {}
    for version, rules in layout.families.items():
        forward = [(i, spec, *counted(iptables_backend._tag(spec)))
                   for i, spec in enumerate(rules.forward, start=1)]
        chain = [(spec, *counted(iptables_backend._tag(spec))) for spec in rules.chain]
        families[version] = iptables_backend._Family({"FORWARD": forward}, {layout.chain: chain})
    sets = {s.name: SavedSet(s.name, s.type, s.version, 0, elements=[
        Element(tuple(element.split(",")), note, 0, *counted(note)) for element, note in s.elements])
        for s in layout.sets}
    return iptables_backend._State(families, sets)


def shown(state: iptables_backend._State, layout: Layout, ir: IR,
          carried: Mapping[str, Sequence[int]]) -> dict[str, counts.Count]:
    """Rule name -> what status shows with `state` in the kernel."""
    live = iptables_backend._counted(state.families.values(), layout.chain, state.sets.values(),
                                     layout.kind, [r.name for r in ir.rules])
    return counts.totals(live, carried)


def test_iptables_carries_what_the_update_resets_and_not_what_kept_sets_still_count() -> None:
    with_exception = POLICY.replace("  - {from: 10.250.7.0/24, to: 192.168.9.0/24}\n",
                                    "  - {from: 10.250.7.0/24, to: 192.168.9.0/24}\n"
                                    "  - {from: 10.250.2.0/24, to: hr}\n")
    old_ir, new_ir = (pipeline.loads(t).ir
                      for t in (with_exception, with_rule_above(with_exception)))
    old_layout, new_layout = build(old_ir), build(new_ir)
    assert old_layout.kind == FULL
    # 20 packets reached our rules, 5 of them an exception's (which skips the jump).
    before = in_force(old_layout, {"forwarded": 20, "jump": 12, "exception:1": 5,
                                   "established": 4, "allow:0": 3})
    mine = {"sets": [s.name for s in old_layout.sets], "chain": old_layout.chain,
            "iptables_layout": old_layout.kind, "rules": [[r.id, r.name, r.text] for r in old_ir.rules],
            "carried": {"allow:0": [10, 10]}}
    refilled = {s.name for s in new_layout.sets
                if not iptables_backend._same_set(s, before.sets.get(s.name))}
    assert "dcos-overlay-exceptions" not in refilled and "dcos-allowed-ports" in refilled
    carried = iptables_backend._carried(mine, before, new_layout, new_ir, refilled)
    assert "exception:1" not in carried, "its element keeps counting"
    # After the update: rules and refilled sets at 0, the exceptions set as it was.
    fresh = in_force(new_layout, {})
    after = iptables_backend._State(fresh.families, {
        name: s if name in refilled else before.sets[name] for name, s in fresh.sets.items()})
    old_shown, new_shown = shown(before, old_layout, old_ir, mine["carried"]), shown(
        after, new_layout, new_ir, carried)
    assert new_shown["allow:1"] == old_shown["allow:0"] == (13, 13)
    for name in ("exception:1", "unfiltered", "established"):
        assert new_shown[name] == old_shown[name], name
    assert new_shown["unfiltered"] == (3, 3)
