"""`make demo`: the seed's IT/HR example, verdict by verdict."""

from __future__ import annotations

import sys

import netaddr

from isoebpf import policy
from isoebpf.compiler import compile_policy
from isoebpf.explain import Question, explain

CASES = [
    ("HR app -> IT app, tcp/80", "192.168.1.10", "10.250.2.20", "tcp", 80),
    ("HR app -> IT app, tcp/22", "192.168.1.10", "10.250.2.20", "tcp", 22),
    ("IT app -> HR app, tcp/80", "10.250.2.20", "192.168.1.10", "tcp", 80),
    ("IT app -> HR app, icmp", "10.250.2.20", "192.168.1.10", "icmp", None),
    ("IT app -> IT app, tcp/5432", "10.250.2.20", "10.250.3.30", "tcp", 5432),
    ("HR app -> HR app, udp/53", "192.168.1.10", "192.168.7.70", "udp", 53),
    ("outside -> IT app, tcp/80", "203.0.113.5", "10.250.2.20", "tcp", 80),
    ("IT app -> outside, tcp/443", "10.250.2.20", "203.0.113.5", "tcp", 443),
]


def main(path: str) -> int:
    ir = compile_policy(policy.load(path))
    print(f"policy {path} (digest {ir.digest[:12]})")
    print(f"{'case':32} {'verdict':8} {'rule':12} reason")
    for label, src, dst, proto, port in CASES:
        answer = explain(ir, Question(netaddr.IPAddress(src), netaddr.IPAddress(dst), proto, port))
        print(f"{label:32} {answer['action']!s:8} {answer['rule']!s:12} {answer['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
