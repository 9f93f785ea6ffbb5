"""Which backend enforces a scope: the one asked for, or the best that works here.

Backends are imported only when used, so reading commands (validate, explain,
render) never need bcc or pyroute2. Each backend module offers the same three
calls: `load(ir, scope, globs, mode, policy_path, force) -> LoadReport`,
`status(scope) -> dict | None` and `unload(scope) -> list[str]`.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from . import capacity
from .errors import IsoebpfError, ProgramRejected
from .ir import IR
from .state import Scope

BACKENDS = ("ebpf", "iptables")


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


def record(name: str, scope: Scope, ir: IR, policy_path: str, generation: int,
           attachments: Sequence[Attachment], **extra: Any) -> dict[str, Any]:
    """The state record every backend writes: what is loaded, since when, where."""
    return {
        "backend": name,
        "netns": scope.netns,
        "digest": ir.digest,
        "policy": os.path.abspath(policy_path),
        "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "generation": generation,
        "rules": [[r.id, r.name, r.text] for r in ir.rules],
        "overlays": {o.name: [str(c.network) for c in ir.classes if c.overlay_id == o.id]
                     for o in ir.overlays},
        "attachments": [a.as_record() for a in attachments],
        **extra,
    }


def module(name: str) -> ModuleType:
    return importlib.import_module(f".backends.{name}", __package__)


def choose(requested: str) -> tuple[str, str]:
    """(backend, why) for `--backend requested`."""
    if requested != "auto":
        return requested, "asked for"
    try:
        problem = module("ebpf").preflight()
    except ImportError as err:
        problem = f"cannot import bcc or pyroute2 ({err})"
    if problem is None:
        return "ebpf", "eBPF preflight passed (bpf syscall, bpffs, bcc compiles)"
    return "iptables", f"eBPF unavailable: {problem}"


def load(requested: str, chosen: str, ir: IR, scope: Scope, globs: Sequence[str], mode: str,
         policy_path: str, force: bool = False, **extra: Any) -> tuple[str, LoadReport, str]:
    """Load with `chosen`; under `--backend auto` a kernel that refuses the eBPF
    program gets the iptables backend instead. Returns (backend, report, note)."""
    try:
        report = module(chosen).load(ir, scope, globs, mode, policy_path, force=force, **extra)
        return chosen, report, ""
    except ProgramRejected as err:
        if requested != "auto":
            raise
        note = f"backend iptables: this kernel refused the eBPF program ({err})"
        report = module("iptables").load(ir, scope, globs, mode, policy_path, force=force)
        return "iptables", report, note


def loaded(scope: Scope) -> str | None:
    record = scope.read()
    return str(record["backend"]) if record else None


def switch_from(scope: Scope, chosen: str, ir: IR) -> str | None:
    """Unload another backend's enforcement before `chosen` takes over the scope,
    once `ir` is sure to fit `chosen` (the eBPF program's maps)."""
    current = loaded(scope)
    if current is None or current == chosen:
        return None
    if current not in BACKENDS:
        raise IsoebpfError(f"state in {scope.record_path} names an unknown backend '{current}'")
    if chosen == "ebpf":
        capacity.check(ir, capacity.sized(capacity.planned_sizes()), {})
    module(current).unload(scope)
    return current
