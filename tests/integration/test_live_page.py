"""The agent's live page in a real headless browser (Debian's chromium, driven by
Playwright), and its flow log read by `isoebpf flows`, with real traffic in the testbed."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from isoebpf.lab.testbed import Testbed
from tests.conftest import require
from tests.integration.conftest import SEED, AgentProcess, Trace, isoebpf

CHROMIUM = "/usr/bin/chromium"
# The page polls every second; the recorder's open bucket is on the page at the next poll.
SEEN_WITHIN_MS = 15_000


def free_port() -> int:
    """A loopback port nobody listens on now: parallel runs must not share one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's chromium, headless, under Playwright (which never downloads a browser here)."""
    if not Path(CHROMIUM).exists():
        require("chromium", "not installed (scripts/setup.sh installs it)")
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as err:
        require("playwright", f"{err} (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        except Error as err:
            require("chromium", str(err).splitlines()[0])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def agent(testbed: Testbed, tmp_path: Path) -> Iterator[tuple[AgentProcess, str]]:
    """The agent on the IT/HR policy with its page and a flow log of 1 s lines; nothing
    of it is left after the test (the flow log goes with unload)."""
    policy = tmp_path / "policy.yaml"
    shutil.copy(SEED, policy)
    address = f"127.0.0.1:{free_port()}"
    running = AgentProcess(policy, testbed.router, "--metrics", address, "--flow-interval", "1")
    try:
        running.wait_for("applied", timeout=120)
        if not any(e["event"] == "flows_recording" for e in running.events):  # either comes first
            running.wait_for("flows_recording")
        yield running, f"http://{address}"
    finally:
        running.stop()
        isoebpf("unload", "--netns", testbed.router)
        assert not (Path("/run/isoebpf") / f"netns-{testbed.router}" / "flows.jsonl").exists()


def get(url: str) -> bytes:
    body: bytes = urllib.request.urlopen(url, timeout=5).read()
    return body


def default_packets(testbed: Testbed) -> int:
    record = json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout)
    return next(int(c["packets"]) for c in record["counters"] if c["rule"] == "default")


def test_the_page_draws_the_policy_and_shows_a_denial_as_it_happens(
        testbed: Testbed, agent: tuple[AgentProcess, str], browser: Any) -> None:
    _, base = agent
    page = browser.new_page()
    page.goto(base + "/")
    page.wait_for_selector('#graph g.overlay[data-overlay="it"]')
    overlays = page.eval_on_selector_all("#graph g.overlay", "nodes => nodes.map(n => n.dataset.overlay)")
    assert sorted(overlays) == ["hr", "it"]
    assert page.text_content('#graph g.edge[data-rule="allow:0"] .ports') == "tcp/80"
    assert page.text_content('#policy [data-fact="backend"] dd') == "ebpf"
    assert page.text_content("#health") == "healthy"
    assert page.is_hidden("#audit")
    assert page.query_selector('#denials tr[data-denial="hr->it tcp/22"]') is None
    shown_before = int(page.text_content('#counters tr[data-rule="default"] .packets'))
    page.evaluate("window.sameDocument = true")  # gone if the page were loaded again

    assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "refused"
    sent = time.monotonic()
    page.wait_for_selector('#denials tr[data-denial="hr->it tcp/22"]', timeout=SEEN_WITHIN_MS)
    page.wait_for_function(
        "before => Number(document.querySelector('#counters tr[data-rule=\"default\"] .packets')"
        ".textContent) > before", arg=shown_before, timeout=SEEN_WITHIN_MS)
    print(f"denial and counter on the page {(time.monotonic() - sent) * 1000:.0f} ms after the try")

    assert page.evaluate("window.sameDocument") is True
    shown_after = int(page.text_content('#counters tr[data-rule="default"] .packets'))
    assert shown_before < shown_after <= default_packets(testbed)
    denied = page.text_content("#denied-flows tbody")
    assert "192.168.1.10 (hr)" in denied and "10.250.1.10 (it)" in denied and "reject" in denied


def test_the_state_the_page_polls_and_the_metrics_share_one_server(
        testbed: Testbed, agent: tuple[AgentProcess, str]) -> None:
    _, base = agent
    assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
    state = json.loads(get(base + "/api/state"))
    assert sorted(o["name"] for o in state["overlays"]) == ["hr", "it"]
    assert [(e["from"], e["to"], e["label"]) for e in state["edges"]] == [("hr", "it", "tcp/80")]
    assert state["loaded"] and state["health"]["ok"] and state["audit"] is False
    assert "isoebpf_rule_packets_total" in get(base + "/metrics").decode()
    assert b"page.js" in get(base + "/")


def test_flows_reads_the_agents_log_and_suggests_the_rule(
        testbed: Testbed, agent: tuple[AgentProcess, str], tmp_path: Path) -> None:
    assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
    assert testbed.probe("it1", "tcp", "hr2", 22, timeout=1.0)["outcome"] == "refused"
    log = Path("/run/isoebpf") / f"netns-{testbed.router}" / "flows.jsonl"
    # A second's line is written once the second is over, in order: the last try's says both are.
    deadline = time.monotonic() + 10
    while b"192.168.2.20" not in (log.read_bytes() if log.exists() else b""):
        assert time.monotonic() < deadline, "the flow log never had the denied flow"
        time.sleep(0.2)
    shown = json.loads(isoebpf("flows", "--netns", testbed.router, "--since", "5m", "--json").stdout)
    keys = {(f["src"], f["dst"], f["protocol"], f["port"], f["action"], f["rule"]) for f in shown["flows"]}
    assert ("10.250.1.10", "192.168.2.20", "tcp", 22, "reject", "default") in keys
    assert ("192.168.1.10", "10.250.1.10", "tcp", 80, "allow", "allow:0") in keys
    assert [(d["src_overlay"], d["dst_overlay"], d["service"]) for d in shown["denials"]] == [
        ("it", "hr", "tcp/22")]
    rejected = json.loads(isoebpf("flows", "--netns", testbed.router, "--verdict", "reject",
                                  "--json").stdout)
    assert {f["action"] for f in rejected["flows"]} == {"reject"}
    suggested = isoebpf("flows", "--netns", testbed.router, "--suggest").stdout
    assert "- {from: it, to: hr, ports: [tcp/22]}" in suggested.splitlines()
    picture = tmp_path / "verdicts.png"
    isoebpf("flows", "--netns", testbed.router, "--plot", str(picture))
    assert picture.read_bytes()[:4] == b"\x89PNG"


def test_trace_takes_the_verdicts_from_the_agent_and_gives_them_back(
        testbed: Testbed, agent: tuple[AgentProcess, str]) -> None:
    running, base = agent
    with Trace(testbed, "ebpf", "--count", "1", "--address", "10.250.2.20") as tracing:
        assert running.wait_for("flows_paused")["why"] == "a trace command has the verdicts"
        assert testbed.probe("it1", "tcp", "it2", 22, timeout=1.0)["outcome"] == "connected"
        events, _ = tracing.finish()
    assert [(e["dst"], e["rule"]) for e in events] == [("10.250.2.20", "hairpin:it")]
    assert running.wait_for("flows_recording")["backend"] == "ebpf"
    assert testbed.probe("it2", "tcp", "hr2", 80, timeout=1.0)["outcome"] == "refused"
    deadline = time.monotonic() + 10
    while not any(f["src"] == "10.250.2.20" and f["dst"] == "192.168.2.20"
                  for f in json.loads(get(base + "/api/state"))["denied_flows"]):
        assert time.monotonic() < deadline, "the recorder did not get the verdicts back"
        time.sleep(0.2)
