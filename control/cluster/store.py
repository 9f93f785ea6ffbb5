"""Cluster stage: a cluster's keys read and written: `push`, what is `published`,
and the nodes' status (`report`, `heartbeat`, `nodes`).

A push writes only what differs from what is stored, in transactions of at
most etcd's limit (`--max-txn-ops`, 128 by default), each guarded by the head
it started from: a push that meets another one's head fails rather than mix
the two, and the items it did write are harmless (no head names them; the next
push diffs against them). The head goes last, in the last transaction.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import IsoebpfError
from ..ir.compiler import digest_of
from ..policy.model import Policy
from . import layout as laid
from .etcd import KV, Etcd, EtcdError, b64
from .layout import ItemsHash, Layout, Plan

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


class ConcurrentPush(IsoebpfError):
    """Another push published a version while this one was writing."""


class NoPolicy(IsoebpfError):
    """The cluster has no complete policy to read."""


@dataclass(frozen=True)
class Head:
    """A published version: what its items hash to, and what they compile to."""

    version: int
    digest: str  # the IR's digest of the items' policy (as `status` shows it)
    items_hash: str  # layout.ItemsHash of the items
    counts: dict[str, int]
    pushed: float
    revision: int = 0  # the head key's mod revision: the store revision of the version

    @classmethod
    def of(cls, kv: KV) -> Head:
        try:
            said = json.loads(kv.value)
            return cls(int(said["version"]), str(said["digest"]), str(said["items_hash"]),
                       dict(said.get("counts", {})), float(said.get("pushed", 0)), kv.mod_revision)
        except (ValueError, KeyError, TypeError) as err:
            raise NoPolicy(f"the head key holds no head: {err}") from err

    def text(self) -> str:
        return laid.canonical({"version": self.version, "digest": self.digest,
                               "items_hash": self.items_hash, "counts": self.counts,
                               "pushed": self.pushed})


@dataclass(frozen=True)
class Stored:
    """The policy keys at one revision."""

    revision: int
    items: dict[str, str]  # the head aside
    head: Head | None


def read(etcd: Etcd, layout: Layout, revision: int = 0) -> Stored:
    found = etcd.range(layout.policy, revision)
    head_kv = found.kvs.pop(layout.head, None)
    return Stored(found.revision, {k: kv.value for k, kv in found.kvs.items()},
                  Head.of(head_kv) if head_kv else None)


def canonical_policy(policy: Policy) -> Policy:
    """`policy` as the cluster keeps it: overlays in name order (their keys' order)."""
    return dataclasses.replace(policy, overlays=tuple(sorted(policy.overlays, key=lambda o: o.name)))


# -- push --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pushed:
    plan: Plan
    head: Head  # the version published (the one already there when nothing changed)
    changed: bool
    transactions: int = 0
    seconds: float = 0.0


def push(etcd: Etcd, layout: Layout, policy: Policy, max_ops: int = MAX_TXN_OPS) -> Pushed:
    """Publish `policy` (validated) as the cluster's next version, writing what differs."""
    started = time.monotonic()
    stored = read(etcd, layout)
    plan = laid.plan(layout, stored.items, policy)
    items = dict(stored.items)
    items.update(plan.puts)
    for key in plan.deletes:
        del items[key]
    digest = digest_of(canonical_policy(policy))
    items_hash = ItemsHash(items.items()).hex()
    if stored.head and stored.head.items_hash == items_hash and stored.head.digest == digest:
        return Pushed(plan, stored.head, changed=False)
    head = Head(version=(stored.head.version if stored.head else 0) + 1, digest=digest,
                items_hash=items_hash, pushed=round(time.time(), 3),
                counts={"overlays": len(policy.overlays), "exceptions": len(policy.exceptions),
                        "allow": len(policy.rules)})
    guard = [_unchanged(layout.head, stored.head)]
    ops = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in plan.puts.items()]
    ops += [{"request_delete_range": {"key": b64(k)}} for k in plan.deletes]
    ops.append({"request_put": {"key": b64(layout.head), "value": b64(head.text())}})
    transactions = 0
    revision = 0
    for start in range(0, len(ops), max_ops):
        ran, revision = etcd.txn(guard, ops[start:start + max_ops])
        transactions += 1
        if not ran:
            raise ConcurrentPush(
                "another push published a version while this one was writing; nothing of this "
                "one is in force: run the push again (it writes what still differs)")
    return Pushed(plan, dataclasses.replace(head, revision=revision), changed=True,
                  transactions=transactions, seconds=time.monotonic() - started)


