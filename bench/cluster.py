"""B7: cluster mode. How long a one-rule change takes to reach every node from
etcd, what it costs etcd and the agents in CPU, and how long a node cut off
from etcd takes to catch up once it can reach it again.

A real three-member etcd cluster on loopback (isoebpf.lab.etcd) holds a
policy of 100k rules, published with `store.push` as `isoebpf cluster push`
does. Then a series of one-rule changes (the first filler's port, moved and
moved back) is pushed, one at a time, each once every node has the one
before. A change's time to a node runs from the push's commit (when etcd
answered the push's last transaction, the one that writes the head; the
agents may hear of the head a few ms before that answer reaches the pusher)
to the node having the change in force.

- **Simulated nodes** (1, 10 and 50): bench/cluster_node.py, processes that
  run the agent's own follow-and-compile path with the backend's apply
  replaced by a step that writes no map (that module says exactly what is
  and is not done). They share this machine's CPUs with each other, with the
  etcd members and with the pusher. The kernel write they leave out is B6's
  one-rule apply; the targets add B6's median at 100k rules (from the same
  results document) to the p99.
- **A real node**: `isoebpf agent --etcd ... --backend ebpf` in a namespace
  of the bench's own (one veth to enforce on, no traffic), reaching etcd
  through a relay on the namespace's loopback (isoebpf.lab.relay), as the
  integration tests' nodes do; a change's time runs to the `ts` of its
  `applied` log line, written once the maps hold it.
- Percentiles are of two populations: "every node", per change the time to
  its slowest node (what the issue's targets name); and "each node", every
  (node, change) pair. "Delivery" is the time to the follower handing the
  version out, before the compile.
- **CPU per change**: utime + stime (/proc/PID/stat) of the etcd members and
  of the agents over the series, over the number of changes; and the same
  processes' CPU in an idle window just before, scaled to the series' length
  (heartbeats, leases, progress notifications), reported beside it. The
  pusher's own work (it reads all 100k keys to compare them) is not counted:
  its wall time is.
- **Resync after a partition**: the real node is cut off by firewall rules in
  its namespace (its agent's traffic to the relay dropped, as the integration
  test does); once its agent says etcd is unreachable, a few changes are
  pushed; then the rules go. The resync is the time from the heal to the
  last version's `applied` line, less the apply and compile (`ms`,
  `compile_ms`) of every version applied since the heal.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import policies, topology
from bench.stats import percentiles, summary
from bench.topology import PYTHON
from isoebpf import pipeline
from isoebpf.cluster import store
from isoebpf.cluster.etcd import Etcd
from isoebpf.cluster.layout import Layout
from isoebpf.lab.etcd import EtcdCluster
from isoebpf.lab.relay import Relay

RULES = 100_000
LAYOUT = Layout()
WARMUP = 2  # changes pushed and waited for, unmeasured, before a series
IDLE_S = 3.0  # the idle window CPU is read over before a series
SETTLE_S = 0.2  # between two changes: the nodes' status writes land
CHANGE_TIMEOUT = 120.0  # seconds for every node to apply one change
PARTITION_PUSHES = 3  # changes pushed while a node is cut off (odd: the last differs from its own)
MEMORY_MARGIN = 0.75  # of the memory available, what the simulated nodes may take
FALLBACK_RULES = 10_000  # where agents too many to hold RULES each are measured instead
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    agents: tuple[int, ...]  # simulated nodes, one series each
    changes: int  # one-rule changes per series
    resyncs: int  # partitions of the real node


PLANS = {"full": Plan((1, 10, 50), 30, 5), "quick": Plan((1, 5), 10, 2)}


class Stamped(Etcd):
    """An etcd client that notes when each transaction was answered: a push's last
    one writes the head, so its answer is the push's commit."""

    answered = 0.0

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> tuple[bool, int]:
        done: tuple[bool, int] = super().txn(compare, success)
        self.answered = time.time()
        return done


class Pusher:
    """Pushes the 100k-rule policy and its one-rule change in turn, each push a change."""

    def __init__(self, client: Stamped, rules: int) -> None:
        self.client = client
        self.rules = rules
        with pipeline.collector_paused():
            self.policies = [pipeline.parse_policy(policies.policy_text(rules, ".json", changed), "policy.json")
                             for changed in (False, True)]
        self.pushes = 0
        self.version = 0  # the last one published
        self.seconds: list[float] = []  # each change's push, wall clock

    def push(self) -> tuple[int, float]:
        """Publish the other policy: (its version, its commit's time.time())."""
        started = time.monotonic()
        with pipeline.collector_paused():
            pushed = store.push(self.client, LAYOUT, self.policies[self.pushes % 2])
        if not pushed.changed:
            raise RuntimeError("B7: a push changed nothing")
        if self.pushes:
            self.seconds.append(time.monotonic() - started)
        self.pushes += 1
        self.version = pushed.head.version
        return self.version, self.client.answered


