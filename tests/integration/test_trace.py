"""`isoebpf trace` on the eBPF backend with real traffic: rule names, actions, interfaces,
filters, and the kernel's rate limit."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from isoebpf.lab.testbed import Testbed
from tests.integration.conftest import SEED, Trace, filtered_trace, flood_udp, isoebpf, suppressed


@pytest.fixture(scope="module")
def loaded(testbed: Testbed) -> Iterator[Testbed]:
    isoebpf("load", str(SEED), "--backend", "ebpf", "--netns", testbed.router, "--iface", "v-*")
    try:
        yield testbed
    finally:
        isoebpf("unload", "--netns", testbed.router)


def test_verdicts_name_rule_action_and_interface(loaded: Testbed) -> None:
    with Trace(loaded, "ebpf", "--action", "reject", "--count", "1") as tracing:
        assert loaded.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
        assert loaded.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"
        (event,), _ = tracing.finish()
    assert {k: event[k] for k in ("ifname", "protocol", "src", "dst", "dport", "action", "rule")} \
        == {"ifname": "v-it1", "protocol": "tcp", "src": "10.250.1.10", "dst": "192.168.1.10",
            "dport": 80, "action": "reject", "rule": "default"}


def test_filters_by_overlay_rule_and_address(loaded: Testbed) -> None:
    events = filtered_trace(loaded, "ebpf")
    assert [(e["ifname"], e["src"], e["dst"], e["rule"], e["action"]) for e in events] == [
        ("v-hr2", "192.168.2.20", "10.250.2.20", "allow:0", "allow"),
        ("v-hr2", "192.168.2.20", "10.250.1.10", "allow:0", "allow")]


def test_the_kernel_limits_the_event_rate(loaded: Testbed) -> None:
    rate, seconds = 5, 2.0
    with Trace(loaded, "ebpf", "--rate", str(rate), "--timeout", str(seconds)) as tracing:
        # 300 datagrams HR -> IT udp/53, each rejected: far more verdicts than the rate.
        flood_udp(loaded, "hr1", "10.250.1.10", 53, 300)
        events, summary = tracing.finish()
    cpus = os.cpu_count() or 1
    # Each CPU's bucket starts full (one second's worth) and refills at the rate.
    assert 0 < len(events) <= cpus * rate * (1 + seconds) + 1, len(events)
    assert suppressed(summary) >= 300 - len(events), summary


def test_one_reader_at_a_time_and_no_events_left_from_a_killed_one(loaded: Testbed) -> None:
    """The ring buffer has one reader: a second trace is refused while the first runs. A
    trace killed with the rate still set leaves events in the ring; the next one drops
    them before it shows anything."""
    killed = Trace(loaded, "ebpf")
    try:
        second = isoebpf("trace", "--netns", loaded.router, "--timeout", "1", check=False)
        assert second.returncode == 1 and "another isoebpf trace" in second.stderr, second.stderr
        killed.process.kill()
    finally:
        killed.close()
    assert loaded.probe("it1", "tcp", "hr1", 81, timeout=1.0)["outcome"] == "refused"  # into the ring
    with Trace(loaded, "ebpf", "--timeout", "2") as tracing:
        assert loaded.probe("it1", "tcp", "hr1", 82, timeout=1.0)["outcome"] == "refused"
        events, _ = tracing.finish()
    assert 82 in {e["dport"] for e in events}
    assert 81 not in {e["dport"] for e in events}, "an event from before this trace was shown"
