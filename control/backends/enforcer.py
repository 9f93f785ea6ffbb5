"""Backends stage, top floor: which backend enforces a scope (the one in force, the
one asked for, or the best that works here), loading it, and switching between
backends without a gap; failures recorded for `status`.

The one door the CLI and the agent use to change enforcement. It reaches the
backends through `registry` (each a `interface.Backend`), and the eBPF
backend's own `preflight` and `compile_early` directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..errors import BackendError, IsoebpfError, ProgramRejected
from ..ir.compiler import Numbering
from ..ir.tables import IR
from . import registry
from .interface import LoadReport
from .registry import BACKENDS
from .state import Scope

FAILURE_MODES = ("closed", "open")  # what a change that cannot be applied leaves; see fail()


def choose(requested: str, scope: Scope, compiling: Any | None = None) -> tuple[str, str]:
    """(backend, why) for `--backend requested` in `scope`; `compiling`: see compile_early().

    `auto` keeps the backend in force: a routine update never switches backends,
    only a `--backend` that names another one does (switch_from says so)."""
    if requested != "auto":
        return requested, "asked for"
    current = loaded(scope)
    if current in BACKENDS:
        return current, "in force here (--backend NAME switches)"
    try:
        from .ebpf import backend as ebpf

        problem = ebpf.preflight(compiling)
    except ImportError as err:
        problem = f"cannot import bcc or pyroute2 ({err})"
    if problem is None:
        return "ebpf", "eBPF preflight passed (bpf syscall, bpffs, bcc compiles)"
    return "iptables", f"eBPF unavailable: {problem}"


def switch_from(scope: Scope, chosen: str) -> str | None:
    """The backend in force that loading with `chosen` would replace, or None."""
    current = loaded(scope)
    if current is None or current == chosen:
        return None
    if current not in BACKENDS:
        raise IsoebpfError(f"state in {scope.record_path} names an unknown backend '{current}'")
    return current


def plan(chosen: str, scope: Scope, ir: IR, **extra: Any) -> list[str]:
    """What loading `ir` with `chosen` would change in `scope` (a switch: all of `chosen`'s
    first load); `extra` as for load()."""
    return registry.get(chosen).plan(scope, ir, **extra)


def numbering(scope: Scope) -> Numbering | None:
    """The numbering of the policy in force (see Backend.numbering), or None."""
    current = loaded(scope)
    return registry.get(current).numbering(scope) if current else None


def compile_early(requested: str, scope: Scope, policy_bytes: int | None = None) -> Any | None:
    """Start compiling the eBPF program, on another thread, when `--backend requested`
    may well load it into a scope that has none yet (a first load): the compile then
    overlaps parsing and compiling the policy, its maps sized for a policy file of
    `policy_bytes` (None: the defaults). Pass the result to load() as `compiling`,
    and discard() it afterwards (a no-op once a load took it)."""
    if requested not in ("auto", "ebpf"):
        return None
    try:
        record = scope.read()
        from .ebpf import backend as ebpf
    except (ImportError, IsoebpfError):
        return None  # choose() or the load says why
    if requested == "auto" and record is not None and record.get("backend") == "iptables":
        return None  # auto keeps iptables
    return ebpf.compile_early(scope, record, policy_bytes)


def load(requested: str, chosen: str, ir: IR, scope: Scope, globs: Sequence[str], mode: str,
         policy_path: str, force: bool = False, on_failure: str = "closed",
         compiling: Any | None = None, **extra: Any) -> tuple[str, LoadReport, list[str]]:
    """Load with `chosen`; under `--backend auto` a kernel that refuses the eBPF
    program gets the iptables backend instead (a first load only: auto never
    switches). Returns (backend, report, notes: what else was done, for the user).
    `compiling` is compile_early()'s program, used by an eBPF first load.

    Make before break: a switch loads and verifies `chosen` while the backend in
    force still enforces (each packet meets both, so neither policy's denials are
    lost), and only then removes the old one. A change that cannot be applied
    leaves what `on_failure` says (see fail()) and is recorded for `status` and
    the metrics until a later change succeeds.
    """
    if on_failure not in FAILURE_MODES:
        raise IsoebpfError(f"on-failure '{on_failure}': choose {' or '.join(FAILURE_MODES)}")
    notes: list[str] = []
    try:
        with scope.locked():
            notes += finish_switch(scope)
            previous = switch_from(scope, chosen)
            if previous:
                report = _switch(previous, chosen, ir, scope, globs, mode, policy_path, force,
                                 on_failure, compiling, **extra)
                notes.append(f"switched from {previous}: {chosen} was loaded and verified while "
                             f"{previous} still enforced, then {previous}'s enforcement removed")
                return chosen, report, notes
            try:
                report = registry.get(chosen).load(ir, scope, globs, mode, policy_path, force=force,
                                             on_failure=on_failure, compiling=compiling, **extra)
            except ProgramRejected as err:
                if requested != "auto":
                    raise
                notes.append(f"backend iptables: this kernel refused the eBPF program ({err})")
                chosen = "iptables"
                report = registry.get(chosen).load(ir, scope, globs, mode, policy_path, force=force,
                                             on_failure=on_failure)
    except IsoebpfError as err:
        # Also when the lock could not be had: status shows that this change failed.
        raise fail(scope, ir, on_failure, err) from err
    return chosen, report, notes


def _switch(previous: str, chosen: str, ir: IR, scope: Scope, globs: Sequence[str], mode: str,
            policy_path: str, force: bool, on_failure: str, compiling: Any | None,
            **extra: Any) -> LoadReport:
    """Replace `previous` by `chosen` (the caller holds the scope's lock)."""
    before = scope.read()
    assert before is not None, "switch_from found a backend in force"
    scope.write_switch(previous, chosen)
    try:
        report: LoadReport = registry.get(chosen).load(ir, scope, globs, mode, policy_path, force=force,
                                     on_failure=on_failure, compiling=compiling, **extra)
        drifted = registry.get(chosen).drift(scope, ir)
        if drifted:
            raise BackendError(f"the {chosen} backend does not read back as loaded: "
                               f"{', '.join(drifted)}")
    except IsoebpfError as err:
        problem = _undo_partial(chosen, scope, before)
        if problem:
            raise type(err)(f"{err}\n{problem}") from err
        raise
    except BaseException:
        _undo_partial(chosen, scope, before)
        raise
    try:
        registry.get(previous).unload(scope)
    except IsoebpfError as err:
        raise BackendError(f"{chosen} enforces the new policy, but removing the {previous} "
                           f"backend's enforcement failed ({err}); both filter until the next "
                           "'isoebpf load' finishes the switch") from err
    scope.clear_switch()
    return report


def _undo_partial(chosen: str, scope: Scope, before: dict[str, Any]) -> str | None:
    """Remove what a failed switch made of `chosen`, and put back the record of the
    backend it was to replace, which was never touched (`chosen`'s unload finds its
    objects without a record). Why that failed too, or None."""
    try:
        registry.get(chosen).unload(scope)
        if scope.read() != before:
            scope.write(before)
    except IsoebpfError as err:
        return (f"removing the partly loaded {chosen} backend failed too ({err}); "
                "the next 'isoebpf load' or 'isoebpf unload' removes it")
    scope.clear_switch()
    return None


def finish_switch(scope: Scope) -> list[str]:
    """Finish or undo a switch a killed command left (under the scope's lock): the
    backend the record names is the one that enforces whole; the other goes."""
    switch = scope.read_switch()
    if switch is None:
        return []
    current = loaded(scope)
    leftover = switch["from"] if current == switch["to"] else switch["to"]
    registry.get(leftover).unload(scope)
    scope.clear_switch()
    return [f"finished an interrupted switch from {switch['from']} to {switch['to']}: "
            f"removed the {leftover} backend's enforcement"]


def fail(scope: Scope, ir: IR, on_failure: str, err: IsoebpfError) -> IsoebpfError:
    """Leave the scope as `on_failure` says after a change failed; the error to show.

    closed: the policy in force stays, whole (each backend's load undoes its own
    partial work); where none was in force, none is. open: every backend's
    enforcement is removed, so traffic flows as if isoebpf were not there.
    """
    try:
        before = scope.read()
    except IsoebpfError:
        before = None
    enforcing = (before or {}).get("digest")
    if on_failure == "open":
        consequence = "fail-open: enforcement removed; traffic passes unfiltered"
        for name in BACKENDS:
            try:
                registry.get(name).unload(scope)
            except IsoebpfError as unload_err:
                consequence = f"fail-open, but removing the {name} backend failed: {unload_err}"
        enforcing = None
    elif enforcing:
        consequence = f"fail-closed: the policy in force (digest {enforcing[:12]}) stays"
    else:
        consequence = "fail-closed: nothing was in force and nothing is"
    scope.write_failure({"on_failure": on_failure, "error": str(err), "wanted": ir.digest,
                         "enforcing": enforcing, "consequence": consequence,
                         "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return type(err)(f"{err}\n{consequence}")


def loaded(scope: Scope) -> str | None:
    return scope.backend()


def status(scope: Scope) -> dict[str, Any] | None:
    """The loaded backend's status, with the last failed change (key `failure`) if any."""
    current = loaded(scope)
    record = registry.get(current).status(scope) if current else None
    failure = scope.read_failure()
    if failure is None:
        return record
    return {**(record or {"backend": None}), "failure": failure}