class Lines:
    """JSON lines of a process's stream, read on a thread of their own as they come."""

    def __init__(self, stream: Any) -> None:
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with contextlib.suppress(ValueError):  # a line that is no JSON (a library's warning)
                self._queue.put(json.loads(line))
        self._queue.put(None)

    def next(self, wanted: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        """The next line `wanted` says yes to; lines before it are kept in `seen`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"B7: the process ended while waiting for {what}")
            self.seen.append(line)
            if line.get("event") in ("policy_refused", "apply_failed"):
                raise RuntimeError(f"B7: waiting for {what}: {line}")
            if wanted(line):
                return line
        raise RuntimeError(f"B7: no {what} within {timeout:.0f} s")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of `pids`, in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / CLOCK_TICK


def etcd_pids(etcd: EtcdCluster) -> list[int]:
    return [m.process.pid for m in etcd.members if m.process]


def private_mb(pid: int) -> float:
    """The process's private dirty memory: what it does not share with the others."""
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) / 1024
    return 0.0


def available_mb() -> float:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Series:
    """What one series of changes measured."""

    every_ms: list[float]  # per change, its slowest node
    each_ms: list[float]  # per (node, change)
    delivery_ms: list[float]
    compile_ms: list[float]
    apply_ms: list[float]  # the real node's map writes (empty for simulated nodes)
    cpu: dict[str, float]

    def row(self, agents: int, nodes: str, rules: int, changes: int) -> dict[str, Any]:
        row: dict[str, Any] = {"agents": agents, "nodes": nodes, "rules": rules, "changes": changes,
                               "every_ms": percentiles(self.every_ms), "each_ms": percentiles(self.each_ms),
                               "compile_ms": percentiles(self.compile_ms), "cpu": self.cpu}
        if self.delivery_ms:
            row["delivery_ms"] = percentiles(self.delivery_ms)
        if self.apply_ms:
            row["apply_ms"] = percentiles(self.apply_ms)
        return row


def _series(pusher: Pusher, changes: int, etcd_pids: list[int], agent_pids: list[int],
            applied: Callable[[int], list[dict[str, Any]]]) -> Series:
    """Push `changes` changes one at a time; `applied(version)` waits for every node's
    line of it, each with `at` (time.time() in force) and `compile_ms`, maybe `received`."""
    etcd_idle, agents_idle = cpu_seconds(etcd_pids), cpu_seconds(agent_pids)
    time.sleep(IDLE_S)
    etcd_idle, agents_idle = cpu_seconds(etcd_pids) - etcd_idle, cpu_seconds(agent_pids) - agents_idle
    every, each, delivery, compiles, applies = [], [], [], [], []
    etcd_before, agents_before, started = cpu_seconds(etcd_pids), cpu_seconds(agent_pids), time.monotonic()
    etcd_after_commit = 0.0  # from each push's return to the next push: delivery, the nodes' status writes
    for _ in range(changes):
        version, committed = pusher.push()
        etcd_pushed = cpu_seconds(etcd_pids)
        lines = applied(version)
        took = [(line["at"] - committed) * 1000 for line in lines]
        every.append(max(took))
        each += took
        delivery += [(line["received"] - committed) * 1000 for line in lines if "received" in line]
        compiles += [float(line["compile_ms"]) for line in lines]
        applies += [float(line["ms"]) for line in lines if "ms" in line]
        time.sleep(SETTLE_S)
        etcd_after_commit += cpu_seconds(etcd_pids) - etcd_pushed
    length = time.monotonic() - started
    per_change = 1000 / changes
    cpu = {"etcd_ms_per_change": (cpu_seconds(etcd_pids) - etcd_before) * per_change,
           "etcd_after_commit_ms_per_change": etcd_after_commit * per_change,
           "agents_ms_per_change": (cpu_seconds(agent_pids) - agents_before) * per_change,
           "etcd_idle_ms_per_change": etcd_idle / IDLE_S * length * per_change,
           "agents_idle_ms_per_change": agents_idle / IDLE_S * length * per_change,
           "series_s": length}
    return Series(every, each, delivery, compiles, applies, cpu)


