"""What deploy/ gives Prometheus and Grafana: the alert rules (promtool checks and
unit-tests them), the dashboard, and the metrics both ask the exporter for."""

from __future__ import annotations

import io
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from isoebpf.cluster import store
from isoebpf.cluster.follow import Incomplete
from isoebpf.service.agent import Stats
from isoebpf.service.cluster_agent import ClusterAgent
from isoebpf.service.metrics import StatusCollector
from tests.conftest import require_program

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "isoebpf-alerts.yaml"
ALERT_TESTS = ROOT / "tests" / "data" / "isoebpf-alerts.test.yaml"
DASHBOARD = ROOT / "deploy" / "isoebpf-dashboard.json"

# Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"instance", "job"}

# A node with every kind of series: a counted rule, a map, an interface of each state, a
# failed-open change, audit mode, repairs, and cluster mode.
RECORD: dict[str, Any] = {
    "counters": [{"rule": "allow:0", "identity": "allow hr -> it tcp/80", "text": "hr -> it tcp/80",
                  "packets": 3, "bytes": 180},
                 {"rule": "default", "identity": "default", "text": "default", "packets": 2,
                  "bytes": 120}],
    "connections": 4,
    "maps": {"conntrack": {"entries": 4, "max_entries": 65536}},
    "attachments": [{"ifname": "v-it1", "mode": "tc", "state": "attached"},
                    {"ifname": "v-hr1", "mode": "xdp", "state": "detached"},
                    {"ifname": "v-old", "mode": "tc", "state": "interface gone"}],
    "audit": True,
    "failure": {"on_failure": "open", "error": "no interface", "at": "now", "consequence": "removed"},
}
STATS = Stats(reconciles=1, repairs={"detached": 2}, applies={"ok": 3, "refused": 1, "failed": 1},
              last_apply_time=1.0, last_apply_ok=True, cluster_version=4, cluster_published=5,
              etcd_connected=True)


