"""The policy maps' keys and values, packed by struct for speed, are byte for
byte the ctypes layouts of abi (which mirror bpf/maps.h); and the plan from
one slot's entries to another's, without a kernel."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import pytest

from isoebpf import pipeline
from isoebpf.backends.ebpf import abi, entries

V6_ADDRESS = 0x2001_0db8_0000_0000_0000_0000_0000_0001
SLOTS = (0, 1)


def _lpm(key_type: type[ctypes.Structure], fixed: int, slot: int, prefixlen: int,
         address: int, size: int) -> bytes:
    key = key_type(fixed + prefixlen, slot)
    key.addr[:] = address.to_bytes(size, "big")
    return bytes(key)


def _allow(slot: int, bits: int, src: int, dst: int, proto: int, port: int) -> bytes:
    key = abi.AllowKey(abi.ALLOW_FIXED_BITS + bits, slot, src, dst, proto)
    key.port[:] = port.to_bytes(2, "big")
    return bytes(key)


@pytest.mark.parametrize("slot", SLOTS)
@pytest.mark.parametrize(("name", "fields", "expected"), [
    ("classes_v4", (24, 0x0A960100),
     lambda slot: _lpm(abi.ClassV4Key, abi.CLASS_FIXED_BITS, slot, 24, 0x0A960100, 4)),
    ("classes_v4", (0, 0), lambda slot: _lpm(abi.ClassV4Key, abi.CLASS_FIXED_BITS, slot, 0, 0, 4)),
    ("classes_v6", (128, V6_ADDRESS),
     lambda slot: _lpm(abi.ClassV6Key, abi.CLASS_FIXED_BITS, slot, 128, V6_ADDRESS, 16)),
    ("exceptions", (70000, 3), lambda slot: bytes(abi.ExceptionKey(slot, 70000, 3))),
    ("hairpins", (5,), lambda slot: bytes(abi.HairpinKey(slot, 5))),
    ("allowed", (40, 65537, 2, 6, 0xFF01), lambda slot: _allow(slot, 40, 65537, 2, 6, 0xFF01)),
    ("allowed", (8, 1, 2, 17, 0), lambda slot: _allow(slot, 8, 1, 2, 17, 0)),
])
def test_keys_pack_as_the_abi_structs(name: str, fields: tuple[int, ...],
                                      expected: Callable[[int], bytes], slot: int) -> None:
    assert entries.key_packer(name, slot)(fields) == expected(slot)


@pytest.mark.parametrize(("name", "fields", "expected"), [
    ("classes_v4", (70000, 9), abi.ClassValue(70000, 9)),
    ("classes_v6", (1, 2), abi.ClassValue(1, 2)),
    ("exceptions", (12,), abi.RuleValue(12)),
    ("hairpins", (13,), abi.RuleValue(13)),
    ("allowed", (2**32 - 1,), abi.RuleValue(2**32 - 1)),
])
def test_values_pack_as_the_abi_structs(name: str, fields: tuple[int, ...],
                                        expected: ctypes.Structure) -> None:
    assert entries.value_packer(name)(*fields) == bytes(expected)


@pytest.mark.parametrize("layout", [key for key, _ in entries.POLICY_MAPS.values()]
                         + [value for _, value in entries.POLICY_MAPS.values()])
def test_struct_layouts_are_derived_from_the_ctypes_ones(layout: type[ctypes.Structure]) -> None:
    packed, swapped = abi.packing(layout)
    assert packed.size == ctypes.sizeof(layout)
    # Only an LPM key's prefix length is a native integer among big-endian fields.
    assert swapped == (("prefixlen",) if layout.__name__.endswith("Key") and
                       layout._fields_[0][0] == "prefixlen" else ())


SEED = (Path(__file__).resolve().parents[2] / "examples" / "it-hr.yaml").read_text()
NARROWER = SEED.replace("ports: [tcp/80]", "ports: [tcp/80, tcp/443]")


def test_a_plan_writes_and_deletes_only_what_differs() -> None:
    before, after = (entries.tables_of(pipeline.loads(text).ir) for text in (SEED, NARROWER))
    plan = entries.diff(before, after)
    assert not plan.clear and set(plan.changes) == {"allowed"}
    assert plan.counts() == {"allowed": (1, 0)}
    (added,) = plan.changes["allowed"].write
    assert added not in before["allowed"] and after["allowed"][added] == before["allowed"][
        next(iter(before["allowed"]))]  # tcp/443 is counted under the same rule as tcp/80
    back = entries.diff(after, before)
    assert back.counts() == {"allowed": (0, 1)} and back.changes["allowed"].delete == [added]
    assert entries.diff(after, after).changes == {}


def test_a_plan_from_an_unknown_slot_clears_it_and_writes_everything() -> None:
    tables = entries.tables_of(pipeline.loads(SEED).ir)
    plan = entries.diff(None, tables)
    assert plan.clear
    assert plan.counts() == {name: (len(t), 0) for name, t in tables.items() if t}
