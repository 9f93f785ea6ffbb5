"""eBPF backend, kernel half: the `Backend` itself: compile once, pin, attach; update policy by generation; unload.

Lifecycle (everything under the scope's lock):
- first load: compile the program (bcc), pin its programs and maps under the
  scope's pin directory, write the policy as generation 1, activate it, attach
  to every matching interface; on any failure undo all of it;
- later loads: open the pins, write generation g+1 into the slot g does not
  use (only what differs from the policy that slot holds, usually g-1's), flip
  the one config word (every packet sees wholly g or wholly g+1), keep g's
  entries for the next update; no recompile. Connections the new policy
  forbids are cut by the datapath itself (each conntrack entry remembers the
  generation that allowed it);
- an update whose policy does not fit beside the one in force: a program
  compiled with maps sized for it, sharing the connection state, takes the
  running one's place on every attachment, each in one step (_grow);
- unload: detach every attachment recorded or found by name, remove the pins
  and the record. Safe to repeat.

Crash safety (a command SIGKILLed anywhere): the datapath's config word, not the
record, says which generation is live, so an update never writes into the
live slot; the other slot's file (program.SlotFiles) is removed before writing
into it, so a slot a killed update left half-written is rewritten whole. A
first load leaves no record until it is complete: the next command finds its
pins or attachments by name and removes them. A growth's new pins take the old
ones' place in one rename; the next load completes or undoes one killed
before or around it (_finish_growth).

Its neighbours: `program` (the maps), `bpfsys` (bpf(2)), `ringbuf` (events), `capacity`;
the shared floor's `state`, `links`, `interface`, `counts` below, and
`registry`/`enforcer` above.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import logging
import marshal
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import NetlinkError

from ...errors import BackendError, CapacityError, IsoebpfError, StateError
from ...ir.compiler import Delta, Numbering
from ...ir.tables import IR
from ...resource import Resource
from .. import counts, docker_user, links
from ..interface import Attachment, LoadReport, Verdict, state_record
from ..state import LAYOUT, Scope, ensure_bpffs, make_private, private_dir, write_atomically
from . import abi, bpfsys, capacity, entries, program, ringbuf

# Phases of a long load, for the CLI to show on a terminal (the "isoebpf" logger's INFO).
_progress = logging.getLogger(__name__)

BACKEND = "ebpf"
PROG_PINS = {"xdp": "prog_xdp", "tc": "prog_tc"}

# Why `auto` attaches where it does: measured here, allowed TCP through a router
# namespace's veths (iperf3): no filter 14.7 Gbit/s, TC 16.7, native XDP 2.55.
WHY_TC_VIRTUAL = "{kind}: TC keeps GRO; native XDP measured 2.55 vs 16.7 Gbit/s for TC"
WHY_XDP_NATIVE = "physical device with a native XDP driver: earliest and cheapest hook"
WHY_TC_FALLBACK = "no native XDP on this driver ({error}); TC clsact instead of generic XDP"
WHY_GENERIC_ON_VETH = ("veth: native XDP_TX hands REJECT answers to the peer's XDP queue, which "
                       "drops them unless the peer runs XDP too; generic XDP answers")


def preflight(compiling: EarlyCompile | None = None) -> str | None:
    """Why the eBPF backend cannot work here, or None when it can. A program
    `compiling` that compiled and loaded shows what the probe would (and bcc is
    never asked to compile twice at once)."""
    try:
        ensure_bpffs()
        if compiling is None or not compiling.succeeded():
            program.probe_compile()
    except IsoebpfError as err:
        return str(err)
    return None


class EarlyCompile:
    """The program compiling on another thread while the caller parses and compiles
    the policy: bcc compiles in C++ without holding the GIL, so on two cores a
    first load hides most of the compile behind the Python work. Its maps are
    sized for what the policy file may need at most (capacity.estimated_needs)."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self._future: Future[program.CompiledProgram] = Future()
        self._future.set_running_or_notify_cancel()
        # A daemon thread, so that a process that gave up on the compile (abandon) need
        # not wait for it to end.
        threading.Thread(target=self._compile, name="isoebpf-compile", daemon=True).start()
        self._taken = False

    def _compile(self) -> None:
        try:
            self._future.set_result(program.compile_program(self.sizes))
        except BaseException as err:  # handed to whoever takes the result
            self._future.set_exception(err)

    def take(self, sizes: dict[str, int]) -> tuple[program.CompiledProgram | None, float]:
        """The compiled program if its maps are at least `sizes` (None: too small, or
        larger maps than `sizes` failed, so the caller compiles at `sizes`), and the
        seconds waited for it; the compile's error where it was sized as asked."""
        started = time.monotonic()
        if any(self.sizes.get(macro, 0) < size for macro, size in sizes.items()):
            self.discard()
            return None, 0.0
        self._taken = True
        try:
            compiled: program.CompiledProgram | None = self._future.result()
        except IsoebpfError:
            if self.sizes == sizes:
                raise
            compiled = None  # the larger maps of the estimate may be what failed
        return compiled, time.monotonic() - started

    def discard(self) -> None:
        """Release the program if no first load took it (an update, a fallback, an error)."""
        if self._taken:
            return
        self._taken = True
        with contextlib.suppress(IsoebpfError):  # a failed compile holds nothing
            self._future.result().close()

    def abandon(self) -> None:
        """Give the program up without waiting for it: released once compiled. The
        compile may still be running when the process ends (see running)."""
        if self._taken:
            return
        self._taken = True
        self._future.add_done_callback(
            lambda done: None if done.exception() else done.result().close())

    def running(self) -> bool:
        return not self._future.done()

    def succeeded(self) -> bool:
        """Wait for the compile; did it load the programs?"""
        return self._future.exception() is None


