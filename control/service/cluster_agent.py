"""Service stage: `isoebpf agent --etcd`, the agent of a cluster node.

Everything the file agent does stays (interfaces as they appear, repair,
metrics); the policy comes from etcd instead of a file:
- Each version `cluster push` publishes is compiled as a difference of the one
  in force and applied as soon as its head arrives (cluster.follow: the items
  of a push under way are never applied).
- A version that is not a valid policy (keys written by hand) is refused: its
  errors, located by key, go to the node's status; the version in force stays.
- etcd out of reach (a partition, every member down): enforcement stays with
  the last good version (fail-static), logged and in the metrics; the watch
  resumes where it stopped, and a compacted revision leads to a full read that
  is compared with what is in force, deletes included.
- The node says what it enforces in nodes/NODE/status after every version and
  every change of connection, and that it lives in nodes/NODE/alive, under a
  lease it refreshes every `heartbeat_interval` (`cluster status` calls a node
  whose lease expired stale).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field, replace

from .. import pipeline
from ..backends import enforcer
from ..cluster import edit, store
from ..cluster.etcd import Etcd, EtcdError
from ..cluster.follow import Follower, Incomplete, Lost, Read, Version
from ..cluster.layout import Layout, NotAPolicy, located
from ..errors import PolicyError
from .agent import Agent, LinkEvents


@dataclass
class ClusterAgent(Agent):
    etcd: Etcd | None = None
    layout: Layout = field(default_factory=Layout)
    node: str = field(default_factory=socket.gethostname)
    lease_ttl: int = 10
    heartbeat_interval: float = 2.0
    watch_quiet: float = 2.0  # a watch stream silent this long is reopened
    _in_force: store.Head | None = None
    _follower: Follower | None = None
    _report: store.NodeReport | None = None
    _report_lock: threading.Lock = field(default_factory=threading.Lock)
    _report_unwritten: bool = False  # the last write of _report failed: the next heartbeat writes it
    _rule_keys: list[str] | None = None  # the key of each rule of the policy in force
    _frame: dict[str, str] = field(default_factory=dict)  # its header and overlays (cluster.edit)

    def __post_init__(self) -> None:
        if self.etcd is None:
            raise ValueError("a cluster agent needs an etcd client")

    @property
    def client(self) -> Etcd:
        assert self.etcd is not None
        return self.etcd

    def check_policy(self) -> None:
        """Nothing to poll: versions arrive from the watch as they are published."""

    def run(self, stop: threading.Event, link_events: LinkEvents | None = None) -> None:
        self.log("cluster", etcd=self.policy_path, node=self.node)
        self.stats.etcd_connected = False
        self._say(store.NodeReport(self.node, "starting", connected=False))
        self._follower = Follower(self.client, self.layout, self.watch_quiet)
        threads = [threading.Thread(target=self._heartbeats, args=(stop,), daemon=True),
                   threading.Thread(target=self._follow, args=(stop,), daemon=True)]
        for thread in threads:
            thread.start()
        try:
            super().run(stop, link_events)
        finally:
            for thread in threads:
                thread.join(timeout=self.client.timeout + 1)

    # -- versions ----------------------------------------------------------------

    def _follow(self, stop: threading.Event) -> None:
        assert self._follower is not None
        for said in self._follower.follow(stop):
            if self._follower.head is not None:  # published, whether or not it can be taken
                self.stats.cluster_published = self._follower.head.version
            if isinstance(said, Lost):
                self._connected(False, said.why)
            elif isinstance(said, Read):
                self._connected(True)
                self.log("cluster_read", revision=said.revision,
                         why=f"revision {said.compacted} compacted" if said.compacted else "start")
            elif isinstance(said, Incomplete):
                self.log("cluster_incomplete", version=said.head.version, why=said.why,
                         keeping=self._in_force.version if self._in_force else None)
            else:
                self._connected(True)
                self.take(said)

    def take(self, version: Version) -> None:
        """Enforce `version`, or refuse it and keep the one in force."""
        head = version.head
        started = time.monotonic()
        try:
            compiled = self._compile(version)
        except (PolicyError, NotAPolicy) as err:
            errors = ([str(d) for d in err.diagnostics if d.severity == "error"]
                      if isinstance(err, PolicyError) else [str(err)])
            self.stats.applies["refused"] += 1
            self.log("policy_refused", version=head.version, errors=errors,
                     keeping=self._in_force.version if self._in_force else None)
            self._say(self._status("refused", errors=tuple(errors)))
            return
        self._compiled = compiled
        self.apply(compiled.ir, f"cluster version {head.version}",
                   compile_ms=(time.monotonic() - started) * 1000, change=compiled.delta)
        if not self.stats.last_apply_ok:
            assert self._follower is not None
            self._follower.forget_changes()
            self._rule_keys = None
            self._say(self._status("failed", errors=(self.stats.last_error,)))
            return
        if compiled.ir.digest != head.digest:
            self.log("digest_differs", version=head.version, head=head.digest[:12],
                     compiled=compiled.ir.digest[:12])
        self._in_force = head
        self.stats.cluster_version = head.version
        self._say(self._status("enforcing"))

    def _compile(self, version: Version) -> pipeline.Compiled:
        """`version` compiled as a difference of the one in force: from the rules that
        changed alone where only rules did (cluster.edit), else from the whole document."""
        changed = version.changed
        if (self._compiled is not None and self._rule_keys is not None and changed is not None
                and edit.rules_only(self.layout, changed)):
            made = edit.edit(self.layout, self._compiled.policy, self._rule_keys, self._frame, version.items,
                             changed, self.policy_path, self.docker.subnets if self.docker else None)
            with pipeline.collector_paused():
                delta = self._compiled.compiler.update(made.policy, edit=made.edit)
            self._rule_keys = made.rule_keys
            return pipeline.Compiled(self._compiled.compiler, (), delta=delta)
        text, line_keys = version.document()
        try:
            compiled = pipeline.read(self.policy_path, text.encode(),
                                     networks=self.docker.subnets if self.docker else None,
                                     numbering=None if self._compiled else enforcer.numbering(self.scope),
                                     previous=self._compiled, audit=self.audit)
        except PolicyError as err:
            raise PolicyError(located(err.diagnostics, line_keys)) from err
        self._rule_keys = sorted(k for k in version.items if k.startswith(self.layout.item("allow", "")))
        self._frame = edit.frame(self.layout, version.items)
        return compiled

    def _status(self, state: str, errors: tuple[str, ...] = ()) -> store.NodeReport:
        head = self._in_force
        return store.NodeReport(
            self.node, state, version=head.version if head else 0,
            digest=self._ir.digest if self._ir else "", revision=head.revision if head else 0,
            backend=self._chosen, mode=",".join(self.stats.attach_modes), errors=errors,
            connected=bool(self.stats.etcd_connected))

    # -- the node's status and heartbeat -------------------------------------------

    def _say(self, report: store.NodeReport) -> None:
        with self._report_lock:
            self._report = report
            self._write_report(report)

    def _write_report(self, report: store.NodeReport) -> None:
        """Under _report_lock. A write that fails (a member that hangs can fail one while
        the others answer) is tried again by the next heartbeat (see _check_report)."""
        try:
            store.report(self.client, self.layout, report)
            self._report_unwritten = False
        except EtcdError as err:
            self._report_unwritten = True
            self.log("status_not_written", error=str(err))

    def _connected(self, connected: bool, why: str = "") -> None:
        if connected == self.stats.etcd_connected:
            return
        self.stats.etcd_connected = connected
        if connected:
            self.log("etcd_connected", endpoint=self.client.endpoint)
            with self._report_lock:  # changed and written at once: never an older one over a newer
                if self._report is not None:
                    self._report = replace(self._report, connected=True, updated=round(time.time(), 3))
                    self._write_report(self._report)
        else:
            self.log("etcd_unreachable", why=why, note="enforcing the last good version",
                     version=self._in_force.version if self._in_force else None)

    def _check_report(self) -> None:
        """Write the node's report again where etcd holds another: one whose write failed,
        or an older one that landed late (a write that timed out against a hung member
        is carried out when the member resumes, over the newer one written meanwhile)."""
        with self._report_lock:
            if self._report is not None and (
                    self._report_unwritten
                    or store.reported(self.client, self.layout, self.node) != self._report.text()):
                self._write_report(self._report)

    def _heartbeats(self, stop: threading.Event) -> None:
        lease = 0
        while not stop.is_set():
            try:
                if not lease or self.client.keepalive(lease) <= 0:
                    lease = self.client.grant(self.lease_ttl)
                    store.heartbeat(self.client, self.layout, self.node, lease)
                self._connected(True)
                self._check_report()
            except EtcdError as err:
                self._connected(False, str(err))
            stop.wait(self.heartbeat_interval)
        if lease:
            with contextlib.suppress(EtcdError):  # etcd out of reach: the lease runs out by itself
                self.client.revoke(lease)  # stopped: `cluster status` says so at once

