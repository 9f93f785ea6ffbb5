"""eBPF backend, pure half: the policy maps' entries as plain values, how they pack, and
the plan that turns what a slot holds into what it must hold.

`tables_of(ir)` says what a slot must hold; `diff(have, want)` says which entries to
delete and which to write (as tubular's diffBindings does); `program` writes a plan
into a slot and decides nothing. `load --dry-run` shows the plan against the live
generation, and tests check plans without a kernel. Packing follows `abi`'s
layouts, which mirror bpf/maps.h.
"""

from __future__ import annotations

import ctypes
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ...ir.tables import IR
from . import abi

# The maps that hold policy tables, each keyed by slot (generation & 1): name ->
# (key layout, value layout).
POLICY_MAPS: dict[str, tuple[type[ctypes.Structure], type[ctypes.Structure]]] = {
    "classes_v4": (abi.ClassV4Key, abi.ClassValue),
    "classes_v6": (abi.ClassV6Key, abi.ClassValue),
    "exceptions": (abi.ExceptionKey, abi.RuleValue),
    "hairpins": (abi.HairpinKey, abi.RuleValue),
    "allowed": (abi.AllowKey, abi.RuleValue),
}

# A slot's policy tables as plain values, so that two policies compare entry by
# entry: map name -> {key fields (without the slot): value fields}.
Tables = dict[str, dict[tuple[int, ...], tuple[int, ...]]]

_ALLOW_KEY_FIELDS = operator.attrgetter("match_bits", "src_class", "dst_class", "proto", "port")


def tables_of(ir: IR) -> Tables:
    """The entries `ir` takes in each policy map, without the slot."""
    classes: dict[int, dict[tuple[int, ...], tuple[int, ...]]] = {4: {}, 6: {}}
    for c in ir.classes:
        network = c.network  # a policy CIDR: no host bits, so its value is its first address
        classes[network.version][(network.prefixlen, network.value)] = (c.class_id, c.overlay_id)
    return {
        "classes_v4": classes[4],
        "classes_v6": classes[6],
        "exceptions": {(e.src_class, e.dst_class): (e.rule,) for e in ir.exceptions},
        "hairpins": {(o.id,): (o.hairpin_rule,) for o in ir.overlays if o.hairpin_rule},
        "allowed": {_ALLOW_KEY_FIELDS(a): (a.rule,) for a in ir.allowed},
    }


def entry_counts(tables: Tables) -> dict[str, int]:
    return {name: len(table) for name, table in tables.items()}


@dataclass(frozen=True)
class MapChange:
    """What one map's slot needs: keys to delete, and keys whose value to write."""

    delete: list[tuple[int, ...]]
    write: list[tuple[int, ...]]


@dataclass(frozen=True)
class Plan:
    """Turning a slot that holds `have` into one that holds `want`."""

    want: Tables
    changes: dict[str, MapChange]  # maps that change only
    clear: bool  # what the slot holds is unknown: delete all of it first, then write all

    def counts(self) -> dict[str, tuple[int, int]]:
        """Map -> (entries written, entries deleted); with `clear`, deleted counts only what
        is known to go (the rest of an unknown slot goes too)."""
        return {name: (len(c.write), len(c.delete)) for name, c in self.changes.items()}


def diff(have: Tables | None, want: Tables) -> Plan:
    """The plan from `have` (None: unknown) to `want`. Pure."""
    if have is None:
        return Plan(want, {name: MapChange([], list(table)) for name, table in want.items() if table},
                    clear=True)
    changes = {}
    for name, table in want.items():
        before = have.get(name, {})
        if before == table:  # one dict comparison, in C: most maps of a small change
            continue
        # Comprehensions, not set operations on items(): no set of 100k pairs to build.
        changes[name] = MapChange([key for key in before if key not in table],
                                  [key for key, value in table.items() if before.get(key) != value])
    return Plan(want, changes, clear=False)


# Keys and values pack by struct in abi's layouts (abi.packing derives them from the
# ctypes structs): a ctypes object per entry cost 7 us, which made writing 100k
# entries take seconds. The LPM keys' prefix length is a native u32 among
# big-endian fields, so it is swapped before packing.
_NATIVE_U32_AS_BIG = tuple(int.from_bytes(n.to_bytes(4, sys.byteorder), "big") for n in range(256))
_KEYS = {name: abi.packing(key)[0] for name, (key, _) in POLICY_MAPS.items()}
_VALUES = {name: abi.packing(value)[0] for name, (_, value) in POLICY_MAPS.items()}
_LOW64 = 2**64 - 1


def key_packer(name: str, slot: int) -> Callable[[tuple[int, ...]], bytes]:
    """fields -> the packed key of map `name` in `slot` (fields as in Tables)."""
    pack = _KEYS[name].pack
    swapped = _NATIVE_U32_AS_BIG
    if name == "classes_v4":
        return lambda f: pack(swapped[abi.CLASS_FIXED_BITS + f[0]], slot, f[1])
    if name == "classes_v6":
        return lambda f: pack(swapped[abi.CLASS_FIXED_BITS + f[0]], slot, f[1] >> 64, f[1] & _LOW64)
    if name == "allowed":
        return lambda f: pack(swapped[abi.ALLOW_FIXED_BITS + f[0]], slot, *f[1:])
    return lambda f: pack(slot, *f)


def value_packer(name: str) -> Callable[..., bytes]:
    """value fields -> the packed value of map `name`."""
    return _VALUES[name].pack
