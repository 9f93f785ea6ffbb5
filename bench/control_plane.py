"""B6: the control plane. How long loading N rules takes, phase by phase, how
long a one-rule change takes, and how much kernel memory the maps hold.

Phases of a first load, timed apart: parse (the policy file to the validated
model), IR compile (model to the tables, and the lints that need them),
program compile (bcc: C to loaded programs and created maps; sized for N), map
fill (the tables written as generation 1 into both slots, and made active). A
one-rule change is the agent's update path: the changed file is parsed and
compiled as a difference of the policy in force (end to end), and that
difference is written as generation 2 and activated (apply): the program is
not recompiled, and no step makes or reads tables of the policy's size. The
load total adds the phases up, whereas `isoebpf load` runs the program compile
beside the parse (see cli.load). Map memory is the kernel's own account
(`memlock` in /proc/self/fdinfo of each map), after the fill. The phases run
with Python's collector paused, as in `isoebpf load`.

End to end, as a user sees it: the wall-clock time of `isoebpf load` (a process
of its own: start-up, parse, the compile beside it, attach, fill) enforcing the
policy on one veth in a namespace of the bench's own, and of the second
`isoebpf load` that changes one rule (a process of its own: it compiles the
file afresh under the numbering in force and compares whole tables). Then
`isoebpf agent` on the changed file, which the bench puts back as it was (a
rename over it, as a deployment does): from the rename to the agent's
`applied` log line, written once the maps hold the change (its poll, the read,
the compile as a difference, the writes). Last, with nothing loaded, how long
`isoebpf load` takes to refuse the policy over bounds set in the environment
(the check that also weighs the machine's memory, before anything is compiled).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import peers, policies, topology
from bench.stats import summary
from bench.topology import PYTHON
from isoebpf import pipeline
from isoebpf.backends.ebpf import entries, program
from isoebpf.errors import PolicyError
from isoebpf.ir.compiler import Compiler, Delta
from isoebpf.ir.lint import lint
from isoebpf.policy.model import Policy

# The policy file's format: its extension (`isoebpf load` reads a file by it). JSON, the
# format for generated policies, which these are; "--policy-format .yaml" measures YAML.
POLICY_FORMAT = ".json"


class Refused(Exception):
    """The policy reader refused the policy of a size (not a failure of the bench)."""


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


def _one(rules: int, suffix: str) -> dict[str, Any]:
    with pipeline.collector_paused():
        return {**_phases(rules, suffix), **_cli(rules, suffix)}


def _compiled_and_linted(model: Policy) -> Compiler:
    compiler = Compiler(model)
    lint(model, compiler.ir)
    return compiler


def _changed_and_linted(compiler: Compiler, model: Policy) -> Delta | None:
    """A change compiled as the agent's pipeline.read compiles it: as a difference, then
    linted (which makes the IR, made when first read)."""
    delta = compiler.update(model)
    lint(model, compiler.ir)
    return delta


def _phases(rules: int, suffix: str) -> dict[str, Any]:
    text = policies.policy_text(rules, suffix)
    name = f"policy{suffix}"
    started = time.perf_counter()
    try:
        model, parse_s = _timed(lambda: pipeline.parse_policy(text, name))
    except PolicyError as err:
        raise Refused(f"{err} (after {time.perf_counter() - started:.1f} s)") from err
    compiler, ir_s = _timed(lambda: _compiled_and_linted(model))
    ir = compiler.ir
    compiled, program_s = _timed(lambda: program.compile_program(policies.map_sizes(rules)))
    try:
        maps = compiled.map_fds
        with tempfile.TemporaryDirectory(prefix="isoebpf-b6-") as state:
            slots = program.SlotFiles(Path(state))
            _, fill_s = _timed(lambda: program.first_generation(maps, ir, slots))
            memory = map_memory(maps)
            # The change as the agent makes it: the changed file parsed, compiled as a
            # difference of the policy in force, and that difference written.
            changed = policies.policy_text(rules, suffix, changed=True)
            delta, change_compile_s = _timed(
                lambda: _changed_and_linted(compiler, pipeline.parse_policy(changed, name)))
            if delta is None or compiler.ir.digest == ir.digest:
                raise RuntimeError("B6: the one-rule change was not a change of rules")
            _, apply_s = _timed(lambda: program.next_generation(
                maps, compiler.ir, slots, fresh=delta.rules_new, change=entries.change_of(delta)))
    finally:
        compiled.close()
    return {"parse_s": parse_s, "ir_compile_s": ir_s, "program_compile_s": program_s,
            "map_fill_s": fill_s, "load_total_s": parse_s + ir_s + program_s + fill_s,
            "change_apply_s": apply_s, "change_end_to_end_s": change_compile_s + apply_s,
            "map_bytes": sum(memory.values()), "map_bytes_by_map": memory,
            "entries": len(ir.allowed) + len(ir.classes)}


def _cli(rules: int, suffix: str) -> dict[str, float]:
    """Wall-clock seconds of `isoebpf load` (a first load, then a one-rule change, with no
    setting: the maps are sized for the policy), of the agent's change, and of a refusal."""
    netns = f"{topology.PREFIX}-b6"

    def load(path: Path) -> float:
        started = time.perf_counter()
        subprocess.run([PYTHON, "-m", "isoebpf.cli", "load", "--backend", "ebpf", "--netns", netns,
                        "--iface", "b6-*", str(path)], check=True, capture_output=True)
        return time.perf_counter() - started

    topology.run("ip", "netns", "add", netns)
    try:
        topology.run("ip", "-n", netns, "link", "add", "b6-a", "type", "veth", "peer", "name", "b6-b")
        topology.run("ip", "-n", netns, "link", "set", "b6-a", "up")
        with tempfile.TemporaryDirectory(prefix="isoebpf-b6-") as files:
            first, change = Path(files, f"first{suffix}"), Path(files, f"change{suffix}")
            first.write_text(policies.policy_text(rules, suffix), encoding="utf-8")
            change.write_text(policies.policy_text(rules, suffix, changed=True), encoding="utf-8")
            try:
                timed = {"cli_load_s": load(first), "cli_change_s": load(change)}
                timed["agent_change_s"] = _agent_change(netns, change, first.read_bytes())
                topology.run(PYTHON, "-m", "isoebpf.cli", "unload", "--netns", netns)
                timed["refuse_s"] = _refusal(netns, first)
                return timed
            finally:  # also the refusal's failure record
                topology.run(PYTHON, "-m", "isoebpf.cli", "unload", "--netns", netns, check=False)
    finally:
        topology.run("ip", "netns", "del", netns, check=False)


