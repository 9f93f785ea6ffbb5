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

from ...ir.compiler import Delta
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


Key = tuple[int, ...]
Value = tuple[int, ...]


@dataclass(frozen=True)
class MapChange:
    """What one map's slot needs: keys to delete, and entries to write (new or changed)."""

    delete: list[Key]
    write: dict[Key, Value]


@dataclass(frozen=True)
class Plan:
    """What turns the entries a slot holds into the ones it must hold."""

    changes: dict[str, MapChange]  # maps that change only
    clear: bool = False  # what the slot holds is unknown: delete all of it first

    def counts(self) -> dict[str, tuple[int, int]]:
        """Map -> (entries written, entries deleted); with `clear`, deleted counts only what
        is known to go (the rest of an unknown slot goes too)."""
        return {name: (len(c.write), len(c.delete)) for name, c in self.changes.items()}

    @property
    def takes_away(self) -> bool:
        """Does it delete or clear anything: may a connection lose what allowed it?"""
        return self.clear or any(c.delete for c in self.changes.values())


def diff(have: Tables | None, want: Tables) -> Plan:
    """The plan from `have` (None: unknown) to `want`. Pure."""
    if have is None:
        return Plan({name: MapChange([], dict(table)) for name, table in want.items() if table},
                    clear=True)
    changes = {}
    for name, table in want.items():
        before = have.get(name, {})
        if before == table:  # one dict comparison, in C: most maps of a small change
            continue
        # Comprehensions, not set operations on items(): no set of 100k pairs to build.
        changes[name] = MapChange([key for key in before if key not in table],
                                  {key: value for key, value in table.items()
                                   if before.get(key) != value})
    return Plan(changes)


def then(first: Plan, second: Plan) -> Plan:
    """One plan doing `first`, then `second` (a slot two changes behind catches up)."""
    changes = {name: MapChange(list(c.delete), dict(c.write)) for name, c in first.changes.items()}
    for name, change in second.changes.items():
        done = changes.setdefault(name, MapChange([], {}))
        gone = set(change.delete)
        for key in gone:
            done.write.pop(key, None)
        kept = [key for key in done.delete if key not in change.write]
        already = set(kept)
        done.delete[:] = kept + [key for key in change.delete if key not in already]
        done.write.update(change.write)
    return Plan(changes, first.clear or second.clear)


def plan_of(delta: Delta) -> Plan:
    """A compiled change (ir.compiler.Delta) as the policy maps' entries."""
    classes: dict[int, MapChange] = {4: MapChange([], {}), 6: MapChange([], {})}
    for version, address, length in delta.classes_deleted:
        classes[version].delete.append((length, address))
    for (version, address, length), value in delta.classes_written.items():
        classes[version].write[(length, address)] = value
    changes = {
        "classes_v4": classes[4],
        "classes_v6": classes[6],
        "exceptions": MapChange(list(delta.exceptions_deleted),
                                {key: (rule,) for key, rule in delta.exceptions_written.items()}),
        "allowed": MapChange(list(delta.allowed_deleted),
                             {key: (rule,) for key, rule in delta.allowed_written.items()}),
    }
    return Plan({name: c for name, c in changes.items() if c.delete or c.write})


@dataclass(frozen=True)
class Change:
    """What an update changes of the live generation, where a compiled difference
    says it: the plan of entries, and the entries per map afterwards (`counters`:
    one past the highest rule id), for the capacity check."""

    plan: Plan
    sizes: dict[str, int]


def change_of(delta: Delta) -> Change:
    sizes = {name: n for name, n in delta.sizes.items() if name in POLICY_MAPS}
    return Change(plan_of(delta), {**sizes, "counters": delta.sizes["rules"]})


def to_plain(plan: Plan) -> dict[str, tuple[list[Key], dict[Key, Value]]]:
    """For marshal: the slot files keep plans (see program.SlotFiles)."""
    return {name: (c.delete, c.write) for name, c in plan.changes.items()}


def from_plain(plain: dict[str, tuple[list[Key], dict[Key, Value]]]) -> Plan:
    return Plan({name: MapChange(list(delete), dict(write)) for name, (delete, write) in plain.items()})


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
