"""Cluster mode with real parts: a three-member etcd cluster, three node namespaces each
with its own agent and real traffic.

Each node is a small testbed (a router namespace with IT and HR hosts); its agent runs
inside the router namespace, so that its connections to etcd leave from there and a
firewall rule there cuts the node off as a partition would. etcd runs on the root
namespace's loopback, reached through a relay on the node's own loopback
(isoebpf.lab.relay), one port per member.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import policies
from isoebpf.cluster import layout as laid
from isoebpf.cluster import store
from isoebpf.cluster.etcd import Credentials, Etcd, EtcdError
from isoebpf.cluster.layout import ItemsHash, Layout
from isoebpf.lab.etcd import EtcdCluster
from isoebpf.lab.relay import Relay
from isoebpf.lab.testbed import Host, Network, Testbed, default_prefix
from tests.integration.conftest import SEED, AgentProcess, isoebpf, require_etcd

NODES = ("a", "b", "c")
LEASE_TTL = 3  # seconds: a node cut off shows as stale this long after its last heartbeat
BASE = SEED.read_text()  # hr -> it tcp/80; default deny, reject
WITH_SSH = BASE.replace("ports: [tcp/80]", "ports: [tcp/80, tcp/22]")
LAYOUT = Layout()


def node_bed(index: int) -> Testbed:
    return Testbed(networks=[Network("it", "10.250.0.1/16"), Network("hr", "192.168.0.1/16")],
                   hosts=[Host("it1", "it", "10.250.1.10"), Host("hr1", "hr", "192.168.1.10")],
                   prefix=f"{default_prefix()}k{index}")


@dataclass
class Node:
    name: str
    bed: Testbed
    relay: Relay
    agent: AgentProcess | None = None

    def start(self, *more: str) -> AgentProcess:
        self.agent = AgentProcess(None, self.bed.router, "--etcd", ",".join(self.relay.urls()),
                                  "--node", self.name, "--lease-ttl", str(LEASE_TTL), *more, inside=True)
        return self.agent

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def verdict(self, port: int) -> str:
        """What hr1 sees connecting to it1 on this node: connected, refused (REJECT), ..."""
        return str(self.bed.probe("hr1", "tcp", "it1", port, timeout=1.0)["outcome"])

    def _rules(self) -> list[list[str]]:
        """What drops everything between the agent and the relay, both ways."""
        ports = ",".join(str(p) for p in self.relay.ports)
        return [["INPUT", "-i", "lo", "-p", "tcp", "-m", "multiport", f"--{way}", ports, "-j", "DROP"]
                for way in ("dports", "sports")]

    def cut(self) -> None:
        """Cut the node off from etcd: its namespace drops what its agent sends there and back."""
        for rule in self._rules():
            self.bed.run_in(self.bed.router, "iptables", "-I", *rule)

    def heal(self) -> None:
        for rule in self._rules():
            while self.bed.run_in(self.bed.router, "iptables", "-C", *rule, check=False).returncode == 0:
                self.bed.run_in(self.bed.router, "iptables", "-D", *rule)


@dataclass
class Cluster:
    etcd: EtcdCluster
    nodes: list[Node]

    @property
    def urls(self) -> str:
        return ",".join(self.etcd.endpoints)

    def push(self, text: str, tmp_path: Path, name: str = "policy.yaml") -> dict[str, Any]:
        path = tmp_path / name
        path.write_text(text)
        said: dict[str, Any] = json.loads(isoebpf("cluster", "push", str(path), "--etcd", self.urls,
                                                  "--json").stdout)
        return said

    def status(self) -> tuple[int, dict[str, Any]]:
        done = isoebpf("cluster", "status", "--etcd", self.urls, "--json", check=False)
        return done.returncode, json.loads(done.stdout)

    def client(self) -> Etcd:
        return Etcd(self.etcd.endpoints)


def wait_version(agent: AgentProcess, version: int, timeout: float = 60) -> dict[str, object]:
    """The agent's `applied` line for this cluster version (earlier ones passed over)."""
    deadline = time.monotonic() + timeout
    while True:
        applied = agent.wait_for("applied", timeout=max(0.1, deadline - time.monotonic()))
        if applied["why"] == f"cluster version {version}":
            return applied


