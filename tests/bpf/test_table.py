"""The table of cases (tests/bpf/cases.py) through both programs.

Every step must get the table's verdict from the program, move the table's
rule counter by one packet and the frame's bytes, agree with the reference
evaluator, and, when it is answered, carry a well-formed REJECT reply.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from isoebpf import pipeline
from isoebpf.ir import evaluate
from isoebpf.ir.evaluate import Classifier, Conntrack
from isoebpf.ir.tables import IR
from tests.bpf.cases import CASES, Case
from tests.bpf.harness import PROGRAMS, Datapath, expected, reply_problems

pytestmark = pytest.mark.bpf


def case_ir(case: Case, text: str) -> IR:
    ir = pipeline.loads(text, f"{case.name}.yaml").ir
    return replace(ir, timeouts={**ir.timeouts, **case.timeouts})


@pytest.mark.vm
@pytest.mark.parametrize("prog", PROGRAMS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(datapath: Datapath, prog: str, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    play(datapath, prog, case, monkeypatch)


def play(datapath: Datapath, prog: str, case: Case, monkeypatch: pytest.MonkeyPatch) -> Conntrack:
    """Run the case's steps through `prog`; returns the evaluator's state after them."""
    if case.fragment_timeout is not None:
        monkeypatch.setattr(evaluate, "FRAGMENT_TIMEOUT", case.fragment_timeout)
    ir = case_ir(case, case.policy)
    datapath.load(ir)
    datapath.clear_state()
    classifier, conntrack, now = Classifier(ir), Conntrack(), 0.0
    for number, step in enumerate(case.steps):
        where = f"{case.name} step {number} ({prog})"
        if step.switch_to is not None:
            ir = case_ir(case, step.switch_to)
            datapath.load(ir, sweep=not step.lazy)
            classifier = Classifier(ir)
            conntrack.revalidate(classifier)
        if step.wait:
            time.sleep(step.wait)
            now += step.wait
        rule = {r.name: r.id for r in ir.rules}[step.rule]
        parsed, want = expected(step.frame, conntrack=conntrack, classifier=classifier, now=now)
        assert (want.verdict, ir.rule(want.rule).name) == (step.verdict, step.rule), (
            f"{where}: the table disagrees with the evaluator")
        if not datapath.runs(prog, step.frame):
            # Only a frame cut inside its IP header: no state to keep in step.
            assert parsed.kind == "malformed", where
            continue
        packets, nbytes = datapath.counter(rule)
        run = datapath.run(prog, step.frame)
        assert run.verdict == step.verdict, f"{where}: {run.verdict}, want {step.verdict}"
        assert datapath.counter(rule) == (packets + 1, nbytes + len(step.frame)), (
            f"{where}: counter of {step.rule} did not move by this packet")
        if run.verdict == "tx":
            assert reply_problems(parsed, step.frame, run.frame) == [], where
    return conntrack


def test_update_reuses_the_program(datapath: Datapath) -> None:
    """A new policy is map entries in the slot the live generation does not use;
    the live one's stay beside it, for the next update to differ from."""
    before = datapath.gen
    datapath.load(case_ir(CASES[0], CASES[0].policy))
    datapath.load(case_ir(CASES[0], CASES[0].policy))
    assert datapath.gen == before + 2
    from isoebpf.backends.ebpf import program

    fill = program.map_fill(datapath.maps)
    ir = case_ir(CASES[0], CASES[0].policy)
    assert fill["classes_v4"]["entries"] == 2 * sum(c.network.version == 4 for c in ir.classes)
    assert fill["allowed"]["entries"] == 2 * len(ir.allowed)
