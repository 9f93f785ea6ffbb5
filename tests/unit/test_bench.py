"""The benchmark's pure parts: targets judged from a results document, the
statistics, and the N-rule policies (the benchmark itself runs under `make bench`)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import peers, policies, rulesets, stats, targets
from bench.rulesets import ipset_rules, nft_ruleset
from isoebpf import pipeline

pytestmark = pytest.mark.unit


def s(median: float) -> dict[str, Any]:
    return stats.summary([median])


def traffic(rules: int, enforcer: str, measure: str, **metrics: float) -> dict[str, Any]:
    return {"rules": rules, "enforcer": enforcer, "measure": measure, **{k: s(v) for k, v in metrics.items()}}


def results(ebpf_xdp: float = 400e3, ebpf_tc: float = 400e3, iptables: float = 150e3,
            at_high: float = 390e3, iptables_high: float = 5e3) -> dict[str, Any]:
    return {
        "b1": [{"rules": n, "prog": "xdp", "path": "denied", "ns": s(ns)} for n, ns in ((10, 200), (100000, 380))],
        "traffic": [
            traffic(10, "xdp-drop", "denied", processed_pps=410e3, answers_pps=0),
            traffic(10, "ebpf-xdp-drop", "denied", processed_pps=ebpf_xdp, answers_pps=0),
            traffic(10, "ebpf-tc", "denied", processed_pps=ebpf_tc, answers_pps=ebpf_tc),
            traffic(10, "iptables", "denied", processed_pps=iptables, answers_pps=iptables),
            traffic(10, "none", "tcp", gbit_s=10.0),
            traffic(10, "ebpf-tc", "tcp", gbit_s=9.6),
            traffic(10000, "ebpf-tc", "denied", processed_pps=at_high),
            traffic(10000, "iptables", "denied", processed_pps=iptables_high),
        ],
        "b6": [{"rules": 100000, "load_total_s": s(2.5), "change_apply_s": s(0.2)}],
    }


def verdicts(doc: dict[str, Any]) -> dict[str, bool | None]:
    return {t.name: t.met for t in targets.evaluate(doc)}


def test_every_target_judged_from_a_full_document() -> None:
    got = verdicts(results())
    assert len(got) == 9
    assert [name for name, met in got.items() if not met] == [
        "B2: XDP discard (drop) >= 3 x iptables REJECT",
        "B2: REJECT answers by the program (auto mode) >= 3 x iptables REJECT",
        "B6: a one-rule change at 100000 rules <= 100 ms, no recompile",
    ]


def test_targets_move_with_the_numbers() -> None:
    got = verdicts(results(ebpf_xdp=380e3, iptables=50e3, at_high=300e3, iptables_high=10e3))
    assert got["B2: XDP discard (drop) >= 95 % of bare XDP_DROP"] is False  # 380k < 0.95 x 410k
    assert got["B2: XDP discard (drop) >= 3 x iptables REJECT"] is True
    assert got["B4: eBPF (auto) discard at the most rules >= 90 % of 10 rules"] is False
    assert got["B4: eBPF (auto) discard at the most rules >= 50 x iptables plain rules"] is False


def test_loading_is_judged_on_isoebpf_load_where_the_bench_timed_it() -> None:
    doc = results()
    doc["b6"] = [{"rules": 100000, "load_total_s": s(2.5), "change_apply_s": s(0.05),
                  "cli_load_s": s(3.5), "cli_change_s": s(1.0)}]
    load, change = targets.control_plane(doc)
    assert (load.met, load.value) == (False, "3.50 s (`isoebpf load`; its phases add up to 2.50 s)")
    assert change.met is True
    assert "`isoebpf load` of the change: 1.00 s" in change.value


def test_an_empty_document_measures_nothing() -> None:
    assert set(verdicts({}).values()) == {None}


def test_summary_and_interleaving() -> None:
    got = stats.summary([5, 1, 3, 2, 4])
    assert (got["median"], got["q1"], got["q3"], got["min"], got["max"]) == (3, 2, 4, 1, 5)
    order = stats.interleaved(2, ["a", "b", "c"])
    assert [x for _, x in order] == ["a", "b", "c", "b", "c", "a"]


@pytest.mark.parametrize("rules", [4, 10, 200])
def test_scaled_policy_has_the_rules_asked_for(rules: int) -> None:
    compiled = pipeline.loads(policies.scaled_policy(rules))
    assert len(compiled.policy.rules) == rules
    ir = compiled.ir
    assert pipeline.loads(policies.changed_policy(rules)).ir.digest != ir.digest
    assert len(nft_ruleset(rules).splitlines()) < 40
    sets, chain = ipset_rules(rules)
    assert sets.count("add isob-allowed") == policies.filler_count(rules)
    assert "REJECT --reject-with tcp-reset" in chain


@pytest.mark.parametrize("rules", [4, 10, 200])
def test_the_policy_as_json_is_the_same_policy(rules: int) -> None:
    for changed in (False, True):
        yaml_ir = pipeline.loads(policies.policy_text(rules, ".yaml", changed)).ir
        assert pipeline.loads(policies.policy_text(rules, ".json", changed), "p.json").ir.digest == yaml_ir.digest
    with pytest.raises(ValueError, match="no policy format"):
        policies.policy_text(rules, ".toml")


def test_the_peers_load_the_fillers_and_change_the_changed_one() -> None:
    rules = 1000
    count = policies.filler_count(rules)
    fillers = list(policies.fillers(count))
    sets = rulesets.peer_ipset(rules).splitlines()
    assert sets[0] == "create isobp-allowed hash:ip,port,net family inet hashsize 1024 maxelem 65536"
    assert sets[1:] == [f"add isobp-allowed {f.src},tcp:{f.port},{f.dst}" for f in fillers]
    chain = rulesets.peer_iptables(rules).splitlines()
    assert chain[:3] == ["*filter", ":isobp-allow - [0:0]", "-A FORWARD -j isobp-allow"]
    assert chain[3] == "-A isobp-allow -s 10.100.0.1/32 -d 10.101.0.0/24 -p tcp -m tcp --dport 1000 -j ACCEPT"
    assert (len(chain), chain[-1]) == (count + 4, "COMMIT")
    table = rulesets.peer_nft(rules)
    assert "type ipv4_addr . inet_service . ipv4_addr; flags interval;" in table
    assert table.count(" . 10.101.") == count
    assert "    10.100.0.1 . 1000 . 10.101.0.0/24,\n" in table
    assert "meta l4proto tcp ip saddr . tcp dport . ip daddr @isobp-allowed accept" in table
    assert "elements" not in rulesets.peer_nft(4)  # no fillers: an empty set
    change = rulesets.peer_change()
    # The change's element is the changed policy's: the first filler on its new port.
    moved = f"tcp/{fillers[0].port + policies.CHANGED_PORT_OFFSET}"
    assert f"{{from: {fillers[0].src}, to: {fillers[0].dst}, ports: [{moved}]}}" in policies.changed_policy(rules)
    assert change["ipset_add"] == ["ipset", "add", "isobp-allowed", "10.100.0.1,tcp:61000,10.101.0.0/24"]
    assert change["ipset_del"][:2] == ["ipset", "del"] and change["ipset_del"][2:] == change["ipset_add"][2:]
    assert change["nft_add"] == ["nft", "add", "element", "ip", "isobpeer", "isobp-allowed",
                                 "{ 10.100.0.1 . 61000 . 10.101.0.0/24 }"]
    assert change["nft_del"][1] == "delete" and change["nft_del"][2:] == change["nft_add"][2:]


def test_sets_are_sized_for_their_entries() -> None:
    head = rulesets.peer_ipset(100000).splitlines()[0]
    assert head.endswith("hashsize 131072 maxelem 131072")


def test_ipset_header_is_read_from_the_terse_listing() -> None:
    listing = ("Name: isobp-allowed\nType: hash:ip,port,net\nRevision: 8\nHeader: family inet hashsize 1024 "
               "maxelem 65536 bucketsize 12 initval 0xdb1b5031\nSize in memory: 40280\nReferences: 0\n"
               "Number of entries: 996\n")
    assert peers.ipset_header(listing) == {"entries": 996, "bytes": 40280}
    with pytest.raises(RuntimeError, match="Number of entries"):
        peers.ipset_header("Name: x\nSize in memory: 1\n")
    assert peers.in_netns("ns1", "ipset", "add") == ["nsenter", "--net=/run/netns/ns1", "ipset", "add"]
