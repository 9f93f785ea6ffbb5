"""Compiled IR + evaluator against a naive reading of the policy: they must agree."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isoebpf import pipeline
from isoebpf.ir.evaluate import Classifier, decide
from tests.policygen import naive_verdict, random_first_packet, random_policy

POLICIES = 250
PACKETS_PER_POLICY = 50


def test_compiled_policy_agrees_with_naive_evaluation() -> None:
    pairs = 0

    @settings(max_examples=POLICIES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        nonlocal pairs
        generated = random_policy(rng)
        compiled = pipeline.loads(generated.text, "generated.yaml")
        classifier = Classifier(compiled.ir)
        for _ in range(PACKETS_PER_POLICY):
            pkt = random_first_packet(rng, generated)
            decision = decide(classifier, pkt)
            got = (decision.action, classifier.ir.rule(decision.rule).name)
            assert got == naive_verdict(compiled.policy, pkt), f"{pkt}\n{generated.text}"
            pairs += 1

    check()
    assert pairs >= 10_000
