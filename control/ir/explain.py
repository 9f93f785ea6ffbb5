"""IR stage: `explain`, the verdict for the first packet of a new connection, and why.

Asks `evaluate` on `tables`; the CLI prints what it answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import netaddr

from ..errors import IsoebpfError
from .evaluate import ICMP_ECHO_REQUEST, IPPROTO_ICMPV6, Classifier, Packet, decide
from .tables import IR, PORT_BITS, PROTO_BITS, PROTO_CODES, PROTO_ICMP


@dataclass(frozen=True)
class Question:
    src: netaddr.IPAddress
    dst: netaddr.IPAddress
    proto: str  # "tcp" | "udp" | "icmp"
    dport: int | None


class PortNeededError(IsoebpfError):
    """The verdict depends on the destination port and none was given; `by_port`
    holds one port of each stretch that is judged alike, with its verdict."""

    def __init__(self, message: str, by_port: list[dict[str, object]]) -> None:
        super().__init__(message)
        self.by_port = by_port


def explain(ir: IR, question: Question) -> dict[str, object]:
    classifier = Classifier(ir)
    if question.src.version != question.dst.version:
        raise IsoebpfError("--src and --dst must both be IPv4 or both IPv6")
    ports = [question.dport] if question.dport is not None else _deciding_ports(classifier, question)
    answers = {}
    for port in ports:
        decision = decide(classifier, _first_packet(question, port))
        answers[port] = (decision.action, decision.rule, decision.filtered, decision.reason)
    if len(set(answers.values())) > 1:
        differing = ", ".join(
            f"{question.proto}/{p}: {a[0]} by {ir.rule(a[1]).name}" for p, a in answers.items()
        )
        by_port: list[dict[str, object]] = [
            {"dport": p, "action": a[0], "rule": ir.rule(a[1]).name} for p, a in answers.items()
        ]
        raise PortNeededError(f"the verdict depends on the port; give --dport ({differing})", by_port)
    action, rule_id, filtered, reason = next(iter(answers.values()))
    rule = ir.rule(rule_id)
    _, src_overlay = classifier.address_class(question.src)
    _, dst_overlay = classifier.address_class(question.dst)
    names = {o.id: o.name for o in ir.overlays}
    return {
        "action": action,
        "rule": rule.name,
        "filtered": filtered,
        "reason": reason,
        "rule_text": rule.text,
        "line": rule.line or None,
        "src": str(question.src),
        "dst": str(question.dst),
        "proto": question.proto,
        "dport": question.dport,
        "src_overlay": names.get(src_overlay),
        "dst_overlay": names.get(dst_overlay),
        "digest": ir.digest,
    }


def _first_packet(question: Question, port: int | None) -> Packet:
    if question.proto == "icmp":
        proto = PROTO_ICMP if question.src.version == 4 else IPPROTO_ICMPV6
        return Packet(question.src, question.dst, proto, icmp_type=ICMP_ECHO_REQUEST[proto])
    return Packet(question.src, question.dst, PROTO_CODES[question.proto], sport=40000,
                  dport=port or 0, tcp_flags=0x02)


def _deciding_ports(classifier: Classifier, question: Question) -> list[int | None]:
    """One port from every stretch of ports the allow table treats alike."""
    if question.proto == "icmp":
        return [None]
    src, _ = classifier.address_class(question.src)
    dst, _ = classifier.address_class(question.dst)
    proto = PROTO_CODES[question.proto]
    ports: set[int | None] = {1}
    for entry in classifier.ir.allowed:
        if (entry.src_class, entry.dst_class, entry.proto) == (src, dst, proto):
            size = 1 << (PORT_BITS - (entry.match_bits - PROTO_BITS))
            ports.update(p for p in (entry.port, entry.port + size) if 1 <= p <= 65535)
    return sorted(ports, key=lambda p: p or 0)
