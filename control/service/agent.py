"""Service stage: `isoebpf agent`, keeping a node's enforcement right while everything around it changes.

- The policy file is watched (content, so a ConfigMap's symlink swap counts):
  a valid new version is applied atomically; an invalid one is logged with its
  located errors and the running policy stays.
- Link events: an interface matching the globs is enforced as soon as it
  appears (the backend's load attaches only what is missing).
- Repair: every `repair_interval` the backend reads back what is in force and
  says what drifted (a program detached, our chain flushed, our sets gone);
  anything that did is reapplied. A backend whose read-back is costly offers a
  cheap canary too (iptables: is our rule still FORWARD's first?), checked
  every `canary_interval`, so a flush or a foreign ruleset is repaired without
  waiting for the next read-back.
- Metrics: a Prometheus endpoint reads the backend's status on every scrape.
- Flows: with a `flows.Recorder`, verdicts are sampled into the scope's flow log.
- SIGTERM/SIGINT end the agent; enforcement stays in place (`isoebpf unload`
  removes it).

Reads policy files through `isoebpf.pipeline`, changes enforcement through
`backends.enforcer`; `metrics` reads its `Stats`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import pipeline
from ..backends import enforcer, registry
from ..backends.state import Scope
from ..errors import IsoebpfError, PolicyError, UntrustedPolicyError
from ..ir.compiler import Delta
from ..ir.tables import IR
from .docker import DockerError, Engine
from .flows import Recorder

# (stop, listening) -> (interface, appeared) as interfaces come and go, as links.link_changes yields them.
LinkEvents = Callable[[threading.Event, threading.Event], Iterator[tuple[str, bool]]]


@dataclass
class Stats:
    """What the agent did, for the metrics endpoint."""

    reconciles: int = 0
    repairs: dict[str, int] = field(default_factory=dict)
    applies: dict[str, int] = field(default_factory=lambda: {"ok": 0, "refused": 0, "failed": 0})
    last_apply_time: float = 0.0
    last_apply_ok: bool = False
    last_error: str = ""  # why the last apply failed
    attach_modes: tuple[str, ...] = ()  # of the last apply that worked
    # Cluster mode: the version enforced, the newest published that the node has seen,
    # and whether etcd answers (None: not in cluster mode).
    cluster_version: int = 0
    cluster_published: int = 0
    etcd_connected: bool | None = None


@dataclass
class Agent:
    policy_path: str
    backend_name: str = "auto"
    globs: tuple[str, ...] = ()
    mode: str = "auto"
    netns: str | None = None
    repair_interval: float = 1.0
    canary_interval: float = 0.4  # iptables: two short commands, about 8 ms of CPU
    force: bool = False  # override safety refusals (a policy file others can write, ...)
    poll_interval: float = 0.2
    on_failure: str = "closed"
    audit: bool = False  # audit mode whatever the policy says (agent --audit)
    log_stream: TextIO = sys.stderr
    stats: Stats = field(default_factory=Stats)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _digest: str | None = None  # of the file text last seen
    _ir: IR | None = None  # the policy in force
    _compiled: pipeline.Compiled | None = None  # ... kept compiled: the next change is a difference
    _chosen: str = ""
    # The engine overlays' Docker networks are asked of; the agent reads the policy again
    # when its networks change (None: a policy that names one is refused).
    docker: Engine | None = None
    _names_networks: bool = False  # the policy file read last names a Docker network
    _networks_moved: threading.Event = field(default_factory=threading.Event)  # read it again
    recorder: Recorder | None = None  # the flow log's, run beside the agent (None: no flow log)

    def __post_init__(self) -> None:
        # bcc moves the whole process into the kernel headers' directory while it compiles.
        self.policy_path = os.path.abspath(self.policy_path)

    @property
    def scope(self) -> Scope:
        return Scope(self.netns)

    @property
    def default_action(self) -> str:
        return self._ir.default_action if self._ir else "allow"

    def log(self, event: str, **fields: Any) -> None:
        line = {"ts": round(time.time(), 3), "event": event, **fields}
        self.log_stream.write(json.dumps(line, sort_keys=True, default=str) + "\n")
        self.log_stream.flush()

    # -- policy ----------------------------------------------------------------

    def check_policy(self) -> None:
        """Apply the policy file if its content changed since last seen."""
        try:
            text = Path(self.policy_path).read_bytes()
        except OSError as err:
            if self._digest != "unreadable":
                self.log("policy_unreadable", path=self.policy_path, error=str(err))
                self._digest = "unreadable"
            return
        digest = hashlib.sha256(text).hexdigest()
        if digest == self._digest and not self._networks_moved.is_set():
            return
        self._networks_moved.clear()
        self._digest = digest
        self._names_networks = b"docker_network" in text
        started = time.monotonic()
        try:
            # The bytes just hashed: a file swapped since must not be applied as them.
            # The policy in force, kept compiled, makes the change a difference.
            compiled = pipeline.read(self.policy_path, text, check_trust=True, force=self.force,
                                     networks=self.docker.subnets if self.docker else None,
                                     numbering=None if self._compiled else enforcer.numbering(self.scope),
                                     previous=self._compiled, audit=self.audit)
        except (PolicyError, UntrustedPolicyError) as err:
            errors = ([str(d) for d in err.diagnostics if d.severity == "error"]
                      if isinstance(err, PolicyError) else [str(err)])
            self.stats.applies["refused"] += 1
            self.log("policy_refused", path=self.policy_path, errors=errors,
                     keeping=self._ir.digest if self._ir else None)
            return
        self._compiled = compiled
        self.apply(compiled.ir, "policy_changed", compile_ms=(time.monotonic() - started) * 1000,
                   change=compiled.delta)

    def apply(self, ir: IR, why: str, compile_ms: float = 0.0, change: Delta | None = None) -> None:
        """Enforce `ir`; `change`: how it differs from the policy in force, where the
        compile says (the backend may write just that)."""
        with self._lock:
            compiling = None
            if not self._chosen:
                # One compile serves both the choice (auto's preflight) and a first load.
                compiling = enforcer.compile_early(self.backend_name, self.scope)
                self._chosen, reason = enforcer.choose(self.backend_name, self.scope, compiling)
                self.log("backend", backend=self._chosen, why=reason)
            started = time.monotonic()
            try:
                globs = list(self.globs) or list(ir.interfaces or ())
                self._chosen, report, notes = enforcer.load(
                    self.backend_name, self._chosen, ir, self.scope, globs, self.mode,
                    self.policy_path, force=self.force, on_failure=self.on_failure,
                    compiling=compiling, change=change)
                for note in notes:
                    self.log("backend", backend=self._chosen, why=note)
            except IsoebpfError as err:
                self.stats.applies["failed"] += 1
                self.stats.last_apply_ok = False
                self.stats.last_error = str(err)
                self.log("apply_failed", why=why, error=str(err))
                # What is in force is not what was compiled: the next change compiles afresh.
                self._compiled = None
                if self.on_failure == "open":
                    self._ir = None  # enforcement was removed: repairs must not bring it back
                return
            finally:
                if compiling is not None:
                    compiling.discard()
            self._ir = ir
            self.stats.applies["ok"] += 1
            self.stats.last_apply_ok = True
            self.stats.last_apply_time = time.time()
            self.stats.attach_modes = tuple(sorted({a.mode for a in report.attachments}))
            self.log("applied", why=why, digest=ir.digest[:12], generation=report.generation,
                     ms=round((time.monotonic() - started) * 1000, 1), compile_ms=round(compile_ms, 1),
                     attachments=[a.ifname for a in report.attachments],
                     enforced=round(report.enforced_at or time.time(), 3))

    # -- interfaces and repair -------------------------------------------------

    def matches(self, ifname: str) -> bool:
        globs = list(self.globs) or list((self._ir.interfaces if self._ir else None) or ())
        return any(fnmatch.fnmatchcase(ifname, g) for g in globs)

    def on_new_link(self, ifname: str, seen_at: float) -> None:
        if self._ir is None or not self.matches(ifname):
            return
        self.stats.reconciles += 1
        self.apply(self._ir, f"new interface {ifname}")
        latency = (time.monotonic() - seen_at) * 1000
        self.log("interface_enforced", ifname=ifname, ms=round(latency, 1))

    def on_link_gone(self, ifname: str) -> None:
        """An interface went (a container removed): where it was enforced, the backend
        forgets it, so that `status` does not report enforcement missing there."""
        forget = getattr(registry.get(self._chosen), "forget_gone", None) if self._chosen else None
        if forget is None or not self.matches(ifname):
            return
        with self._lock:
            gone = forget(self.scope)
        if gone:
            self.log("interface_gone", ifname=ifname, forgotten=gone)

    def canary(self) -> list[str]:
        """What the backend's canary says drifted; [] if fine or the backend has none."""
        if self._ir is None:
            return []
        check = getattr(registry.get(self._chosen), "canary", None)
        return list(check(self.scope)) if check else []

    def repair(self) -> None:
        if self._ir is None:
            return
        with self._lock:
            drift = registry.get(self._chosen).drift(self.scope, self._ir)
        if drift:
            for what in drift:
                key = what.split(":")[0]
                self.stats.repairs[key] = self.stats.repairs.get(key, 0) + 1
            self.log("drift", found=drift)
            self.apply(self._ir, "repair")

    # -- main loop ---------------------------------------------------------------

    def run(self, stop: threading.Event, link_events: LinkEvents | None = None) -> None:
        self.log("started", policy=self.policy_path, netns=self.netns)
        recording = None
        if self.recorder is not None:
            recording = threading.Thread(target=self.recorder.run, args=(stop,), daemon=True)
            recording.start()
        if link_events is not None:
            # Listen before the first apply lists the interfaces, so none slips between.
            listening = threading.Event()
            threading.Thread(target=self._follow_links, args=(stop, listening, link_events),
                             daemon=True).start()
            listening.wait(timeout=10)
        self.check_policy()
        if self.docker is not None:
            threading.Thread(target=self._follow_networks, args=(stop, self.docker), daemon=True).start()
        next_repair = next_canary = time.monotonic() + self.repair_interval
        # A sleep and a look, not stop.wait(): the signal handler that sets `stop` runs on
        # this thread, and would wait forever for the event's lock were it held here.
        while not _slept_until(stop, self.poll_interval):
            self.check_policy()
            sang = []
            if time.monotonic() >= next_canary:
                next_canary = time.monotonic() + self.canary_interval
                try:
                    sang = self.canary()
                except IsoebpfError as err:
                    sang = [str(err)]
            if sang or time.monotonic() >= next_repair:
                if sang:
                    self.log("canary", found=sang)
                try:
                    self.repair()
                except IsoebpfError as err:
                    self.log("repair_failed", error=str(err))
                next_repair = time.monotonic() + self.repair_interval
        if recording is not None:
            recording.join(timeout=5)  # its last bucket written
        self.log("stopped", note="enforcement stays in place; 'isoebpf unload' removes it")

    def _follow_links(self, stop: threading.Event, listening: threading.Event,
                      link_events: LinkEvents) -> None:
        for ifname, appeared in link_events(stop, listening):
            try:
                if appeared:
                    self.on_new_link(ifname, time.monotonic())
                else:
                    self.on_link_gone(ifname)
            except IsoebpfError as err:
                self.log("attach_failed", ifname=ifname, error=str(err))

    def _follow_networks(self, stop: threading.Event, engine: Engine) -> None:
        """Read the policy again when a Docker network it names is created, removed or
        changed, and each time the engine's event stream is (re)opened (what happened
        while it was away is not said). An engine out of reach is logged; the policy in
        force stays."""
        pause = 0.1
        while not stop.is_set():
            if not self._names_networks:
                stop.wait(0.5)
                continue
            try:
                for name in engine.network_events(stop):
                    pause = 0.1
                    named = {o.docker_network for o in self._compiled.policy.overlays} if self._compiled else None
                    if not name or named is None or name in named:
                        if name:
                            self.log("docker_network_changed", network=name)
                        self._networks_moved.set()
            except DockerError as err:
                self.log("docker_unreachable", error=str(err), note="the policy in force stays")
            stop.wait(pause)
            pause = min(pause * 2, 5.0)


def _slept_until(stop: threading.Event, seconds: float) -> bool:
    """Sleep `seconds`; whether `stop` is set (looked at, never waited on)."""
    time.sleep(seconds)
    return stop.is_set()
