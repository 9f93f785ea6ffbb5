"""isoebpf beside a real Docker engine: overlays named by Docker network, the guide's
IT/HR policy between containers, and the engine's life (new containers, a restart,
a network made again with another subnet).

dockerd runs in a namespace of its own (isoebpf.lab.docker, with --live-restore so that
containers outlive its restarts); the agent enforces there (`--netns`), on Docker's
veths, and asks that engine for the networks' subnets (DOCKER_HOST).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isoebpf.backends import docker_user
from isoebpf.lab.docker import DockerEngine
from tests.integration.conftest import AgentProcess, isoebpf, require_docker

POLICY = """\
version: 1
default: deny
deny_action: reject
overlays:
  it: {docker_network: it}
  hr: {docker_network: hr}
  lab: {docker_network: lab, isolated: true}
allow:
  - {from: hr, to: it, ports: [tcp/80]}
"""
CONTAINERS = {"it1": ("it", "10.250.1.10"), "it2": ("it", "10.250.2.20"), "hr1": ("hr", "192.168.1.10"),
              "lab1": ("lab", "172.20.0.10"), "lab2": ("lab", "172.20.0.20")}
SLEEP = ("sleep", "1000000")
ATTACH_BOUND_MS = 100
REPAIR_BOUND_S = 2.0


def start(engine: DockerEngine, name: str, network: str, ip: str) -> None:
    engine.run(name, network, ip, command=SLEEP)
    engine.serve(name, tcp=(80, 22), udp=(53,))


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    require_docker()
    with DockerEngine(live_restore=True) as docker:
        for name, subnet in (("it", "10.250.0.0/16"), ("hr", "192.168.0.0/16"), ("lab", "172.20.0.0/16")):
            docker.network_create(name, subnet)
        for name, (network, ip) in CONTAINERS.items():
            start(docker, name, network, ip)
        previous = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = f"unix://{docker.socket}"
        try:
            yield docker
        finally:
            if previous is None:
                del os.environ["DOCKER_HOST"]
            else:
                os.environ["DOCKER_HOST"] = previous
            isoebpf("unload", "--netns", docker.namespace, check=False)


@pytest.fixture(scope="module")
def agent(engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    policy = tmp_path_factory.mktemp("docker") / "policy.yaml"
    policy.write_text(POLICY)
    running = AgentProcess(policy, engine.namespace, "--iface", "veth*", "--backend", "ebpf")
    try:
        running.wait_for("applied", timeout=120)
        yield running
    finally:
        running.stop()


def accepting(engine: DockerEngine) -> bool:
    """Whether the engine's IPv4 Docker chains start with our rules."""
    firsts = docker_user.chains(engine.namespace).get("iptables")
    return firsts is not None and docker_user.accepting(firsts)


def verdict(engine: DockerEngine, client: str, proto: str, target: str, port: int = 0) -> str:
    return str(engine.probe(client, proto, CONTAINERS[target][1], port, timeout=1.0)["outcome"])


def verdict_from(sandbox: str, proto: str, target: str, port: int) -> str:
    """As `verdict`, from a container's namespace found before (while dockerd is away,
    `docker inspect` cannot find it)."""
    done = subprocess.run(["nsenter", f"--net={sandbox}", sys.executable, "-m", "isoebpf.lab.probe", "connect",
                           proto, CONTAINERS[target][1], str(port), "--timeout", "1.0"],
                          capture_output=True, text=True, check=True)
    return str(json.loads(done.stdout)["outcome"])


