"""Two nodes joined by VXLAN, the same policy enforced on both by two agents: cross-node
HR -> IT tcp/80 passes, IT -> HR is rejected, and replies pass both nodes' enforcement."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from isoebpf.backends.ebpf import backend as ebpf
from isoebpf.backends.state import Scope
from isoebpf.lab.multinode import VXLAN, MultiNode, it_hr_two_nodes
from tests.conftest import require
from tests.integration.conftest import SEED, AgentProcess, isoebpf, packets_by_rule


def require_vxlan() -> None:
    """Skip (fail under CI) where the kernel makes no VXLAN devices; probed in a scratch
    namespace, never the root one."""
    scratch = f"isoebpf-vxprobe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", scratch], capture_output=True, text=True)
    if made.returncode != 0:
        require("network namespaces", made.stderr.strip())
    try:
        probe = subprocess.run(["ip", "-n", scratch, "link", "add", "vxprobe", "type", "vxlan",
                                "id", "1", "dstport", "4789"], capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", scratch], check=True)
    if probe.returncode != 0:
        require("vxlan devices", probe.stderr.strip())


@pytest.fixture(scope="module")
def cluster() -> Iterator[MultiNode]:
    require_vxlan()
    with it_hr_two_nodes() as built:
        yield built


@pytest.fixture(scope="module")
def agents(cluster: MultiNode) -> Iterator[dict[str, AgentProcess]]:
    running: dict[str, AgentProcess] = {}
    try:
        for node in cluster.nodes:
            ns = cluster.node(node.name)
            running[node.name] = AgentProcess(SEED, ns, "--backend", "ebpf", "--iface", VXLAN)
        for agent in running.values():
            agent.wait_for("applied", timeout=120)
        yield running
    finally:
        for agent in running.values():
            agent.stop()
        # Every node unloaded, whichever fails; then any failure is reported.
        unloads = [isoebpf("unload", "--netns", cluster.node(node.name), check=False)
                   for node in cluster.nodes]
        failed = [f"{' '.join(done.args)}: {done.stdout}{done.stderr}"
                  for done in unloads if done.returncode != 0]
        assert not failed, failed


def counters(cluster: MultiNode, node: str) -> dict[str, int]:
    record = ebpf.status(Scope(cluster.node(node)))
    assert record is not None
    return packets_by_rule(record)


def test_cross_node_verdicts_and_replies_through_both_nodes(
    cluster: MultiNode, agents: dict[str, AgentProcess],
) -> None:
    for node in ("node-a", "node-b"):
        record = ebpf.status(Scope(cluster.node(node)))
        assert record is not None
        attached = {a["ifname"] for a in record["attachments"] if a["state"] == "attached"}
        assert {VXLAN, "v-it-" + node[-1] + "1", "v-hr-" + node[-1] + "1"} <= attached, attached
    before = {node: counters(cluster, node) for node in ("node-a", "node-b")}
    assert cluster.probe("hr-a1", "tcp", "it-b1", 80, timeout=2.0)["outcome"] == "connected"
    assert cluster.probe("hr-b1", "tcp", "it-a1", 80, timeout=2.0)["outcome"] == "connected"
    after = {node: counters(cluster, node) for node in ("node-a", "node-b")}
    for node in ("node-a", "node-b"):
        # Each node judged the connection its HR host opened and the one arriving over
        # VXLAN; the replies of both met each node's conntrack as established.
        assert after[node]["allow:0"] - before[node]["allow:0"] >= 2, (node, after[node])
        assert after[node]["established"] > before[node]["established"], (node, after[node])

    refused = cluster.probe("it-a1", "tcp", "hr-b1", 80, timeout=2.0)
    assert refused["outcome"] == "refused", refused
    assert cluster.probe("it-b1", "tcp", "hr-a1", 22, timeout=2.0)["outcome"] == "refused"
    assert cluster.probe("hr-a1", "tcp", "it-b1", 22, timeout=2.0)["outcome"] == "refused"
    assert counters(cluster, "node-a")["default"] > after["node-a"]["default"]
    # Same overlay across nodes: hairpin-allowed.
    assert cluster.probe("it-a1", "tcp", "it-b1", 22, timeout=2.0)["outcome"] == "connected"

