"""B2-B5: real traffic through the router under each enforcer.

Kinds of traffic, from trafgen (one process, pinned to the generator's CPU)
or iperf3:

- denied: TCP SYNs to a port the policy denies, a new source port each
  (B2, B4): the router discards them and answers each with a reset;
- flow: 64-byte UDP packets of one allowed, established flow (B3, B5);
- new: 64-byte UDP packets to an allowed port, a new source port each, so
  every packet opens a connection (B5);
- tcp: iperf3 TCP throughput, one stream (B3, B4).

Rates come from interface counters over the window: `processed` is what the
router's ingress veth took in (every packet it accepts is processed: the
backlog drops before it counts), `forwarded` what reached the sink (whose UDP
is dropped by an XDP program at its interface, so the sink's stack costs
nothing), `answers` what came back to the generator. One CPU generates and
routes (bench/topology.py), so every packet rate here is bounded by the
generator's share of that CPU too (`generator_share`, its user and system
time); `cpu_ns_per_packet` removes it: the CPU's softirq time (the router's
receive, forward, enforce and answer work) over the packets processed.

On denied traffic, a second, shorter window follows with the kernel's run-time
statistics on (they cost every program run a little, so the first window runs
without): `program_ns_per_packet` is the time the enforcer's BPF programs took
per packet, theirs alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import enforcers, policies
from bench.programs import references
from bench.stats import interleaved, summary
from bench.topology import (
    GEN_ADDR,
    GEN_CPU,
    PYTHON,
    SINK_ADDR,
    TICK_SECONDS,
    Topology,
    cpu_times,
)
from isoebpf import pipeline
from isoebpf.backends.ebpf import bpfsys

FLOW_SPORT = 40000


# Measured on denied traffic only: a bare XDP_DROP passes nothing, and the drop
# variant of our XDP program allows what ebpf-xdp allows.
DISCARD_ONLY = ("xdp-drop", "ebpf-xdp-drop")


def trafgen_config(kind: str, macs: dict[str, str], topo: Topology) -> str:
    eth = f"eth(da={macs['r-gen']}, sa={macs[topo.gen]})"
    ip = f"ipv4(sa={GEN_ADDR}, da={SINK_ADDR}, ttl=64)"
    if kind == "denied":
        transport = f"tcp(sp=drnd(), dp={policies.DENIED_PORT}, syn), fill(0x00, 6)"
    elif kind == "flow":
        transport = f"udp(sp={FLOW_SPORT}, dp={policies.BENCH_PORT}), fill(0x41, 18)"
    else:
        transport = f"udp(sp=drnd(), dp={policies.BENCH_PORT}), fill(0x41, 18)"
    return f"{{ {eth}, {ip}, {transport} }}\n"


class Runner:
    def __init__(self, topo: Topology, window: float, conf_dir: Path, xdp_drop: int) -> None:
        self.topo = topo
        self.xdp_drop = xdp_drop
        self.window = window
        self.conf_dir = conf_dir

    def _seed_flow(self) -> None:
        """Open the UDP flow both ways, so conntrack (any of them) calls it established."""
        send = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                "s.bind(('', int(sys.argv[1]))); s.sendto(b'seed', (sys.argv[2], int(sys.argv[3])))")
        self.topo.exec(self.topo.gen, PYTHON, "-c", send, str(FLOW_SPORT), SINK_ADDR, str(policies.BENCH_PORT))
        time.sleep(0.05)
        self.topo.exec(self.topo.sink, PYTHON, "-c", send, str(policies.BENCH_PORT), GEN_ADDR, str(FLOW_SPORT))
        time.sleep(0.05)

    def packets(self, kind: str, programs: Sequence[int] = ()) -> dict[str, float]:
        """`programs`: ids of the enforcer's BPF programs whose own time to measure too."""
        conf = self.conf_dir / f"{kind}.trafgen"
        conf.write_text(trafgen_config(kind, self.topo.macs, self.topo), encoding="ascii")
        sink_drop = kind in ("flow", "new")
        if sink_drop:
            self.topo.xdp(self.topo.sink, "eth0", self.xdp_drop, "xdp")
        if kind == "flow":
            self._seed_flow()
        # Its own session: trafgen forks its sender, and both must stop before the next measure.
        gen = subprocess.Popen(
            ["ip", "netns", "exec", self.topo.gen, "taskset", "-c", str(GEN_CPU), "trafgen", "--cpus", "1",
             "-o", "eth0", "-i", str(conf), "-n", "0", "-C"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            time.sleep(0.5)
            if gen.poll() is not None:
                raise RuntimeError(f"trafgen stopped: {gen.stderr.read() if gen.stderr else ''}")
            before, cpu_before, t0 = self.topo.counters(), cpu_times(), time.monotonic()
            time.sleep(self.window)
            after, cpu_after, t1 = self.topo.counters(), cpu_times(), time.monotonic()
            program_ns = self._program_ns(programs)
        finally:
            _stop_group(gen)
            if sink_drop:
                self.topo.xdp(self.topo.sink, "eth0", None, "xdp")
        dt = t1 - t0

        def rate(where: str, direction: str) -> float:
            return (after[where][direction] - before[where][direction]) / dt
        cpu = {k: (cpu_after[GEN_CPU][k] - cpu_before[GEN_CPU][k]) * TICK_SECONDS
               for k in cpu_after[GEN_CPU]}
        processed = rate("router:r-gen", "rx")
        return ({} if program_ns is None else {"program_ns_per_packet": program_ns}) | {
            "offered_pps": rate("gen:eth0", "tx"),
            "processed_pps": processed,
            "forwarded_pps": rate("sink:eth0", "rx"),
            "answers_pps": rate("gen:eth0", "rx"),
            "softirq_share": cpu["softirq"] / dt,
            "generator_share": (cpu["user"] + cpu["system"]) / dt,
            "cpu_ns_per_packet": cpu["softirq"] * 1e9 / (processed * dt) if processed else 0.0,
        }

    def _program_ns(self, ids: Sequence[int]) -> float | None:
        """ns per packet the enforcer's programs (`ids`) take, by the kernel's run-time
        statistics over half a window; None for an enforcer that is no BPF program."""
        if not ids:
            return None
        statistics = bpfsys.run_time_statistics()
        try:
            first = [bpfsys.prog_info_by_id(i) for i in ids]
            time.sleep(self.window / 2)
            last = [bpfsys.prog_info_by_id(i) for i in ids]
        finally:
            os.close(statistics)
        # Each program sees each packet once: their times per run add up.
        return float(sum((b.run_time_ns - a.run_time_ns) / (b.run_cnt - a.run_cnt)
                         for a, b in zip(first, last, strict=True) if a and b and b.run_cnt > a.run_cnt))

    def tcp(self) -> dict[str, float]:
        # Longer than the packet windows: one TCP stream on this machine swings about
        # 10 % from run to run, and a longer run averages more of that out.
        seconds = max(3, round(self.window * 3))
        done = self.topo.exec(self.topo.gen, "iperf3", "-c", SINK_ADDR, "-p", str(policies.BENCH_PORT), "-t",
                              str(seconds), "-O", "1", "-J", "-A", str(GEN_CPU), "--connect-timeout", "5000",
                              timeout=seconds + 30)
        report = json.loads(done.stdout)
        return {"gbit_s": float(report["end"]["sum_received"]["bits_per_second"]) / 1e9}


def _stop_group(process: subprocess.Popen[str]) -> None:
    """SIGINT to the process group, then SIGKILL to whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(0.1)


def run_all(rules_sizes: list[int], rounds: int, window: float,
            say: Callable[[str], None]) -> list[dict[str, Any]]:
    """One row per (rules, enforcer, measure) with a summary per metric."""
    refs = references()
    rows: dict[tuple[int, str, str], list[dict[str, float]]] = {}
    try:
        with Topology() as topo:
            runner = Runner(topo, window, Path(tempfile.mkdtemp(prefix="isobench-")), refs.xdp_drop)
            runner.tcp()  # not kept: the first TCP run on a new topology came out 10-20 % low
            for rules in rules_sizes:
                ir = pipeline.loads(policies.scaled_policy(rules)).ir
                subjects = list(enforcers.ALL if rules == min(rules_sizes) else enforcers.SCALING)
                for rnd, name in interleaved(rounds, subjects):
                    with enforcers.enforcing(name, topo, rules, ir, refs.xdp_drop) as setup_s:
                        # A bare XDP_DROP passes nothing: only discarding means something there.
                        measures = ["denied"] if name in DISCARD_ONLY else ["denied", "flow", "tcp"]
                        if rules == min(rules_sizes) and name not in DISCARD_ONLY:
                            measures.append("new")
                        programs = enforcers.program_ids(name, topo, refs.xdp_drop)
                        for measure in measures:
                            got = (runner.tcp() if measure == "tcp" else
                                   runner.packets(measure, programs if measure == "denied" else ()))
                            rows.setdefault((rules, name, measure), []).append(got)
                            say(f"traffic {rules:>6} rules, round {rnd}, {name:14} {measure:6} "
                                + ", ".join(f"{k} {v:,.2f}" for k, v in got.items()
                                            if k in ("processed_pps", "forwarded_pps", "answers_pps",
                                                     "gbit_s", "cpu_ns_per_packet", "softirq_share"))
                                + f" (set-up {setup_s:.1f}s)")
    finally:
        refs.close()
    results = []
    for (rules, name, measure), runs in rows.items():
        row: dict[str, Any] = {"rules": rules, "enforcer": name, "measure": measure}
        for key in runs[0]:
            row[key] = summary([r[key] for r in runs])
        results.append(row)
    return results