def compile_early(scope: Scope, record: dict[str, Any] | None,
                  policy_bytes: int | None = None) -> EarlyCompile | None:
    """Start compiling now when the scope's next load is a first load (no reusable
    program pinned beside its `record`), its maps sized for a policy file of
    `policy_bytes` (None: the defaults); None when it is an update (which compiles
    only to move to new maps, once it knows their sizes), or when a policy that
    large would be refused: a refused policy compiles nothing, and one that fits
    after all compiles once it is read."""
    if record is not None and _reusable(record, scope):
        return None
    needs = capacity.estimated_needs(policy_bytes) if policy_bytes else {}
    sizes = capacity.sizes_for(needs)
    if capacity.refusals(needs, sizes):
        return None
    return EarlyCompile(sizes)


def load(ir: IR, scope: Scope, globs: Sequence[str], mode: str, policy_path: str,
         force: bool = False, on_failure: str = "closed",
         compiling: EarlyCompile | None = None, change: Delta | None = None) -> LoadReport:
    """`compiling`: the program compile_early() started, taken by a first load;
    `change`: how `ir` differs from the policy in force, where its compile says (an
    update then writes just that); `on_failure` is recorded (enforcer.load acts on it)."""
    said = {"policy_path": policy_path, "on_failure": on_failure}
    ensure_bpffs()
    with scope.locked():
        record = scope.read()
        started = time.monotonic()
        if record is not None and _ours_in_this_layout(record):
            _finish_growth(scope)
        if record is not None and _reusable(record, scope):
            report = _update(ir, scope, record, globs, mode, said, force, started, change)
        else:
            # A first load compiles maps sized for the policy: refuse one this machine cannot
            # hold before compiling, pinning or tearing anything down.
            needed = capacity.needed_entries(ir)
            sizes = capacity.sizes_for(needed)
            capacity.refuse(needed, sizes)
            report = _first_load(ir, scope, record, globs, mode, said, force, started, compiling, sizes)
        return _beside_docker(scope, report)


def _beside_docker(scope: Scope, report: LoadReport) -> LoadReport:
    """Where Docker runs, mark what the program allows between overlays and accept it in
    DOCKER-USER (backends.docker_user); where it does not (any more), mark nothing."""
    found = docker_user.chains(scope.netns)
    mark = docker_user.MARK if found else 0
    maps = _open_maps(scope)
    try:
        if program.accept_mark(maps) != mark:
            program.set_accept_mark(maps, mark)
    finally:
        for fd in maps.values():
            os.close(fd)
    if not found:
        return report
    docker_user.ensure(scope.netns, found)
    unmarked = [a.ifname for a in report.attachments if a.mode != "tc"]
    if not unmarked:
        return report
    return dataclasses.replace(report, warnings=(*report.warnings, (
        f"Docker runs here, and XDP cannot mark what it allows: Docker's isolation drops what the "
        f"policy allows between overlays through {', '.join(unmarked)}; load with --mode tc")))


def program_ids(scope: Scope) -> dict[str, int]:
    """Kind ("xdp", "tc") -> id of the scope's pinned program."""
    found = {}
    for kind, pin in PROG_PINS.items():
        fd = bpfsys.obj_get(str(scope.pin_dir / pin))
        try:
            found[kind] = bpfsys.prog_info(fd).id
        finally:
            os.close(fd)
    return found


def _ours_in_this_layout(record: dict[str, Any]) -> bool:
    return record.get("layout") == LAYOUT and record.get("backend") == BACKEND


def _reusable(record: dict[str, Any], scope: Scope) -> bool:
    if not _ours_in_this_layout(record):
        return False
    needed = [*PROG_PINS.values(), *program.MAP_NAMES]
    return all((scope.pin_dir / name).exists() for name in needed)


def _replaced(scope: Scope, record: dict[str, Any] | None) -> str | None:
    """What unusable state a first load finds in its way, or None (another backend's
    record is not in its way: enforcer.load switches from that backend)."""
    if record is not None and record.get("backend") in (BACKEND, None):
        if not _ours_in_this_layout(record):
            return f"layout {record.get('layout')} state from {record.get('loaded_at', '?')}"
        return (f"the state of {record.get('loaded_at', '?')} without its pins under "
                f"{scope.pin_dir} (was bpffs unmounted or remounted?)")
    if scope.pin_dir.exists():
        return "the pins of an interrupted command"
    return None


