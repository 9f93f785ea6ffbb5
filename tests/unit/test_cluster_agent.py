"""The cluster agent's status in etcd, with a fake etcd: the next heartbeat writes the
node's report again where etcd holds another (a write that failed, or an older one that
landed late)."""

from __future__ import annotations

import io
import threading

import pytest

from isoebpf.cluster import store
from isoebpf.cluster.etcd import KV, EtcdError
from isoebpf.service.cluster_agent import ClusterAgent

pytestmark = pytest.mark.unit

STATUS = "nodes/c/status"


class _Etcd:
    """A key-value store whose first write of the node's status fails (a member that hangs)."""

    def __init__(self) -> None:
        self.kv: dict[str, str] = {}
        self.failed = False

    def put(self, key: str, value: str, lease: int = 0) -> int:
        if key.endswith(STATUS) and not self.failed:
            self.failed = True
            raise EtcdError("timed out")
        self.kv[key] = value
        return 1

    def get(self, key: str) -> KV | None:
        return KV(self.kv[key], 1) if key in self.kv else None

    def grant(self, ttl: int) -> int:
        return 7

    def keepalive(self, lease: int) -> int:
        return 10  # the lease's seconds left

    def revoke(self, lease: int) -> None:
        pass


def agent_on(etcd: _Etcd) -> ClusterAgent:
    agent = ClusterAgent("etcd://relay/isoebpf/", etcd=etcd, node="c", heartbeat_interval=0.01,
                         log_stream=io.StringIO())
    agent.stats.etcd_connected = True
    return agent


def one_heartbeat(agent: ClusterAgent) -> None:
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    agent._heartbeats(stop)


def status_of(etcd: _Etcd) -> list[str]:
    return [v for k, v in etcd.kv.items() if k.endswith(STATUS)]


def test_a_status_write_that_failed_is_written_by_the_next_heartbeat() -> None:
    etcd = _Etcd()
    agent = agent_on(etcd)
    report = store.NodeReport("c", "enforcing", version=9)
    agent._say(report)
    assert etcd.failed and status_of(etcd) == []
    one_heartbeat(agent)
    assert status_of(etcd) == [report.text()]


def test_an_older_report_that_lands_late_is_overwritten_by_the_next_heartbeat() -> None:
    etcd = _Etcd()
    etcd.failed = True  # every write goes through
    agent = agent_on(etcd)
    older, newer = store.NodeReport("c", "enforcing", version=8), store.NodeReport("c", "enforcing", version=9)
    agent._say(newer)
    key = next(k for k in etcd.kv if k.endswith(STATUS))
    etcd.kv[key] = older.text()  # the hung member resumes and carries out the write it held
    one_heartbeat(agent)
    assert status_of(etcd) == [newer.text()]
