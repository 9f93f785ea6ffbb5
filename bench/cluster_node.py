"""B7's simulated cluster nodes: agents without a kernel to write to.

    python -m bench.cluster_node --etcd URLS --agents N [--node-prefix NAME]

Each simulated node is a process running the cluster agent's own path
(isoebpf.service.cluster_agent.ClusterAgent): the follower's watch on the
policy keys, each version compiled as a difference of the one in force
(`ClusterAgent.take`, through cluster.edit and Compiler.update for a change
of rules), the node's status written after each version, and its heartbeat
under a lease. One step is replaced: `apply`, which would hand the compiled
version to the backend, records it as in force and says so; no map is
written. What that leaves out is the kernel write of the change (B6 measures
it: about 2 ms for a one-rule change at 100k rules).

An agent holding a compiled 100k-rule policy takes about 400 MB, and 50 of
them more than the bench's machine has. So this process reads the published
version and compiles it once, as an agent's start does, and then forks the N
nodes from there: they start out sharing that state copy-on-write, each opens
its own connections to etcd, and from the next revision on each follows and
compiles on its own.

Each node prints, on stdout, a JSON line when it is ready and one per version
it applies: `received` (time.time() when the follower handed the version
out), `applied` (time.time() once it is compiled and in force) and
`compile_ms`. The agent's own log goes to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from isoebpf.cluster.etcd import Etcd
from isoebpf.cluster.follow import Follower, Version
from isoebpf.cluster.layout import Layout
from isoebpf.ir.compiler import Delta
from isoebpf.ir.tables import IR
from isoebpf.service.cluster_agent import ClusterAgent

PR_SET_PDEATHSIG = 1


def say(line: dict[str, Any]) -> None:
    """One line on stdout in one write: the nodes share the pipe, and a write of less
    than PIPE_BUF bytes is never interleaved with another."""
    os.write(sys.stdout.fileno(), (json.dumps(line) + "\n").encode())


@dataclass
class SimulatedNode(ClusterAgent):
    """ClusterAgent, its apply replaced by a step that touches no kernel."""

    received: float = 0.0  # when the follower handed out the version being taken
    taking: int = 0  # ... and its number

    def take(self, version: Version) -> None:
        self.received = time.time()
        self.taking = version.head.version
        super().take(version)

    def apply(self, ir: IR, why: str, compile_ms: float = 0.0, change: Delta | None = None) -> None:
        """What Agent.apply records once the backend has loaded a version, without the load."""
        self._ir = ir
        self._chosen = "simulated"
        self.stats.applies["ok"] += 1
        self.stats.last_apply_ok = True
        self.stats.last_apply_time = time.time()
        say({"event": "applied", "node": self.node, "version": self.taking, "received": self.received,
             "applied": time.time(), "compile_ms": compile_ms})


@dataclass
class Resumed:
    """The follower as it stood at the fork: `follow` goes on with the stream the parent
    started, so the node's own loop (ClusterAgent._follow) takes the next versions."""

    follower: Follower
    heard: Iterator[Any]

    def follow(self, stop: threading.Event) -> Iterator[Any]:
        return self.heard

    def forget_changes(self) -> None:
        self.follower.forget_changes()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--etcd", required=True, help="the members' client URLs, comma-separated")
    parser.add_argument("--agents", type=int, required=True, help="how many nodes to simulate")
    parser.add_argument("--node-prefix", default="sim-", help="node NAME is this and its number")
    parser.add_argument("--prefix", default="/isoebpf/", help="the cluster's keys' prefix")
    args = parser.parse_args(argv)
    urls = [u for u in args.etcd.split(",") if u]
    layout = Layout(args.prefix)
    # A namespace of no state: the first compile asks the scope for the numbering in force.
    node = SimulatedNode(f"etcd://{urls[0].split('://', 1)[-1]}{layout.prefix}", netns=f"b7-sim-{os.getpid()}",
                         etcd=Etcd(urls), layout=layout, node=f"{args.node_prefix}0")
    stop = threading.Event()
    follower = Follower(node.client, layout, node.watch_quiet)
    heard = follower.follow(stop)
    started = time.monotonic()
    for said in heard:
        if isinstance(said, Version):
            node.take(said)
            break
    if not node.stats.last_apply_ok:
        print(f"the published version was not taken: {node.stats.last_error or 'refused'}", file=sys.stderr)
        return 1
    say({"event": "compiled", "version": node.taking, "seconds": time.monotonic() - started})
    node.client.session.close()  # its pooled connections are the parent's, not the nodes'
    gc.freeze()  # the collector leaves the shared objects alone (their pages stay shared)
    children = [_fork(node, follower, heard, stop, urls, f"{args.node_prefix}{index}")
                for index in range(args.agents)]

    def stop_nodes(signum: int, frame: FrameType | None) -> None:
        for child in children:
            os.kill(child, signal.SIGKILL)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop_nodes)
    signal.signal(signal.SIGINT, stop_nodes)
    for _ in children:
        os.wait()
    return 0


def _fork(node: SimulatedNode, follower: Follower, heard: Iterator[Any], stop: threading.Event,
          urls: list[str], name: str) -> int:
    """Start node `name` as a child process: its pid (the child never returns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        return child
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the parent
        node.node = name
        node.etcd = follower.etcd = Etcd(urls)
        node._follower = Resumed(follower, heard)
        threading.Thread(target=node._heartbeats, args=(stop,), daemon=True).start()
        say({"event": "ready", "node": name, "pid": os.getpid()})
        node._follow(stop)
    finally:
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