def _first_load(ir: IR, scope: Scope, record: dict[str, Any] | None, globs: Sequence[str],
                mode: str, said: dict[str, str], force: bool, started: float,
                compiling: EarlyCompile | None, sizes: dict[str, int]) -> LoadReport:
    replaced = _replaced(scope, record)
    _progress.info("compiling the program with bcc")
    compiled, waited = compiling.take(sizes) if compiling is not None else (None, 0.0)
    if compiled is None:
        compiled = program.compile_program(sizes)
        waited += compiled.compile_seconds
    attachments: list[Attachment] = []
    try:
        # After compiling, so whatever still enforces goes only milliseconds before we do;
        # always, because a killed first load may have attached before writing its record.
        _teardown(scope, record)
        scope.make_pin_dir()
        for fd, name in _pins_of(compiled):
            bpfsys.obj_pin(fd, str(scope.pin_dir / name))
            make_private(scope.pin_dir / name)
        _progress.info("writing %d classes and %d allow entries", len(ir.classes), len(ir.allowed))
        generation, no_room = program.first_generation(compiled.map_fds, ir,
                                                       _slot_files(scope, make=True))
        _progress.info("attaching")
        attachments = _attach_all(scope, compiled.prog_fds, globs, mode, force, []).now
        _save(scope, ir, generation, attachments, said, compiled.compile_seconds, carried={})
        warnings = _next_update_warnings(no_room)
    except BaseException:
        _detach_all(scope, attachments)
        _unpin(scope)
        raise
    finally:
        compiled.close()
    applied = time.monotonic() - started - waited
    return LoadReport(generation, True, compiled.compile_seconds, applied, tuple(attachments),
                      replaced, (), warnings)


def _update(ir: IR, scope: Scope, record: dict[str, Any], globs: Sequence[str], mode: str,
            said: dict[str, str], force: bool, started: float, delta: Delta | None) -> LoadReport:
    """Make before break: check the new policy fits, attach new interfaces (they
    enforce the live policy meanwhile), make the new generation live, and only
    then detach what is no longer wanted. A failure before the flip detaches
    only what this update attached: the policy in force stays, where it was.

    A `delta` from the policy in force (its base is the record's, and no killed
    update went live since) is written as it is; otherwise the new policy's
    tables are compared with what the slot holds."""
    maps = _open_maps(scope)
    progs = {kind: bpfsys.obj_get(str(scope.pin_dir / pin)) for kind, pin in PROG_PINS.items()}
    try:
        live = program.active_generation(maps)
        known = [Attachment(**a) for a in record.get("attachments", [])]
        slots = _slot_files(scope, make=True)
        in_step = int(record["generation"]) == live
        changed = record.get("digest") != ir.digest or not in_step
        change = entries.change_of(delta) if (delta is not None and in_step
                                              and delta.base == record.get("digest")) else None
        try:
            if change is not None and not program.change_fits(maps, ir, slots, change):
                change = None  # the standby slot's way to the live generation is not on file
            tables = program.prepare_next(maps, ir, slots) if changed and change is None else None
        except CapacityError:
            grow = True
        else:
            grow = False
        if grow:
            return _grow(ir, scope, record, maps, progs, globs, mode, said, force, started)
        attached = _attach_all(scope, progs, globs, mode, force, known)
        carried = record.get("carried", {})
        try:
            new = live
            if changed:
                if change is not None and delta is not None:
                    # The numbering is kept: only the new rules' counters start at 0, and
                    # what others carry follows them to their names.
                    fresh = delta.rules_new
                    carried = counts.carry(counts.totals({}, carried),
                                           [(str(n), str(t)) for _, n, t in record["rules"]],
                                           [(r.name, r.text) for r in ir.rules]) if carried else {}
                else:
                    carried, fresh = program.counters_across(maps, record["rules"], carried, ir)
                _progress.info("writing what changed as generation %d", live + 1)
                new = program.next_generation(maps, ir, slots, tables, fresh, change)
            enforced_at = time.time()  # the new generation is live: what follows is bookkeeping
            _save(scope, ir, new, attached.now, said, float(record.get("compile_seconds", 0)),
                  carried, delta.numbering if change is not None and delta is not None else None)
        except BaseException:
            # The live generation's slot was never written: flipping back restores
            # the policy in force exactly (the connections the sweep cut are judged afresh).
            program.set_active(maps, live)
            _detach_all(scope, attached.added)
            raise
        detached = _retire(scope, attached.retired)
        needed = change.sizes if change is not None else (
            program.needed_entries(ir, tables) if tables is not None else None)
        warnings = _next_update_warnings(program.room_for_next(maps, ir, needed)) \
            if changed else ()
    finally:
        for fd in (*maps.values(), *progs.values()):
            os.close(fd)
    return LoadReport(new, False, 0.0, time.monotonic() - started, tuple(attached.now), None,
                      detached, warnings, enforced_at=enforced_at)


