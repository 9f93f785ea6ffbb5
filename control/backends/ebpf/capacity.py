"""eBPF backend, pure half: how big the program's maps are made, and whether a policy fits.

Map sizes are compile-time constants (the ISOEBPF_MAX_* of bpf/abi.h and
bpf/maps.h). A first load sizes the policy maps and the counters from the
policy it loads (`sizes_for`): room for two generations, and a quarter more,
never below the headers' defaults; the ISOEBPF_MAX_* of the environment only
bound them. A policy beyond a bound, beyond what the kernel holds in a map, or
beyond the memory there is (the room its memory cgroups leave, MemAvailable,
and RLIMIT_MEMLOCK where the kernel still charges maps to it) is refused before
anything is compiled, in one message naming every limit (`refusals`). An
update that needs more than the maps in force hold beside the policy in force
raises CapacityError before a single entry is written (`check`): the backend
then moves it to new maps. Pure but for reading the machine's limits.

Asked by `program` (updates) and `backend` (a first load); reads bpf/ for the default sizes.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import resource
from collections.abc import Collection, Mapping
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
    def here(cls, proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> Machine:
        """`proc` and `cgroups`: where the kernel's files are read (a test's own tree)."""
        available, source = available_memory(proc, cgroups)
        memlock = None
        if tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2]) < (5, 11):
            limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
            memlock = None if limit == resource.RLIM_INFINITY else limit
        return cls(bpfsys.possible_cpus(), available, source, memlock)


# A memory cgroup's files: cgroup v2, then v1. The page cache a cgroup holds counts in its
# usage, but the kernel reclaims it for a new map: its inactive part is counted as room.
_CGROUP_FILES = (("memory.max", "memory.current", "inactive_file"),
                 ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))
_NO_LIMIT = 1 << 62  # v1 writes "no limit" as the largest page-aligned long


def available_memory(proc: Path, cgroups: Path) -> tuple[int | None, str]:
    """Bytes this process may still allocate, and where that was read: the least room
    any memory cgroup it is in leaves (its own, or an ancestor's; v2 or v1), or the
    machine's MemAvailable where that is less."""
    found: list[tuple[int, str]] = []
    try:
        for line in (proc / "self" / "cgroup").read_text().splitlines():
            _, controllers, group = line.split(":", 2)
            if controllers == "":
                mounts = [cgroups, cgroups / "unified"]  # v2 alone, or beside v1
            elif "memory" in controllers.split(","):
                mounts = [cgroups / "memory"]
            else:
                continue
            found += _cgroup_rooms(mounts, Path(group))
    except (OSError, ValueError):
        pass
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "this machine's MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        return None, "nothing"
    return min(found)


def _cgroup_rooms(mounts: list[Path], group: Path) -> list[tuple[int, str]]:
    """What each limited level of `group`, from itself up, leaves."""
    rooms = []
    for level in (group, *group.parents):
        for mount in mounts:
            folder = mount / str(level).lstrip("/")
            for limit_file, usage_file, inactive_key in _CGROUP_FILES:
                try:
                    limit = (folder / limit_file).read_text().strip()
                    if limit == "max" or int(limit) >= _NO_LIMIT:
                        continue
                    used = int((folder / usage_file).read_text())
                    stat = dict(line.split() for line in (folder / "memory.stat").read_text()
                                .splitlines() if line.count(" ") == 1)
                except (OSError, ValueError):
                    continue
                room = int(limit) - used + int(stat.get(inactive_key, 0))
                rooms.append((max(0, room), f"the memory cgroup {level} ({limit_file})"))
    return rooms


def map_bytes(sizes: Mapping[str, int], needed: Mapping[str, int], cpus: int,
              shared: Collection[str] = ()) -> int:
    """About the kernel memory the maps of `sizes` take with a policy of `needed` in
    both generations; `shared`: maps taken over from a running program, which cost
    nothing new. Hash maps are allocated whole; the longest-prefix tries hold only
    what is written. The overheads per entry are the kernel's own account (`memlock`
    in each map's fdinfo) for a 100,000-rule policy on 6.18."""
    def entry(key: type[ctypes.Structure], value: type[ctypes.Structure], overhead: int) -> int:
        return ctypes.sizeof(key) + ctypes.sizeof(value) + overhead

    tries = (2 * needed.get("classes_v4", 0) * entry(abi.ClassV4Key, abi.ClassValue, 20)
             + 2 * needed.get("classes_v6", 0) * entry(abi.ClassV6Key, abi.ClassValue, 20)
             + 2 * needed.get("allowed", 0) * entry(abi.AllowKey, abi.RuleValue, 20))
    hashes = (sizes["ISOEBPF_MAX_EXCEPTIONS"] * entry(abi.ExceptionKey, abi.RuleValue, 72)
              + sizes["ISOEBPF_MAX_HAIRPINS"] * entry(abi.HairpinKey, abi.RuleValue, 72)
              + ("conntrack" not in shared)
              * sizes["ISOEBPF_MAX_CONNECTIONS"] * entry(abi.FlowKey, abi.FlowEntry, 64)
              + ("fragments" not in shared)
              * sizes["ISOEBPF_MAX_FRAGMENTS"] * entry(abi.FragmentKey, abi.FragmentVerdict, 64))
    counters = sizes["ISOEBPF_MAX_RULES"] * (ctypes.sizeof(abi.Counter) * cpus + 8)
    return tries + hashes + counters


# Room for two generations (an update writes the next policy beside the one in
# force), and a quarter more, so that a policy may grow a little before it moves
# to larger maps.
HEADROOM = 2 * 5 / 4

# The most entries the kernel holds in a map of each kind, whatever the memory
# (bpf(2) answers E2BIG): max_entries is a u32; a hash table's buckets (16 bytes
# each, a power of two of them) must span fewer than 2^32 bytes, so 2^27 entries
# (measured on 6.18); a per-CPU array's index rounds up to a power of two in a u32.
KERNEL_LIMITS = {
    "ISOEBPF_MAX_CLASSES": (2**32 - 1, "an LPM trie"),
    "ISOEBPF_MAX_ALLOWED": (2**32 - 1, "an LPM trie"),
    "ISOEBPF_MAX_EXCEPTIONS": (2**27, "a hash map"),
    "ISOEBPF_MAX_HAIRPINS": (2**27, "a hash map"),
    "ISOEBPF_MAX_CONNECTIONS": (2**27, "an LRU hash map"),
    "ISOEBPF_MAX_FRAGMENTS": (2**27, "an LRU hash map"),
    "ISOEBPF_MAX_RULES": (2**31, "a per-CPU array"),
}


def sizes_for(needed: Mapping[str, int], environ: Mapping[str, int] | None = None) -> dict[str, int]:
    """ISOEBPF_MAX_* for a program that holds a policy needing `needed` entries per map
    (`counters`: rule ids): powers of two with HEADROOM, never below the defaults, and
    never above what the environment sets or the kernel holds (KERNEL_LIMITS)."""
    bounds = environment_sizes() if environ is None else dict(environ)
    sizes = {**default_sizes(), **{m: v for m, v in bounds.items() if m not in SIZED_BY_POLICY}}
    for name, count in needed.items():
        macro = MAP_SIZE_MACROS[name]
        sizes[macro] = max(sizes[macro], 1 << max(0, math.ceil(count * HEADROOM) - 1).bit_length())
    for macro in SIZED_BY_POLICY:
        sizes[macro] = min(sizes[macro], bounds.get(macro, sizes[macro]), KERNEL_LIMITS[macro][0])
    return sizes


def estimated_needs(policy_bytes: int) -> dict[str, int]:
    """What a policy file of `policy_bytes` may need at most, for a compile started before
    it is read: no rule is written in fewer than 40 bytes, and a rule names at most two
    classes and lists a few entries (a load whose policy needs more compiles again)."""
    rules = policy_bytes // 40
    return {"classes_v4": 2 * rules, "allowed": 2 * rules, "counters": rules + 64}


def refusals(needed: Mapping[str, int], sizes: Mapping[str, int],
             environ: Mapping[str, int] | None = None, machine: Machine | None = None,
             shared: Collection[str] = ()) -> list[str]:
    """Every limit a policy needing `needed` entries per map exceeds with maps of `sizes`
    (sizes_for's): a bound the environment sets, the most the kernel holds in a map,
    the memory the machine has, and RLIMIT_MEMLOCK where the kernel charges maps to
    it; [] when there is none. `shared`: as for map_bytes."""
    bounds = environment_sizes() if environ is None else dict(environ)
    machine = machine or Machine.here()
    found = []
    for name, count in needed.items():
        macro = MAP_SIZE_MACROS[name]
        limit, kind = KERNEL_LIMITS[macro]
        what = "rule ids (counters)" if name == "counters" else f"entries in map {name}"
        if count > bounds.get(macro, count):
            found.append(f"the policy needs {count} {what}, and {macro}={bounds[macro]} in the "
                         f"environment allows {bounds[macro]}: raise {macro} (or leave it unset: "
                         "the maps are sized for the policy) or simplify the policy")
        if count > limit:
            found.append(f"the policy needs {count} {what}, and the kernel holds at most {limit} "
                         f"entries in {kind}: simplify the policy")
    for macro in sorted(set(bounds) - SIZED_BY_POLICY):
        limit, kind = KERNEL_LIMITS[macro]
        if bounds[macro] > limit:
            found.append(f"{macro}={bounds[macro]} in the environment asks for more entries than "
                         f"the kernel holds in {kind} ({limit}): lower it")
    memory = map_bytes(sizes, needed, machine.cpus, shared)
    mib = memory / 2**20
    if machine.available is not None and memory > machine.available:
        found.append(f"its maps need about {mib:.0f} MiB, and {machine.available_from} leaves "
                     f"{machine.available / 2**20:.0f} MiB")
    if machine.memlock is not None and memory > machine.memlock:
        found.append(f"its maps need about {mib:.0f} MiB, and RLIMIT_MEMLOCK allows "
                     f"{machine.memlock / 2**20:.0f} MiB (this kernel charges maps to it: "
                     "'ulimit -l' raises it)")
    return found


def refuse(needed: Mapping[str, int], sizes: Mapping[str, int], shared: Collection[str] = ()) -> None:
    found = refusals(needed, sizes, shared=shared)
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
