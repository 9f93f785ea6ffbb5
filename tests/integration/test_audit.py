"""Audit mode with real traffic, on both backends: nothing is denied, every would-be
denial is counted under its rule and traced as audit, and the switch to enforcing (and
back) is one atomic update that keeps the connections the policy allows."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isoebpf import pipeline
from isoebpf.lab.testbed import Testbed
from tests.integration.conftest import SEED, AgentProcess, Trace, isoebpf, packets_by_rule
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_auditing_agent_logs_would_be_denials_as_audit(testbed: Testbed, tmp_path: Path,
                                                          backend: str) -> None:
    policy = tmp_path / "policy.yaml"
    shutil.copy(SEED, policy)
    isoebpf("unload", "--netns", testbed.router)
    running = AgentProcess(policy, testbed.router, "--audit", "--backend", backend, "--iface", "v-*",
                           "--flow-interval", "1")
    try:
        running.wait_for("applied", timeout=120)
        if not any(e["event"] == "flows_recording" for e in running.events):
            running.wait_for("flows_recording")
        log = Path("/run/isoebpf") / f"netns-{testbed.router}" / "flows.jsonl"
        deadline = time.monotonic() + 10
        # Tried again until logged: the recorder's reader may still be starting.
        while b"192.168.2.20" not in (log.read_bytes() if log.exists() else b""):
            assert testbed.probe("it1", "tcp", "hr2", 22, timeout=1.0)["outcome"] == "connected"
            assert time.monotonic() < deadline, running.events
            time.sleep(0.5)
        shown = json.loads(isoebpf("flows", "--netns", testbed.router, "--json").stdout)
        found = [f for f in shown["flows"] if (f["src"], f["dst"], f["port"]) == ("10.250.1.10", "192.168.2.20", 22)]
        assert [(f["action"], f["rule"], f["audit"]) for f in found] == [("reject", "default", True)]
        suggested = isoebpf("flows", "--netns", testbed.router, "--suggest").stdout
        assert "- {from: it, to: hr, ports: [tcp/22]}" in suggested.splitlines()
    finally:
        running.stop()
        isoebpf("unload", "--netns", testbed.router)