def _grow(ir: IR, scope: Scope, record: dict[str, Any], old_maps: dict[str, int],
          old_progs: dict[str, int], globs: Sequence[str], mode: str, said: dict[str, str],
          force: bool, started: float) -> LoadReport:
    """Move a policy that does not fit beside the one in force to a program compiled
    with maps sized for it, make before break. The new program shares the running
    one's connection state (program.SHARED_STATE, by its pins) and holds the new
    policy as the next generation before it sees a packet. Interfaces new to this
    load are attached with the running program first (they enforce the policy in
    force meanwhile, as in _update); then each attachment switches programs in one
    netlink message (a TC filter replaced in place, an XDP program swapped for the
    one expected there), so each packet meets the old program and policy or the new
    ones, never a mix, and no tracked connection is forgotten. Only then do the new
    pins take the old ones' place, in one rename (_commit). A failure before that
    puts the old program back wherever it was switched; a command killed there is
    undone by the next load (_finish_growth)."""
    needed = capacity.needed_entries(ir)
    sizes = capacity.sizes_for(needed)
    # The shared tables stay as they are, and cost nothing new.
    sizes.update({abi.MAP_SIZE_MACROS[name]: bpfsys.map_info(old_maps[name]).max_entries
                  for name in program.SHARED_STATE})
    capacity.refuse(needed, sizes, shared=program.SHARED_STATE)
    new = program.active_generation(old_maps) + 1
    _progress.info("compiling the program with bcc, for new maps")
    compiled = program.compile_program(sizes, shared_state=scope.pin_dir)
    staged = _staged_dir(scope)
    known = [Attachment(**a) for a in record.get("attachments", [])]
    attached: _Attached | None = None
    switched: list[Attachment] = []
    try:
        private_dir(staged)
        for fd, name in _pins_of(compiled):
            bpfsys.obj_pin(fd, str(staged / name))
            make_private(staged / name)
        _progress.info("writing %d classes and %d allow entries", len(ir.classes), len(ir.allowed))
        _, no_room = program.first_generation(compiled.map_fds, ir, _slot_files(scope, make=True),
                                              new, sweep=False)
        attached = _attach_all(scope, old_progs, globs, mode, force, known)
        with links.netlink(scope.netns) as sock:
            for a in attached.now:
                _switch_program(sock, a, compiled.prog_fds, old_progs)
                switched.append(a)
        # The old program is attached nowhere now; once its last runs have ended, what
        # it counted is final, and the record carries it (the new maps count from 0).
        bpfsys.wait_for_program_runs()
        old_rules = record["rules"]
        names = {int(rule_id): str(name) for rule_id, name, _ in old_rules}
        counted = {names[i]: count for i, count in program.read_counters(old_maps, names).items()
                   if count != (0, 0)}
        carried = counts.carry(counts.totals(counted, record.get("carried", {})),
                               [(str(n), str(t)) for _, n, t in old_rules],
                               [(r.name, r.text) for r in ir.rules])
        _commit(scope)
    except BaseException:
        switched_back = _switch_back(scope, switched, old_progs, compiled.prog_fds)
        if attached is not None:
            _detach_all(scope, attached.added)
        if switched_back:  # else the staged pins stay, for the next load to finish it
            _remove_pins(staged)
        compiled.close()
        raise
    _remove_pins(staged)  # the old program's pins, since _commit
    _remove_pins(_retired_dir(scope))
    program.activate(compiled.map_fds, ir, new)  # the sweep: cut what the new policy forbids
    our_xdp = bpfsys.prog_info(compiled.prog_fds["xdp"]).id
    now = [dataclasses.replace(a, prog_id=our_xdp if a.mode != "tc" else 0) for a in attached.now]
    _save(scope, ir, new, now, said, compiled.compile_seconds, carried)
    compiled.close()
    detached = _retire(scope, attached.retired)
    return LoadReport(new, True, compiled.compile_seconds, time.monotonic() - started,
                      tuple(now), None, detached, _next_update_warnings(no_room),
                      grown=", ".join(f"{m}={v}" for m, v in sorted(sizes.items())))


def _pins_of(compiled: program.CompiledProgram) -> list[tuple[int, str]]:
    """(fd, pin name) of every program and map of `compiled`."""
    return [*((compiled.prog_fds[kind], pin) for kind, pin in PROG_PINS.items()),
            *((fd, name) for name, fd in compiled.map_fds.items())]


def _switch_program(sock: Any, attachment: Attachment, to: dict[str, int],
                    running: dict[str, int]) -> None:
    """Put program `to` where program `running` enforces `attachment`, in one step."""
    link = links.Link(attachment.ifname, attachment.ifindex, "")
    if attachment.mode == "tc":
        links.attach_tc(sock, link, to["tc"])  # the same priority and handle: replaced in place
    else:
        links.swap_xdp(sock, link, to["xdp"], running["xdp"], attachment.mode)


def _switch_back(scope: Scope, switched: Sequence[Attachment], old: dict[str, int],
                 new: dict[str, int]) -> bool:
    """Put the old program back where a failed growth switched; False if that failed
    somewhere (the interface still there): _finish_growth then does it at the next load."""
    done = True
    with links.netlink(scope.netns) as sock:
        for a in switched:
            try:
                _switch_program(sock, a, old, new)
            except (BackendError, NetlinkError):
                done = done and a.ifindex not in {link.index for link in links.links(sock)}
    return done


def _staged_dir(scope: Scope) -> Path:
    """Where a growth pins its new program until it commits (beside the scope's pins, under
    a name no scope's pin directory has: those are `root` and `netns-*`; bpffs takes no dot)."""
    return scope.pin_dir.with_name(f"staged-{scope.pin_dir.name}")


def _retired_dir(scope: Scope) -> Path:
    """Where the old pins go where bpffs cannot exchange two directories (see _commit)."""
    return scope.pin_dir.with_name(f"retired-{scope.pin_dir.name}")


RENAME_EXCHANGE = 2  # renameat2(2)
_AT_FDCWD = -100


def _commit(scope: Scope) -> None:
    """The staged pins take the scope's pin directory in one step: renameat2 exchanges
    the two directories, and the old pins are left under the staged name. Where bpffs
    cannot exchange, two renames, through _retired_dir (_finish_growth completes them)."""
    staged = _staged_dir(scope)
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None and renameat2(_AT_FDCWD, bytes(staged), _AT_FDCWD,
                                           bytes(scope.pin_dir), RENAME_EXCHANGE) == 0:
        return
    error = ctypes.get_errno() if renameat2 is not None else errno.ENOSYS
    if error not in (errno.EINVAL, errno.ENOSYS):
        raise BackendError(f"cannot put {staged} in place of {scope.pin_dir}: {os.strerror(error)}")
    os.rename(scope.pin_dir, _retired_dir(scope))
    os.rename(staged, scope.pin_dir)


