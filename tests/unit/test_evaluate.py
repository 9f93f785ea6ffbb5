"""The reference evaluator's stateful semantics: conntrack, ICMP errors, fragments, updates."""

from __future__ import annotations

import netaddr
import pytest

from isoebpf import pipeline
from isoebpf.ir.evaluate import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Classifier, Conntrack, Decision, Packet, decide
from isoebpf.ir.tables import PROTO_ICMP, PROTO_TCP, PROTO_UDP

POLICY = """\
version: 1
default: deny
overlays:
  it: {subnets: [10.250.0.0/16]}
  hr: {subnets: [192.168.0.0/16, "fd00:4852::/48"]}
  ops: {subnets: ["fd00:1::/48"]}
exceptions:
  - {from: 10.250.7.0/24, to: 192.168.9.0/24}
allow:
  - {from: hr, to: it, ports: [tcp/80, udp/53, icmp]}
  - {from: hr, to: ops, ports: [tcp/22]}
"""
HR, IT, OUT = netaddr.IPAddress("192.168.1.10"), netaddr.IPAddress("10.250.2.20"), \
    netaddr.IPAddress("203.0.113.5")
HR6, OPS6 = netaddr.IPAddress("fd00:4852::10"), netaddr.IPAddress("fd00:1::22")


@pytest.fixture
def classifier() -> Classifier:
    return Classifier(pipeline.loads(POLICY).ir)


def tcp(src: netaddr.IPAddress, dst: netaddr.IPAddress, sport: int, dport: int,
        flags: int) -> Packet:
    return Packet(src, dst, PROTO_TCP, sport=sport, dport=dport, tcp_flags=flags)


def name(classifier: Classifier, pkt: Packet, ct: Conntrack, now: float = 0) -> tuple[str, str]:
    decision = ct.step(classifier, pkt, now)
    return decision.action, classifier.ir.rule(decision.rule).name


def test_replies_of_an_allowed_connection_pass_and_the_reverse_opening_does_not(
    classifier: Classifier,
) -> None:
    ct = Conntrack()
    assert name(classifier, tcp(HR, IT, 40000, 80, TCP_SYN), ct) == ("allow", "allow:0")
    assert name(classifier, tcp(IT, HR, 80, 40000, TCP_SYN | TCP_ACK), ct) == \
        ("allow", "established")
    assert name(classifier, tcp(IT, HR, 80, 40001, TCP_SYN), ct) == ("reject", "default")


def test_tcp_closes_after_fin_both_ways_and_after_rst(classifier: Classifier) -> None:
    timeouts = classifier.ir.timeouts
    for closing in ([tcp(HR, IT, 1, 80, TCP_FIN | TCP_ACK), tcp(IT, HR, 80, 1, TCP_FIN | TCP_ACK)],
                    [tcp(IT, HR, 80, 1, TCP_RST)]):
        ct = Conntrack()
        ct.step(classifier, tcp(HR, IT, 1, 80, TCP_SYN), 0)
        for pkt in closing:
            assert ct.step(classifier, pkt, 1).action == "allow"
        # Still alive during the closing grace, then gone: a late reply is judged afresh.
        assert name(classifier, tcp(IT, HR, 80, 1, TCP_ACK), ct, 1 + timeouts["tcp_closing"]) \
            == ("allow", "established")
        late = 2 + 2 * timeouts["tcp_closing"]
        assert name(classifier, tcp(IT, HR, 80, 1, TCP_ACK), ct, late) == ("reject", "default")


def test_one_fin_keeps_the_connection_open(classifier: Classifier) -> None:
    ct = Conntrack()
    ct.step(classifier, tcp(HR, IT, 1, 80, TCP_SYN), 0)
    ct.step(classifier, tcp(HR, IT, 1, 80, TCP_FIN | TCP_ACK), 1)
    assert name(classifier, tcp(IT, HR, 80, 1, TCP_ACK), ct, 100) == ("allow", "established")


def test_udp_idles_out(classifier: Classifier) -> None:
    ct = Conntrack()
    query = Packet(HR, IT, PROTO_UDP, sport=5353, dport=53)
    answer = Packet(IT, HR, PROTO_UDP, sport=53, dport=5353)
    ct.step(classifier, query, 0)
    udp_timeout = classifier.ir.timeouts["udp"]
    assert name(classifier, answer, ct, udp_timeout) == ("allow", "established")
    assert name(classifier, answer, ct, 2 * udp_timeout + 1) == ("reject", "default")


def test_echo_reply_passes_only_for_a_tracked_request(classifier: Classifier) -> None:
    ct = Conntrack()
    request = Packet(HR, IT, PROTO_ICMP, icmp_type=8, icmp_id=7)
    assert name(classifier, Packet(IT, HR, PROTO_ICMP, icmp_type=0, icmp_id=7), ct) == \
        ("reject", "default")
    ct.step(classifier, request, 0)
    assert name(classifier, Packet(IT, HR, PROTO_ICMP, icmp_type=0, icmp_id=7), ct) == \
        ("allow", "established")
    assert name(classifier, Packet(IT, HR, PROTO_ICMP, icmp_type=8, icmp_id=8), ct) == \
        ("reject", "default")


