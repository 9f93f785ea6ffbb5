"""eBPF backend, pure half: how big the program's maps are made, and whether a policy fits.

Map sizes are compile-time constants (the ISOEBPF_MAX_* of bpf/abi.h and
bpf/maps.h). A first load sizes the policy maps and the counters from the
policy it loads (`sizes_for`): room for two generations, and a quarter more,
never below the headers' defaults; the ISOEBPF_MAX_* of the environment only
bound them. A policy beyond a bound or beyond what the machine has (memory,
and RLIMIT_MEMLOCK where the kernel still charges it) is refused before
anything is compiled, in one message naming every limit (`refusals`). An
update that needs more than the maps in force hold is refused with the map,
the count, the limit and the constant, before a single entry is written: the
policy in force stays as it is. Pure but for reading the machine's limits.

Asked by `program` (updates) and `backend` (a first load); reads bpf/ for the default sizes.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ...errors import BackendError, CapacityError
from ...ir.tables import IR
from . import abi, bpfsys
from .abi import MAP_SIZE_MACROS

BPF_DIR = Path(__file__).resolve().parents[3] / "bpf"  # control/backends/ebpf/ -> bpf/
_DEFINE = re.compile(r"#define (ISOEBPF_MAX_[A-Z_]+) (\d+)\s*$", re.MULTILINE)


def default_sizes() -> dict[str, int]:
    """The ISOEBPF_MAX_* constants as bpf/maps.h and bpf/abi.h define them."""
    return dict(_header_sizes())


@functools.cache
def _header_sizes() -> tuple[tuple[str, int], ...]:
    """Read once: the headers do not change under a running command."""
    return tuple((m, int(v)) for header in ("abi.h", "maps.h")
                 for m, v in _DEFINE.findall((BPF_DIR / header).read_text()))


def environment_sizes(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """The ISOEBPF_MAX_* the environment sets, checked: upper bounds for the maps a
    policy sizes, the sizes of the others (connections, fragments)."""
    chosen = {}
    for macro in sorted(set(MAP_SIZE_MACROS.values())):
        text = environ.get(macro)
        if text is not None:
            if not text.isdigit() or int(text) < 1:
                raise BackendError(f"{macro}={text!r} in the environment: give a positive number")
            chosen[macro] = int(text)
    return chosen


# The maps a policy sizes; the environment's ISOEBPF_MAX_* only bound them.
SIZED_BY_POLICY = {MAP_SIZE_MACROS[name] for name in
                   ("classes_v4", "exceptions", "hairpins", "allowed", "counters")}


@dataclass(frozen=True)
class Machine:
    """What bounds the maps' memory here."""

    cpus: int  # what a per-CPU map holds a value for
    available: int | None  # bytes a new map may take (None: not known)
    available_from: str  # where `available` was read
    memlock: int | None  # RLIMIT_MEMLOCK, where the kernel charges maps to it (before 5.11)

    @classmethod
    def here(cls) -> Machine:
        available, source = _available_memory()
        memlock = None
        if tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2]) < (5, 11):
            limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
            memlock = None if limit == resource.RLIM_INFINITY else limit
        return cls(bpfsys.possible_cpus(), available, source, memlock)