def test_the_guides_policy_holds_between_containers(engine: DockerEngine, agent: AgentProcess) -> None:
    # Allowed between two Docker networks: Docker alone would drop it (its isolation).
    assert verdict(engine, "hr1", "tcp", "it1", 80) == "connected"
    # Denied, answered as REJECT says: a reset for TCP, admin-prohibited for the rest.
    assert verdict(engine, "hr1", "tcp", "it1", 22) == "refused"
    assert verdict(engine, "hr1", "udp", "it1", 53) == "unreachable"
    assert verdict(engine, "hr1", "icmp", "it1") == "unreachable"
    assert verdict(engine, "it1", "tcp", "hr1", 80) == "refused"
    # Inside a network: hairpin allows it; an isolated overlay does not.
    assert verdict(engine, "it2", "tcp", "it1", 22) == "connected"
    assert verdict(engine, "lab1", "tcp", "lab2", 22) == "refused"
    # Ours first where Docker leaves room for its users; Docker's own rules all there.
    saved = engine.iptables_save()
    assert accepting(engine)
    assert "-A DOCKER-ISOLATION-STAGE-2 -o " in saved and "-A FORWARD -j DOCKER-USER" in saved


def test_a_new_container_is_enforced_as_its_veth_appears(engine: DockerEngine, agent: AgentProcess) -> None:
    start(engine, "it3", "it", "10.250.3.30")
    CONTAINERS["it3"] = ("it", "10.250.3.30")
    veth = engine.veth_of("it3")
    while True:
        enforced = agent.wait_for("interface_enforced", timeout=10)
        if enforced["ifname"] == veth:
            break
    assert float(enforced["ms"]) <= ATTACH_BOUND_MS, enforced  # type: ignore[arg-type]
    print(f"new container's veth enforced {enforced['ms']} ms after it appeared")
    assert verdict(engine, "hr1", "tcp", "it3", 80) == "connected"
    assert verdict(engine, "hr1", "tcp", "it3", 22) == "refused"


def test_a_dockerd_restart_opens_nothing_and_is_repaired(engine: DockerEngine, agent: AgentProcess) -> None:
    """A live-restore restart: Docker rebuilds its chains (not atomically: a packet between
    its delete and insert of a jump meets its isolation first) and flushes ours from its
    isolation chain. No verdict changes at any moment (what the policy allows between the
    networks never meets FORWARD), and the agent puts our rules back within the bound."""
    seen: list[tuple[str, str]] = []
    done = threading.Event()
    hr1 = engine.sandbox("hr1")

    def probe() -> None:
        while not done.is_set():
            seen.append((verdict_from(hr1, "tcp", "it1", 80), verdict_from(hr1, "tcp", "it1", 22)))

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        engine.restart()
        restarted = time.monotonic()
        while not accepting(engine):
            assert time.monotonic() - restarted < REPAIR_BOUND_S, engine.iptables_save()
            time.sleep(0.05)
        repaired = len(seen)
        print(f"dockerd restart: our rules back {time.monotonic() - restarted:.2f} s after it answered")
        time.sleep(1.0)  # traffic after the repair too
    finally:
        done.set()
        prober.join()
    assert set(seen) == {("connected", "refused")}, seen
    print(f"probe pairs across the restart: {len(seen)}, {repaired} of them before our rules were back")


