"""The etcd lab the cluster mode's tests stand on: three members and a leader, a new
leader when one dies, TLS that turns away clients without a certificate, and roles
that let a node read the policy and write its own status, nothing else. Also the
gateway's watch behaviour the agents will rely on: progress notifications and the
answer to a compacted start revision."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from etcd3gw.exceptions import Etcd3Exception

from isoebpf.lab.etcd import EtcdCluster, Member, Pki
from tests.integration.conftest import NODES, GatewayClient


def test_three_members_agree_on_one_leader_and_replicate(etcd_cluster: EtcdCluster,
                                                         gateway_client: GatewayClient) -> None:
    named = etcd_cluster.leaders_named()
    assert named is not None and len(named) == 3
    assert len(set(named.values())) == 1 and 0 not in named.values()
    assert etcd_cluster.leader().id in named.values()
    gateway_client(etcd_cluster, etcd_cluster.members[0]).put("/lab/k", "v")
    for member in etcd_cluster.members:
        assert gateway_client(etcd_cluster, member).get("/lab/k") == [b"v"]


def test_a_killed_leader_is_replaced_and_rejoins_with_what_it_missed(
        etcd_cluster: EtcdCluster, gateway_client: GatewayClient) -> None:
    old = etcd_cluster.leader()
    etcd_cluster.kill(old)
    new = etcd_cluster.leader(timeout=5.0)
    assert new is not old
    gateway_client(etcd_cluster, new).put("/lab/after", "written")
    etcd_cluster.start(old)
    assert gateway_client(etcd_cluster, old).get("/lab/after") == [b"written"]


def test_tls_turns_away_a_client_without_a_certificate_from_the_ca(
        tmp_path: Path, secured_etcd: EtcdCluster) -> None:
    """No certificate, or one from another CA, fails the handshake; the admin's, from the
    lab's CA, gets an answer (so TLS itself works)."""
    assert secured_etcd.pki is not None and secured_etcd.rbac is not None
    url = f"{secured_etcd.members[0].client_url}/v3/maintenance/status"
    stranger = Pki(tmp_path / "other-ca").issue_client("stranger", common_name=False)
    admin = secured_etcd.rbac.admin
    with requests.Session() as session:
        session.trust_env = False
        session.verify = str(secured_etcd.pki.ca)
        for cert in (None, (str(stranger[0]), str(stranger[1]))):
            with pytest.raises(requests.exceptions.ConnectionError):
                session.post(url, json={}, cert=cert, timeout=5)
        answer = session.post(url, json={}, cert=(str(admin.cert), str(admin.key)), timeout=5)
    assert answer.status_code == 200 and answer.json()["leader"] != "0"


def test_a_node_reads_the_policy_writes_its_status_and_nothing_else(
        secured_etcd: EtcdCluster, gateway_client: GatewayClient) -> None:
    rbac = secured_etcd.rbac
    assert rbac is not None
    admin = gateway_client(secured_etcd, credentials=rbac.admin)
    admin.put(f"{rbac.policy_prefix}overlays", "it, hr")
    node_a = gateway_client(secured_etcd, credentials=rbac.nodes["a"])

    assert [value for value, _ in node_a.get_prefix(rbac.policy_prefix)] == [b"it, hr"]
    node_a.put(rbac.status_key("a"), "applied")
    assert admin.get(rbac.status_key("a")) == [b"applied"]
    for forbidden in (rbac.status_key("b"), f"{rbac.policy_prefix}overlays"):
        _assert_denied(lambda key=forbidden: node_a.put(key, "forged"))
    _assert_denied(lambda: node_a.get(rbac.status_key("a")))  # nodes write their status, never read it
    assert admin.get(f"{rbac.policy_prefix}overlays") == [b"it, hr"]
    assert admin.get(rbac.status_key("b")) == []
    assert set(rbac.nodes) == set(NODES)


def test_the_gateway_refuses_a_certificate_that_names_a_user(secured_etcd: EtcdCluster) -> None:
    """Why gateway clients carry CN-less certificates and passwords: with auth on, etcd 3.4
    answers 400 to a certificate with a common name, even root's, where gRPC would take
    the CN for the user."""
    assert secured_etcd.pki is not None
    cert, key = secured_etcd.pki.issue_client("root", common_name=True)
    with requests.Session() as session:
        session.trust_env = False
        answer = session.post(f"{secured_etcd.members[0].client_url}/v3/kv/range",
                              json={"key": _b64("/isoebpf/")}, verify=str(secured_etcd.pki.ca),
                              cert=(str(cert), str(key)), timeout=5)
    assert answer.status_code == 400
    assert "CommonName of client sending a request against gateway will be ignored" in answer.text
    assert "root" in secured_etcd.etcdctl("user", "list")  # while gRPC takes the CN for root


def test_an_idle_watch_gets_progress_notifications_at_the_lab_interval(etcd_cluster: EtcdCluster) -> None:
    with _watch(etcd_cluster.members[0], {"key": _b64("/lab/"), "range_end": _b64("/lab0"),
                                          "progress_notify": True}) as results:
        assert next(results).get("created")
        started = time.monotonic()
        notes = [next(results) for _ in range(2)]
        elapsed = time.monotonic() - started
    assert all(set(note) == {"header"} and note["header"]["revision"] == "1" for note in notes), notes
    assert 1.0 < elapsed < 4.0  # two at the lab's 1 s interval, not etcd's default 10 min


def test_a_watch_from_a_compacted_revision_is_canceled_with_the_compaction_revision(
        etcd_cluster: EtcdCluster, gateway_client: GatewayClient) -> None:
    client = gateway_client(etcd_cluster)
    for number in range(4):
        client.put(f"/lab/k{number}", str(number))
    head = int(client.status()["header"]["revision"])
    etcd_cluster.compact(head)
    with _watch(etcd_cluster.members[0], {"key": _b64("/lab/"), "range_end": _b64("/lab0"),
                                          "start_revision": 2}) as results:
        assert next(results).get("created")
        refused = next(results)
    assert refused.get("canceled") is True and refused.get("compact_revision") == str(head)


def _assert_denied(call: Callable[[], object]) -> None:
    with pytest.raises(Etcd3Exception) as refused:
        call()
    assert "permission denied" in (refused.value.detail_text or ""), refused.value.detail_text


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@contextmanager
def _watch(member: Member, create_request: dict[str, Any]) -> Iterator[Iterator[dict[str, Any]]]:
    """A raw POST /v3/watch stream on a plain-HTTP member, as its `result` objects one by
    one (5 s read timeout): etcd3gw's Watcher drops progress notifications and cancels."""
    with requests.Session() as session:
        session.trust_env = False
        with session.post(f"{member.client_url}/v3/watch", json={"create_request": create_request},
                          stream=True, timeout=(5, 5)) as response:
            yield (json.loads(line)["result"] for line in response.iter_lines() if line)
