"""Audit mode with real traffic, on both backends: nothing is denied, every would-be
denial is counted under its rule and traced as audit, and the switch to enforcing (and
back) is one atomic update that keeps the connections the policy allows."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from isoebpf import pipeline
from isoebpf.lab.testbed import Testbed
from tests.integration.conftest import SEED, Trace, isoebpf, packets_by_rule
from tests.scenarios import IT_HR_TRIES, expected_outcome

pytestmark = pytest.mark.integration

BACKENDS = ("ebpf", "iptables")


def status(testbed: Testbed) -> dict[str, object]:
    record: dict[str, object] = json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout)
    return record


def load(testbed: Testbed, backend: str, *more: str) -> str:
    return isoebpf("load", str(SEED), "--backend", backend, "--netns", testbed.router, "--iface", "v-*",
                   *more).stdout


@pytest.fixture(params=BACKENDS)
def auditing(request: pytest.FixtureRequest, testbed: Testbed) -> Iterator[str]:
    isoebpf("unload", "--netns", testbed.router)
    said = load(testbed, request.param, "--audit")
    assert "\n*** AUDIT MODE: NOTHING IS DENIED." in said, said
    try:
        yield str(request.param)
    finally:
        isoebpf("unload", "--netns", testbed.router)


def test_audit_denies_nothing_and_counts_every_would_be_denial(testbed: Testbed, auditing: str) -> None:
    enforcing = pipeline.read(SEED).ir
    would_deny = [t for t in IT_HR_TRIES if expected_outcome(enforcing, testbed, *t) != "connected"]
    assert would_deny, "the suite has denied tries"
    before = packets_by_rule(status(testbed))  # type: ignore[arg-type]
    with Trace(testbed, auditing, "--action", "reject", "--count", "1") as tracing:
        for client, proto, target, port in IT_HR_TRIES:
            outcome = testbed.probe(client, proto, target, port, timeout=1.0)["outcome"]
            assert outcome == "connected", (client, proto, target, port)
        (event,), _ = tracing.finish()
    assert event["audit"] is True and event["rule"] == "default", event
    shown = status(testbed)
    assert shown["audit"] is True
    assert packets_by_rule(shown)["default"] - before.get("default", 0) >= len(would_deny)  # type: ignore[arg-type]
    text = isoebpf("status", "--netns", testbed.router).stdout
    assert text.startswith("*** AUDIT MODE: NOTHING IS DENIED."), text


def test_switching_to_enforce_and_back_is_atomic_and_keeps_allowed_connections(
        testbed: Testbed, auditing: str) -> None:
    allowed = testbed.session("hr1", "it1", 80)
    audited = testbed.session("hr1", "it1", 22)  # passed only because nothing is denied
    try:
        assert (allowed.exchange(), audited.exchange()) == ("echoed", "echoed")
        said = load(testbed, auditing)
        assert "AUDIT" not in said and status(testbed)["audit"] is False
        assert allowed.exchange() == "echoed"  # the policy allows it: kept across the switch
        assert audited.exchange() in ("reset", "timeout", "closed")  # denied now: cut
        assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "refused"
        load(testbed, auditing, "--audit")
        assert allowed.exchange() == "echoed"
        assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "connected"
    finally:
        allowed.close()
        audited.close()