def test_what_is_allowed_between_networks_never_meets_forward(engine: DockerEngine, agent: AgentProcess) -> None:
    """The TC program forwards what it allows between overlays to the next hop itself: a
    DROP first in FORWARD (what a packet can meet while dockerd rebuilds its chains)
    changes no verdict, and the destination sees the source's own address. (Traffic inside
    one network is bridged, not forwarded, and meets Docker's rules as it would without us.)"""
    engine.in_engine("iptables", "-w", "-I", "FORWARD", "1", "-j", "DROP")
    try:
        assert verdict(engine, "hr1", "tcp", "it1", 80) == "connected"
        assert verdict(engine, "hr1", "tcp", "it1", 22) == "refused"
        with subprocess.Popen(["nsenter", f"--net={engine.sandbox('hr1')}", sys.executable, "-m",
                               "isoebpf.lab.probe", "session", CONTAINERS["it1"][1], "80"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as session:
            assert session.stdout is not None and json.loads(session.stdout.readline())["outcome"] == "open"
            peers = engine.in_netns_of("it1", "ss", "-Htn", "state", "established", "sport", "= :80").stdout
            session.communicate("")
        assert CONTAINERS["hr1"][1] in peers, peers  # not masqueraded to it1's gateway
    finally:
        engine.in_engine("iptables", "-w", "-D", "FORWARD", "-j", "DROP")


def test_a_network_made_again_with_another_subnet_is_followed(engine: DockerEngine, agent: AgentProcess,
                                                              tmp_path: Path) -> None:
    for name in ("lab1", "lab2"):
        engine.rm(name)
    engine.network_rm("lab")
    refused = agent.wait_for("policy_refused", timeout=10)
    assert any("no Docker network 'lab'" in str(e) for e in refused["errors"])  # type: ignore[union-attr]
    assert verdict(engine, "hr1", "tcp", "it1", 80) == "connected"  # the policy in force stays
    engine.network_create("lab", "172.21.0.0/16")
    CONTAINERS.update(lab1=("lab", "172.21.0.10"), lab2=("lab", "172.21.0.20"))
    for name in ("lab1", "lab2"):
        start(engine, name, *CONTAINERS[name])
    deadline = time.monotonic() + 10
    while True:
        applied = agent.wait_for("applied", timeout=max(0.1, deadline - time.monotonic()))
        if applied["why"] == "policy_changed":
            break
    # The removed containers' veths went with them: forgotten, not reported as missing enforcement.
    shown = json.loads(isoebpf("status", "--netns", engine.namespace, "--json").stdout)
    assert shown["overlays"]["lab"] == ["172.21.0.0/16"]
    assert all(a["state"] == "attached" for a in shown["attachments"]), shown["attachments"]
    assert verdict(engine, "lab1", "tcp", "lab2", 22) == "refused"  # isolated, on its new subnet


def docker_rules(engine: DockerEngine) -> list[str]:
    """The engine namespace's IPv4 rules that are not ours, counters aside."""
    return [line.split(" [")[0] if line.startswith(":") else line
            for line in engine.iptables_save().splitlines()
            if "isoebpf" not in line and not line.startswith(":dcos-isolation")]


def test_the_iptables_backend_beside_docker(engine: DockerEngine, agent: AgentProcess, tmp_path: Path) -> None:
    agent.stop()  # the eBPF agent: from here on this test's loads decide
    isoebpf("unload", "--netns", engine.namespace)
    dockers = docker_rules(engine)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    isoebpf("load", str(policy), "--backend", "iptables", "--netns", engine.namespace)
    assert verdict(engine, "hr1", "tcp", "it1", 80) == "connected"  # accepted before Docker's isolation
    assert verdict(engine, "hr1", "tcp", "it1", 22) == "refused"
    assert verdict(engine, "hr1", "udp", "it1", 53) == "unreachable"
    assert verdict(engine, "it1", "tcp", "hr1", 80) == "refused"
    user = [line for line in engine.iptables_save().splitlines() if line.startswith("-A DOCKER-USER ")]
    assert "isoebpf forwarded" in user[0] and "-j dcos-isolation" in user[1]
    assert docker_rules(engine) == dockers, "Docker's rules intact and in order"
    policy.write_text(POLICY.replace("ports: [tcp/80]", "ports: [tcp/80, tcp/22]"))
    isoebpf("load", str(policy), "--backend", "iptables", "--netns", engine.namespace)
    assert verdict(engine, "hr1", "tcp", "it1", 22) == "connected"
    assert docker_rules(engine) == dockers
    # A live-restore restart may put Docker's isolation jump first in FORWARD: then ours
    # go first in FORWARD, above it (what the agent's canary and repair do).
    engine.restart()
    isoebpf("load", str(policy), "--backend", "iptables", "--netns", engine.namespace)
    saved = engine.iptables_save().splitlines()
    forward = [line for line in saved if line.startswith("-A FORWARD ")]
    user = [line for line in saved if line.startswith("-A DOCKER-USER ")]
    assert "isoebpf" in forward[0] or (forward[0] == "-A FORWARD -j DOCKER-USER" and "isoebpf" in user[0]), saved
    assert verdict(engine, "hr1", "tcp", "it1", 22) == "connected", "\n".join(saved)
    isoebpf("unload", "--netns", engine.namespace)
    assert [line for line in engine.iptables_save().splitlines() if "isoebpf" in line] == []
