"""eBPF backend, pure half: whether a policy fits the eBPF program's maps, decided before anything changes.

Map sizes are compile-time constants (the ISOEBPF_MAX_* of bpf/abi.h and
bpf/maps.h, overridable from the environment of the command that compiles).
A policy that needs more entries than a map holds is refused with the map, the
count, the limit and the constant to raise, before the program is compiled
(first load) or before a single entry is written (update): the policy in force
stays as it is. Pure: the backend supplies the sizes and what is taken.

Asked by `program` (updates) and `backend` (a first load); reads bpf/ for the default sizes.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ...errors import BackendError
from ...ir.tables import IR
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
    """The ISOEBPF_MAX_* the environment overrides, checked."""
    chosen = {}
    for macro in sorted(set(MAP_SIZE_MACROS.values())):
        text = environ.get(macro)
        if text is not None:
            if not text.isdigit() or int(text) < 1:
                raise BackendError(f"{macro}={text!r} in the environment: give a positive number")
            chosen[macro] = int(text)
    return chosen


def planned_sizes() -> dict[str, int]:
    """The sizes a program compiled now would get: the defaults, then the environment."""
    return {**default_sizes(), **environment_sizes()}


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
        # Raised, the map must hold two generations of this policy during an update.
        suggested = 1 << (2 * needed - 1).bit_length()
        beside = f" beside the {used} of the policy in force" if used else ""
        what = "rule counters" if name == "counters" else f"entries in map {name}"
        found.append(f"the policy needs {needed} {what}{beside}, and the program holds {room}: "
                     f"raise {macro} ('isoebpf unload', then '{macro}={suggested} isoebpf load "
                     "...'; sizes are fixed when the program is compiled) or simplify the policy")
    return found


def check_first_load(ir: IR) -> None:
    """Refuse `ir` if it cannot fit the maps of a program compiled now."""
    check(ir, sized(planned_sizes()), {})


def check(ir: IR, capacity: Mapping[str, int], taken: Mapping[str, int],
          needed: Mapping[str, int] | None = None) -> None:
    found = problems(ir, capacity, taken, needed)
    if found:
        raise BackendError("the policy does not fit the program's maps; nothing was changed:\n  "
                           + "\n  ".join(found))


def sized(sizes: Mapping[str, int]) -> dict[str, int]:
    """Map name -> capacity, from ISOEBPF_MAX_* values (`counters`: rule slots per generation)."""
    return {name: sizes[macro] for name, macro in MAP_SIZE_MACROS.items()}
