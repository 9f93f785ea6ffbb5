"""Service stage: the flow log, verdicts aggregated into connections over time.

The agent's `Recorder` keeps the backend's tracer open (the eBPF datapath sends
at most `--flow-rate` events a second per CPU, a token bucket in the kernel;
the rest it only counts), folds each verdict into the bucket of the moment by
(source, destination, protocol/port, action, rule, audit), and appends each
closed bucket as one JSON line to a bounded, rotated log in the scope's run
directory. `isoebpf flows` reads that log (or traces live itself), and this
module turns flows into what people ask: connections, top talkers, the
denials one more rule would allow, and that rule as a policy line.

Flow counts are the verdicts the rate limit let through, a sample: `status`'s
per-rule counters are the exact totals.

Only one reader at a time receives a scope's verdicts, so tracers take turns:
`isoebpf trace` and `flows --listen` hold `Turn.TRACE` while they run, and the
recorder lets go of the events (and takes them back after) when it sees one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import netaddr

from ..backends import registry
from ..backends.interface import Tracer, Verdict
from ..backends.state import PRIVATE_FILE, Scope
from ..errors import IsoebpfError
from .trace import clock_offset

BUCKET_SECONDS = 10.0
# The log is rotated once past this, to one older file beside it: at most twice this on disk.
LOG_BYTES = 4 * 1024 * 1024
# Distinct flows one bucket keeps; more (a scan) are counted as `overflow`, not kept.
BUCKET_FLOWS = 5000
# Buckets the recorder keeps in memory for the live page: the last five minutes.
RECENT_BUCKETS = 30
# A tracer that has seen nothing for this long is opened again: the program may have
# been made anew (unload and load), or the backend switched, since it was opened.
REARM_AFTER = 30.0
DEFAULT_FLOW_RATE = 200  # events a second per CPU: a sample, never a load
# Rules whose denials an allow rule could turn around (fragment and malformed could not).
FIXABLE_RULES = ("default",)
PORTED = ("tcp", "udp")


class FlowKey(NamedTuple):
    src: str
    dst: str
    protocol: str
    port: int  # the destination port (tcp, udp); 0 where none says what the flow is
    action: str
    rule: str
    audit: bool


@dataclass
class Flow:
    key: FlowKey
    packets: int
    first: float  # wall-clock seconds
    last: float

    def as_json(self) -> dict[str, Any]:
        return {**self.key._asdict(), "packets": self.packets, "first": round(self.first, 3),
                "last": round(self.last, 3)}

    @staticmethod
    def from_json(entry: Mapping[str, Any]) -> Flow:
        key = FlowKey(str(entry["src"]), str(entry["dst"]), str(entry["protocol"]),
                      int(entry["port"]), str(entry["action"]), str(entry["rule"]),
                      bool(entry.get("audit", False)))
        return Flow(key, int(entry["packets"]), float(entry["first"]), float(entry["last"]))

    @property
    def service(self) -> str:
        """proto/port as a policy names it: tcp/22, udp/53, icmp."""
        return f"{self.key.protocol}/{self.key.port}" if self.key.port else self.key.protocol


def key_of(v: Verdict) -> FlowKey:
    """The flow a verdict belongs to. Packets of tracked connections (`established`)
    go both ways, the replies to the client's ephemeral port: they are one flow per
    address pair, not one per connection."""
    port = v.dport if v.protocol in PORTED and v.rule != "established" else 0
    return FlowKey(str(v.src), str(v.dst), v.protocol, port, v.action, v.rule, v.audit)


@dataclass
class Bucket:
    """The flows of one stretch of time."""

    start: float
    end: float = 0.0
    flows: dict[FlowKey, Flow] = field(default_factory=dict)
    overflow: int = 0  # verdicts of flows beyond BUCKET_FLOWS
    suppressed: int = 0  # verdicts the kernel's rate limit kept back (known when a tracer closes)
    lost: int = 0  # verdicts the ring had no room for

    def add(self, v: Verdict, when: float) -> None:
        key = key_of(v)
        flow = self.flows.get(key)
        if flow is not None:
            flow.packets += 1
            flow.first, flow.last = min(flow.first, when), max(flow.last, when)
        elif len(self.flows) < BUCKET_FLOWS:
            self.flows[key] = Flow(key, 1, when, when)
        else:
            self.overflow += 1

    def as_json(self) -> dict[str, Any]:
        return {"start": round(self.start, 3), "end": round(self.end, 3),
                "flows": [f.as_json() for f in self.flows.values()], "overflow": self.overflow,
                "suppressed": self.suppressed, "lost": self.lost}

    @staticmethod
    def from_json(entry: Mapping[str, Any]) -> Bucket:
        flows = (Flow.from_json(f) for f in entry.get("flows", []))
        return Bucket(float(entry["start"]), float(entry["end"]), {f.key: f for f in flows},
                      int(entry.get("overflow", 0)), int(entry.get("suppressed", 0)),
                      int(entry.get("lost", 0)))


def flow_log(scope: Scope) -> Path:
    return scope.run_dir / "flows.jsonl"


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def forget(scope: Scope) -> bool:
    """Remove the scope's flow log (`unload`: everything isoebpf made there goes); whether
    there was one."""
    path = flow_log(scope)
    found = False
    for part in (path, rotated(path)):
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
            found = True
    return found


def append(path: Path, bucket: Bucket, max_bytes: int = LOG_BYTES) -> None:
    """One bucket as one line; past `max_bytes` the log moves to `.1` (replacing the one there)."""
    line = json.dumps(bucket.as_json(), sort_keys=True, separators=(",", ":")) + "\n"
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size + len(line) > max_bytes:
            os.replace(path, rotated(path))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    with os.fdopen(fd, "a", encoding="utf-8") as log:
        log.write(line)


def read(path: Path, since: float = 0.0) -> list[Bucket]:
    """The buckets that end after `since`, oldest first, from the rotated file and then the
    current one. A line cut short (a writer killed midway) is passed over."""
    found = []
    for part in (rotated(path), path):
        try:
            lines = part.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            continue
        for text in lines:
            try:
                bucket = Bucket.from_json(json.loads(text))
            except (ValueError, KeyError, TypeError):
                continue
            if bucket.end > since:
                found.append(bucket)
    return found


def merged(buckets: Iterable[Bucket]) -> list[Flow]:
    """The flows of all `buckets`, one per key, most packets first."""
    total: dict[FlowKey, Flow] = {}
    for bucket in buckets:
        for flow in bucket.flows.values():
            seen = total.get(flow.key)
            if seen is None:
                total[flow.key] = Flow(flow.key, flow.packets, flow.first, flow.last)
            else:
                seen.packets += flow.packets
                seen.first, seen.last = min(seen.first, flow.first), max(seen.last, flow.last)
    return sorted(total.values(), key=lambda f: (-f.packets, f.key))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])\Z")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """`--since`: a duration back from `now` (30s, 5m, 2h, 1d) or an ISO 8601 time (local
    time where it names no zone); wall-clock seconds."""
    match = _DURATION.match(text.strip())
    if match:
        return now - float(match[1]) * _UNIT_SECONDS[match[2]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise IsoebpfError(f"--since takes a duration (30s, 5m, 2h, 1d) or an ISO time "
                           f"(2024-05-01T12:00), not '{text}'") from None


class Overlays:
    """Which overlay an address lies in, from a state record's "overlays" (name -> networks)."""

    def __init__(self, networks: Mapping[str, Sequence[str]]) -> None:
        self._sets = {name: netaddr.IPSet(nets) for name, nets in networks.items()}

    @property
    def names(self) -> list[str]:
        return sorted(self._sets)

    def of(self, address: str) -> str | None:
        try:
            ip = netaddr.IPAddress(address)
        except (netaddr.AddrFormatError, ValueError):
            return None  # "-": not IP
        return next((name for name, nets in self._sets.items() if ip in nets), None)


