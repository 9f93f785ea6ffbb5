"""The user-visible verdict suite: what each client sees, derived from the reference evaluator.

Every backend runs these unchanged against real sockets in the testbed; the
expected outcome of each try is what the evaluator's verdict means to a user.
"""

from __future__ import annotations

import netaddr

from isoebpf.ir.evaluate import ICMP_ECHO_REQUEST, IPPROTO_ICMPV6, TCP_SYN, Packet, decide
from isoebpf.ir.tables import IR, PROTO_ICMP, PROTO_TCP, PROTO_UDP
from isoebpf.lab.testbed import Testbed

# (client, protocol, target host, port): the IT/HR testbed's interesting pairs.
IT_HR_TRIES = [
    ("hr1", "tcp", "it1", 80),
    ("hr1", "tcp", "it1", 22),
    ("hr1", "udp", "it1", 53),
    ("hr1", "icmp", "it1", 0),
    ("it1", "tcp", "hr1", 80),
    ("it1", "udp", "hr1", 53),
    ("it1", "icmp", "hr1", 0),
    ("it1", "tcp", "it2", 22),
    ("hr1", "udp", "hr2", 53),
    ("hr1", "tcp", "fd00:4852::20", 22),
    ("out1", "tcp", "it1", 80),
    ("it1", "tcp", "out1", 22),
]


def first_packet(testbed: Testbed, client: str, proto: str, target: str, port: int) -> Packet:
    """The first packet of a try, as the evaluator sees it."""
    dst = netaddr.IPAddress(target if ":" in target else testbed.host(target).address)
    host = testbed.host(client)
    src = netaddr.IPAddress(host.address6 if dst.version == 6 and host.address6 else host.address)
    if proto == "icmp":
        number = PROTO_ICMP if dst.version == 4 else IPPROTO_ICMPV6
        return Packet(src, dst, number, icmp_type=ICMP_ECHO_REQUEST[number], icmp_id=1)
    number = PROTO_TCP if proto == "tcp" else PROTO_UDP
    return Packet(src, dst, number, sport=40000, dport=port, tcp_flags=TCP_SYN)


def expected_outcome(ir: IR, testbed: Testbed, client: str, proto: str, target: str,
                     port: int) -> str:
    """connected / refused / unreachable / timeout, as the evaluator's verdict implies."""
    decision = decide(ir, first_packet(testbed, client, proto, target, port))
    action = decision.action
    if action == "allow" or decision.audit:  # audit mode denies nothing
        return "connected"
    if action == "drop":
        return "timeout"
    return "refused" if proto == "tcp" else "unreachable"
