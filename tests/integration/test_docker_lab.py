"""The Docker lab itself: a real dockerd in a namespace, its networks and containers,
Docker's own isolation and restarts, and that nothing outlives it or touches the host."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from isoebpf.lab.docker import PLUGINS, DockerEngine
from tests.integration.conftest import require_docker

IT1, IT2, HR1 = "10.250.1.10", "10.250.2.20", "192.168.1.10"
GET = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {} 80"


def root_namespace() -> tuple[object, ...]:
    """What the tests must not change in the root namespace: its links (name, index,
    master, state) and its firewall, as iptables-save and nft print them."""
    links = [(link["ifname"], link["ifindex"], link.get("master"), link["operstate"])
             for link in json.loads(subprocess.run(["ip", "-j", "link"], check=True,
                                                   capture_output=True, text=True).stdout)]
    rules = [subprocess.run([tool], check=True, capture_output=True, text=True).stdout
             for tool in ("iptables-save", "ip6tables-save")]
    rules = ["".join(line for line in text.splitlines(True) if not line.startswith("#")) for text in rules]
    nft = subprocess.run(["nft", "list", "ruleset"], check=True, capture_output=True, text=True).stdout
    return sorted(links), *rules, nft


def left_behind(root: Path, netns: str | None) -> list[str]:
    """Whatever of an engine with this root survives its close."""
    left = [f"root {root}"] if root.exists() else []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if netns and re.search(rf"^{re.escape(netns)}\b", listed, re.M):
        left.append(f"namespace {netns}")
    left += [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
             if str(root) in line]
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and str(root) in (entry / "cmdline").read_text(errors="replace")
                    and (entry / "stat").read_text().rpartition(")")[2].split()[0] != "Z"):
                left.append(f"process {entry.name}")
        except OSError:
            continue
    left += [f"cgroup {top}" for top, _, _ in os.walk("/sys/fs/cgroup") if Path(top).name == root.name]
    return left


def on_it_and_hr(engine: DockerEngine) -> None:
    """The guide's two overlays as Docker networks, it1 and it2 on `it`, hr1 on `hr`."""
    engine.network_create("it", "10.250.0.0/16")
    engine.network_create("hr", "192.168.0.0/16")
    engine.run("it1", "it", IT1)
    engine.run("it2", "it", IT2, restart="unless-stopped")
    engine.run("hr1", "hr", HR1)


def forward(engine: DockerEngine) -> list[str]:
    return [line for line in engine.iptables_save().splitlines() if line.startswith("-A FORWARD")]


def test_the_engine_lives_in_its_namespace_and_close_removes_all_of_it() -> None:
    require_docker()
    before = root_namespace()
    plugins_before = PLUGINS.exists()
    with DockerEngine() as engine:
        root, netns = engine.root, engine.namespace
        assert engine.docker("version", "-f", "{{.Server.Version}}").stdout.startswith("20.10")
        pid = int((root / "docker.pid").read_text())
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
        assert "docker0" in engine.in_engine("ip", "-br", "link").stdout
        assert ":DOCKER-USER - [0:0]" in engine.iptables_save()
        on_it_and_hr(engine)
        engine.serve("it1")
        assert root_namespace() == before, "the engine changed the root namespace"
    assert root_namespace() == before
    assert left_behind(root, netns) == []
    assert PLUGINS.exists() == plugins_before
    assert not Path("/etc/docker/key.json").exists()