def _unchanged(key: str, head: Head | None) -> dict[str, Any]:
    """The compare that holds while the head is still `head` (or still absent)."""
    if head is None:
        return {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": head.revision}


# -- the published version ---------------------------------------------------------


def published(etcd: Etcd, layout: Layout) -> tuple[Stored, Head]:
    """The complete version in force: the items as the head published them. Read at
    the latest revision; when a push is under way there, at the head's own (or, that
    being compacted, NoPolicy: a push is under way, try again when it is done)."""
    stored = read(etcd, layout)
    if stored.head is None:
        raise NoPolicy(f"no policy published under {layout.policy} ('isoebpf cluster push' one)")
    if complete(stored.items, stored.head):
        return stored, stored.head
    try:
        at_head = read(etcd, layout, stored.head.revision)
    except EtcdError as err:
        raise NoPolicy(f"a push is under way and version {stored.head.version}'s revision is "
                       f"compacted ({err}); read again when it is done") from err
    if at_head.head is None or not complete(at_head.items, at_head.head):
        raise NoPolicy(f"the items under {layout.policy} are not the ones version "
                       f"{stored.head.version} published, at its own revision either")
    return at_head, at_head.head


def complete(items: Mapping[str, str], head: Head) -> bool:
    return ItemsHash(items.items()).hex() == head.items_hash


# -- nodes -------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeReport:
    """What a node's agent says it enforces."""

    node: str
    state: str  # "enforcing", "refused" (a version it could not take), "failed", "starting"
    version: int = 0
    digest: str = ""
    revision: int = 0
    backend: str = ""
    mode: str = ""
    errors: tuple[str, ...] = ()
    connected: bool = True  # False: etcd unreachable, enforcing the last good version
    updated: float = field(default_factory=lambda: round(time.time(), 3))

    def text(self) -> str:
        return laid.canonical(dataclasses.asdict(self))

    @classmethod
    def of(cls, text: str) -> NodeReport:
        said = json.loads(text)
        said["errors"] = tuple(said.get("errors", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in said.items() if k in known})


def report(etcd: Etcd, layout: Layout, status: NodeReport) -> None:
    etcd.put(layout.node_status(status.node), status.text())


def reported(etcd: Etcd, layout: Layout, node: str) -> str | None:
    """The text of `node`'s status as etcd holds it (None: none)."""
    kv = etcd.get(layout.node_status(node))
    return kv.value if kv is not None else None


def heartbeat(etcd: Etcd, layout: Layout, node: str, lease: int) -> None:
    etcd.put(layout.node_alive(node), laid.canonical({"node": node, "at": round(time.time(), 3)}), lease)


@dataclass(frozen=True)
class NodeRow:
    """One line of `cluster status`."""

    node: str
    alive: bool
    report: NodeReport | None
    behind: int  # versions behind the head (0: in sync)

    @property
    def in_sync(self) -> bool:
        return self.alive and self.report is not None and self.behind == 0

    def state(self) -> str:
        if self.report is None:
            return "no status yet"
        if not self.alive:
            return "stale (no heartbeat: its lease expired)"
        if self.report.state == "refused":
            return "refused the stored version, enforcing its last good one"
        if not self.report.connected:
            return "cut off from etcd, enforcing its last good version"
        return "in sync" if self.behind == 0 else f"behind by {self.behind} version(s)"


def nodes(etcd: Etcd, layout: Layout, head: Head | None) -> list[NodeRow]:
    found = etcd.range(layout.nodes).kvs
    reports: dict[str, NodeReport] = {}
    alive: set[str] = set()
    for key, kv in found.items():
        said = layout.node_of(key)
        if said is None:
            continue
        node, what = said
        if what == "alive":
            alive.add(node)
        elif what == "status":
            try:
                reports[node] = NodeReport.of(kv.value)
            except (ValueError, TypeError):
                continue
    rows = []
    for node in sorted(alive | set(reports)):
        said_report = reports.get(node)
        behind = 0
        if head is not None and said_report is not None:
            in_force = said_report.version == head.version and said_report.digest == head.digest
            behind = 0 if in_force else max(1, head.version - said_report.version)
        rows.append(NodeRow(node, node in alive, said_report, behind))
    return rows