# Bounds every measured policy is over (two overlays, and more than one rule).
REFUSING = {"ISOEBPF_MAX_CLASSES": "1", "ISOEBPF_MAX_RULES": "1"}


def _refusal(netns: str, policy: Path) -> float:
    """Wall-clock seconds of `isoebpf load` refusing `policy` over REFUSING's bounds."""
    started = time.perf_counter()
    done = subprocess.run([PYTHON, "-m", "isoebpf.cli", "load", "--backend", "ebpf", "--netns", netns,
                           "--iface", "b6-*", str(policy)], capture_output=True, text=True,
                          env={**os.environ, **REFUSING})
    took = time.perf_counter() - started
    if done.returncode != 1 or not all(f"{macro}=1 in the environment" in done.stderr for macro in REFUSING):
        raise RuntimeError(f"B6: the policy over {REFUSING} was not refused naming both: {done.stderr}")
    return took


def _agent_change(netns: str, policy: Path, changed: bytes) -> float:
    """Seconds from renaming `changed` over `policy` (the policy in force) to the
    agent's log line saying it is applied."""
    agent = subprocess.Popen([PYTHON, "-m", "isoebpf.cli", "agent", "--backend", "ebpf", "--netns", netns,
                              "--iface", "b6-*", "--repair-interval", "3600", str(policy)],
                             stderr=subprocess.PIPE, text=True)
    try:
        _applied(agent)  # the policy in force, found as it is
        staged = policy.with_name(f".{policy.name}.new")
        staged.write_bytes(changed)
        renamed = time.time()
        os.replace(staged, policy)
        return _applied(agent) - renamed
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)