def _simulated(etcd: EtcdCluster, pusher: Pusher, agents: int, changes: int, logs: Path,
               say: Callable[[str], None]) -> tuple[dict[str, Any], float]:
    """A series with `agents` simulated nodes: their row, and the most private memory one took."""
    log = logs / f"nodes-{agents}.log"
    with log.open("w") as errors:
        process = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", PYTHON, "-m", "bench.cluster_node",
             "--etcd", ",".join(etcd.endpoints), "--agents", str(agents), "--node-prefix", f"b7-{agents}-"],
            stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        lines = Lines(process.stdout)
        started = lines.next(lambda line: line["event"] == "compiled", 300, "the nodes' first compile")
        pids = [lines.next(lambda line: line["event"] == "ready", 60, "a node ready")["pid"]
                for _ in range(agents)]

        def applied(version: int) -> list[dict[str, Any]]:
            got = [lines.next(lambda line: line["event"] == "applied" and line["version"] == version,
                              CHANGE_TIMEOUT, f"version {version} on every node") for _ in range(agents)]
            return [{**line, "at": line["applied"]} for line in got]

        for _ in range(WARMUP):
            applied(pusher.push()[0])
        series = _series(pusher, changes, etcd_pids(etcd), pids, applied)
        memory = max(private_mb(pid) for pid in pids)
    except RuntimeError as err:
        raise RuntimeError(f"{err}; the nodes' log: {log.read_text()[-2000:]}") from err
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()
    row = series.row(agents, "simulated", pusher.rules, changes)
    row["start_s"] = started["seconds"]
    row["node_private_mb"] = memory
    return row, memory


class RealNode:
    """`isoebpf agent --etcd` with the eBPF backend in a namespace of the bench's own,
    reaching etcd through a relay on the namespace's loopback."""

    NAME = "b7-real"

    def __init__(self, stack: contextlib.ExitStack, etcd: EtcdCluster) -> None:
        self.netns = f"{topology.PREFIX}-b7"
        topology.run("ip", "netns", "add", self.netns)
        stack.callback(topology.run, "ip", "netns", "del", self.netns, check=False)
        topology.run("ip", "-n", self.netns, "link", "set", "lo", "up")
        topology.run("ip", "-n", self.netns, "link", "add", "b7-a", "type", "veth", "peer", "name", "b7-b")
        topology.run("ip", "-n", self.netns, "link", "set", "b7-a", "up")
        self.relay = stack.enter_context(Relay(self.netns, [("127.0.0.1", m.client_port) for m in etcd.members]))
        stack.callback(topology.run, PYTHON, "-m", "isoebpf.cli", "unload", "--netns", self.netns, check=False)
        # No repair pass while measuring (B6's agent too): it reads back every map.
        self.process = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", "nsenter", f"--net=/run/netns/{self.netns}",
             PYTHON, "-m", "isoebpf.cli", "agent", "--backend", "ebpf", "--netns", self.netns, "--iface", "b7-*",
             "--repair-interval", "3600", "--etcd", ",".join(self.relay.urls()), "--node", self.NAME],
            stderr=subprocess.PIPE, text=True)
        stack.callback(self._stop)
        self.lines = Lines(self.process.stderr)

    def _stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()

    def applied(self, version: int, timeout: float = CHANGE_TIMEOUT) -> list[dict[str, Any]]:
        """The agent's `applied` line of `version`; `at`: when the version went live, where the
        line says (`enforced`), else when the line was written (`ts`, after the state record)."""
        line = self.lines.next(lambda line: line["event"] == "applied"
                               and line["why"] == f"cluster version {version}", timeout, f"version {version} applied")
        return [{**line, "at": float(line.get("enforced") or line["ts"])}]

    def _rules(self) -> list[list[str]]:
        """What drops everything between the agent and the relay, both ways."""
        ports = ",".join(str(p) for p in self.relay.ports)
        return [["INPUT", "-i", "lo", "-p", "tcp", "-m", "multiport", f"--{way}", ports, "-j", "DROP"]
                for way in ("dports", "sports")]

    @contextlib.contextmanager
    def cut_off(self) -> Iterator[None]:
        """The node cut off from etcd (its agent said so) until the block ends."""
        for rule in self._rules():
            topology.run("ip", "netns", "exec", self.netns, "iptables", "-I", *rule)
        try:
            self.lines.next(lambda line: line["event"] == "etcd_unreachable", 30, "the agent cut off")
            yield
        finally:
            for rule in self._rules():
                topology.run("ip", "netns", "exec", self.netns, "iptables", "-D", *rule, check=False)


