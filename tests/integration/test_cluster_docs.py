"""docs/cluster.md's three-node example, followed as written.

Three hosts are three namespaces on one LAN (10.0.0.1-3 on a bridge), each a
small testbed with IT and HR hosts behind it. On each, the example's per-host
block runs in bash as written, with three changes a namespace needs: this
checkout stands for the clone (set up already), the etcd data directory is a
temporary one, and the agent is told which namespace it enforces in (a real
host's agent enforces in its own). Then the "from any host" block runs on the
first host, and traffic is tried on each.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

from isoebpf.lab.testbed import default_prefix
from tests.integration.conftest import ROOT, isoebpf, require_etcd
from tests.integration.test_cluster import node_bed

DOCS = ROOT / "docs" / "cluster.md"
SECTION = "## Three nodes, from scratch"


def blocks() -> list[str]:
    """The code blocks of the example's section, in order."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    return re.findall(r"```\n(.*?)```", section, re.S)


def run(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *args], check=True, capture_output=True, text=True)


def test_the_three_node_example_works_as_written(tmp_path: Path) -> None:
    require_etcd()
    per_host, from_any = blocks()[:2]
    clone, naming, *steps = per_host.splitlines()
    assert clone.startswith("git clone") and naming == "NAME=node1 IP=10.0.0.1"
    lan = f"{default_prefix()}-lan"
    with ExitStack() as stack:
        subprocess.run(["ip", "netns", "add", lan], check=True)
        stack.callback(subprocess.run, ["ip", "netns", "del", lan])
        run(lan, "ip", "link", "add", "br0", "type", "bridge")
        run(lan, "ip", "link", "set", "br0", "up")
        hosts = []
        for n in (1, 2, 3):
            bed = stack.enter_context(node_bed(n + 10))
            stack.callback(isoebpf, "unload", "--netns", bed.router, check=False)
            run(bed.router, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", f"h{n}", "netns", lan)
            run(bed.router, "ip", "addr", "add", f"10.0.0.{n}/24", "dev", "lan0")
            run(bed.router, "ip", "link", "set", "lan0", "up")
            run(bed.router, "ip", "link", "set", "lo", "up")
            run(lan, "ip", "link", "set", f"h{n}", "master", "br0", "up")
            hosts.append(bed)
        for n, bed in enumerate(hosts, 1):
            script = "\n".join([f"NAME=node{n} IP=10.0.0.{n}", *steps]).replace(
                "/var/lib/isoebpf-etcd", str(tmp_path / f"etcd{n}"))
            script = re.sub(r"(isoebpf agent .*) &$", rf"\1 --netns {bed.router} --iface 'v-*' &", script,
                            flags=re.M)
            assert f"--netns {bed.router}" in script
            with (tmp_path / f"host{n}.log").open("w") as log:
                shell = subprocess.Popen(["nsenter", f"--net=/run/netns/{bed.router}", "bash", "-e", "-c",
                                          script + "\nwait"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            stack.callback(_end, shell)
        exported = re.search(r"^export ISOEBPF_ETCD=(\S+)$", per_host, re.M)
        assert exported is not None
        env = {**os.environ, "ISOEBPF_ETCD": exported.group(1)}
        push, status = from_any.splitlines()
        host1 = ["nsenter", f"--net=/run/netns/{hosts[0].router}", "bash", "-e", "-c"]
        deadline = time.monotonic() + 60
        while (pushed := subprocess.run([*host1, push], cwd=ROOT, env=env, capture_output=True,
                                        text=True)).returncode != 0:
            assert time.monotonic() < deadline, pushed.stderr + _logs(tmp_path)
            time.sleep(0.5)
        assert "pushed version 1" in pushed.stdout
        deadline = time.monotonic() + 120
        while (said := subprocess.run([*host1, status], cwd=ROOT, env=env, capture_output=True,
                                      text=True)).returncode != 0:
            assert time.monotonic() < deadline, said.stdout + said.stderr + _logs(tmp_path)
            time.sleep(0.5)
        assert [line.split()[:2] for line in said.stdout.splitlines()[1:]] == \
            [[f"node{n}", "version"] for n in (1, 2, 3)], said.stdout
        for bed in hosts:
            assert bed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
            assert bed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "refused"


def _end(shell: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the host's shell and all it started (etcd, the agent); SIGKILL to what
    is left of them after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(shell.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            shell.poll()
            os.killpg(shell.pid, 0)  # ProcessLookupError once every one of them is gone
            time.sleep(0.1)
        os.killpg(shell.pid, signal.SIGKILL)
    shell.wait()


def _logs(tmp_path: Path) -> str:
    return "".join(f"\n--- {p.name}:\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("host*.log")))