def _finish_growth(scope: Scope) -> None:
    """Complete or undo a growth killed midway. Killed before _commit: the old program
    goes back wherever the new one runs, and the new one's pins go. After it: only the
    old program's pins are left to remove (the record is the old policy's; the update
    that follows writes its own policy whole, as after any killed update)."""
    staged, retired = _staged_dir(scope), _retired_dir(scope)
    if retired.exists():  # _commit's two renames: the first was done
        if not scope.pin_dir.exists():
            os.rename(staged, scope.pin_dir)
        _remove_pins(retired)
        return
    if not staged.exists():
        return
    if 0 < _generation(staged) < _generation(scope.pin_dir):
        _remove_pins(staged)  # exchanged: the old program's pins
        return
    _switch_back_everywhere(scope, staged)
    _remove_pins(staged)


def _generation(pins: Path) -> int:
    """The active generation of the maps pinned under `pins` (0: none yet)."""
    try:
        fd = bpfsys.obj_get(str(pins / "config"))
    except BackendError:
        return 0
    try:
        return program.active_generation({"config": fd})
    finally:
        os.close(fd)


def _switch_back_everywhere(scope: Scope, staged: Path) -> None:
    """Every interface of the scope that runs the staged program runs the pinned one again."""
    fds: dict[str, dict[str, int]] = {"pinned": {}, "staged": {}}
    try:
        for kind, pin in PROG_PINS.items():
            fds["pinned"][kind] = bpfsys.obj_get(str(scope.pin_dir / pin))
            with contextlib.suppress(BackendError):  # pinned after a kill, or never
                fds["staged"][kind] = bpfsys.obj_get(str(staged / pin))
        staged_xdp = bpfsys.prog_info(fds["staged"]["xdp"]).id if "xdp" in fds["staged"] else 0
        with links.netlink(scope.netns) as sock:
            for link in links.links(sock):
                prog_id, xdp_mode = links.xdp_state(sock, link.index)
                if xdp_mode and prog_id == staged_xdp:
                    links.swap_xdp(sock, link, fds["pinned"]["xdp"], fds["staged"]["xdp"],
                                   "xdpgeneric" if xdp_mode == "xdpgeneric" else "xdp")
                if links.has_our_tc(sock, link.index):
                    links.attach_tc(sock, link, fds["pinned"]["tc"])
    finally:
        for fd in (*fds["pinned"].values(), *fds["staged"].values()):
            os.close(fd)


def _remove_pins(folder: Path) -> None:
    if folder.exists():
        for pin in folder.iterdir():
            pin.unlink()
        folder.rmdir()


def _retire(scope: Scope, retired: Sequence[tuple[Attachment, str]]) -> tuple[str, ...]:
    """Detach attachments the change in force no longer has; what was detached, and why."""
    if not retired:
        return ()
    try:
        _detach_all(scope, [a for a, _ in retired])
    except (BackendError, NetlinkError) as err:
        raise BackendError(f"the new policy is in force, but detaching from "
                           f"{', '.join(a.ifname for a, _ in retired)} failed ({err}): "
                           "'isoebpf unload' removes every attachment of ours") from err
    return tuple(f"{a.ifname} ({a.mode}): {why}" for a, why in retired)


def _next_update_warnings(no_room: Sequence[str]) -> tuple[str, ...]:
    """Why the next update cannot be written beside this policy, and so compiles a new
    program (see _grow): only where an environment bound keeps the maps small."""
    return tuple(f"the next update needs new maps (a compile): {problem}" for problem in no_room)


def plan(scope: Scope, ir: IR) -> list[str]:
    """What loading `ir` would change here, as '<what>: <change>' lines; changes nothing.
    An update's entries are counted against the live generation's: what the policy in
    force would gain and lose."""
    wanted = entries.tables_of(ir)
    record = scope.read()
    if record is None or not _reusable(record, scope):
        return ["program: compile, pin and attach (a first load)",
                *(f"map {name}: write {_entries(n)}" for name, n in entries.entry_counts(wanted).items()
                  if n)]
    maps = _open_maps(scope)
    try:
        live = program.active_generation(maps)
        have = _slot_files(scope).read(maps, program.slot_of(live))
    finally:
        for fd in maps.values():
            os.close(fd)
    change = entries.diff(have, wanted)
    said = [f"generation {live} -> {live + 1}: the pinned program is reused"]
    if change.clear:
        said.append("maps: what the live generation holds is not on record here: "
                    "the update writes every entry")
    said += [f"map {name}: write {_entries(written)}, delete {_entries(deleted)}"
             for name, (written, deleted) in change.counts().items()]
    return said if len(said) > 1 else [*said, "maps: no entry changes"]


def _entries(count: int) -> str:
    return f"{count} {'entry' if count == 1 else 'entries'}"


def _open_maps(scope: Scope) -> dict[str, int]:
    return {name: bpfsys.obj_get(str(scope.pin_dir / name)) for name in program.MAP_NAMES}


