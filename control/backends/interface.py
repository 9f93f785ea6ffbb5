"""Backends stage, shared floor: what every backend is (the Backend protocol) and what it returns.

Below the two backends (`ebpf/`, `iptables/`), which each implement `Backend`
as a module of functions; above them, `registry` finds one by name and
`enforcer` chooses, loads and switches. Imports only the IR stage and the
backends' own state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

import netaddr

from ..ir.compiler import Delta, Numbering
from ..ir.evaluate import IPPROTO_ICMPV6
from ..ir.tables import IR, PROTO_CODES
from .state import Scope


@dataclass(frozen=True)
class Attachment:
    ifname: str
    ifindex: int
    mode: str  # "tc", "xdp" (native) or "xdpgeneric"
    reason: str
    added_clsact: bool = False  # TC: we created the clsact qdisc, so we may remove it
    prog_id: int = 0  # XDP: the program we attached; we never detach anyone else's

    def as_record(self) -> dict[str, Any]:
        return {"ifname": self.ifname, "ifindex": self.ifindex, "mode": self.mode,
                "reason": self.reason, "added_clsact": self.added_clsact,
                "prog_id": self.prog_id}


@dataclass(frozen=True)
class LoadReport:
    generation: int
    compiled: bool
    compile_seconds: float
    apply_seconds: float
    attachments: tuple[Attachment, ...]
    replaced_layout: str | None  # what older state was torn down, if any
    detached: tuple[str, ...] = ()  # interfaces no longer enforced on, and why
    warnings: tuple[str, ...] = ()  # what the user should act on before the next change
    grown: str = ""  # the sizes of the new maps an update moved to (its policy did not fit beside the old)
    enforced_at: float = 0.0  # time.time() when the new policy went live, where the backend says (0: at return)


def state_record(name: str, scope: Scope, ir: IR, policy_path: str, generation: int,
           attachments: Sequence[Attachment], **extra: Any) -> dict[str, Any]:
    """The state record every backend writes: what is loaded, since when, where."""
    return {
        "backend": name,
        "netns": scope.netns,
        "digest": ir.digest,
        # A file, or where else the policy came from (a cluster's etcd://HOST:PORT/PREFIX).
        "policy": policy_path if "://" in policy_path else os.path.abspath(policy_path),
        "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "generation": generation,
        "rules": [[r.id, r.name, r.text] for r in ir.rules],
        "overlays": _networks_by_overlay(ir),
        "attachments": [a.as_record() for a in attachments],
        "audit": ir.audit,
        **extra,
    }


def _networks_by_overlay(ir: IR) -> dict[str, list[str]]:
    """Overlay name -> its outermost classes' networks, which hold all its addresses (what
    trace's --overlay matches). Classes come in address order, each after any that holds
    it, and every class lies in its overlay's subnets: those are the outermost ones."""
    found: dict[int, list[str]] = {o.id: [] for o in ir.overlays}
    version, last = 0, -1
    for c in ir.classes:
        net = c.network
        if net.version == version and net.value <= last:
            continue  # inside the one before
        version, last = net.version, net.last
        found[c.overlay_id].append(str(net))
    return {o.name: found[o.id] for o in ir.overlays}


class Tracer(Protocol):
    """Live verdicts while open (`with`); `suppressed` and `lost` are final once closed."""

    suppressed: int  # verdicts the rate limit kept back
    lost: int  # verdicts that did not fit the ring

    def __enter__(self) -> Self: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None: ...

    def verdicts(self, timeout: float) -> Iterator[Verdict]:
        """The verdicts that arrive within `timeout` seconds."""
        ...


class Backend(Protocol):
    """One way of enforcing an IR in a scope. Each call takes the scope's lock itself.

    Beyond these, a backend may offer what only it can: the eBPF one `preflight`
    and `compile_early` (what `--backend auto` asks, and a first load's compile
    started early) and `forget_gone` (attachments whose interface went), the
    iptables one `canary` (a cheap check the agent runs between read-backs) and
    `set_types` (what `render` asks)."""

    def load(self, ir: IR, scope: Scope, globs: Sequence[str], mode: str, policy_path: str, *,
             force: bool = False, on_failure: str = "closed", compiling: Any | None = None,
             change: Delta | None = None) -> LoadReport:
        """Enforce `ir` on the interfaces matching `globs`: a first load, or an atomic update.
        `change`: how `ir` differs from the policy in force, where its compile says (the
        agent's); a backend may write just that. A backend may take options of its
        own beside these (iptables: `chain`)."""
        ...

    def plan(self, scope: Scope, ir: IR) -> list[str]:
        """What loading `ir` would change in `scope`, one '<what>: <change>' line each;
        reads the kernel and the scope's state, changes nothing (`load --dry-run`)."""
        ...

    def numbering(self, scope: Scope) -> Numbering | None:
        """The ids of the policy in force, for compiling the next one under them (an
        update then writes only what changed); None where ids do not matter."""
        ...

    def status(self, scope: Scope) -> dict[str, Any] | None:
        """The record of what is loaded, read back live (None: nothing of this backend)."""
        ...

    def unload(self, scope: Scope) -> list[str]:
        """Remove everything this backend made in `scope`; what was removed. Safe to repeat."""
        ...

    def drift(self, scope: Scope, ir: IR) -> list[str]:
        """What others undid of `ir`'s enforcement (the agent repairs it); [] when none."""
        ...

    def tracer(self, scope: Scope, per_second: int) -> Tracer:
        """Live verdicts at most `per_second` a second, or a clear refusal."""
        ...


PROTOCOLS = {code: name for name, code in PROTO_CODES.items()} | {IPPROTO_ICMPV6: "icmpv6"}


@dataclass(frozen=True)
class Verdict:
    """One packet's verdict as the datapath reported it."""

    timestamp_ns: int  # CLOCK_MONOTONIC, as bpf_ktime_get_ns
    ifname: str
    family: int  # 4, 6, or 0 for a frame that is not IP (ARP: unfiltered)
    proto: int
    src: netaddr.IPAddress
    sport: int
    dst: netaddr.IPAddress
    dport: int
    action: str  # "allow", "drop", "reject"
    rule: str  # the rule's name: "allow:0", "default", ...
    text: str  # what the rule says
    audit: bool = False  # audit mode let it through: `action` is what enforcing would have done

    def endpoint(self, address: netaddr.IPAddress, port: int) -> str:
        if not self.family:
            return "-"
        shown = f"[{address}]" if address.version == 6 and port else str(address)
        return f"{shown}:{port}" if port and self.proto in (6, 17) else shown

    @property
    def protocol(self) -> str:
        if not self.family:
            return "non-ip"
        return PROTOCOLS.get(self.proto, str(self.proto))