def _applied(agent: subprocess.Popen[str]) -> float:
    """The time stamp of the agent's next `applied` line; any other outcome fails the bench."""
    assert agent.stderr is not None
    for line in agent.stderr:
        event = json.loads(line)
        if event["event"] == "applied":
            return float(event["ts"])
        if event["event"] in ("policy_refused", "apply_failed", "policy_unreadable"):
            raise RuntimeError(f"B6: the agent did not apply the policy: {line.strip()}")
    raise RuntimeError(f"B6: the agent ended (exit {agent.wait()}) before applying the policy")


ISOEBPF_KEYS = ("parse_s", "ir_compile_s", "program_compile_s", "map_fill_s", "load_total_s",
                "change_apply_s", "change_end_to_end_s", "map_bytes", "cli_load_s", "cli_change_s",
                "agent_change_s", "refuse_s")
PEER_KEYS = ("ipset_restore_s", "iptables_restore_s", "nft_restore_s", "ipset_add_s", "ipset_del_s",
             "nft_add_s", "nft_del_s", "spawn_s")


def run(sizes: list[int], peer_sizes: list[int], rounds: int, say: Callable[[str], None],
        suffix: str = POLICY_FORMAT) -> dict[str, Any]:
    """B6: isoebpf at `sizes`, the peers at `peer_sizes`, round by round (the sizes up
    one round and down the next; at a size, isoebpf and the peers in turn).
    Returns the results document's "b6", "b6_peers" and "b6_skipped"."""
    taken: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    peer_taken: dict[int, list[dict[str, Any]]] = {n: [] for n in peer_sizes}
    refused: dict[int, str] = {}
    every = sorted(set(sizes) | set(peer_sizes))
    for r in range(rounds):
        for rules in every if r % 2 == 0 else list(reversed(every)):
            subjects = ["isoebpf", "peers"] if (r + every.index(rules)) % 2 == 0 else ["peers", "isoebpf"]
            for subject in subjects:
                if subject == "peers" and rules in peer_taken:
                    one = peers.one_round(rules, r)
                    peer_taken[rules].append(one)
                    peers.say_round(rules, one, say)
                elif subject == "isoebpf" and rules in taken and rules not in refused:
                    try:
                        taken[rules].append(_one(rules, suffix))
                    except Refused as err:
                        refused[rules] = str(err)
                        say(f"B6 {rules:>7} rules: not measured, the {suffix} policy is refused: {err}")
                        continue
                    _say(rules, taken[rules][-1], say)
    results = []
    for rules, runs in taken.items():
        if not runs:
            continue
        row: dict[str, Any] = {"rules": rules, "format": suffix}
        for key in ISOEBPF_KEYS:
            row[key] = summary([one[key] for one in runs])
        row["map_bytes_by_map"] = runs[-1]["map_bytes_by_map"]
        row["entries"] = runs[-1]["entries"]
        results.append(row)
    peer_rows = []
    for rules, runs in peer_taken.items():
        peer_row: dict[str, Any] = {"rules": rules, "entries": runs[-1]["entries"], "ipset_type": peers.IPSET_TYPE,
                                    "ipset_bytes": runs[-1]["ipset_bytes"]}
        for key in PEER_KEYS:
            peer_row[key] = summary([v for one in runs for v in _listed(one[key])])
        peer_rows.append(peer_row)
    skipped = [{"subject": f"isoebpf ({suffix})", "rules": rules, "why": why} for rules, why in refused.items()]
    return {"b6": results, "b6_peers": peer_rows, "b6_skipped": skipped}


def _listed(value: float | list[float]) -> list[float]:
    return value if isinstance(value, list) else [value]


def _say(rules: int, one: dict[str, Any], say: Callable[[str], None]) -> None:
    say(f"B6 {rules:>7} rules: parse {one['parse_s']:.2f}s, IR {one['ir_compile_s']:.2f}s, "
        f"bcc {one['program_compile_s']:.2f}s, fill {one['map_fill_s']:.2f}s; change "
        f"{one['change_apply_s'] * 1000:.0f} ms apply, {one['change_end_to_end_s']:.2f}s end to end; "
        f"maps {one['map_bytes'] / 2**20:.1f} MiB; isoebpf load {one['cli_load_s']:.2f}s, "
        f"its change {one['cli_change_s']:.2f}s, the agent's {one['agent_change_s']:.2f}s; "
        f"refused over bounds in {one['refuse_s']:.2f}s")
