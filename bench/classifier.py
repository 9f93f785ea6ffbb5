"""B1: what classifying one packet costs, in ns, through BPF_PROG_TEST_RUN.

The frames are the datapath table's own (tests/bpf/cases.py), run by the
table's harness (tests/bpf/harness.py), so the benchmark measures paths the
tests prove right: before timing, each frame must get the table's verdict.

- new-allowed: a SYN a rule allows; the connection is tracked as a side
  effect, so each timed run is a single repetition and the table is cleared
  between runs (outside the timed window);
- denied: a SYN the default rejects (the reset is built, XDP_TX);
- established: the reply of a tracked connection;
- unfiltered: a source outside every overlay.

Each path runs for both programs (XDP, TC) against an empty program measured
the same way, in the same run, interleaved.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from bench import policies
from bench.programs import references
from bench.stats import interleaved, ratio, summary
from isoebpf import pipeline
from isoebpf.backends.ebpf import bpfsys, program
from tests.bpf.cases import CASES
from tests.bpf.harness import PROGRAMS, Datapath

REPEAT = 20000  # repetitions per timed run, where a path can repeat
SINGLES = 300  # single-shot runs per timed run of the new-allowed path


def _step(case: str, number: int) -> Any:
    return next(c for c in CASES if c.name == case).steps[number]


# path -> (the frame's case step, a step to run first to seed state, or None)
PATHS = {
    "new-allowed": (("allow-and-reply", 0), None),
    "denied": (("reject-tcp", 0), None),
    "established": (("allow-and-reply", 1), ("allow-and-reply", 0)),
    "unfiltered": (("outside", 0), None),
}


def _timer(datapath: Datapath, empty_fd: int, prog: str, path: str) -> tuple[Callable[[], float], Callable[[], float]]:
    """(time the path, time the empty program the same way), each in ns per packet."""
    (case, number), seed = PATHS[path]
    step = _step(case, number)
    fd = datapath.compiled.prog_fds[prog]
    if seed is not None:
        datapath.clear_state()
        datapath.run(prog, _step(*seed).frame)
    got = datapath.run(prog, step.frame).verdict
    if got != step.verdict:
        raise RuntimeError(f"B1 {path} ({prog}): the program says {got}, the table {step.verdict}")
    if path == "new-allowed":
        def singles(target: int, clear: bool) -> float:
            spent = []
            for _ in range(SINGLES):
                if clear:
                    program.clear(datapath.maps, "conntrack")
                spent.append(bpfsys.prog_test_run(target, step.frame).duration_ns)
            return float(statistics.median(spent))
        return (lambda: singles(fd, True)), (lambda: singles(empty_fd, False))
    return ((lambda: float(bpfsys.prog_test_run(fd, step.frame, REPEAT).duration_ns)),
            (lambda: float(bpfsys.prog_test_run(empty_fd, step.frame, REPEAT).duration_ns)))


def run(sizes: list[int], rounds: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    compiled = program.compile_program(policies.map_sizes(max(sizes)))
    refs = references()
    results: list[dict[str, Any]] = []
    try:
        datapath = Datapath(compiled)
        for rules in sizes:
            started = time.monotonic()
            # JSON: the same policy as the YAML, which refuses a million rules (2,000,000 nodes).
            ir = pipeline.loads(policies.scaled_policy_json(rules)).ir
            datapath.load(ir)
            say(f"B1 {rules} rules loaded in {time.monotonic() - started:.1f}s")
            subjects = [(prog, path) for prog in PROGRAMS for path in PATHS]
            taken: dict[tuple[str, str], tuple[list[float], list[float]]] = {s: ([], []) for s in subjects}
            for _, (prog, path) in interleaved(rounds, subjects):
                measure, baseline = _timer(datapath, refs.empty[prog], prog, path)
                taken[(prog, path)][0].append(measure())
                taken[(prog, path)][1].append(baseline())
            for (prog, path), (ns, empty_ns) in taken.items():
                row: dict[str, Any] = {"rules": rules, "prog": prog, "path": path, "ns": summary(ns),
                                       "empty_ns": summary(empty_ns)}
                row["ratio_to_empty"] = ratio(row["ns"], row["empty_ns"])
                results.append(row)
                say(f"B1 {rules:>6} {prog:3} {path:12} {row['ns']['median']:7.0f} ns "
                    f"(empty {row['empty_ns']['median']:.0f} ns, x{row['ratio_to_empty']:.1f})")
            datapath.clear_state()
    finally:
        refs.close()
        compiled.close()
    return results
