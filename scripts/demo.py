"""`make demo`: the guide's IT/HR example, enforced for real in a throw-away testbed.

Builds a router namespace with an IT, an HR and an outside network, loads the
policy with the eBPF backend onto the router's container-facing veths, and
shows what each client saw next to what the policy says. Removes everything
it made, also when interrupted.
"""

from __future__ import annotations

import subprocess
import sys

import netaddr

from isoebpf import pipeline
from isoebpf.ir.explain import Question, explain
from isoebpf.lab.testbed import it_hr

TRIES = [
    ("HR app -> IT app, tcp/80", "hr1", "tcp", "it1", 80),
    ("HR app -> IT app, tcp/22", "hr1", "tcp", "it1", 22),
    ("IT app -> HR app, tcp/80", "it1", "tcp", "hr1", 80),
    ("IT app -> HR app, udp/53", "it1", "udp", "hr1", 53),
    ("IT app -> HR app, ping", "it1", "icmp", "hr1", 0),
    ("IT app -> IT app, tcp/22", "it1", "tcp", "it2", 22),
    ("HR app -> HR app, udp/53", "hr1", "udp", "hr2", 53),
    ("outside -> IT app, tcp/80", "out1", "tcp", "it1", 80),
    ("IT app -> outside, tcp/22", "it1", "tcp", "out1", 22),
]


def isoebpf(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "isoebpf.cli", *args], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"isoebpf {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def main(path: str) -> int:
    ir = pipeline.read(path).ir
    with it_hr() as bed:
        print(isoebpf("load", path, "--netns", bed.router, "--iface", "v-*"), end="")
        try:
            print()
            print(f"{'try':28} {'client saw':12} {'in':>8}  {'policy says':8} rule")
            for label, client, proto, target, port in TRIES:
                seen = bed.probe(client, proto, target, port, timeout=1.0)
                question = Question(netaddr.IPAddress(bed.host(client).address),
                                    netaddr.IPAddress(bed.host(target).address), proto,
                                    port or None)
                said = explain(ir, question)
                print(f"{label:28} {seen['outcome']!s:12} {seen['ms']!s:>6}ms  "
                      f"{said['action']!s:8} {said['rule']}")
            print()
            print(isoebpf("status", "--netns", bed.router), end="")
        finally:
            print(isoebpf("unload", "--netns", bed.router), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