@dataclass(frozen=True)
class Filters:
    overlay: str | None = None  # source or destination in it
    verdict: str | None = None  # the action

    def matches(self, flow: Flow, overlays: Overlays) -> bool:
        if self.verdict and flow.key.action != self.verdict:
            return False
        return not self.overlay or self.overlay in (overlays.of(flow.key.src), overlays.of(flow.key.dst))


def filtered(buckets: Sequence[Bucket], filters: Filters, overlays: Overlays) -> list[Bucket]:
    """The buckets with only the flows `filters` lets through."""
    return [Bucket(b.start, b.end, {k: f for k, f in b.flows.items() if filters.matches(f, overlays)},
                   b.overflow, b.suppressed, b.lost) for b in buckets]


@dataclass(frozen=True)
class Denial:
    """Denied flows that one allow rule would admit: those from one overlay to another
    on one service."""

    src_overlay: str
    dst_overlay: str
    service: str
    packets: int
    flows: int
    audit: bool  # every one of them was let through by audit mode
    last: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def denials(flows: Iterable[Flow], overlays: Overlays) -> list[Denial]:
    """Denials by the default between two overlays, grouped by (source overlay, destination
    overlay, service), most packets first. Audit mode's would-be denials count: they are
    what enforcing would deny."""
    groups: dict[tuple[str, str, str], list[Flow]] = {}
    for flow in flows:
        if flow.key.action == "allow" or flow.key.rule not in FIXABLE_RULES:
            continue
        src, dst = overlays.of(flow.key.src), overlays.of(flow.key.dst)
        if src is None or dst is None:
            continue
        groups.setdefault((src, dst, flow.service), []).append(flow)
    found = [Denial(src, dst, service, sum(f.packets for f in group), len(group),
                    all(f.key.audit for f in group), max(f.last for f in group))
             for (src, dst, service), group in groups.items()]
    return sorted(found, key=lambda d: (-d.packets, d.src_overlay, d.dst_overlay, d.service))