def exposition(record: dict[str, Any], stats: Stats) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The exporter's answer to a scrape, as Prometheus reads it: series name -> labels -> value."""
    collectors = CollectorRegistry()
    collectors.register(StatusCollector(lambda: record, stats, lambda: "reject"))
    series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in generate_latest(collectors).decode().splitlines():
        sample = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if sample:
            labels = tuple(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', sample[2] or ""))
            series.setdefault(sample[1], {})[labels] = float(sample[3])
    return series


def exported() -> dict[str, set[str]]:
    """Every series name the exporter exports, with its label names."""
    return {name: {label for labels in samples for label, _ in labels}
            for name, samples in exposition(RECORD, STATS).items()}


def test_attachments_by_state_audit_mode_and_the_published_cluster_version() -> None:
    series = exposition(RECORD, STATS)
    attachments = {dict(labels)["ifname"]: dict(labels)["state"]
                   for labels, value in series["isoebpf_attachment_state"].items() if value == 1}
    assert attachments == {"v-it1": "attached", "v-hr1": "detached", "v-old": "interface gone"}
    assert len(series["isoebpf_attachment_state"]) == 9  # every state of each interface
    assert series["isoebpf_audit_mode"] == {(): 1.0}
    assert series["isoebpf_cluster_published_version"] == {(): 5.0}
    assert series["isoebpf_cluster_version"] == {(): 4.0}
    enforcing = exposition({}, Stats())
    assert enforcing["isoebpf_audit_mode"] == {(): 0.0}
    assert "isoebpf_attachment_state" not in enforcing  # nothing loaded: no interface
    assert "isoebpf_cluster_published_version" not in enforcing  # a file agent: no cluster


class _Follower:
    """Heads published one after another whose items never arrive (a push racing another)."""

    head: store.Head | None = None

    def follow(self, stop: threading.Event) -> Iterator[Incomplete]:
        for version in (5, 6):
            self.head = store.Head(version, "0" * 64, "0" * 64, {}, 0.0)
            yield Incomplete(self.head, "its items are not the ones seen")


def test_a_cluster_node_says_the_newest_version_published_even_one_it_cannot_take() -> None:
    agent = ClusterAgent("etcd://relay/isoebpf/", etcd=object(),
                         log_stream=io.StringIO())
    agent.stats.cluster_version, agent.stats.etcd_connected = 4, True
    agent._follower = _Follower()
    agent._follow(threading.Event())
    series = exposition({}, agent.stats)
    assert series["isoebpf_cluster_published_version"] == {(): 6.0}
    assert series["isoebpf_cluster_version"] == {(): 4.0}  # behind: IsoebpfNodeBehindCluster


# -- the alert rules ------------------------------------------------------------------------

def promtool() -> str:
    return require_program("promtool", "prometheus")


def test_the_alert_rules_are_valid_and_fire_as_their_tests_say() -> None:
    """promtool's own check, then its unit tests: for each alert, series that fire it
    (labels and annotations as expected) and series close to them that do not."""
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 9 rules found" in checked.stdout
    tested = subprocess.run([tool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_test() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {check["alertname"] for test in tests for check in test["alert_rule_test"]
             if check["exp_alerts"]}
    assert fired == {rule["alert"] for rule in rules}


# -- every query asks for what is exported -------------------------------------------------

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
MATCHERS = re.compile(r"\{([^}]*)\}")
LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
NAME = re.compile(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()")  # an identifier that is not a function call


def asked(expr: str) -> tuple[set[str], set[str]]:
    """(series names, label names) a PromQL expression names."""
    labels = {label for matchers in MATCHERS.findall(expr)
              for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", STRING.sub('""', matchers))}
    labels |= {label.strip() for listed in LABEL_LISTS.findall(expr) for label in listed.split(",")
               if label.strip()}
    bare = re.sub(r"\[[^\]]*\]", "", MATCHERS.sub("", LABEL_LISTS.sub("", STRING.sub('""', expr))))
    words = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    return {name for name in NAME.findall(bare) if name not in words}, labels


def queries() -> dict[str, str]:
    """Every query of the dashboard and of the alert rules, by where it is."""
    found = {}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            found[f"dashboard {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            listed = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
            assert listed, variable
            found[f"dashboard variable {variable['name']}"] = f"sum by ({listed[2]}) ({listed[1]})"
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            found[f"alert {rule['alert']}"] = rule["expr"]
    return found


def unknown(expr: str, names: dict[str, set[str]]) -> list[str]:
    """What `expr` asks for that the exporter does not export: series, or labels none of
    the expression's series carry."""
    series, labels = asked(expr)
    carried = TARGET_LABELS.union(*(names.get(name, set()) for name in series))
    return sorted(series - names.keys()) + sorted(labels - carried)


def test_every_query_of_the_dashboard_and_the_alerts_asks_for_exported_series() -> None:
    names = exported()
    found = queries()
    assert len(found) >= 20
    problems = {where: missing for where, expr in found.items() if (missing := unknown(expr, names))}
    assert problems == {}
    used = set().union(*(asked(expr)[0] for expr in found.values()))
    # The panels the dashboard is for, and the alerts' series.
    assert {"isoebpf_rule_packets_total", "isoebpf_verdicts_total", "isoebpf_map_entries",
            "isoebpf_map_capacity", "isoebpf_applies_total", "isoebpf_repairs_total",
            "isoebpf_tracked_connections", "isoebpf_audit_mode", "isoebpf_attachment_state",
            "isoebpf_cluster_published_version", "isoebpf_change_failed"} <= used


def test_the_query_check_finds_what_is_not_exported() -> None:
    names = exported()
    assert asked('sum by (identity) (rate(isoebpf_rule_packets_total{instance=~"$i"}[5m])) > 0') == (
        {"isoebpf_rule_packets_total"}, {"identity", "instance"})
    assert unknown('rate(isoebpf_rule_packets{rule="a"}[5m])', names) == ["isoebpf_rule_packets", "rule"]
    assert unknown('isoebpf_map_entries{mapname="x"} / on (map) isoebpf_map_capacity', names) == [
        "mapname"]
    assert unknown("sum by (identity) (isoebpf_verdicts_total)", names) == ["identity"]
    assert unknown('isoebpf_attachment_state{state="attached"} == 0 and up', names) == ["up"]