def _available_memory() -> tuple[int | None, str]:
    """Bytes this process may still allocate: its memory cgroup's room where it is
    limited, else the kernel's MemAvailable."""
    try:
        group = Path("/proc/self/cgroup").read_text().split("::", 1)[1].strip()
        folder = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit != "max":
            used = int((folder / "memory.current").read_text())
            return int(limit) - used, f"the memory cgroup {group} (memory.max)"
    except (OSError, IndexError, ValueError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "this machine's MemAvailable"
    except (OSError, ValueError):
        pass
    return None, "nothing"


def map_bytes(sizes: Mapping[str, int], needed: Mapping[str, int], cpus: int) -> int:
    """About the kernel memory the maps of `sizes` take with a policy of `needed` in
    both generations. Hash maps are allocated whole; the longest-prefix tries hold
    only what is written. The overheads per entry are the kernel's own account
    (`memlock` in each map's fdinfo) for a 100,000-rule policy on 6.18."""
    def entry(key: type[ctypes.Structure], value: type[ctypes.Structure], overhead: int) -> int:
        return ctypes.sizeof(key) + ctypes.sizeof(value) + overhead

    tries = (2 * needed.get("classes_v4", 0) * entry(abi.ClassV4Key, abi.ClassValue, 20)
             + 2 * needed.get("classes_v6", 0) * entry(abi.ClassV6Key, abi.ClassValue, 20)
             + 2 * needed.get("allowed", 0) * entry(abi.AllowKey, abi.RuleValue, 20))
    hashes = (sizes["ISOEBPF_MAX_EXCEPTIONS"] * entry(abi.ExceptionKey, abi.RuleValue, 72)
              + sizes["ISOEBPF_MAX_HAIRPINS"] * entry(abi.HairpinKey, abi.RuleValue, 72)
              + sizes["ISOEBPF_MAX_CONNECTIONS"] * entry(abi.FlowKey, abi.FlowState, 64)
              + sizes["ISOEBPF_MAX_FRAGMENTS"] * entry(abi.FragmentKey, abi.FragmentVerdict, 64))
    counters = sizes["ISOEBPF_MAX_RULES"] * (ctypes.sizeof(abi.Counter) * cpus + 8)
    return tries + hashes + counters


# Room for two generations (an update writes the next policy beside the one in
# force), and a quarter more, so that a policy may grow a little before it moves
# to larger maps.
HEADROOM = 2 * 5 / 4


def sizes_for(needed: Mapping[str, int], environ: Mapping[str, int] | None = None) -> dict[str, int]:
    """ISOEBPF_MAX_* for a program that holds a policy needing `needed` entries per map
    (`counters`: rule ids): powers of two with HEADROOM, never below the defaults, and
    never above what the environment sets."""
    bounds = environment_sizes() if environ is None else dict(environ)
    sizes = {**default_sizes(), **{m: v for m, v in bounds.items() if m not in SIZED_BY_POLICY}}
    for name, count in needed.items():
        macro = MAP_SIZE_MACROS[name]
        sizes[macro] = max(sizes[macro], 1 << max(0, math.ceil(count * HEADROOM) - 1).bit_length())
    for macro in SIZED_BY_POLICY & set(bounds):
        sizes[macro] = min(sizes[macro], bounds[macro])
    return sizes


def estimated_needs(policy_bytes: int) -> dict[str, int]:
    """What a policy file of `policy_bytes` may need at most, for a compile started before
    it is read: no rule is written in fewer than 40 bytes, and a rule names at most two
    classes and lists a few entries (a load whose policy needs more compiles again)."""
    rules = policy_bytes // 40
    return {"classes_v4": 2 * rules, "allowed": 2 * rules, "counters": rules + 64}


def refusals(needed: Mapping[str, int], sizes: Mapping[str, int],
             environ: Mapping[str, int] | None = None, machine: Machine | None = None) -> list[str]:
    """Every limit a policy needing `needed` entries per map exceeds with maps of `sizes`
    (sizes_for's): a bound the environment sets, the memory the machine has, and
    RLIMIT_MEMLOCK where the kernel charges maps to it; [] when there is none."""
    bounds = environment_sizes() if environ is None else dict(environ)
    machine = machine or Machine.here()
    found = []
    for name, count in needed.items():
        macro = MAP_SIZE_MACROS[name]
        if count > sizes[macro]:
            what = "rule ids (counters)" if name == "counters" else f"entries in map {name}"
            found.append(f"the policy needs {count} {what}, and {macro}={bounds[macro]} in the "
                         f"environment allows {sizes[macro]}: raise {macro} (or leave it unset: "
                         "the maps are sized for the policy) or simplify the policy")
    memory = map_bytes(sizes, needed, machine.cpus)
    mib = memory / 2**20
    if machine.available is not None and memory > machine.available:
        found.append(f"its maps need about {mib:.0f} MiB, and {machine.available_from} leaves "
                     f"{machine.available / 2**20:.0f} MiB")
    if machine.memlock is not None and memory > machine.memlock:
        found.append(f"its maps need about {mib:.0f} MiB, and RLIMIT_MEMLOCK allows "
                     f"{machine.memlock / 2**20:.0f} MiB (this kernel charges maps to it: "
                     "'ulimit -l' raises it)")
    return found


def refuse(needed: Mapping[str, int], sizes: Mapping[str, int]) -> None:
    found = refusals(needed, sizes)
    if found:
        raise BackendError("the policy exceeds what this machine allows; nothing was compiled, "
                           "nothing was changed:\n  " + "\n  ".join(found))


def needed_entries(ir: IR) -> dict[str, int]:
    """Entries `ir` takes in each policy map, as one generation; `counters`: rule slots."""
    return {
        "classes_v4": sum(c.network.version == 4 for c in ir.classes),
        "classes_v6": sum(c.network.version == 6 for c in ir.classes),
        "exceptions": len(ir.exceptions),
        "hairpins": sum(1 for o in ir.overlays if o.hairpin_rule),
        "allowed": len(ir.allowed),
        "counters": rule_slots(ir),
    }


def rule_slots(ir: IR) -> int:
    """Counter slots `ir` uses: rule ids run from 0 to the highest."""
    return max(r.id for r in ir.rules) + 1


def problems(ir: IR, capacity: Mapping[str, int], taken: Mapping[str, int],
             needed_by_map: Mapping[str, int] | None = None) -> list[str]:
    """Why `ir` does not fit maps of `capacity` (map -> max entries; `counters`:
    slots per generation) beside the `taken` entries of the policy in force,
    which stays until the new one is in place. Empty: it fits. `needed_by_map`:
    needed_entries(ir), where the caller has counted already."""
    found = []
    for name, needed in (needed_by_map or needed_entries(ir)).items():
        room, used = capacity[name], taken.get(name, 0)
        if needed + used <= room:
            continue
        macro = MAP_SIZE_MACROS[name]
        beside = f" beside the {used} of the policy in force" if used else ""
        what = "rule counters" if name == "counters" else f"entries in map {name}"
        found.append(f"the policy needs {needed} {what}{beside}, and the program holds {room} "
                     f"({macro} in the environment, if set, bounds it)")
    return found


def check(ir: IR, capacity: Mapping[str, int], taken: Mapping[str, int],
          needed: Mapping[str, int] | None = None) -> None:
    found = problems(ir, capacity, taken, needed)
    if found:
        raise CapacityError("the policy does not fit the program's maps; nothing was changed:\n  "
                            + "\n  ".join(found))


def sized(sizes: Mapping[str, int]) -> dict[str, int]:
    """Map name -> capacity, from ISOEBPF_MAX_* values (`counters`: rule slots per generation)."""
    return {name: sizes[macro] for name, macro in MAP_SIZE_MACROS.items()}
