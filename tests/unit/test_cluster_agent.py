"""The cluster agent's status in etcd, with a fake etcd: a write that fails while the
connection stays up is written again by the next heartbeat."""

from __future__ import annotations

import io
import threading

import pytest

from isoebpf.cluster import store
from isoebpf.cluster.etcd import EtcdError
from isoebpf.service.cluster_agent import ClusterAgent

pytestmark = pytest.mark.unit


class _Etcd:
    """Fails the first write of the node's status (a member that hangs on it), then works."""

    def __init__(self) -> None:
        self.kv: dict[str, str] = {}
        self.failed = False

    def put(self, key: str, value: str, lease: int = 0) -> int:
        if key.endswith("/status") and not self.failed:
            self.failed = True
            raise EtcdError("timed out")
        self.kv[key] = value
        return 1

    def grant(self, ttl: int) -> int:
        return 7

    def keepalive(self, lease: int) -> int:
        return 10  # the lease's seconds left

    def revoke(self, lease: int) -> None:
        pass


def test_a_status_write_that_failed_is_written_by_the_next_heartbeat() -> None:
    stop = threading.Event()
    etcd = _Etcd()
    agent = ClusterAgent("etcd://relay/isoebpf/", etcd=etcd, node="c", heartbeat_interval=0.01,
                         log_stream=io.StringIO())
    agent.stats.etcd_connected = True
    report = store.NodeReport("c", "enforcing", version=9)
    agent._say(report)
    assert etcd.failed and not any(k.endswith("/status") for k in etcd.kv)
    threading.Timer(0.2, stop.set).start()
    agent._heartbeats(stop)
    written = [v for k, v in etcd.kv.items() if k.endswith("nodes/c/status")]
    assert written == [report.text()]
