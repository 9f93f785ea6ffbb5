"""The iptables backend's trace: `nft monitor` lines to verdicts, with no kernel."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from isoebpf.backends.iptables import nftrace

LISTING = """\
table ip filter {
\tchain dcos-isolation { # handle 7
\t\tct state related,established  counter packets 0 bytes 0 return # handle 8
\t\tip protocol tcp tcp dport 80  counter packets 0 bytes 0 return # handle 9
\t\tip protocol tcp  counter packets 0 bytes 0 reject with tcp reset # handle 10
\t}
}
"""
RULES = [("established", "allow", False), ("allow:0", "allow", False), ("default", "reject", False)]
PACKET = ('packet: iif "br-hr" oif "br-it" ether saddr 02:00:00:00:00:01 ip saddr 192.168.1.10 '
          "ip daddr 10.250.1.10 ip dscp cs0 ip ecn not-ect ip ttl 63 ip id 1 ip protocol tcp "
          "ip length 60 tcp sport 40000 tcp dport 80 tcp flags == syn tcp window 64240")


def tracer(rules: list[tuple[str, str, bool]] = RULES) -> nftrace.Tracer:
    def run(args: Sequence[str], stdin: str | None = None) -> str:
        assert list(args[:4]) == ["nft", "-a", "list", "chain"], args
        return LISTING if args[4] == "ip" else ""

    found = nftrace.Tracer(None, run, "dcos-isolation",
                           lambda version: rules if version == 4 else [],
                           {"allow:0": "hr -> it tcp/80"}, 10)
    found.learn()
    return found


def feed(t: nftrace.Tracer, lines: Sequence[str]) -> list[tuple[str, str]]:
    found = []
    for line in lines:
        match = nftrace.TRACE.match(line)
        assert match, line
        verdict = t.step(*match.groups())
        if verdict is not None:
            found.append((verdict.rule, verdict.action))
    return found


def test_handles_map_to_our_rule_names_by_position() -> None:
    assert nftrace.chain_handles(LISTING) == [8, 9, 10]
    t = tracer()
    assert feed(t, [
        f"trace id aa inet isoebpf-trace forward {PACKET}",
        "trace id aa inet isoebpf-trace forward rule meta nftrace set 1 (verdict continue)",
        "trace id aa ip filter FORWARD rule  counter packets 1 bytes 60 # handle 3 (verdict continue)",
        "trace id aa ip filter FORWARD rule # handle 4 (verdict jump dcos-isolation)",
        "trace id aa ip filter dcos-isolation rule ip protocol tcp tcp dport 80 # handle 9 "
        "(verdict return)",
        "trace id aa ip filter FORWARD policy accept",
        f"trace id bb inet isoebpf-trace forward {PACKET}",
        "trace id bb ip filter FORWARD rule # handle 4 (verdict jump dcos-isolation)",
        # REJECT is an xt target: nftables reports it as drop.
        "trace id bb ip filter dcos-isolation unknown rule handle 10 (verdict drop)",
    ]) == [("allow:0", "allow"), ("default", "reject")]


def test_audit_modes_default_says_what_it_would_have_done() -> None:
    t = tracer([*RULES[:2], ("default", "reject", True)])
    verdicts = []
    for line in (f"trace id cc inet isoebpf-trace forward {PACKET}",
                 "trace id cc ip filter FORWARD rule # handle 4 (verdict jump dcos-isolation)",
                 "trace id cc ip filter dcos-isolation rule # handle 10 (verdict return)"):
        match = nftrace.TRACE.match(line)
        assert match, line
        verdicts.append(t.step(*match.groups()))
    assert verdicts[-1] is not None
    assert (verdicts[-1].rule, verdicts[-1].action, verdicts[-1].audit) == ("default", "reject", True)


def test_a_packet_that_skips_our_jump_is_unfiltered() -> None:
    t = tracer()
    assert feed(t, [
        f"trace id cc inet isoebpf-trace forward {PACKET}",
        "trace id cc ip filter FORWARD rule  counter packets 1 bytes 60 # handle 3 (verdict continue)",
        "trace id cc ip filter FORWARD policy accept",
        "trace id dd ip filter FORWARD policy accept",  # not marked by us: no packet line
    ]) == [("unfiltered", "allow")]


@pytest.mark.parametrize("text, fields", [
    (PACKET, ("br-hr", 4, 6, "192.168.1.10", 40000, "10.250.1.10", 80)),
    ('packet: iif "br-it" ip6 saddr fd00::1 ip6 daddr fd00::2 ip6 nexthdr ipv6-icmp '
     "icmpv6 type echo-request", ("br-it", 6, 58, "fd00::1", 0, "fd00::2", 0)),
])
def test_packet_lines_give_interface_addresses_protocol_and_ports(
        text: str, fields: tuple[object, ...]) -> None:
    p = nftrace.Packet.parse(text)
    assert (p.ifname, p.family, p.proto, str(p.src), p.sport, str(p.dst), p.dport) == fields


def test_the_table_limits_before_it_marks() -> None:
    script = nftrace.table_script(7)
    assert script.index("limit rate over 7/second counter return") < \
        script.index("meta nftrace set 1")
    assert script.startswith("table inet isoebpf-trace\ndelete table inet isoebpf-trace\n")