def top_talkers(flows: Iterable[Flow], count: int = 5) -> list[tuple[str, int]]:
    """The sources with the most packets."""
    by_source: dict[str, int] = {}
    for flow in flows:
        by_source[flow.key.src] = by_source.get(flow.key.src, 0) + flow.packets
    return sorted(by_source.items(), key=lambda item: (-item[1], item[0]))[:count]


def suggest(found: Iterable[Denial]) -> list[str]:
    """`allow:` lines of the policy file that would admit these denials: one per overlay
    pair, its ports those denied. A protocol no port names (neither tcp, udp nor icmp)
    needs a rule without ports, which allows everything between the two: that rule
    says so in a comment."""
    wanted: dict[tuple[str, str], list[str]] = {}
    for denial in found:
        ports = wanted.setdefault((denial.src_overlay, denial.dst_overlay), [])
        if denial.service not in ports:
            ports.append(denial.service)
    lines = []
    for (src, dst), ports in sorted(wanted.items()):
        named = sorted((p for p in ports if p.split("/")[0] in (*PORTED, "icmp")), key=_service_order)
        others = sorted(set(ports) - set(named))
        if named:
            lines.append(f"- {{from: {src}, to: {dst}, ports: [{', '.join(named)}]}}")
        if others:
            lines.append(f"- {{from: {src}, to: {dst}}}  # every protocol and port: {', '.join(others)} "
                         "has no port of its own")
    return lines


def _service_order(service: str) -> tuple[str, int]:
    proto, _, port = service.partition("/")
    return proto, int(port or 0)


class Turn:
    """Which reader has a scope's verdicts. Only one tracer receives them (the eBPF
    program's ring has one slot per CPU, and closing a tracer ends the event rate; the
    iptables one removes its trace table), so a command that traces holds TRACE while
    it runs and the agent's recorder holds RECORD while its tracer is open; each is
    an abstract socket (gone with its process, however it ends) of this network
    namespace, which is where the agent and the commands run."""

    TRACE = "trace"
    RECORD = "record"

    def __init__(self, scope: Scope, who: str) -> None:
        self._name = f"\0isoebpf/{who}/{scope.name}"
        self._socket: socket.socket | None = None

    def take(self) -> bool:
        """Hold it; False while another process does."""
        if self._socket is not None:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self._name)
        except OSError as err:
            sock.close()
            if err.errno == errno.EADDRINUSE:
                return False
            raise
        self._socket = sock
        return True

    def held_elsewhere(self) -> bool:
        if self._socket is not None:
            return False
        if self.take():
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


# How long a command that traces waits for the agent's recorder to let go of the events.
HANDOVER_WAIT = 5.0


@contextlib.contextmanager
def tracing_turn(scope: Scope) -> Iterator[None]:
    """For a command that traces (`trace`, `flows --listen`): claim the verdicts from an
    agent that records them, wait (at most HANDOVER_WAIT) until it has let go, and give
    them back at the end."""
    turn = Turn(scope, Turn.TRACE)
    turn.take()  # a second command tracing the same scope shares the claim
    try:
        recording = Turn(scope, Turn.RECORD)
        deadline = time.monotonic() + HANDOVER_WAIT
        while recording.held_elsewhere() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield
    finally:
        turn.release()


Log = Callable[..., None]