def wait_status(cluster: Cluster, ok: bool, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        code, said = cluster.status()
        if (code == 0) == ok:
            return said
        if time.monotonic() > deadline:
            raise AssertionError(f"cluster status never {'ok' if ok else 'failing'}: {said}")
        time.sleep(0.2)


def row(said: dict[str, Any], node: str) -> dict[str, Any]:
    return next(n for n in said["nodes"] if n["node"] == node)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    require_etcd()
    with ExitStack() as stack:
        etcd = stack.enter_context(EtcdCluster())
        nodes = []
        for index, name in enumerate(NODES):
            bed = stack.enter_context(node_bed(index))
            relay = stack.enter_context(Relay(bed.router, [("127.0.0.1", m.client_port) for m in etcd.members]))
            nodes.append(Node(name, bed, relay))
        # Last in, first out: the agents stop and their enforcement goes before the testbeds do.
        for node in nodes:
            stack.callback(isoebpf, "unload", "--netns", node.bed.router, check=False)
            stack.callback(node.stop)
        yield Cluster(etcd, nodes)


@pytest.fixture
def agents(cluster: Cluster, tmp_path: Path) -> Iterator[Cluster]:
    """Every node's agent enforcing BASE, published; every member back and every node
    reachable after the test."""
    version = cluster.push(BASE, tmp_path)["version"]
    for node in cluster.nodes:
        node.start()
    try:
        for node in cluster.nodes:
            assert node.agent is not None
            wait_version(node.agent, version, timeout=120)
        yield cluster
    finally:
        for node in cluster.nodes:
            node.heal()
            node.stop()
        for member in cluster.etcd.members:
            if not member.running:
                cluster.etcd.start(member)


def test_a_push_reaches_every_node_and_a_one_rule_change_writes_one_key(agents: Cluster,
                                                                       tmp_path: Path) -> None:
    for node in agents.nodes:
        assert (node.verdict(80), node.verdict(22)) == ("connected", "refused"), node.name
    assert isoebpf("cluster", "diff", str(_file(tmp_path, WITH_SSH)), "--etcd", agents.urls,
                   check=False).returncode == 3
    pushed = agents.push(WITH_SSH, tmp_path)
    assert pushed["changed"] and pushed["counts"]["allow"] == [0, 1, 0] and pushed["transactions"] == 1
    for node in agents.nodes:
        assert node.agent is not None
        wait_version(node.agent, pushed["version"])
        assert node.verdict(22) == "connected", node.name
    said = wait_status(agents, ok=True)
    assert said["version"] == pushed["version"]
    assert all(n["in_sync"] and n["report"]["backend"] == "ebpf" for n in said["nodes"])


def test_members_and_then_the_leader_killed_during_pushes_lose_nothing(agents: Cluster,
                                                                      tmp_path: Path) -> None:
    etcd = agents.etcd
    leader = etcd.leader()
    follower = next(m for m in etcd.members if m is not leader)
    etcd.kill(follower)
    agents.push(WITH_SSH, tmp_path)
    agents.push(BASE, tmp_path)
    etcd.start(follower)
    etcd.kill(etcd.leader())
    agents.push(WITH_SSH.replace("tcp/22", "tcp/22, udp/53"), tmp_path)
    final = agents.push(WITH_SSH, tmp_path)
    for node in agents.nodes:
        assert node.agent is not None
        wait_version(node.agent, final["version"])
        assert node.verdict(22) == "connected", node.name
    said = wait_status(agents, ok=True)
    assert said["version"] == final["version"]


def test_a_frozen_member_hangs_no_watch(agents: Cluster, tmp_path: Path) -> None:
    """A member that stops answering without closing its connections (SIGSTOP: a hung
    process, a half-open network) leaves streams that say nothing: the agents, watching
    through the first member, notice the silence and go on through another one."""
    first = agents.etcd.members[0]
    assert first.process is not None
    os.kill(first.process.pid, signal.SIGSTOP)
    try:
        pushed = agents.push(WITH_SSH, tmp_path)
        for node in agents.nodes:
            assert node.agent is not None
            wait_version(node.agent, pushed["version"], timeout=30)
            assert node.verdict(22) == "connected", node.name
    finally:
        os.kill(first.process.pid, signal.SIGCONT)
    wait_status(agents, ok=True)


def test_a_node_cut_off_keeps_enforcing_shows_stale_and_catches_up(agents: Cluster,
                                                                   tmp_path: Path) -> None:
    cut = agents.nodes[2]
    assert cut.agent is not None
    cut.cut()
    pushed = agents.push(WITH_SSH, tmp_path)
    for node in agents.nodes[:2]:
        assert node.agent is not None
        wait_version(node.agent, pushed["version"])
    cut.agent.wait_for("etcd_unreachable", timeout=10)
    deadline = time.monotonic() + LEASE_TTL + 10
    code, said = agents.status()
    while row(said, cut.name)["alive"]:
        assert time.monotonic() < deadline, said
        time.sleep(0.2)
        code, said = agents.status()
    assert row(said, cut.name)["state"].startswith("stale")
    # A stale node is no live one: the live nodes are in sync, so the status is 0.
    assert code == 0 and all(row(said, n.name)["in_sync"] for n in agents.nodes[:2]), said
    assert cut.verdict(22) == "refused"  # fail-static: the version it had
    healed = time.monotonic()
    cut.heal()
    applied = wait_version(cut.agent, pushed["version"], timeout=10)
    caught_up = time.monotonic() - healed
    work = (float(applied["ms"]) + float(applied["compile_ms"])) / 1000  # type: ignore[arg-type]
    assert caught_up - work <= 1.5, f"{caught_up:.2f} s to catch up, {work:.2f} s of it applying"
    assert cut.verdict(22) == "connected"
    wait_status(agents, ok=True)


def test_a_watch_whose_revision_was_compacted_reads_everything_again(agents: Cluster,
                                                                     tmp_path: Path) -> None:
    cut = agents.nodes[2]
    assert cut.agent is not None
    cut.cut()
    cut.agent.wait_for("etcd_unreachable", timeout=10)
    agents.push(WITH_SSH, tmp_path)
    no_rules = BASE.split("allow:")[0]  # the rule's key deleted
    final = agents.push(no_rules, tmp_path)
    assert final["counts"]["allow"] == [0, 0, 1]
    agents.etcd.compact(final["revision"])
    cut.heal()
    read = cut.agent.wait_for("cluster_read", timeout=10)
    assert "compacted" in str(read["why"])
    wait_version(cut.agent, final["version"], timeout=10)
    assert cut.verdict(80) == "refused"
    wait_status(agents, ok=True)


def test_a_restarted_agent_carries_on_and_catches_up(agents: Cluster, tmp_path: Path) -> None:
    node = agents.nodes[1]
    node.stop()
    seen: list[str] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            seen.append(node.verdict(22))

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        pushed = agents.push(WITH_SSH, tmp_path)
        agents.etcd.compact(pushed["revision"])
        time.sleep(0.5)
        agent = node.start()
        applied = wait_version(agent, pushed["version"], timeout=120)
    finally:
        done.set()
        prober.join()
    # Closed all along (the pins kept enforcing), until the new version opened it.
    opened = seen.index("connected") if "connected" in seen else len(seen)
    assert opened > 0 and set(seen[:opened]) == {"refused"} and set(seen[opened:]) <= {"connected"}, seen
    assert applied["generation"] != 1  # an update of what was in force, not a fresh load
    assert node.verdict(22) == "connected"
    wait_status(agents, ok=True)


def test_an_agent_killed_mid_change_converges_when_restarted(agents: Cluster, tmp_path: Path) -> None:
    node = agents.nodes[0]
    assert node.agent is not None
    pushed = agents.push(WITH_SSH, tmp_path)
    node.agent.process.kill()
    node.stop()
    agent = node.start()
    wait_version(agent, pushed["version"], timeout=120)
    assert node.verdict(22) == "connected"
    wait_status(agents, ok=True)


def test_a_version_written_by_hand_that_is_no_valid_policy_is_refused(agents: Cluster,
                                                                       tmp_path: Path) -> None:
    client = agents.client()
    stored = store.read(client, LAYOUT)
    assert stored.head is not None
    bad_key = LAYOUT.item("allow", "95")
    bad = laid.canonical({"from": "hr", "to": "10.99.0.0/16", "ports": ["tcp/22"]})
    items = {**stored.items, bad_key: bad}
    head = store.Head(stored.head.version + 1, "0" * 64, ItemsHash(items.items()).hex(), {}, time.time())
    client.put(bad_key, bad)
    client.put(LAYOUT.head, head.text())
    for node in agents.nodes:
        assert node.agent is not None
        refused = node.agent.wait_for("policy_refused")
        assert any(str(e).startswith(f"etcd:{bad_key}:1:") for e in refused["errors"]), refused  # type: ignore[union-attr]
        assert node.verdict(80) == "connected"  # the version in force stays
    said = wait_status(agents, ok=False)
    assert all(n["report"]["state"] == "refused" and n["report"]["errors"] for n in said["nodes"])
    recovered = agents.push(BASE, tmp_path)
    assert recovered["counts"]["allow"][2] == 1  # the bad key deleted
    for node in agents.nodes:
        assert node.agent is not None
        wait_version(node.agent, recovered["version"])
    wait_status(agents, ok=True)


def test_a_100k_rule_push_is_published_whole_on_every_node(agents: Cluster, tmp_path: Path) -> None:
    big = policies.policy_text(100_000, ".yaml").replace("{from: hr, to: it, ports: [tcp/80]}",
                                                         "{from: hr, to: it, ports: [tcp/80, tcp/22]}")
    assert big.count("\n") > 100_000
    pushed = agents.push(big, tmp_path)
    assert pushed["transactions"] > 700  # etcd takes 128 operations a transaction
    for node in agents.nodes:
        assert node.agent is not None
        applied = wait_version(node.agent, pushed["version"], timeout=240)
        # Nothing in between: no version but the whole one was applied, and it is the pushed one.
        versions = [e["why"] for e in node.agent.events if e["event"] == "applied"]
        assert versions[-1] == f"cluster version {pushed['version']}"
        assert applied["digest"] == pushed["digest"][:12]
        assert node.verdict(22) == "connected", node.name
    back = agents.push(BASE, tmp_path)
    assert back["counts"]["allow"][2] > 99_000
    for node in agents.nodes:
        assert node.agent is not None
        wait_version(node.agent, back["version"], timeout=240)
        assert node.verdict(22) == "refused"
    wait_status(agents, ok=True)


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "diff.yaml"
    path.write_text(text)
    return path


def test_tls_and_roles_a_node_reads_the_policy_and_writes_only_its_own_status(
        secured_etcd: EtcdCluster, tmp_path: Path) -> None:
    assert secured_etcd.pki is not None and secured_etcd.rbac is not None
    rbac = secured_etcd.rbac
    ca = str(secured_etcd.pki.ca)
    urls = ",".join(secured_etcd.endpoints)

    def options(who: Any) -> list[str]:
        return ["--etcd", urls, "--etcd-ca", ca, "--etcd-cert", str(who.cert), "--etcd-key", str(who.key),
                "--etcd-user", who.user, "--etcd-password-file", str(who.password_file)]

    policy = _file(tmp_path, BASE)
    pushed = json.loads(isoebpf("cluster", "push", str(policy), *options(rbac.admin), "--json").stdout)
    assert pushed["version"] == 1
    node_a = rbac.nodes["a"]
    refused = isoebpf("cluster", "push", str(_file(tmp_path, WITH_SSH)), *options(node_a), check=False)
    assert refused.returncode == 1 and "permission denied" in refused.stderr

    as_a = Etcd(secured_etcd.endpoints, Credentials(ca, str(node_a.cert), str(node_a.key), node_a.user,
                                                     str(node_a.password_file)))
    _, head = store.published(as_a, LAYOUT)
    assert head.version == 1
    store.report(as_a, LAYOUT, store.NodeReport("a", "enforcing", version=1))
    with pytest.raises(EtcdError, match="permission denied"):
        store.report(as_a, LAYOUT, store.NodeReport("b", "enforcing", version=1))
    with pytest.raises(EtcdError):
        Etcd(secured_etcd.endpoints, Credentials(ca)).range(LAYOUT.policy)  # no certificate: no TLS

    # An agent with node a's credentials, in a node namespace: it enforces and reports.
    with node_bed(9) as bed, Relay(bed.router, [("127.0.0.1", m.client_port)
                                                for m in secured_etcd.members]) as relay:
        agent = AgentProcess(None, bed.router, "--etcd", ",".join(relay.urls("https")), "--etcd-ca", ca,
                             "--etcd-cert", str(node_a.cert), "--etcd-key", str(node_a.key),
                             "--etcd-user", node_a.user, "--etcd-password-file", str(node_a.password_file),
                             "--node", "a", inside=True)
        try:
            wait_version(agent, 1, timeout=120)
            assert bed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "refused"
            status = isoebpf("cluster", "status", *options(rbac.admin), "--json", check=False)
            said = json.loads(status.stdout)
            assert status.returncode == 0 and row(said, "a")["in_sync"], said
        finally:
            agent.stop()
            isoebpf("unload", "--netns", bed.router, check=False)