def choose_mode(sock: Any, link: links.Link, requested: str, prog_fds: dict[str, int],
                our_xdp: int, force: bool) -> tuple[str, str, bool]:
    """Attach one interface; return (mode, why, whether we added its clsact qdisc).

    Another tool's XDP program, or another tool's TC filter in our slot, is
    refused unless `force`; our own XDP program (`our_xdp`, its id: attached by
    a command killed before it wrote its record) is simply attached again.
    """
    if requested == "tc" or (requested == "auto" and link.kind):
        added = links.attach_tc(sock, link, prog_fds["tc"], replace=force)
        return "tc", "requested" if requested == "tc" else WHY_TC_VIRTUAL.format(kind=link.kind), added
    xdp_force = force or links.xdp_state(sock, link.index)[0] == our_xdp
    if link.kind == "veth":
        links.attach_xdp(sock, link, prog_fds["xdp"], "xdpgeneric", replace=xdp_force)
        return "xdpgeneric", WHY_GENERIC_ON_VETH, False
    try:
        links.attach_xdp(sock, link, prog_fds["xdp"], "xdp", replace=xdp_force)
        return "xdp", "requested" if requested == "xdp" else WHY_XDP_NATIVE, False
    except BackendError as err:
        if "already has an XDP program" in str(err):
            raise
        if requested == "xdp":
            links.attach_xdp(sock, link, prog_fds["xdp"], "xdpgeneric", replace=xdp_force)
            return "xdpgeneric", f"no native XDP on this driver ({err}); generic XDP", False
        added = links.attach_tc(sock, link, prog_fds["tc"], replace=force)
        return "tc", WHY_TC_FALLBACK.format(error=err), added


@dataclass(frozen=True)
class _Attached:
    """What an attach pass did: `kept`, `replaced` (ours again in the same hook, in
    one step: a renamed interface) and `added` (on an interface that had none of
    ours there) enforce from now on; `retired` are earlier attachments that still
    enforce the policy in force and are to be detached once the change is live
    (interfaces no longer matched, or moved to another hook), each with why."""

    kept: list[Attachment]
    replaced: list[Attachment]
    added: list[Attachment]
    retired: list[tuple[Attachment, str]]

    @property
    def now(self) -> list[Attachment]:
        return self.kept + self.replaced + self.added


def _hook(mode: str) -> str:
    return "tc" if mode == "tc" else "xdp"


def _attach_all(scope: Scope, prog_fds: dict[str, int], globs: Sequence[str], mode: str,
                force: bool, known: list[Attachment]) -> _Attached:
    """Attach to every matching interface not attached already; forget vanished ones.
    Nothing is detached here: an attachment to retire keeps enforcing the policy in
    force until the caller's change is live, so a failure leaves it exactly as it was."""
    if not globs:
        raise BackendError("no interfaces to enforce on: give --iface GLOB or 'interfaces:' "
                           "in the policy")
    with links.netlink(scope.netns) as sock:
        present = {link.index: link for link in links.links(sock)}
        wanted = links.matching(list(present.values()), globs)
        if not wanted:
            where = f"namespace '{scope.netns}'" if scope.netns else "this namespace"
            raise BackendError(f"no interface in {where} matches {', '.join(globs)}")
        wanted_indexes = {link.index for link in wanted}
        kept = [a for a in known if a.ifindex in wanted_indexes
                and present[a.ifindex].name == a.ifname
                and (mode == "auto" or a.mode.startswith(mode)) and _attached(sock, a.as_record())]
        stale = {a.ifindex: a for a in known if a not in kept and a.ifindex in present}
        done = {a.ifindex for a in kept}
        our_xdp = bpfsys.prog_info(prog_fds["xdp"]).id
        added: list[Attachment] = []
        replaced: list[Attachment] = []
        retired: list[tuple[Attachment, str]] = []
        try:
            for link in wanted:
                if link.index in done:
                    continue
                try:
                    chosen, why, added_clsact = choose_mode(sock, link, mode, prog_fds, our_xdp,
                                                            force)
                except (BackendError, NetlinkError):
                    if link.index not in {found.index for found in links.links(sock)}:
                        continue  # deleted while we attached: nothing left to enforce on
                    raise
                attachment = Attachment(link.name, link.index, chosen, why, added_clsact,
                                        our_xdp if chosen != "tc" else 0)
                before = stale.pop(link.index, None)
                if before is not None and _hook(before.mode) == _hook(chosen):
                    # The attach replaced ours in place, and the clsact qdisc we once
                    # added is still ours to remove.
                    replaced.append(dataclasses.replace(
                        attachment, added_clsact=added_clsact or before.added_clsact))
                    continue
                if before is not None:
                    retired.append((before, f"now {chosen}"))
                added.append(attachment)
        except BaseException:
            _detach(sock, added)
            raise
        retired += [(a, f"no longer matches {', '.join(globs)}") for a in stale.values()]
        return _Attached(kept, replaced, added, retired)


def _detach(sock: Any, attachments: Sequence[Attachment]) -> None:
    for a in attachments:
        link = links.Link(a.ifname, a.ifindex, "")
        if a.mode == "tc":
            links.detach_tc(sock, link, a.added_clsact)
        elif links.xdp_state(sock, a.ifindex)[0] == a.prog_id:
            links.detach_xdp(sock, link, a.mode)


def _detach_all(scope: Scope, attachments: Sequence[Attachment]) -> None:
    if not attachments:
        return
    with links.netlink(scope.netns) as sock:
        _detach(sock, attachments)


