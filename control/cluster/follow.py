"""Cluster stage: following a cluster's policy as an agent does.

The pattern of the field: read everything at the latest revision, hand out what
is complete, then watch from that revision + 1 and keep the items current event
by event. A version is handed out when a head arrives whose items hash is the
hash of the items seen: never the items of a push still under way. A compacted
watch reads everything again (the caller diffs it against what it enforces, so
deletes are seen too); a lost stream is reported and resumed where it stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from . import layout as laid
from . import store
from .etcd import KV, Etcd, EtcdError, Event
from .layout import ItemsHash, Layout


@dataclass(frozen=True)
class Version:
    """A complete published version: its items, and the policy document they make."""

    head: store.Head
    layout: Layout
    items: Mapping[str, str]  # key -> text, the head aside (the follower's own: read before the next)
    # The item keys that changed since the version handed out before (None: unknown,
    # compare everything).
    changed: frozenset[str] | None

    def document(self) -> tuple[str, list[str]]:
        """The JSON policy document (laid.document), made only when asked: a change of a
        few rules needs only those (cluster.edit)."""
        return laid.document(self.layout, self.items)


@dataclass(frozen=True)
class Lost:
    """etcd could not be reached or the stream broke: why (the watch goes on trying)."""

    why: str


@dataclass(frozen=True)
class Read:
    """Everything was read afresh at `revision`: at the start, or because the watch's
    next revision was compacted (`compacted`: up to which)."""

    revision: int
    compacted: int = 0


@dataclass(frozen=True)
class Incomplete:
    """A head whose items are not the ones seen (a push raced another, or items were
    written by hand): nothing is handed out until a head and its items agree."""

    head: store.Head
    why: str


class Follower:
    """One agent's view of the policy keys."""

    def __init__(self, etcd: Etcd, layout: Layout, quiet: float = 2.0) -> None:
        self.etcd = etcd
        self.layout = layout
        self.quiet = quiet
        self.items: dict[str, str] = {}
        self.hash = ItemsHash()
        self.head: store.Head | None = None
        self.revision = 0  # the store revision `items` are current at
        self._given: store.Head | None = None
        self._changed: set[str] | None = set()

    def follow(self, stop: threading.Event) -> Iterator[Version | Lost | Incomplete | Read]:
        """Each version published from now on, once, in order (the one in etcd first)."""
        compacted = 0
        while not stop.is_set():
            try:
                stored = store.read(self.etcd, self.layout)
            except EtcdError as err:
                yield Lost(str(err))
                stop.wait(0.25)
                continue
            yield Read(stored.revision, compacted)
            yield from self._reset(stored)
            for batch in self.etcd.watch(self.layout.policy, self.revision + 1, stop, self.quiet):
                if batch.lost:
                    yield Lost(batch.lost)
                elif batch.compacted:
                    compacted = batch.compacted
                    break  # read everything again
                elif batch.events:
                    yield from self._apply(batch.events)

    def _reset(self, stored: store.Stored) -> Iterator[Version | Incomplete]:
        if self._changed is not None:
            self._changed |= {k for k in self.items.keys() | stored.items.keys()
                              if self.items.get(k) != stored.items.get(k)}
        self.items = stored.items
        self.hash = ItemsHash(self.items.items())
        self.head = stored.head
        self.revision = stored.revision
        yield from self._offer()

    def _apply(self, events: list[Event]) -> Iterator[Version | Incomplete]:
        head_moved = False
        for event in events:
            self.revision = max(self.revision, event.revision)
            if event.key == self.layout.head:
                head_moved = True
                self.head = store.Head.of(KV(event.value, event.revision)) if event.value is not None else None
                continue
            was = self.items.get(event.key)
            if event.value is None:
                if was is not None:
                    self.hash.delete(event.key, was)
                    del self.items[event.key]
            else:
                self.hash.put(event.key, event.value, was)
                self.items[event.key] = event.value
            if self._changed is not None:
                self._changed.add(event.key)
        if head_moved:
            yield from self._offer()

    def _offer(self) -> Iterator[Version | Incomplete]:
        head = self.head
        if head is None or head == self._given:
            return
        items = self.items
        changed = frozenset(self._changed) if self._changed is not None else None
        if self.hash.hex() != head.items_hash:
            # Items written after the head (a push racing another) or by hand: the
            # head's own revision still holds what it published, unless compacted.
            try:
                at_head = store.read(self.etcd, self.layout, head.revision)
            except EtcdError as err:
                yield Incomplete(head, f"its items are not the ones seen, and its revision "
                                       f"cannot be read: {err}")
                return
            if at_head.head != head or not store.complete(at_head.items, head):
                yield Incomplete(head, "its items hash is not the hash of the items stored")
                return
            items, changed = at_head.items, None
        if self.layout.header not in items:
            yield Incomplete(head, f"no {self.layout.header}")
            return
        self._given = head
        # What changes next is counted from the items handed out, where they are the ones seen.
        self._changed = set() if items is self.items else None
        yield Version(head, self.layout, items, changed)

    def forget_changes(self) -> None:
        """The next version is compared in full (what was handed out was not enforced)."""
        self._changed = None

