"""The flow log: aggregation, the log's rotation, --since, denials and the allow lines
--suggest prints (held to the reference evaluator)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import netaddr
import pytest

from isoebpf import pipeline
from isoebpf.backends.interface import Verdict
from isoebpf.errors import IsoebpfError
from isoebpf.ir.evaluate import TCP_SYN, Packet, decide
from isoebpf.service import flows
from isoebpf.service.flows import Bucket, Filters, Flow, FlowKey, Overlays

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "it-hr.yaml"
OVERLAYS = Overlays({"it": ["10.250.0.0/16"], "hr": ["192.168.0.0/16", "fd00:4852::/48"]})
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1}


def verdict(src: str, dst: str, dport: int = 80, action: str = "allow", rule: str = "allow:0",
            proto: int = 6, sport: int = 40000, audit: bool = False) -> Verdict:
    address = netaddr.IPAddress(src)
    return Verdict(0, "v-hr1", address.version, proto, address, sport, netaddr.IPAddress(dst), dport,
                   action, rule, "hr -> it tcp/80", audit)


def bucket(*verdicts: Verdict, start: float = 100.0) -> Bucket:
    found = Bucket(start, start + 10)
    for n, v in enumerate(verdicts):
        found.add(v, start + n)
    return found


def test_verdicts_fold_into_flows_by_key_whatever_the_source_port() -> None:
    made = bucket(verdict("192.168.1.10", "10.250.1.10", sport=40000),
                  verdict("192.168.1.10", "10.250.1.10", sport=40001),
                  verdict("192.168.1.10", "10.250.1.10", 22, "reject", "default"))
    web = made.flows[FlowKey("192.168.1.10", "10.250.1.10", "tcp", 80, "allow", "allow:0", False)]
    assert (web.packets, web.first, web.last, web.service) == (2, 100.0, 101.0, "tcp/80")
    assert len(made.flows) == 2


def test_established_packets_are_one_flow_per_address_pair_not_per_reply_port() -> None:
    replies = bucket(*(verdict("10.250.1.10", "192.168.1.10", dport=40000 + n, rule="established")
                       for n in range(5)))
    assert [(f.key.port, f.packets, f.service) for f in replies.flows.values()] == [(0, 5, "tcp")]


def test_audit_is_part_of_the_key_and_survives_the_log(tmp_path: Path) -> None:
    made = bucket(verdict("10.250.1.10", "192.168.1.10", action="reject", rule="default", audit=True),
                  verdict("10.250.1.10", "192.168.1.10", action="reject", rule="default"))
    assert sorted(k.audit for k in made.flows) == [False, True]
    log = tmp_path / "flows.jsonl"
    flows.append(log, made)
    assert flows.read(log)[0].flows == made.flows


def test_a_bucket_keeps_a_bounded_number_of_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flows, "BUCKET_FLOWS", 3)
    scan = bucket(*(verdict("192.168.1.10", "10.250.1.10", dport=port) for port in range(1, 11)))
    assert (len(scan.flows), scan.overflow) == (3, 7)


def test_the_log_rotates_to_one_older_file_and_reads_across_both(tmp_path: Path) -> None:
    log = tmp_path / "flows.jsonl"
    line_size = len(json.dumps(bucket(verdict("192.168.1.10", "10.250.1.10")).as_json())) + 1
    for n in range(5):
        flows.append(log, bucket(verdict("192.168.1.10", "10.250.1.10"), start=100.0 * n),
                     max_bytes=2 * line_size + 10)
    assert flows.rotated(log).exists()
    assert log.stat().st_size + flows.rotated(log).stat().st_size <= 2 * (2 * line_size + 10)
    starts = [b.start for b in flows.read(log)]
    assert starts == sorted(starts) and starts[-1] == 400.0 and 0.0 not in starts
    assert [b.start for b in flows.read(log, since=305.0)] == [300.0, 400.0]


def test_a_line_cut_short_is_passed_over(tmp_path: Path) -> None:
    log = tmp_path / "flows.jsonl"
    flows.append(log, bucket(verdict("192.168.1.10", "10.250.1.10")))
    with log.open("a") as out:
        out.write('{"start": 1, "end": 2, "flo')
    assert len(flows.read(log)) == 1


def test_merged_adds_up_buckets_most_packets_first() -> None:
    web = verdict("192.168.1.10", "10.250.1.10")
    ssh = verdict("192.168.1.10", "10.250.1.10", 22)
    total = flows.merged([bucket(web, ssh, start=0), bucket(ssh, ssh, start=10)])
    assert [(f.service, f.packets, f.first, f.last) for f in total] == [
        ("tcp/22", 3, 1.0, 11.0), ("tcp/80", 1, 0.0, 0.0)]


@pytest.mark.parametrize(("text", "back"), [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400),
                                            ("1.5m", 90)])
def test_since_takes_durations(text: str, back: float) -> None:
    assert flows.parse_since(text, 10_000_000.0) == 10_000_000.0 - back


def test_since_takes_iso_times() -> None:
    assert flows.parse_since("2024-05-01T12:00:00+00:00", 0) == 1714564800.0
    local = datetime(2024, 5, 1, 12, 0).timestamp()  # no zone: local time
    assert flows.parse_since("2024-05-01T12:00", 0) == local


@pytest.mark.parametrize("text", ["5 minutes", "yesterday", "-5m", ""])
def test_since_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(IsoebpfError, match="--since takes"):
        flows.parse_since(text, 0)


def test_filters_by_overlay_at_either_end_and_by_verdict() -> None:
    made = bucket(verdict("192.168.1.10", "10.250.1.10"),
                  verdict("10.250.1.10", "10.250.2.20", rule="hairpin:it"),
                  verdict("10.250.1.10", "192.168.1.10", 22, "reject", "default"))
    hr = flows.filtered([made], Filters(overlay="hr"), OVERLAYS)[0]
    assert {(f.key.src, f.key.dst) for f in hr.flows.values()} == {
        ("192.168.1.10", "10.250.1.10"), ("10.250.1.10", "192.168.1.10")}
    rejected = flows.filtered([made], Filters(verdict="reject"), OVERLAYS)[0]
    assert [f.key.rule for f in rejected.flows.values()] == ["default"]


def test_overlay_of_an_address() -> None:
    assert [OVERLAYS.of(a) for a in ("10.250.9.9", "fd00:4852::10", "203.0.113.10", "-")] == [
        "it", "hr", None, None]


def denied_flows() -> list[Flow]:
    return flows.merged([bucket(
        verdict("192.168.1.10", "10.250.1.10", 22, "reject", "default"),
        verdict("192.168.2.20", "10.250.2.20", 22, "reject", "default"),
        verdict("192.168.1.10", "10.250.1.10", 53, "reject", "default", proto=17),
        verdict("10.250.1.10", "192.168.1.10", 0, "reject", "default", proto=1, audit=True),
        verdict("10.250.1.10", "192.168.1.10", 0, "drop", "fragment", proto=6),  # no rule helps
        verdict("192.168.1.10", "203.0.113.10", 25, "reject", "default"),  # not between overlays
        verdict("192.168.1.10", "10.250.1.10", 80),  # allowed
    )])


def test_denials_group_by_overlays_and_service() -> None:
    found = flows.denials(denied_flows(), OVERLAYS)
    assert [(d.src_overlay, d.dst_overlay, d.service, d.packets, d.flows, d.audit) for d in found] == [
        ("hr", "it", "tcp/22", 2, 2, False),
        ("hr", "it", "udp/53", 1, 1, False),
        ("it", "hr", "icmp", 1, 1, True),
    ]


def test_suggested_lines_parse_and_make_the_denied_flows_allowed(tmp_path: Path) -> None:
    """Appended to the policy (whose last key is allow:), the suggestions parse, and the
    reference evaluator then allows the first packet of every flow that was denied,
    and still denies what nobody asked for."""
    lines = flows.suggest(flows.denials(denied_flows(), OVERLAYS))
    assert lines == ["- {from: hr, to: it, ports: [tcp/22, udp/53]}",
                     "- {from: it, to: hr, ports: [icmp]}"]
    before = pipeline.read(SEED).ir
    policy = tmp_path / "suggested.yaml"
    policy.write_text(SEED.read_text() + "".join(f"  {line}\n" for line in lines))
    after = pipeline.read(policy).ir
    for flow in denied_flows():
        if flow.key.rule != "default" or OVERLAYS.of(flow.key.dst) is None:
            continue
        first = Packet(netaddr.IPAddress(flow.key.src), netaddr.IPAddress(flow.key.dst),
                       PROTOCOLS[flow.key.protocol], sport=40000, dport=flow.key.port,
                       tcp_flags=TCP_SYN, icmp_type=8)
        assert decide(before, first).action == "reject", flow
        assert decide(after, first).action == "allow", flow
    still_closed = Packet(netaddr.IPAddress("10.250.1.10"), netaddr.IPAddress("192.168.1.10"), 6,
                          sport=40000, dport=80, tcp_flags=TCP_SYN)
    assert decide(after, still_closed).action == "reject"


def test_a_protocol_without_ports_is_suggested_as_a_rule_that_says_what_it_opens() -> None:
    gre = flows.merged([bucket(verdict("192.168.1.10", "10.250.1.10", 0, "reject", "default", proto=47))])
    (line,) = flows.suggest(flows.denials(gre, OVERLAYS))
    assert line.startswith("- {from: hr, to: it}  # every protocol and port: 47")


def test_top_talkers_by_packets() -> None:
    talk = flows.merged([bucket(verdict("192.168.1.10", "10.250.1.10"),
                                verdict("192.168.2.20", "10.250.1.10"),
                                verdict("192.168.2.20", "10.250.1.10", 22))])
    assert flows.top_talkers(talk, 1) == [("192.168.2.20", 2)]


def test_plot_draws_a_png(tmp_path: Path) -> None:
    picture = tmp_path / "flows.png"
    flows.plot([bucket(verdict("192.168.1.10", "10.250.1.10"), start=0),
                bucket(verdict("10.250.1.10", "192.168.1.10", 22, "reject", "default", audit=True),
                       start=10)], str(picture), "verdicts")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