def _save(scope: Scope, ir: IR, generation: int, attachments: Sequence[Attachment],
          said: dict[str, str], compile_seconds: float, carried: counts.Carried,
          numbered: Numbering | None = None) -> None:
    """`said`: the command's policy_path and on_failure; `carried`: see counts;
    `numbered`: the IR's numbering, where the compile gave it (else read from the IR)."""
    scope.write(state_record(BACKEND, scope, ir, said["policy_path"], generation, attachments,
                               on_failure=said["on_failure"],
                               compile_seconds=round(compile_seconds, 3), carried=carried))
    numbered = numbered or Numbering.of(ir)
    write_atomically(_numbering_path(scope),
                     marshal.dumps((numbered.classes, numbered.overlays, numbered.rules)))


def numbering(scope: Scope) -> Numbering | None:
    """The ids of the policy in force (ir.compiler.Numbering): compiling the next one
    under them keeps the entries of what stays as they are. None: none recorded
    (only an update's number of writes depends on it, never what it writes)."""
    try:
        classes, overlays, rules = marshal.loads(_numbering_path(scope).read_bytes())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    return Numbering(classes, overlays, rules)


def _numbering_path(scope: Scope) -> Path:
    return scope.run_dir / "numbering"


def _slot_files(scope: Scope, make: bool = False) -> program.SlotFiles:
    """What each slot holds, beside the record; `make`: create its directory, root's alone."""
    return program.SlotFiles(scope.make_run_dir() if make else scope.run_dir)


def _unpin(scope: Scope) -> None:
    """Remove the pins and the files saying what the pinned maps' slots hold, and the numbering."""
    for slot in (0, 1):
        _slot_files(scope).forget(slot)
        _slot_files(scope).forget_pending(slot)
    _numbering_path(scope).unlink(missing_ok=True)
    _remove_pins(_staged_dir(scope))  # a growth killed before it finished
    _remove_pins(_retired_dir(scope))
    _remove_pins(scope.pin_dir)


def _teardown(scope: Scope, record: dict[str, Any] | None) -> list[str]:
    """Detach what the record lists and anything of ours found by name; unpin; forget."""
    removed = [] if scope.namespace_gone else _detach_ours(scope, record)
    if scope.pin_dir.exists():
        removed.append(f"pins under {scope.pin_dir}")
    _unpin(scope)  # the slot files too, when bpffs lost the pins under us
    if record is not None and record.get("backend") == BACKEND:
        scope.forget()
    return removed


def _detach_ours(scope: Scope, record: dict[str, Any] | None) -> list[str]:
    removed: list[str] = []
    with links.netlink(scope.netns) as sock:
        recorded = {a["ifindex"]: a for a in (record or {}).get("attachments", [])}
        for link in links.links(sock):
            prog_id, xdp_mode = links.xdp_state(sock, link.index)
            entry = recorded.get(link.index)
            ours = prog_id and ((entry and entry.get("prog_id") == prog_id)
                                or bpfsys.prog_name(prog_id) == program.XDP_NAME)
            if xdp_mode and ours:
                links.detach_xdp(sock, link, "xdpgeneric" if xdp_mode == "xdpgeneric" else "xdp")
                removed.append(f"{link.name} ({xdp_mode})")
            if links.has_our_tc(sock, link.index):
                links.detach_tc(sock, link, bool(entry and entry.get("added_clsact")))
                removed.append(f"{link.name} (tc)")
    return removed


def unload(scope: Scope) -> list[str]:
    """Remove everything of ours in the scope; returns what was detached."""
    with scope.locked():
        try:
            record = scope.read()
        except StateError:
            record = None
        removed = _teardown(scope, record)
        return removed + ([] if scope.namespace_gone else docker_user.remove(scope.netns))


def drift(scope: Scope, ir: IR) -> list[str]:
    """What no longer matches what we loaded: "kind:detail" strings, [] when all is in place."""
    record = scope.read()
    if record is None or record.get("backend") != BACKEND:
        return ["state:missing"]
    if not _reusable(record, scope):
        return ["pins:missing"]
    if record.get("digest") != ir.digest:
        return ["policy:changed"]
    found = []
    with links.netlink(scope.netns) as sock:
        present = {link.index for link in links.links(sock)}
        for a in record["attachments"]:
            if a["ifindex"] in present and not _attached(sock, a):
                found.append(f"detached:{a['ifname']}")
    # Docker started (or restarted with its rules flushed) beside us: our accept rule.
    found += [f"docker:{tool} {docker_user.CHAIN} does not accept what the program allowed"
              for tool, firsts in docker_user.chains(scope.netns).items() if not docker_user.accepting(firsts)]
    return found


def forget_gone(scope: Scope) -> list[str]:
    """Drop from the record the attachments whose interface no longer exists (a
    container removed took its veth, and our program with it), so that `status` does
    not report enforcement missing there. Their names."""
    with scope.locked():
        record = scope.read()
        if record is None or record.get("backend") != BACKEND:
            return []
        with links.netlink(scope.netns) as sock:
            present = {link.index: link.name for link in links.links(sock)}
        kept = [a for a in record["attachments"] if present.get(a["ifindex"]) == a["ifname"]]
        gone = [a["ifname"] for a in record["attachments"] if a not in kept]
        if gone:
            scope.amend({**record, "attachments": kept})
        return gone


def _attached(sock: Any, attachment: dict[str, Any]) -> bool:
    if attachment["mode"] == "tc":
        return links.has_our_tc(sock, attachment["ifindex"])
    return links.xdp_state(sock, attachment["ifindex"]) == (attachment["prog_id"],
                                                             attachment["mode"])


