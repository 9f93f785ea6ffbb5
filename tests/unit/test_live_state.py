"""The live page's /api/state document, from made-up status records, and its page files."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import netaddr

from isoebpf.backends.interface import Verdict
from isoebpf.backends.state import Scope
from isoebpf.service import live
from isoebpf.service.agent import Stats
from isoebpf.service.flows import Bucket, Recorder

RECORD: dict[str, Any] = {
    "backend": "ebpf", "netns": "lab", "policy": "/etc/isoebpf/policy.yaml", "digest": "ab" * 32,
    "generation": 3, "loaded_at": "2024-05-01T12:00:00+0000",
    "overlays": {"it": ["10.250.0.0/16"], "hr": ["192.168.0.0/16"], "lab": ["172.20.0.0/16"]},
    "rules": [[2, "default", "default"], [16, "hairpin:it", "it -> it"], [17, "hairpin:hr", "hr -> hr"],
              [5, "exception:0", "10.250.7.0/24 -> 192.168.9.0/24 unfiltered"],
              [18, "allow:0", "hr -> it tcp/80"], [19, "allow:1", "hr -> lab udp/5000-5010, icmp"]],
    "attachments": [{"ifname": "v-it1", "mode": "tc", "state": "attached"}],
    "counters": [{"rule": "default", "identity": "default", "text": "default", "packets": 7, "bytes": 420},
                 {"rule": "allow:0", "identity": "allow hr -> it tcp/80", "text": "hr -> it tcp/80",
                  "packets": 3, "bytes": 180}],
    "failure": None,
}


class Remembered(Recorder):
    """A recorder whose buckets are given, not traced."""

    def __init__(self, *buckets: Bucket) -> None:
        super().__init__(Scope("lab"), 100, lambda *_, **__: None)
        self.given = list(buckets)

    def recent(self) -> list[Bucket]:
        return self.given


def stats(ok: bool = True) -> Stats:
    return Stats(last_apply_ok=ok, last_apply_time=1.0)


def test_overlays_and_edges_from_the_record() -> None:
    document = live.state_document(RECORD, stats(), None, 10.0)
    assert [(o["name"], o["isolated"]) for o in document["overlays"]] == [
        ("hr", False), ("it", False), ("lab", True)]
    assert [(e["rule"], e["kind"], e["from"], e["to"], e["label"]) for e in document["edges"]] == [
        ("exception:0", "exception", "it", "hr", "10.250.7.0/24 192.168.9.0/24 unfiltered"),
        ("allow:0", "allow", "hr", "it", "tcp/80"),
        ("allow:1", "allow", "hr", "lab", "udp/5000-5010, icmp"),
    ]
    assert document["policy"]["generation"] == 3 and document["loaded"]
    assert document["counters"][1] == RECORD["counters"][1]
    assert document["health"]["ok"] and not document["audit"]
    assert document["cluster_version"] is None
    json.dumps(document)  # what the server sends


def test_audit_mode_and_problems_are_said() -> None:
    record = {**RECORD, "audit": True, "failure": {"error": "map full"},
              "attachments": [{"ifname": "v-it1", "mode": "tc", "state": "detached"}]}
    document = live.state_document(record, stats(ok=False), None, 10.0)
    assert document["audit"] is True
    assert document["health"]["problems"] == ["the last change failed: map full", "v-it1 (tc) detached"]
    assert not document["health"]["ok"]


def test_cluster_version_where_the_agent_follows_a_cluster() -> None:
    followed = Stats(cluster_version=12, etcd_connected=True)
    assert live.state_document(RECORD, followed, None, 0.0)["cluster_version"] == 12


def test_nothing_loaded() -> None:
    document = live.state_document({"backend": None, "failure": None}, Stats(), None, 0.0)
    assert (document["loaded"], document["overlays"], document["edges"], document["counters"]) == (
        False, [], [], [])


def test_denials_from_the_recorder_with_their_overlays_and_audit_mark() -> None:
    bucket = Bucket(100.0, 110.0)
    for audit in (True, True, False):
        bucket.add(Verdict(0, "v-it1", 4, 6, netaddr.IPAddress("10.250.1.10"), 40000,
                           netaddr.IPAddress("192.168.1.10"), 22, "reject", "default", "default", audit),
                   105.0)
    document = live.state_document(RECORD, stats(), Remembered(bucket), 200.0)
    assert [(d["src_overlay"], d["dst_overlay"], d["service"], d["packets"], d["audit"])
            for d in document["denials"]] == [("it", "hr", "tcp/22", 3, False)]
    assert [(f["src_overlay"], f["dst_overlay"], f["packets"], f["audit"])
            for f in document["denied_flows"]] == [("it", "hr", 2, True), ("it", "hr", 1, False)]
    assert document["flow_log"] == {"recording": True, "rate": 100}


def test_the_page_loads_only_its_own_files() -> None:
    """Package data, and nothing fetched from elsewhere."""
    static = resources.files("isoebpf.service") / "static"
    for _, (name, _) in live.ASSETS.items():
        text = (static / name).read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
