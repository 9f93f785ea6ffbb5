"""B6: the control plane. How long loading N rules takes, phase by phase, how
long a one-rule change takes, and how much kernel memory the maps hold.

Phases of a first load, timed apart: parse (YAML to the validated model), IR
compile (model to the tables, and the lints that need them), program compile
(bcc: C to loaded programs and created maps; sized for N), map fill (the
tables written as generation 1 into both slots, and made active). A one-rule
change is the update path a second `load` takes: the policy is parsed and
compiled again (end to end), then written as generation 2 as the difference
from what its slot holds, and activated (apply): the program is not
recompiled. The load total adds the phases up, whereas `isoebpf load` runs the
program compile beside the parse (see cli.load). Map memory is the kernel's
own account (`memlock` in /proc/self/fdinfo of each map), after the fill. The
phases run with Python's collector paused, as in `isoebpf load`.

End to end, as a user sees it: the wall-clock time of `isoebpf load` (a process
of its own: start-up, parse, the compile beside it, attach, fill) enforcing the
policy on one veth in a namespace of the bench's own, and of the second
`isoebpf load` that changes one rule.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import policies, topology
from bench.stats import summary
from bench.topology import PYTHON
from isoebpf import pipeline
from isoebpf.backends.ebpf import program
from isoebpf.ir.compiler import compile_policy
from isoebpf.ir.lint import lint
from isoebpf.ir.tables import IR
from isoebpf.policy import parse
from isoebpf.policy.model import Policy


def map_memory(maps: program.Maps) -> dict[str, int]:
    """Bytes of kernel memory each map takes, as the kernel accounts it."""
    found: dict[str, int] = {}
    for name, fd in maps.items():
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("memlock:"):
                    found[name] = int(line.split()[1])
    return found


def _timed(work: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def _one(rules: int) -> dict[str, Any]:
    with pipeline.collector_paused():
        return {**_phases(rules), **_cli(rules)}


def _compiled_and_linted(model: Policy) -> IR:
    ir = compile_policy(model)
    lint(model, ir)
    return ir


def _phases(rules: int) -> dict[str, Any]:
    text = policies.scaled_policy(rules)
    model, parse_s = _timed(lambda: parse.loads(text))
    ir, ir_s = _timed(lambda: _compiled_and_linted(model))
    compiled, program_s = _timed(lambda: program.compile_program(policies.map_sizes(rules)))
    try:
        maps = compiled.map_fds
        with tempfile.TemporaryDirectory(prefix="isoebpf-b6-") as state:
            slots = program.SlotFiles(Path(state))
            _, fill_s = _timed(lambda: program.first_generation(maps, ir, slots))
            memory = map_memory(maps)
            changed = policies.changed_policy(rules)
            new_ir, change_compile_s = _timed(lambda: pipeline.loads(changed).ir)
            if new_ir.digest == ir.digest:
                raise RuntimeError("B6: the one-rule change changed nothing")
            _, apply_s = _timed(lambda: program.next_generation(maps, new_ir, slots))
    finally:
        compiled.close()
    return {"parse_s": parse_s, "ir_compile_s": ir_s, "program_compile_s": program_s,
            "map_fill_s": fill_s, "load_total_s": parse_s + ir_s + program_s + fill_s,
            "change_apply_s": apply_s, "change_end_to_end_s": change_compile_s + apply_s,
            "map_bytes": sum(memory.values()), "map_bytes_by_map": memory,
            "entries": len(ir.allowed) + len(ir.classes)}


def _cli(rules: int) -> dict[str, float]:
    """Wall-clock seconds of `isoebpf load` (a first load, then a one-rule change)."""
    netns = f"{topology.PREFIX}-b6"
    env = {**os.environ, **{name: str(size) for name, size in policies.map_sizes(rules).items()}}

    def load(path: Path) -> float:
        started = time.perf_counter()
        subprocess.run([PYTHON, "-m", "isoebpf.cli", "load", "--backend", "ebpf", "--netns", netns,
                        "--iface", "b6-*", str(path)], check=True, capture_output=True, env=env)
        return time.perf_counter() - started

    topology.run("ip", "netns", "add", netns)
    try:
        topology.run("ip", "-n", netns, "link", "add", "b6-a", "type", "veth", "peer", "name", "b6-b")
        topology.run("ip", "-n", netns, "link", "set", "b6-a", "up")
        with tempfile.TemporaryDirectory(prefix="isoebpf-b6-") as files:
            first, change = Path(files, "first.yaml"), Path(files, "change.yaml")
            first.write_text(policies.scaled_policy(rules), encoding="utf-8")
            change.write_text(policies.changed_policy(rules), encoding="utf-8")
            try:
                first_s = load(first)
                return {"cli_load_s": first_s, "cli_change_s": load(change)}
            finally:
                topology.run(PYTHON, "-m", "isoebpf.cli", "unload", "--netns", netns, check=False)
    finally:
        topology.run("ip", "netns", "del", netns, check=False)


def run(sizes: list[int], rounds: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    taken: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for r in range(rounds):
        for rules in sizes if r % 2 == 0 else list(reversed(sizes)):
            one = _one(rules)
            taken[rules].append(one)
            say(f"B6 {rules:>6} rules: parse {one['parse_s']:.2f}s, IR {one['ir_compile_s']:.2f}s, "
                f"bcc {one['program_compile_s']:.2f}s, fill {one['map_fill_s']:.2f}s; change "
                f"{one['change_apply_s'] * 1000:.0f} ms apply, {one['change_end_to_end_s']:.2f}s end to end; "
                f"maps {one['map_bytes'] / 2**20:.1f} MiB; isoebpf load {one['cli_load_s']:.2f}s, "
                f"its change {one['cli_change_s']:.2f}s")
    results = []
    for rules, runs in taken.items():
        row: dict[str, Any] = {"rules": rules}
        for key in ("parse_s", "ir_compile_s", "program_compile_s", "map_fill_s", "load_total_s",
                    "change_apply_s", "change_end_to_end_s", "map_bytes", "cli_load_s",
                    "cli_change_s"):
            row[key] = summary([run[key] for run in runs])
        row["map_bytes_by_map"] = runs[-1]["map_bytes_by_map"]
        row["entries"] = runs[-1]["entries"]
        results.append(row)
    return results
