"""bpf/abi.h and control/abi.py must not drift: every constant, size, offset and byte order.

The header is parsed as text (it is kept plain for this), so the check needs
no compiler and no root.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from isoebpf.backends.ebpf import abi
from isoebpf.ir import tables as ir

pytestmark = pytest.mark.unit

BPF = Path(__file__).resolve().parents[2] / "bpf"
HEADER = (BPF / "abi.h").read_text(encoding="utf-8")

C_TYPES = {"__u8": (1, False), "__u16": (2, False), "__be16": (2, True), "__u32": (4, False),
           "__be32": (4, True), "__u64": (8, False)}
DEFINE = re.compile(r"^#define\s+([A-Z_0-9]+)\s+(\d+)\b", re.MULTILINE)
STRUCT = re.compile(r"^struct\s+(\w+)\s*\{(.*?)^\};", re.MULTILINE | re.DOTALL)
FIELD = re.compile(r"^\s*((?:struct\s+)?\w+)\s+(\w+)(?:\[(\d+)\])?;", re.MULTILINE)


def header_constants() -> dict[str, int]:
    return {name: int(value) for name, value in DEFINE.findall(HEADER)}


def header_structs() -> dict[str, list[tuple[str, str, int]]]:
    """struct name -> [(type, field, count)] in order."""
    return {name: [(t, f, int(n or 1)) for t, f, n in FIELD.findall(body)]
            for name, body in STRUCT.findall(HEADER)}


def c_layout(fields: list[tuple[str, str, int]]) -> tuple[list[tuple[str, int, int, bool]], int]:
    """(field, offset, size, big-endian) with natural alignment, and the struct size.
    A field of an earlier struct of the header takes that struct's size and alignment."""
    offset, align, layout = 0, 1, []
    for ctype, name, count in fields:
        if ctype.startswith("struct"):
            inner = header_structs()[ctype.split()[1]]
            size, big = c_layout(inner)[1], False
            field_align = max(C_TYPES[t][0] for t, _, _ in inner)
        else:
            (size, big), field_align = C_TYPES[ctype], C_TYPES[ctype][0]
        offset = (offset + field_align - 1) // field_align * field_align
        layout.append((name, offset, size * count, big))
        offset += size * count
        align = max(align, field_align)
    return layout, (offset + align - 1) // align * align


def test_every_constant_of_the_header_is_mirrored() -> None:
    constants = header_constants()
    assert constants, "no #define parsed from abi.h"
    for name, value in constants.items():
        assert getattr(abi, name, None) == value, f"abi.h {name}={value}, abi.py {getattr(abi, name, None)}"


def test_fixed_rule_ids_equal_the_compilers() -> None:
    constants = header_constants()
    fixed = {name: value for name, value in vars(ir).items() if name.startswith("RULE_")}
    assert fixed and all(constants[name] == value for name, value in fixed.items())
    assert constants["FIRST_POLICY_RULE"] == ir.FIRST_POLICY_RULE
    assert {constants[name] for name in fixed} == set(ir.FIXED_RULES)
    assert (constants["PROTO_ICMP"], constants["PROTO_TCP"], constants["PROTO_UDP"]) == (
        ir.PROTO_ICMP, ir.PROTO_TCP, ir.PROTO_UDP)
    assert constants["ALLOW_FIXED_BITS"] + ir.PROTO_BITS + ir.PORT_BITS <= 8 * 16  # fits the LPM data


def test_actions_cover_the_irs() -> None:
    assert set(abi.ACTIONS) == {"allow", "drop", "reject"}
    assert {abi.ACTIONS[n]: n for n in abi.ACTIONS} == abi.ACTION_NAMES


@pytest.mark.parametrize("name", sorted(header_structs()))
def test_struct_layout(name: str) -> None:
    mirror = abi.STRUCTS.get(name)
    assert mirror is not None, f"struct {name} of abi.h has no mirror in abi.STRUCTS"
    layout, size = c_layout(header_structs()[name])
    assert ctypes.sizeof(mirror) == size, f"{name}: {ctypes.sizeof(mirror)} bytes, header {size}"
    python_fields = [f[0] for f in mirror._fields_]
    assert python_fields == [f[0] for f in layout], f"{name}: fields differ"
    types = dict((f[0], f[1]) for f in mirror._fields_)
    for field, offset, nbytes, big in layout:
        described = getattr(mirror, field)
        assert (described.offset, described.size) == (offset, nbytes), f"{name}.{field}"
        is_big = types[field].__name__.endswith("_be")
        assert is_big == big, f"{name}.{field}: byte order differs from the header"


def test_every_mirror_is_in_the_header() -> None:
    assert set(abi.STRUCTS) == set(header_structs())


def test_map_names_are_the_programs() -> None:
    maps_h = (BPF / "maps.h").read_text(encoding="utf-8")
    names = re.findall(r"^BPF_(?:F_TABLE|TABLE)\(\"\w+\",\s*[^,]+,\s*[^,]+,\s*(\w+)|"
                       r"^BPF_(?:ARRAY|HASH|PERCPU_ARRAY|RINGBUF_OUTPUT|PROG_ARRAY)\((\w+)", maps_h, re.MULTILINE)
    in_order = [a or b for a, b in names]
    assert tuple(in_order) == abi.MAP_NAMES
    assert all(len(name) < 16 for name in abi.MAP_NAMES)  # BPF_OBJ_NAME_LEN
    for name, macro in abi.MAP_SIZE_MACROS.items():
        declaration = next(line for line in maps_h.splitlines() if re.search(rf"\b{name}\b", line)
                           and line.startswith("BPF_"))
        following = maps_h[maps_h.index(declaration):].split(";")[0]
        assert macro in following, f"map {name} is not sized by {macro}"
