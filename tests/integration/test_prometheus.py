"""A real Prometheus (Debian's) scraping the agent: after real traffic in the testbed, its
HTTP API has the per-rule counters the node has, and our alert rules evaluate cleanly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from isoebpf.lab.testbed import Testbed
from tests.conftest import require_program
from tests.integration.conftest import ROOT, SEED, WEB, AgentProcess, isoebpf, packets_by_rule

ALERTS = ROOT / "deploy" / "isoebpf-alerts.yaml"
# Short intervals keep the test quick: a counter reaches Prometheus within a second or two.
INTERVAL = "1s"


def free_port() -> int:
    """A loopback port nobody listens on now: parallel runs must not share one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Prometheus:
    """Debian's prometheus server on a loopback port, its data in a directory of its own,
    scraping `targets` every INTERVAL; stopped and its directory removed on close."""

    def __init__(self, binary: str, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._home = tempfile.TemporaryDirectory(prefix="isoebpf-prometheus-")
        home = Path(self._home.name)
        config = home / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "isoebpf", "static_configs": [{"targets": targets}]}],
        }))
        self.log = home / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=home)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited: {self.log.read_text()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready within {timeout} s: {self.log.read_text()}")

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        """The instant value of a query of one series (None: no such series now)."""
        result = self.api("query", query=query)["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, query: str, wanted: float, timeout: float = 20.0) -> float:
        """Poll `query` until it equals `wanted`; what it last said otherwise."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = self.value(query)
            if seen == wanted:
                return seen
            time.sleep(0.25)
        raise AssertionError(f"{query} is {seen}, not {wanted}, after {timeout} s")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._home.cleanup()


def prometheus_binary() -> str:
    return require_program("prometheus", "prometheus")


@pytest.fixture
def scraped_agent(testbed: Testbed, unloaded: None, tmp_path: Path) -> Iterator[tuple[Prometheus, str]]:
    """An agent enforcing the seed in the testbed's router namespace, serving metrics in
    this one, and a Prometheus scraping it: (prometheus, the agent's address)."""
    binary = prometheus_binary()
    policy = tmp_path / "policy.yaml"
    policy.write_text(SEED.read_text())
    address = f"127.0.0.1:{free_port()}"
    with AgentProcess(policy, testbed.router, "--metrics", address) as agent:
        agent.wait_for("applied", timeout=120)
        server = Prometheus(binary, [address])
        try:
            server.wait_ready()
            yield server, address
        finally:
            server.close()


def test_prometheus_sees_the_rule_counters_move(scraped_agent: tuple[Prometheus, str],
                                               testbed: Testbed) -> None:
    prometheus, address = scraped_agent
    prometheus.wait_for(f'up{{job="isoebpf", instance="{address}"}}', 1)
    web = f'isoebpf_rule_packets_total{{job="isoebpf", identity="{WEB}"}}'
    denied = 'isoebpf_rule_packets_total{job="isoebpf", rule="default"}'
    before = packets_by_rule(json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout))
    prometheus.wait_for(web, before["allow:0"])
    for _ in range(3):
        assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
    assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"
    after = packets_by_rule(json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout))
    assert after["allow:0"] >= before["allow:0"] + 3 and after["default"] >= before["default"] + 1
    # What Prometheus stored is what the node counted: every new connection's first packet.
    assert prometheus.wait_for(web, after["allow:0"]) > before["allow:0"]
    assert prometheus.wait_for(denied, after["default"]) > before["default"]
    assert prometheus.value('isoebpf_audit_mode{job="isoebpf"}') == 0
    assert prometheus.value(f'isoebpf_attachment_state{{ifname="{testbed.veth("hr1")}", '
                            'state="attached"}') == 1
    # The alert rules were loaded and evaluate on these series without error.
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert len(rules) == 9
    deadline = time.monotonic() + 10
    while any(rule["health"] == "unknown" for rule in rules) and time.monotonic() < deadline:
        time.sleep(0.5)  # not yet evaluated
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert {rule["name"]: rule["health"] for rule in rules} == {rule["name"]: "ok" for rule in rules}
    assert prometheus.api("alerts")["alerts"] == []