class Recorder:
    """The agent's flow log: a thread that keeps the scope's tracer open and writes a
    bucket every `bucket_seconds`; `recent()` is what the live page shows."""

    def __init__(self, scope: Scope, per_second: int, log: Log,
                 bucket_seconds: float = BUCKET_SECONDS, max_bytes: int = LOG_BYTES) -> None:
        self.scope = scope
        self.per_second = per_second
        self.path = flow_log(scope)
        self._log = log
        self._bucket_seconds = bucket_seconds
        self._max_bytes = max_bytes
        self._lock = threading.Lock()  # the live page reads what this thread writes
        self._bucket = Bucket(time.time())
        self._recent: deque[Bucket] = deque(maxlen=RECENT_BUCKETS)
        self._turn = Turn(scope, Turn.RECORD)
        self._trace_wanted = Turn(scope, Turn.TRACE)

    def recent(self) -> list[Bucket]:
        """The buckets in memory, the one still open last (a copy)."""
        with self._lock:
            now = Bucket(self._bucket.start, time.time(), dict(self._bucket.flows), self._bucket.overflow,
                         self._bucket.suppressed, self._bucket.lost)
            return [*self._recent, now]

    def run(self, stop: threading.Event) -> None:
        said = ""  # what was logged last, so that a state that lasts is logged once
        while not stop.is_set():
            backend, waiting = self._backend()
            if waiting:
                if waiting != said:
                    self._log("flows_paused", why=waiting)
                    said = waiting
                self._close_bucket_if_due()
                stop.wait(0.5)
                continue
            try:
                self._record(stop, backend)
                said = ""
            except IsoebpfError as err:
                if str(err) != said:
                    self._log("flows_failed", error=str(err), note="trying again")
                    said = str(err)
                stop.wait(1.0)
        self._close_bucket(time.time())

    def _backend(self) -> tuple[str, str]:
        """The backend to trace, or why not now."""
        if self._trace_wanted.held_elsewhere():
            return "", "a trace command has the verdicts"
        try:
            backend = self.scope.backend()  # read again only when the record changed
        except IsoebpfError as err:
            return "", str(err)
        return (backend, "") if backend else ("", "nothing is loaded")

    def _record(self, stop: threading.Event, backend: str) -> None:
        """Follow the verdicts until stopped, a trace command wants them, or the tracer
        has seen nothing for REARM_AFTER."""
        if not self._turn.take():
            raise IsoebpfError("another agent records this scope's flows")
        tracer: Tracer | None = None
        try:
            tracer = registry.get(backend).tracer(self.scope, self.per_second)
            with tracer:
                self._log("flows_recording", backend=backend, per_second=self.per_second, log=str(self.path))
                offset = clock_offset()
                heard = time.monotonic()
                while not stop.is_set():
                    for verdict in tracer.verdicts(0.5):
                        if verdict.family:
                            heard = time.monotonic()
                            with self._lock:
                                self._bucket.add(verdict, verdict.timestamp_ns / 1e9 + offset)
                    self._close_bucket_if_due()
                    if time.monotonic() - heard > REARM_AFTER or self._backend()[0] != backend:
                        break
        finally:
            self._turn.release()
            if tracer is not None:
                with self._lock:
                    self._bucket.suppressed += tracer.suppressed
                    self._bucket.lost += tracer.lost

    def _close_bucket_if_due(self) -> None:
        now = time.time()
        if now - self._bucket.start >= self._bucket_seconds:
            self._close_bucket(now)

    def _close_bucket(self, now: float) -> None:
        with self._lock:
            done, self._bucket = self._bucket, Bucket(now)
            done.end = now
            self._recent.append(done)
        if not (done.flows or done.overflow or done.suppressed or done.lost):
            return
        # Nothing is written where nothing is loaded: unload removed the log, and with
        # it the scope's run directory.
        if self.scope.record_path.exists():
            try:
                append(self.path, done, self._max_bytes)
            except OSError as err:
                self._log("flows_failed", error=f"cannot write {self.path}: {err.strerror}")


def listen(scope: Scope, seconds: float, per_second: int, bucket_seconds: float = 1.0) -> list[Bucket]:
    """Trace the scope's verdicts for `seconds` (the agent's recorder lets go meanwhile),
    in buckets of `bucket_seconds`."""
    record = scope.read()
    if record is None:
        raise IsoebpfError("nothing loaded" + (f" in namespace {scope.netns}" if scope.netns else ""))
    buckets = [Bucket(time.time())]
    with tracing_turn(scope):
        tracer = registry.get(str(record["backend"])).tracer(scope, per_second)
        with tracer:
            offset = clock_offset()
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0:
                for verdict in tracer.verdicts(min(left, 0.5)):
                    if not verdict.family:
                        continue
                    when = verdict.timestamp_ns / 1e9 + offset
                    if when - buckets[-1].start >= bucket_seconds:
                        buckets[-1].end = when
                        buckets.append(Bucket(when))
                    buckets[-1].add(verdict, when)
        buckets[-1].end = time.time()
        buckets[-1].suppressed, buckets[-1].lost = tracer.suppressed, tracer.lost
    return buckets


def plot(buckets: Sequence[Bucket], path: str, title: str) -> None:
    """Packets by verdict over time, one line each (audit mode's would-be denials apart),
    as a PNG (or whatever the file's extension names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[int]] = {}
    for n, bucket in enumerate(buckets):
        for flow in bucket.flows.values():
            label = flow.key.action + (" (audit)" if flow.key.audit else "")
            series.setdefault(label, [0] * len(buckets))[n] += flow.packets
    times = [datetime.fromtimestamp((b.start + b.end) / 2) for b in buckets]
    figure, axes = plt.subplots(figsize=(9, 4))
    for label, counts in sorted(series.items()):
        axes.plot(times, counts, marker=".", label=label)
    axes.set_title(title)
    axes.set_ylabel("packets seen per bucket")
    axes.set_xlabel("time")
    if series:
        axes.legend()
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