def _real(etcd: EtcdCluster, pusher: Pusher, changes: int, resyncs: int,
          say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The real node's series and its resyncs after partitions (the node gone after)."""
    with contextlib.ExitStack() as stack:
        return _measure_real(RealNode(stack, etcd), etcd, pusher, changes, resyncs, say)


def _measure_real(node: RealNode, etcd: EtcdCluster, pusher: Pusher, changes: int, resyncs: int,
                  say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    started = time.monotonic()
    node.applied(pusher.version, timeout=600)
    start_s = time.monotonic() - started
    say(f"B7 real node: the {pusher.rules:,}-rule version enforced in {start_s:.1f} s")
    for _ in range(WARMUP):
        node.applied(pusher.push()[0])
    series = _series(pusher, changes, etcd_pids(etcd), [node.process.pid], node.applied)
    row = series.row(1, "ebpf", pusher.rules, changes)
    row["start_s"] = start_s
    row["time_of"] = "enforced" if any("enforced" in line for line in node.lines.seen) else "ts"
    runs = []
    for _ in range(resyncs):
        with node.cut_off():
            for _ in range(PARTITION_PUSHES):
                pusher.push()
        healed, heard = time.time(), len(node.lines.seen)
        last = node.applied(pusher.version)[0]
        # Every version applied since the heal is work on what changed (the watch may hand them out apart).
        work = sum(float(line["ms"]) + float(line["compile_ms"])
                   for line in node.lines.seen[heard:] if line["event"] == "applied") / 1000
        # `ts`, not `at`: the line's `ms` runs to the line, past the moment the version went live.
        caught_up = float(last["ts"]) - healed
        runs.append({"caught_up_s": caught_up, "work_s": work, "resync_s": caught_up - work})
        say(f"B7 resync after a partition: {runs[-1]['resync_s']:.2f} s "
            f"({runs[-1]['caught_up_s']:.2f} s to applied, {work:.2f} s of it compiling and applying)")
    resync = [r["resync_s"] for r in runs]
    return row, {"pushes": PARTITION_PUSHES, "runs": runs, "median_s": statistics.median(resync),
                 "max_s": max(resync)}


def run(plan: Plan, say: Callable[[str], None]) -> dict[str, Any]:
    """B7 under `plan`: the results document's "b7"."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(EtcdCluster())
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="isoebpf-b7-")))
        client = Stamped(etcd.endpoints)
        pusher = Pusher(client, RULES)
        started = time.monotonic()
        pusher.push()
        first_push_s = time.monotonic() - started
        say(f"B7: {RULES:,} rules pushed to a 3-member etcd in {first_push_s:.1f} s")
        per_node = 0.0  # MiB a simulated node took of its own, at RULES
        for agents in plan.agents:
            need, have = agents * per_node, available_mb() * MEMORY_MARGIN
            if need > have:
                why = (f"{agents} nodes would take about {need / 1024:.1f} GiB ({per_node:.0f} MiB each, "
                       f"private), more than {MEMORY_MARGIN:.0%} of the {have / MEMORY_MARGIN / 1024:.1f} GiB "
                       f"available; measured at {FALLBACK_RULES:,} rules instead")
                skipped.append({"agents": agents, "rules": RULES, "why": why})
                say(f"B7 {agents:>3} simulated nodes at {RULES:,} rules: not measured: {why}")
                continue
            row, per_node = _simulated(etcd, pusher, agents, plan.changes, logs, say)
            rows.append(row)
            _say(row, say)
        real, resync = _real(etcd, pusher, plan.changes, plan.resyncs, say)
        rows.append(real)
        _say(real, say)
        push_s = summary(pusher.seconds)
        if skipped:
            smaller = Pusher(client, FALLBACK_RULES)
            smaller.push()
            for skip in skipped:
                row, _ = _simulated(etcd, smaller, skip["agents"], plan.changes, logs, say)
                rows.append(row)
                _say(row, say)
    return {"rules": RULES, "warmup": WARMUP, "first_push_s": first_push_s, "push_s": push_s,
            "propagation": rows, "skipped": skipped, "resync": resync}


def _say(row: dict[str, Any], say: Callable[[str], None]) -> None:
    every, cpu = row["every_ms"], row["cpu"]
    say(f"B7 {row['agents']:>3} {row['nodes']} node(s) at {row['rules']:,} rules, {row['changes']} changes: "
        f"every node p50 {every['p50']:.0f} ms, p99 {every['p99']:.0f} ms, max {every['max']:.0f} ms; compile p50 "
        f"{row['compile_ms']['p50']:.0f} ms; CPU per change: etcd {cpu['etcd_ms_per_change']:.0f} ms, "
        f"agents {cpu['agents_ms_per_change']:.0f} ms")
