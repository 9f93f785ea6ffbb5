"""Service stage: Prometheus metrics for the agent, read from the backend's status on every scrape.

Reads the agent's `Stats` and `backends.enforcer`'s status.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..backends.enforcer import FAILURE_MODES
from .agent import Stats

# The action each fixed rule stands for; policy rules (exception, hairpin, allow)
# all allow, and `default` takes the policy's default action.
FIXED_ACTIONS = {"unfiltered": "allow", "established": "allow", "fragment": "drop",
                 "malformed": "drop"}

# What `status` says of each attachment (backends' status: `state`).
ATTACHMENT_STATES = ("attached", "detached", "interface gone")

# Why a rule's series carry two labels: names number rules by their place in the
# file, identities (ir.rule_identities) stay with the rule, and its count with them.
RULE_LABELS_HELP = ("; rule: its name now (allow:<i> moves when rules are inserted above it), "
                    "identity: the rule itself, whose count goes on across policy updates "
                    "(aggregate by identity)")


class StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any] | None], stats: Stats,
                 default_action: Callable[[], str], on_failure: str = "closed") -> None:
        self._status = status
        self._on_failure = on_failure
        self._stats = stats
        self._default_action = default_action

    def collect(self) -> Iterator[Any]:
        record = self._status() or {}
        packets = CounterMetricFamily("isoebpf_rule_packets", "Packets decided by each rule"
                                      + RULE_LABELS_HELP, labels=["rule", "identity"])
        octets = CounterMetricFamily("isoebpf_rule_bytes", "Bytes decided by each rule"
                                     + RULE_LABELS_HELP, labels=["rule", "identity"])
        verdicts = CounterMetricFamily("isoebpf_verdicts", "Packets by action", labels=["action"])
        by_action: dict[str, int] = {}
        for counter in record.get("counters", []):
            labels = [counter["rule"], counter["identity"]]
            packets.add_metric(labels, counter["packets"])
            octets.add_metric(labels, counter["bytes"])
            rule = counter["rule"]
            action = FIXED_ACTIONS.get(rule) or (
                self._default_action() if rule == "default" else "allow")
            by_action[action] = by_action.get(action, 0) + counter["packets"]
        for action, count in sorted(by_action.items()):
            verdicts.add_metric([action], count)
        yield from (packets, octets, verdicts)

        yield GaugeMetricFamily("isoebpf_tracked_connections", "Connections tracked now",
                                value=record.get("connections", 0))
        fill = GaugeMetricFamily("isoebpf_map_entries", "Entries in each map", labels=["map"])
        capacity = GaugeMetricFamily("isoebpf_map_capacity", "Capacity of each map",
                                     labels=["map"])
        for name, entry in sorted(record.get("maps", {}).items()):
            fill.add_metric([name], entry["entries"])
            capacity.add_metric([name], entry["max_entries"])
        yield from (fill, capacity)
        # One series a state for each interface, 1 for the state it is in: an alert can
        # ask for interfaces not attached and name them.
        attachments = GaugeMetricFamily("isoebpf_attachment_state", "1 for the state each "
                                        "enforced interface is in (attached, detached, "
                                        "interface gone)", labels=["ifname", "mode", "state"])
        for attachment in record.get("attachments", []):
            for state in ATTACHMENT_STATES:
                attachments.add_metric([attachment["ifname"], attachment["mode"], state],
                                       1 if attachment.get("state", "attached") == state else 0)
        yield attachments
        yield GaugeMetricFamily("isoebpf_audit_mode", "1 while the policy in force is in audit "
                                "mode: judged, counted, nothing denied",
                                value=1 if record.get("audit", False) else 0)

        yield CounterMetricFamily("isoebpf_reconciles", "Interfaces enforced as they appeared",
                                  value=self._stats.reconciles)
        repairs = CounterMetricFamily("isoebpf_repairs", "Drift found and repaired",
                                      labels=["what"])
        for what, count in sorted(self._stats.repairs.items()):
            repairs.add_metric([what], count)
        applies = CounterMetricFamily("isoebpf_applies", "Policy applies by result",
                                      labels=["result"])
        for result, count in sorted(self._stats.applies.items()):
            applies.add_metric([result], count)
        yield from (repairs, applies)
        yield GaugeMetricFamily("isoebpf_last_apply_timestamp_seconds",
                                "When the policy was last applied",
                                value=self._stats.last_apply_time)
        yield GaugeMetricFamily("isoebpf_last_apply_success", "1 if the last apply worked",
                                value=1 if self._stats.last_apply_ok else 0)
        if self._stats.etcd_connected is not None:  # cluster mode
            yield GaugeMetricFamily("isoebpf_etcd_connected", "1 while etcd answers; 0: enforcing "
                                    "the last good version (fail-static)",
                                    value=1 if self._stats.etcd_connected else 0)
            yield GaugeMetricFamily("isoebpf_cluster_version", "The cluster's policy version enforced",
                                    value=self._stats.cluster_version)
            yield GaugeMetricFamily("isoebpf_cluster_published_version", "The cluster's "
                                    "newest policy version this node has seen published",
                                    value=self._stats.cluster_published)
        mode = GaugeMetricFamily("isoebpf_failure_mode", "What a change that cannot be applied "
                                 "leaves: closed keeps the policy in force, open removes it",
                                 labels=["mode"])
        for choice in FAILURE_MODES:
            mode.add_metric([choice], 1 if choice == self._on_failure else 0)
        yield mode
        failure = record.get("failure")
        yield GaugeMetricFamily("isoebpf_change_failed",
                                "1 while the last change could not be applied (see status)",
                                value=1 if failure else 0)
        yield GaugeMetricFamily("isoebpf_failed_open",
                                "1 while a failed change left enforcement removed (fail-open)",
                                value=1 if failure and failure["on_failure"] == "open" else 0)
