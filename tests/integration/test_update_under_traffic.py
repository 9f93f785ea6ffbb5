"""Policy updates under continuous traffic: every outcome is the old policy's or the new one's.

Two policies that disagree on some tries alternate while clients in three host
namespaces attempt connections without pause (real sockets, 2.5 s timeouts).
Each outcome must be what policy A or policy B implies (reference evaluator);
one that matches neither (a packet that met no policy, or half of each) fails.

The first load goes through the CLI; the alternations call `backend.load`, the
function `isoebpf load` and the agent both call, in this process: a CLI process
start (~0.5 s of Python imports) would otherwise dominate the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from isoebpf.backends import enforcer
from isoebpf.backends.state import Scope
from isoebpf.lab.testbed import Testbed
from tests.integration.conftest import isoebpf, policy_files
from tests.scenarios import expected_outcome

# Per client: the tries its loop repeats. Some differ between A and B, some are denied
# by both (an update that left a gap would let them through), some allowed by both.
LOOPS = {
    "hr1": [("tcp", "it1", 80), ("tcp", "it1", 22), ("udp", "it1", 53), ("icmp", "it1", 0)],
    "it1": [("tcp", "hr1", 80), ("udp", "hr1", 53), ("tcp", "it2", 22), ("icmp", "hr1", 0)],
    "out1": [("tcp", "it1", 80)],
}
# An eBPF update writes maps (~35 ms here with traffic running). An iptables update
# runs ~15 tools in the namespace and dumps conntrack to revoke (~0.85 s with this
# traffic), so CI does fewer, and the soak 2,000 (half an hour) rather than 10,000.
ALTERNATIONS = {"ebpf": 1000, "iptables": 30}
SOAK_ALTERNATIONS = {"ebpf": 10_000, "iptables": 2_000}


class Clients:
    """One probe loop per client namespace; every outcome they report, kept."""

    def __init__(self, testbed: Testbed) -> None:
        self.outcomes: dict[str, list[dict[str, object]]] = {c: [] for c in LOOPS}
        self.processes: dict[str, subprocess.Popen[str]] = {}
        self.readers = []
        for client, tries in LOOPS.items():
            args = [sys.executable, "-m", "isoebpf.lab.probe", "loop"]
            for proto, target, port in tries:
                args += ["--try", proto, testbed.address_of(target), str(port)]
            process = subprocess.Popen(["ip", "netns", "exec", testbed.netns(client), *args],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.processes[client] = process
            reader = threading.Thread(target=self._read, args=(client, process), daemon=True)
            reader.start()
            self.readers.append(reader)

    def _read(self, client: str, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.outcomes[client].append(json.loads(line))

    def stop(self) -> None:
        for process in self.processes.values():
            if process.stdin:
                process.stdin.close()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for reader in self.readers:
            reader.join(timeout=5)
        for process in self.processes.values():
            if process.stdout:
                process.stdout.close()


def alternate(testbed: Testbed, name: str, count: int, tmp_path: Path) -> Counter[str]:
    """Load A, start the clients, alternate B/A `count` times; outcomes by class."""
    files = policy_files(tmp_path)
    (path_a, ir_a), (path_b, ir_b) = files["A"], files["B"]
    scope = Scope(testbed.router)
    expected = {client: [(expected_outcome(ir_a, testbed, client, *t),
                          expected_outcome(ir_b, testbed, client, *t)) for t in tries]
                for client, tries in LOOPS.items()}
    clients: Clients | None = None
    try:
        isoebpf("load", str(path_a), "--backend", name, "--netns", testbed.router,
                "--iface", "v-*", "--mode", "tc")
        clients = Clients(testbed)
        time.sleep(1.0)  # every loop running before the first change
        started = time.monotonic()
        for n in range(count):
            path, ir = (path_b, ir_b) if n % 2 == 0 else (path_a, ir_a)
            enforcer.load(name, name, ir, scope, ["v-*"], "tc", str(path))
        elapsed = time.monotonic() - started
        time.sleep(1.0)
    finally:
        if clients is not None:
            clients.stop()
        isoebpf("unload", "--netns", testbed.router)
    classes: Counter[str] = Counter()
    wrong = []
    for client, seen in clients.outcomes.items():
        for attempt in seen:
            want_a, want_b = expected[client][int(str(attempt["try"]))]
            outcome = attempt["outcome"]
            if want_a == want_b == outcome:
                classes["both policies agree"] += 1
            elif outcome == want_a:
                classes["policy A"] += 1
            elif outcome == want_b:
                classes["policy B"] += 1
            elif outcome == "reset" and {want_a, want_b} == {"connected", "refused"}:
                # The SYN passed under the policy that allows it, the switch to the one
                # that rejects came before the SYN-ACK: each packet met one whole policy.
                classes["cut mid-handshake by a switch"] += 1
            else:
                classes["neither"] += 1
                wrong.append((client, LOOPS[client][int(str(attempt["try"]))], want_a, want_b,
                              outcome))
    print(f"\n{name}: {count} alternations in {elapsed:.1f} s "
          f"({elapsed / count * 1000:.1f} ms each); outcomes: {dict(classes)}")
    assert not wrong, f"{len(wrong)} outcomes match neither policy: {wrong[:10]}"
    assert classes["policy A"] and classes["policy B"], f"the alternation never showed: {classes}"
    return classes


@pytest.mark.parametrize("name", ["ebpf", "iptables"])
def test_update_under_traffic(testbed: Testbed, tmp_path: Path, name: str) -> None:
    alternate(testbed, name, ALTERNATIONS[name], tmp_path)


@pytest.mark.soak
@pytest.mark.parametrize("name", ["ebpf", "iptables"])
def test_update_under_traffic_soak(testbed: Testbed, tmp_path: Path, name: str) -> None:
    alternate(testbed, name, SOAK_ALTERNATIONS[name], tmp_path)
