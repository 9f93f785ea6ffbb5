"""The agent with real namespaces: file watch, new interfaces, repair, metrics, SIGTERM."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from isoebpf import pipeline
from isoebpf.lab.testbed import Host, Testbed
from tests.integration.conftest import (
    DOCKER,
    SEED,
    SEED_RULE_ABOVE,
    WEB,
    AgentProcess,
    flush_iptables,
    isoebpf,
)


def free_port() -> int:
    """A loopback port nobody listens on now: parallel runs must not share one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


METRICS_PORT = free_port()
ATTACH_BOUND_MS = 100
REPAIR_BOUND_S = 2.0


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(SEED.read_text())
    return path


@pytest.fixture
def agent(testbed: Testbed, policy_file: Path) -> Iterator[AgentProcess]:
    running = AgentProcess(policy_file, testbed.router, "--metrics",
                           f"127.0.0.1:{METRICS_PORT}")
    try:
        running.wait_for("applied", timeout=120)
        yield running
    finally:
        running.stop()
        isoebpf("unload", "--netns", testbed.router)


def test_policy_changes_apply_and_bad_ones_are_refused(agent: AgentProcess, testbed: Testbed,
                                                       policy_file: Path) -> None:
    assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "refused"
    # A ConfigMap update: the new file appears beside the old and a symlink swaps.
    new = policy_file.with_name("v2.yaml")
    new.write_text(SEED.read_text().replace("ports: [tcp/80]", "ports: [tcp/80, tcp/22]"))
    link = policy_file.with_name("link.yaml")
    os.symlink(new, link)
    os.replace(link, policy_file)
    applied = agent.wait_for("applied")
    assert applied["generation"] == 2
    assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "connected"

    policy_file.unlink()
    policy_file.write_text("version: 1\noverlays: {it: {subnets: [10.250.0.0./16]}}\n")
    refused = agent.wait_for("policy_refused")
    assert any("remove the trailing dot" in str(e) for e in refused["errors"])  # type: ignore[union-attr]
    assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "connected"


def test_new_interfaces_are_enforced_within_the_bound(agent: AgentProcess,
                                                     testbed: Testbed) -> None:
    late = Host("it3", "it", "10.250.3.30")
    started = time.monotonic()
    testbed.add_host(late)
    enforced = agent.wait_for("interface_enforced")
    assert enforced["ifname"] == testbed.veth("it3")
    assert float(str(enforced["ms"])) < ATTACH_BOUND_MS, enforced
    assert time.monotonic() - started < 10
    assert testbed.probe("it3", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"


def test_a_detached_program_is_reattached(agent: AgentProcess, testbed: Testbed) -> None:
    # Someone else's tool removes the clsact qdisc, and our filter with it.
    subprocess.run(["tc", "-n", testbed.router, "qdisc", "del", "dev", testbed.veth("it1"),
                    "clsact"], check=True)
    detached_at = time.time()
    agent.wait_for("drift")
    repaired = float(str(agent.wait_for("applied")["ts"])) - detached_at
    assert repaired < REPAIR_BOUND_S
    print(f"re-attached after {repaired:.3f} s")
    assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"


def scrape() -> str:
    body: bytes = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics",
                                         timeout=5).read()
    return body.decode()


def packets_series(text: str, identity: str) -> dict[str, float]:
    """The rule label -> value of each isoebpf_rule_packets_total series of `identity`."""
    found = {}
    for line in text.splitlines():
        series = re.fullmatch(r"isoebpf_rule_packets_total\{(.*)\} (\S+)", line)
        labels = dict(re.findall(r'(\w+)="([^"]*)"', series[1])) if series else {}
        if series and labels["identity"] == identity:
            found[labels["rule"]] = float(series[2])
    return found


def test_metrics_are_served_and_sigterm_leaves_enforcement(agent: AgentProcess, testbed: Testbed,
                                                          policy_file: Path) -> None:
    testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)
    text = scrape()
    before = packets_series(text, WEB)
    assert list(before) == ["allow:0"] and before["allow:0"] > 0
    assert 'isoebpf_applies_total{result="ok"} 1.0' in text
    assert "isoebpf_last_apply_success 1.0" in text
    # A rule inserted above renames it allow:1: the series of its identity counts on.
    edited = policy_file.with_name("edited.yaml")
    edited.write_text(SEED_RULE_ABOVE)
    os.replace(edited, policy_file)
    assert agent.wait_for("applied")["generation"] == 2
    after = packets_series(scrape(), WEB)
    assert list(after) == ["allow:1"] and after["allow:1"] >= before["allow:0"]
    assert agent.stop() == 0
    assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"


FOREIGN_RULESET = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FORWARD_direct - [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -j FORWARD_direct
-A FORWARD -j ACCEPT
COMMIT
"""

# What others do to a node's firewall, as commands in the router namespace.
DISRUPTIONS = {
    # Docker restarting on a node where it ran before us: its chains are there, and it
    # puts its jumps back at the top of FORWARD, above ours.
    "docker restart": ["iptables-restore --noflush"],
    "iptables -F": ["iptables -F"],
    "nft flush ruleset": ["nft flush ruleset"],
    # firewalld reloading: its own whole filter table restored (accepting everything
    # forwarded), and the sets no rule uses any more destroyed.
    "firewalld reload": ["iptables-restore", "ipset destroy dcos.it", "ipset destroy dcos.hr"],
}
DOCKER_REINSERTS = """\
*filter
-D FORWARD -j DOCKER-ISOLATION-STAGE-1
-D FORWARD -j DOCKER-USER
-I FORWARD 1 -j DOCKER-USER
-I FORWARD 2 -j DOCKER-ISOLATION-STAGE-1
COMMIT
"""


def test_iptables_backend_is_repaired_after_others_undo_it(testbed: Testbed,
                                                           policy_file: Path) -> None:
    from isoebpf.backends.iptables import backend as iptables_backend
    from isoebpf.backends.state import Scope

    ir = pipeline.read(str(policy_file)).ir
    router = testbed.router
    running = AgentProcess(policy_file, router, "--backend", "iptables")
    latencies: dict[str, float] = {}
    try:
        running.wait_for("applied", timeout=60)
        subprocess.run(["ip", "netns", "exec", router, "iptables-restore", "--noflush"],
                       input=DOCKER.read_text(),
                       text=True, check=True)
        for name, commands in DISRUPTIONS.items():
            disrupted = time.time()
            for command in commands:
                stdin = {"iptables-restore": FOREIGN_RULESET,
                         "iptables-restore --noflush": DOCKER_REINSERTS}.get(command)
                subprocess.run(["ip", "netns", "exec", router, *command.split()], input=stdin,
                               text=True, check=True, capture_output=True)
            # A disruption of several commands may be repaired halfway and again after.
            while True:
                applied = running.wait_for("applied", timeout=5)
                assert applied["why"] == "repair", (name, applied)
                if iptables_backend.drift(Scope(router), ir) == []:
                    break
            latencies[name] = float(str(applied["ts"])) - disrupted
            assert latencies[name] < REPAIR_BOUND_S, (name, latencies)
            assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
            assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused", name
        assert any(e["event"] == "canary" for e in running.events), "the canary went unused"
        print("repair latencies (s):", {k: round(v, 3) for k, v in latencies.items()})
    finally:
        running.stop()
        isoebpf("unload", "--netns", router)
        flush_iptables(testbed)