def test_icmp_errors_about_tracked_connections_pass_and_forged_ones_do_not(
    classifier: Classifier,
) -> None:
    ct = Conntrack()
    # Packet too big, IPv6, about an allowed HR -> OPS ssh connection.
    ct.step(classifier, tcp(HR6, OPS6, 5000, 22, TCP_SYN), 0)
    quoted = tcp(HR6, OPS6, 5000, 22, TCP_ACK)
    too_big = Packet(OPS6, HR6, 58, icmp_type=2, inner=quoted)
    assert name(classifier, too_big, ct) == ("allow", "established")
    # The same error quoting a connection nobody opened is judged like any ICMP.
    forged = Packet(OPS6, HR6, 58, icmp_type=2, inner=tcp(HR6, OPS6, 5001, 22, TCP_ACK))
    assert name(classifier, forged, ct) == ("reject", "default")
    # An error about the tracked flow but sent to someone other than its sender.
    misdirected = Packet(OPS6, netaddr.IPAddress("fd00:4852::99"), 58, icmp_type=2, inner=quoted)
    assert name(classifier, misdirected, ct) == ("reject", "default")


def test_later_fragments_follow_the_first_and_orphans_are_dropped(classifier: Classifier) -> None:
    ct = Conntrack()
    first = Packet(HR, IT, PROTO_UDP, sport=1, dport=53, frag_id=9, more_fragments=True)
    later = Packet(HR, IT, PROTO_UDP, frag_id=9, frag_offset=185)
    assert name(classifier, first, ct) == ("allow", "allow:0")
    assert name(classifier, later, ct) == ("allow", "allow:0")
    orphan = Packet(HR, IT, PROTO_UDP, frag_id=10, frag_offset=185)
    assert name(classifier, orphan, ct) == ("drop", "fragment")
    denied_first = Packet(IT, HR, PROTO_UDP, sport=1, dport=53, frag_id=11, more_fragments=True)
    assert name(classifier, denied_first, ct) == ("reject", "default")
    denied_later = Packet(IT, HR, PROTO_UDP, frag_id=11, frag_offset=185)
    assert name(classifier, denied_later, ct) == ("drop", "default")
    unfiltered_orphan = Packet(OUT, IT, PROTO_UDP, frag_id=12, frag_offset=185)
    assert name(classifier, unfiltered_orphan, ct) == ("allow", "unfiltered")


def test_exception_traffic_is_unfiltered_and_its_replies_pass(classifier: Classifier) -> None:
    ct = Conntrack()
    src, dst = netaddr.IPAddress("10.250.7.1"), netaddr.IPAddress("192.168.9.1")
    decision = ct.step(classifier, tcp(src, dst, 1, 22, TCP_SYN), 0)
    assert (decision.action, decision.filtered) == ("allow", False)
    assert name(classifier, tcp(dst, src, 22, 1, TCP_SYN | TCP_ACK), ct) == \
        ("allow", "established")
    assert name(classifier, tcp(dst, src, 23, 1, TCP_SYN), ct) == ("reject", "default")


def test_update_cuts_connections_the_new_policy_forbids(classifier: Classifier) -> None:
    ct = Conntrack()
    ct.step(classifier, tcp(HR, IT, 1, 80, TCP_SYN), 0)
    ct.step(classifier, tcp(HR6, OPS6, 2, 22, TCP_SYN), 0)
    narrowed = Classifier(pipeline.loads(POLICY.replace("tcp/22", "tcp/2222")).ir)
    ct.revalidate(narrowed)
    assert name(narrowed, tcp(IT, HR, 80, 1, TCP_ACK), ct) == ("allow", "established")
    assert name(narrowed, tcp(OPS6, HR6, 22, 2, TCP_ACK), ct) == ("reject", "default")


def test_truncated_filtered_packets_are_dropped_unfiltered_ones_pass(
    classifier: Classifier,
) -> None:
    assert decide(classifier, Packet(HR, IT, PROTO_TCP, truncated=True)).action == "drop"
    assert decide(classifier, Packet(OUT, IT, PROTO_TCP, truncated=True)).action == "allow"


def test_drop_policy_answers_nothing() -> None:
    drop = Classifier(pipeline.loads(POLICY.replace(
        "default: deny", "default: deny\ndeny_action: drop")).ir)
    assert decide(drop, tcp(IT, HR, 1, 80, TCP_SYN)).action == "drop"


def test_neighbour_discovery_is_never_filtered(classifier: Classifier) -> None:
    solicit = Packet(HR6, OPS6, 58, icmp_type=135)
    assert decide(classifier, solicit) == Decision("allow", 0, False, "neighbour discovery")
    assert decide(classifier, Packet(HR6, OPS6, 58, icmp_type=138)).action == "reject"


def test_a_fin_after_a_rst_does_not_reopen(classifier: Classifier) -> None:
    ct = Conntrack()
    ct.step(classifier, tcp(HR, IT, 1, 80, TCP_SYN), 0)
    ct.step(classifier, tcp(IT, HR, 80, 1, TCP_RST), 1)
    ct.step(classifier, tcp(HR, IT, 1, 80, TCP_FIN), 1)
    late = 2 + classifier.ir.timeouts["tcp_closing"]
    assert name(classifier, tcp(IT, HR, 80, 1, TCP_ACK), ct, late) == ("reject", "default")


def test_truncated_packets_never_start_a_connection(classifier: Classifier) -> None:
    ct = Conntrack()
    src, dst = netaddr.IPAddress("10.250.7.1"), netaddr.IPAddress("192.168.9.1")
    ct.step(classifier, Packet(src, dst, PROTO_ICMP, truncated=True), 0)
    assert ct.connections == {}
