"""The compiler: deterministic tables, exact classes, first-match port entries, lints."""

from __future__ import annotations

import random

import pytest

from isoebpf import pipeline
from isoebpf.ir.compiler import compile_policy, port_prefixes
from isoebpf.ir.tables import PROTO_TCP, PROTO_UDP, RULE_DEFAULT
from isoebpf.policy import parse

SEED = """\
version: 1
default: deny
overlays:
  it: {subnets: [10.250.0.0/16]}
  hr: {subnets: [192.168.0.0/16, "fd00:4852::/48"]}
  lab: {subnets: [172.20.0.0/16], isolated: true}
exceptions:
  - {from: 10.250.7.0/24, to: 192.168.9.0/24}
allow:
  - {from: hr, to: it, ports: [tcp/80]}
  - {from: 192.168.5.0/24, to: 10.250.3.0/24}
  - {from: it, to: lab, ports: [udp/5000-5010, icmp, tcp/443]}
"""


@pytest.mark.parametrize(("low", "high"), [(1, 1), (1, 65535), (80, 80), (5000, 5010),
                                           (1024, 2047), (3, 65534), (65535, 65535)])
def test_port_prefixes_cover_the_range_exactly(low: int, high: int) -> None:
    covered: list[int] = []
    for port, bits in port_prefixes(low, high):
        size = 1 << (16 - bits)
        assert port % size == 0, "blocks are aligned"
        covered.extend(range(port, port + size))
    assert covered == list(range(low, high + 1))
    assert len(list(port_prefixes(low, high))) <= 30


def test_same_policy_same_digest_and_any_change_moves_it() -> None:
    first = pipeline.loads(SEED).ir
    again = pipeline.loads(SEED).ir
    assert first.digest == again.digest and len(first.digest) == 64
    changed = pipeline.loads(SEED.replace("tcp/80", "tcp/81")).ir
    assert changed.digest != first.digest


def test_classes_are_the_named_prefixes_and_rules_are_numbered_in_order() -> None:
    ir = pipeline.loads(SEED).ir
    assert [str(c.network) for c in ir.classes] == [
        "10.250.0.0/16", "10.250.3.0/24", "10.250.7.0/24", "172.20.0.0/16",
        "192.168.0.0/16", "192.168.5.0/24", "192.168.9.0/24", "fd00:4852::/48",
    ]
    names = [r.name for r in ir.rules if r.id >= 16]
    assert names == ["exception:0", "hairpin:it", "hairpin:hr",
                     "allow:0", "allow:1", "allow:2"]
    lab = next(o for o in ir.overlays if o.name == "lab")
    assert lab.isolated and lab.hairpin_rule == 0


def test_exception_covers_every_class_inside_its_cidrs() -> None:
    ir = pipeline.loads(SEED).ir
    by_net = {str(c.network): c.class_id for c in ir.classes}
    pairs = {(e.src_class, e.dst_class) for e in ir.exceptions}
    assert pairs == {(by_net["10.250.7.0/24"], by_net["192.168.9.0/24"])}


def test_port_range_stays_a_handful_of_entries() -> None:
    ir = pipeline.loads(SEED).ir
    udp = [a for a in ir.allowed if a.proto == PROTO_UDP]
    # 5000-5010 is 5000-5007 (/13) and 5008-5010 (/15 + /16): 3 entries per class pair.
    assert len({(a.port, a.match_bits) for a in udp}) == 3


def test_entry_under_an_earlier_wider_rule_keeps_the_earlier_rule_id() -> None:
    text = """\
version: 1
default: deny
overlays:
  a: {subnets: [10.1.0.0/16]}
  b: {subnets: [10.2.0.0/16]}
allow:
  - {from: a, to: b, ports: [tcp/1-1000]}
  - {from: a, to: b, ports: [tcp/80]}
  - {from: a, to: b, ports: [tcp/2000]}
"""
    loaded = pipeline.loads(text)
    ir = loaded.ir
    rules = {r.id: r.name for r in ir.rules}
    tcp = [(a.port, a.match_bits, rules[a.rule]) for a in ir.allowed if a.proto == PROTO_TCP]
    assert all(name == "allow:0" for port, bits, name in tcp if port <= 1000)
    assert (2000, 24, "allow:2") in tcp
    assert [w.message for w in loaded.warnings] == [
        "allow[1] never decides a packet: earlier rules, hairpins or exceptions cover all it allows"
    ]


def test_lints_name_rules_without_effect_under_default_allow() -> None:
    loaded = pipeline.loads(SEED.replace("default: deny", "default: allow"))
    assert sum("has no effect under 'default: allow'" in w.message for w in loaded.warnings) == 3


def test_hairpin_rule_is_reported_as_never_deciding() -> None:
    loaded = pipeline.loads(SEED + "  - {from: it, to: it, ports: [tcp/22]}\n")
    (warning,) = loaded.warnings
    assert (warning.line, warning.message.split(" ")[0]) == (13, "allow[3]")


def test_large_policy_compiles_and_default_is_not_a_table_entry() -> None:
    rng = random.Random(7)
    lines = ["version: 1", "default: deny", "overlays:",
             "  a: {subnets: [10.0.0.0/9]}", "  b: {subnets: [10.128.0.0/9]}", "allow:"]
    for _ in range(2000):
        src = f"10.{rng.randrange(0, 128)}.{rng.randrange(256)}.0/24"
        dst = f"10.{rng.randrange(128, 256)}.{rng.randrange(256)}.0/24"
        lines.append(f"  - {{from: {src}, to: {dst}, ports: [tcp/{rng.randint(1, 65535)}]}}")
    ir = pipeline.loads("\n".join(lines) + "\n").ir
    assert len(ir.allowed) >= 1900
    assert all(a.rule != RULE_DEFAULT for a in ir.allowed)


def test_the_pipeline_gives_what_parsing_and_compiling_afresh_give() -> None:
    through = pipeline.loads(SEED)
    fresh = compile_policy(parse.loads(SEED))
    assert fresh is not through.ir and fresh == through.ir and fresh.digest == through.ir.digest
    assert through.policy == parse.loads(SEED)
