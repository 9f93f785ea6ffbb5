"""A million hostile frames through the program, judged against the reference evaluator.

Random policies (tests/policygen.py), one per episode of FRAMES_PER_EPISODE
frames, each frame from tests/bpf/hostile.py: random bytes, cuts at every
header boundary, bad IHL, IPv4 options, IPv6 extension chains, overlapping and
tiny fragments, forged ICMP errors, VLAN and QinQ tags (and unreadable ones),
bit flips, mixed with ordinary traffic so connections and fragments are
tracked. Each frame goes
through XDP or TC (at random; they share the state) and through
`evaluate.Conntrack.step` on the Packet tests/packets.py reads from it. They
must agree on the verdict of every frame; the program must return one of its
verdicts (never an error); and its per-rule counters must equal the
evaluator's at sampled frames and, for every rule, at the end of each episode.

`make test` runs 1,000,000 frames; `make soak` 10,000,000. ISOEBPF_HOSTILE_SEED
and ISOEBPF_HOSTILE_FRAMES change the run (a failure prints what reproduces it).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter

import pytest

from isoebpf.ir.evaluate import Classifier, Conntrack
from tests.bpf.harness import PROGRAMS, Datapath, expected, reply_problems
from tests.bpf.hostile import HOSTILE_KINDS, HostileEpisode
from tests.bpf.test_differential import TICK, load_random

pytestmark = pytest.mark.bpf

SEED = int(os.environ.get("ISOEBPF_HOSTILE_SEED", "8"))
FRAMES = int(os.environ.get("ISOEBPF_HOSTILE_FRAMES", "1000000"))
SOAK_FRAMES = 10_000_000
FRAMES_PER_EPISODE = 10_000  # loading a policy costs thousands of map writes
REPLAY_SHARE = 0.7  # of frames replayed from earlier ones, damaged or not (generating is the cost)
COUNTER_SAMPLE = 0.01  # frames after which the counted rule is read back (a map read costs ~3 runs)


def run_hostile(datapath: Datapath, frames: int, seed: int) -> Counter[str]:
    """Send `frames` hostile frames; returns how many were sent ("sent") and, of those
    judged by a program ("frames"), how many of each kind, verdict and program."""
    rng = random.Random(seed)
    tally: Counter[str] = Counter()
    started = time.monotonic()
    episode_number = 0
    while tally["sent"] < frames:
        generated, ir = load_random(datapath, rng)
        datapath.clear_state()
        classifier, conntrack = Classifier(ir), Conntrack()
        counts: Counter[int] = Counter()
        episode = HostileEpisode(rng, generated)
        for number in range(min(FRAMES_PER_EPISODE, frames - tally["sent"])):
            kind, frame = episode.hostile_frame(REPLAY_SHARE)
            tally["sent"] += 1
            if not datapath.runs("xdp", frame):  # too short for any program: none judges it
                tally[f"unjudged {kind}"] += 1
                continue

            def where() -> str:
                return (f"seed {seed} episode {episode_number} frame {number} ({kind})\n"  # noqa: B023
                        f"policy:\n{generated.text}frame: {frame.hex()}")  # noqa: B023

            parsed, want = expected(frame, conntrack=conntrack, classifier=classifier, now=number * TICK)
            prog = rng.choice(PROGRAMS) if datapath.runs("tc", frame) else "xdp"
            run = datapath.run(prog, frame)
            counts[want.rule] += 1
            assert run.verdict == want.verdict, (
                f"{prog} said {run.verdict}, the evaluator {want.action} "
                f"({ir.rule(want.rule).name}) for {parsed.packet}\n{where()}")
            if rng.random() < COUNTER_SAMPLE:
                assert datapath.counter(want.rule)[0] == counts[want.rule], (
                    f"{prog}: counter of {ir.rule(want.rule).name} is off\n{where()}")
            if run.verdict == "tx":
                problems = reply_problems(parsed, frame, run.frame)
                assert not problems, f"{prog}: bad reply {problems}\n{where()}"
            tally["frames"] += 1
            tally[f"kind {kind}"] += 1
            verdict = f"{want.verdict}:{ir.rule(want.rule).name.split(':')[0]}"
            tally[f"verdict {verdict}"] += 1
            tally[f"{kind} -> {verdict}"] += 1
            tally[f"program {prog}"] += 1
        for rule in ir.rules:
            assert datapath.counter(rule.id)[0] == counts[rule.id], (
                f"seed {seed} episode {episode_number}: counter of {rule.name} is "
                f"{datapath.counter(rule.id)[0]}, the evaluator counted {counts[rule.id]}")
        episode_number += 1
    print(f"\nhostile: {tally['frames']} frames over {episode_number} policies in "
          f"{time.monotonic() - started:.1f}s\n  " + "\n  ".join(f"{k}: {v}" for k, v in sorted(tally.items())))
    return tally


def unjudged(tally: Counter[str]) -> dict[str, int]:
    """Frames too short for any program, by kind: the generator should make none."""
    return {k: v for k, v in tally.items() if k.startswith("unjudged ")}


def check_coverage(tally: Counter[str]) -> None:
    """Every kind of frame and of verdict came up, or the generator has gone blind."""
    for kind in set(HOSTILE_KINDS) - {"normal"}:
        assert tally[f"kind {kind}"], f"no {kind} frame in the whole run"
    for program in PROGRAMS:
        assert tally[f"program {program}"] > tally["frames"] // 4
    for needed in ("pass:established", "pass:unfiltered", "pass:exception", "pass:hairpin", "pass:allow",
                   "tx:default", "drop:default", "drop:malformed", "drop:fragment"):
        assert tally[f"verdict {needed}"], f"no {needed} verdict in the whole run"
    # Tagged frames are judged by what they carry (answers keep the tags); unreadable tags are not.
    for kind, needed in (("vlan", "pass:allow"), ("vlan", "pass:unfiltered"), ("vlan", "tx:default"),
                         ("vlan-unreadable", "drop:malformed")):
        assert tally[f"{kind} -> {needed}"], f"no {kind} frame came to {needed}"


def test_hostile_frames_agree_with_the_evaluator(datapath: Datapath) -> None:
    tally = run_hostile(datapath, FRAMES, SEED)
    assert tally["frames"] == tally["sent"] == FRAMES, unjudged(tally)
    check_coverage(tally)


@pytest.mark.soak
def test_hostile_frames_soak(datapath: Datapath) -> None:
    tally = run_hostile(datapath, SOAK_FRAMES, SEED + 1)
    assert tally["frames"] == tally["sent"] == SOAK_FRAMES, unjudged(tally)
    check_coverage(tally)