def status(scope: Scope) -> dict[str, Any] | None:
    record = scope.read()
    if record is None:
        return None
    if record.get("backend") != BACKEND:
        return record
    if not _reusable(record, scope):
        raise StateError(f"the record says the eBPF backend is loaded here, but its pins under "
                         f"{scope.pin_dir} are gone (was bpffs unmounted?); the programs may "
                         "still be attached. 'isoebpf load' pins and attaches afresh; "
                         "'isoebpf unload' removes what is left")
    maps = _open_maps(scope)
    try:
        record["generation"] = program.active_generation(maps)
        names = {rule_id: (name, text) for rule_id, name, text in record["rules"]}
        live = program.read_counters(maps, sorted(names))
        record["counters"] = counts.report(
            [names[rule_id] for rule_id in live],
            {names[rule_id][0]: count for rule_id, count in live.items()},
            record.get("carried", {}))
        record["connections"] = program.count_connections(maps)
        record["maps"] = program.map_fill(maps)
        record["programs"] = program_ids(scope)
    finally:
        for fd in maps.values():
            os.close(fd)
    with links.netlink(scope.netns) as sock:
        present = {link.index: link for link in links.links(sock)}
        for a in record["attachments"]:
            if a["ifindex"] not in present:
                a["state"] = "interface gone"
            else:
                a["state"] = "attached" if _attached(sock, a) else "detached"
                a["prog_id"] = record["programs"]["tc" if a["mode"] == "tc" else "xdp"]
    return record


class Tracer(Resource):
    """Verdict events from the loaded program, while this is open (`with`).

    Opening sets the program's event rate (per CPU and second; beyond it the
    kernel counts verdicts as suppressed instead of sending them); closing sets
    it back to 0, so the datapath sends nothing when nobody traces. Events that
    found the ring buffer full are counted by the kernel too (`lost`). One
    tracer per scope at a time: the ring has one reader.
    """

    def __init__(self, scope: Scope, per_second: int) -> None:
        self.scope = scope
        self.per_second = per_second
        self.suppressed = 0
        self.lost = 0
        self._maps: dict[str, int] = {}
        self._events: ringbuf.RingBuffer | None = None
        self._reader_lock = -1
        self._before = (0, 0)
        self._rules: dict[int, tuple[str, str]] = {}
        self._ifnames: dict[int, str] = {}

    def _open(self) -> None:
        record = self.scope.read()
        if record is None or record.get("backend") != BACKEND:
            raise BackendError("no eBPF program is loaded here")
        self._learn(record)
        self._lock_the_reader()
        self._maps = {name: bpfsys.obj_get(str(self.scope.pin_dir / name))
                      for name in ("events", "event_rate", "event_tokens")}
        self._events = ringbuf.RingBuffer(self._maps["events"])
        # What a trace killed before it could set the rate back left in the ring is not shown.
        program.set_event_rate(self._maps, 0)
        self._events.drain()
        self._before = program.undelivered_events(self._maps)
        program.set_event_rate(self._maps, self.per_second)

    def _lock_the_reader(self) -> None:
        """flock the scope's pin directory: nothing else locks it, and it holds no lock file
        that unload would have to remove."""
        self._reader_lock = os.open(self.scope.pin_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._reader_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackendError("another isoebpf trace is reading this scope's verdicts; the "
                               "events ring buffer has one reader: end that one first") from None

    def close(self) -> None:
        if "event_rate" in self._maps:
            program.set_event_rate(self._maps, 0)
        if "event_tokens" in self._maps:
            suppressed, lost = program.undelivered_events(self._maps)
            self.suppressed, self.lost = suppressed - self._before[0], lost - self._before[1]
        if self._events is not None:
            self._events.close()
            self._events = None
        for fd in self._maps.values():
            os.close(fd)
        self._maps = {}
        if self._reader_lock >= 0:
            os.close(self._reader_lock)
            self._reader_lock = -1

    def _learn(self, record: dict[str, Any]) -> None:
        """Rule names and interface names, from the state record (the agent keeps it current)."""
        self._rules = {int(i): (str(name), str(text)) for i, name, text in record["rules"]}
        self._ifnames = {int(a["ifindex"]): str(a["ifname"]) for a in record["attachments"]}

    def verdicts(self, timeout: float) -> Iterator[Verdict]:
        """The verdicts that arrive within `timeout` seconds."""
        assert self._events is not None, "use Tracer in a with statement"
        for raw in self._events.poll(timeout):
            if len(raw) < ctypes.sizeof(abi.VerdictEvent):
                continue
            event = abi.VerdictEvent.from_buffer_copy(raw)
            if event.rule not in self._rules or event.ifindex not in self._ifnames:
                record = self.scope.read()  # a policy update or a new interface since
                if record is not None:
                    self._learn(record)
            name, text = self._rules.get(event.rule, (f"rule {event.rule}", "unknown rule"))
            yield Verdict(event.timestamp_ns, self._ifnames.get(event.ifindex, f"if{event.ifindex}"),
                          event.family, event.proto, program.address(event.family, event.src), event.sport,
                          program.address(event.family, event.dst), event.dport,
                          abi.ACTION_NAMES.get(event.action, str(event.action)), name, text, bool(event.audit))


def tracer(scope: Scope, per_second: int) -> Tracer:
    return Tracer(scope, per_second)