def test_a_network_connects_its_containers_and_docker_isolates_networks(docker_engine: DockerEngine) -> None:
    on_it_and_hr(docker_engine)
    docker_engine.serve("it1")
    it_bridge = docker_engine.bridge_of("it")
    veth = docker_engine.veth_of("it1")
    link = json.loads(docker_engine.in_engine("ip", "-j", "link", "show", veth).stdout)[0]
    assert link["master"] == it_bridge

    # Inside the containers, with busybox: web and ping within `it`, nothing from `hr`.
    assert docker_engine.exec("it2", "sh", "-c", GET.format(IT1)).stdout.startswith("HTTP/1.1 ")
    assert docker_engine.exec("it2", "ping", "-c", "1", "-W", "1", IT1).returncode == 0
    assert docker_engine.exec("hr1", "sh", "-c", GET.format(IT1)).stdout == ""
    assert docker_engine.exec("hr1", "ping", "-c", "1", "-W", "1", IT1).returncode == 1

    # The probes, from the containers' namespaces, for UDP and the outcome a user sees.
    assert docker_engine.probe("it2", "udp", IT1, 53)["outcome"] == "connected"
    assert docker_engine.probe("it2", "tcp", IT1, 22)["outcome"] == "connected"
    assert docker_engine.probe("hr1", "udp", IT1, 53, timeout=1.0)["outcome"] == "timeout"
    assert docker_engine.probe("hr1", "tcp", IT1, 22, timeout=1.0)["outcome"] == "timeout"

    # It was Docker's isolation that dropped them: its DROP into `it` counted them.
    drop = re.search(rf"^\[(\d+):\d+\] -A DOCKER-ISOLATION-STAGE-2 -o {it_bridge} -j DROP$",
                     docker_engine.in_engine("iptables-save", "-c").stdout, re.M)
    assert drop is not None and int(drop.group(1)) >= 4


def test_a_restart_reinserts_dockers_jumps_and_keeps_docker_user(docker_engine: DockerEngine) -> None:
    on_it_and_hr(docker_engine)
    it2_veth = docker_engine.veth_of("it2")
    ours = "-A FORWARD -m comment --comment ours -j ACCEPT"
    docker_engine.in_engine("iptables", "-I", "FORWARD", "-m", "comment", "--comment", "ours", "-j", "ACCEPT")
    docker_engine.in_engine("iptables", "-I", "DOCKER-USER", "-s", "198.51.100.0/24", "-j", "DROP")
    user_chain = [line for line in docker_engine.iptables_save().splitlines() if line.startswith("-A DOCKER-USER")]
    assert forward(docker_engine)[0] == ours

    docker_engine.restart()

    assert docker_engine.docker("version").returncode == 0
    rules = forward(docker_engine)
    # Its two jumps on top again, then the default bridge's four rules (docker0 is made
    # anew), then ours; the user-defined networks' rules stay where they were.
    assert rules[:2] == ["-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-ISOLATION-STAGE-1"]
    assert all("docker0" in rule for rule in rules[2:6])
    assert rules[6] == ours
    assert [line for line in docker_engine.iptables_save().splitlines()
            if line.startswith("-A DOCKER-USER")] == user_chain
    # Without live restore, stopping dockerd stopped every container; only the one with a
    # restart policy came back, on a new veth.
    state = {name: docker_engine.inspect(name, "{{.State.Running}}") for name in ("it1", "it2", "hr1")}
    assert state == {"it1": "false", "it2": "true", "hr1": "false"}
    assert docker_engine.veth_of("it2") != it2_veth


def test_with_live_restore_containers_run_through_a_restart() -> None:
    require_docker()
    with DockerEngine(live_restore=True) as engine:
        on_it_and_hr(engine)
        engine.serve("it1")
        veths = {name: engine.veth_of(name) for name in ("it1", "it2", "hr1")}
        engine.restart()
        assert {name: engine.veth_of(name) for name in veths} == veths
        assert engine.probe("it2", "tcp", IT1, 22)["outcome"] == "connected"
        # Docker 20.10 re-inserts only the isolation jump here: it now comes before
        # DOCKER-USER, whose rules no longer see traffic between networks first.
        rules = forward(engine)
        assert rules.index("-A FORWARD -j DOCKER-ISOLATION-STAGE-1") < rules.index("-A FORWARD -j DOCKER-USER")


def test_close_sweeps_what_a_crashed_dockerd_leaves() -> None:
    require_docker()
    before = root_namespace()
    with DockerEngine() as engine:
        root, netns = engine.root, engine.namespace
        on_it_and_hr(engine)
        engine.serve("it1")
        http = engine.inspect("it1", "{{.State.Pid}}")
        engine.kill()
        # Containers run on without dockerd and containerd, and still answer.
        assert Path(f"/proc/{http}").exists()
        assert subprocess.run(["nsenter", "-t", http, "--net", "ip", "-br", "link", "show", "eth0"],
                              capture_output=True).returncode == 0
    assert left_behind(root, netns) == []
    assert root_namespace() == before
