"""Audit mode without a kernel: the policy key and `--audit`, the digest, the reference
evaluator, the iptables layout, the trace line and status."""

from __future__ import annotations

import netaddr
import pytest

from isoebpf import pipeline
from isoebpf.backends.interface import Verdict
from isoebpf.backends.iptables import backend as iptables_backend
from isoebpf.backends.iptables.layout import render
from isoebpf.cli import AUDIT_BANNER, _say_status
from isoebpf.cluster.layout import parts
from isoebpf.errors import PolicyError
from isoebpf.ir.evaluate import Classifier, Conntrack, Packet
from isoebpf.ir.tables import PROTO_TCP
from isoebpf.service import trace

pytestmark = pytest.mark.unit

POLICY = """\
version: 1
default: deny
overlays:
  it: {subnets: [10.250.0.0/16]}
  hr: {subnets: [192.168.0.0/16]}
allow:
  - {from: hr, to: it, ports: [tcp/80]}
"""
HR, IT = netaddr.IPAddress("192.168.1.10"), netaddr.IPAddress("10.250.1.10")


def test_audit_is_a_policy_key_or_forced_by_the_command() -> None:
    assert not pipeline.loads(POLICY).ir.audit
    assert pipeline.loads(POLICY + "audit: true\n").ir.audit
    assert pipeline.loads(POLICY, audit=True).ir.audit
    with pytest.raises(PolicyError, match="'audit' must be true or false, not a string"):
        pipeline.loads(POLICY + "audit: maybe\n")


def test_an_enforcing_policy_keeps_its_digest_and_audit_changes_it() -> None:
    enforcing = pipeline.loads(POLICY).ir.digest
    assert pipeline.loads(POLICY + "audit: false\n").ir.digest == enforcing
    assert pipeline.loads(POLICY, audit=True).ir.digest not in ("", enforcing)


def test_the_evaluator_lets_a_denial_through_and_tracks_it() -> None:
    conntrack, classifier = Conntrack(), Classifier(pipeline.loads(POLICY, audit=True).ir)
    syn = Packet(HR, IT, PROTO_TCP, sport=40000, dport=22, tcp_flags=0x02)
    first = conntrack.step(classifier, syn)
    assert (first.action, first.audit, first.track) == ("reject", True, True)
    reply = conntrack.step(classifier, Packet(IT, HR, PROTO_TCP, sport=22, dport=40000, tcp_flags=0x12))
    assert (reply.action, reply.audit) == ("allow", False)
    allowed = conntrack.step(classifier, Packet(HR, IT, PROTO_TCP, sport=40001, dport=80, tcp_flags=0x02))
    assert (allowed.action, allowed.audit) == ("allow", False)


@pytest.mark.parametrize("deny_action", ["reject", "drop"])
def test_iptables_audits_with_a_counted_return_that_says_what_it_would_do(deny_action: str) -> None:
    ir = pipeline.loads(POLICY + f"deny_action: {deny_action}\naudit: true\n").ir
    _, rules, _ = render(ir)
    assert " -j REJECT" not in rules and " -j DROP" not in rules
    default = [line for line in rules.splitlines() if "isoebpf default" in line]
    assert len(default) == 1 and default[0].endswith("-j RETURN"), default
    spec = default[0].split(" ", 2)[2]
    assert iptables_backend._action(spec) == (deny_action, True)
    assert iptables_backend._action('-m comment --comment "isoebpf allow:0" -j RETURN') == ("allow", False)


def test_a_cluster_carries_audit_mode_in_its_header() -> None:
    assert parts(pipeline.loads(POLICY + "audit: true\n").policy).header["audit"] is True
    assert "audit" not in parts(pipeline.loads(POLICY).policy).header


def test_trace_says_a_denial_passed_in_audit_mode() -> None:
    verdict = Verdict(0, "veth0", 4, PROTO_TCP, HR, 40000, IT, 22, "reject", "default", "default", audit=True)
    assert " AUDIT reject " in trace.line(verdict, 0.0)
    assert '"audit": true' in trace.as_json(verdict, 0.0)


def test_status_says_audit_mode_first(capsys: pytest.CaptureFixture[str]) -> None:
    record = {"backend": "ebpf", "policy": "/p.yaml", "digest": "d" * 64, "generation": 1,
              "loaded_at": "now", "attachments": [], "audit": True}
    _say_status(record, None)
    assert capsys.readouterr().out.splitlines()[0] == AUDIT_BANNER
