"""iptables backend, pure half: the text of `iptables-save` and `ipset save` as plain values.

What `importer` reads a hand-built layout from, and what `backend` reads our own
layout back from (the drift check, the counters). No kernel, no I/O: text in,
rules and sets out, with warnings for what it cannot read.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from ...errors import Diagnostic
from .layout import TAG


@dataclass(frozen=True)
class Element:
    fields: tuple[str, ...]  # one per dimension: "10.0.0.0/8", "tcp:80-90", a set name
    comment: str | None
    line: int
    packets: int = 0  # per-element counters, when the set has them
    bytes: int = 0


@dataclass
class SavedSet:
    name: str
    type: str
    version: int
    line: int
    maxelem: int = 65536
    elements: list[Element] = field(default_factory=list)


@dataclass(frozen=True)
class SetMatch:
    name: str
    dirs: tuple[str, ...]  # ("src",), ("src", "dst"), ("src", "dst", "dst")
    negated: bool


@dataclass(frozen=True)
class Rule:
    """One iptables rule, as far as an isolation layout uses iptables."""

    chain: str
    line: int
    src: str | None = None
    dst: str | None = None
    proto: str | None = None
    sets: tuple[SetMatch, ...] = ()
    dports: tuple[tuple[int, int], ...] = ()
    ctstate: frozenset[str] = frozenset()
    icmp_type: str | None = None
    comment: str | None = None
    target: str | None = None
    unknown: tuple[str, ...] = ()  # options this reader does not model

    @property
    def tag(self) -> str | None:
        """Our rule name when isoebpf wrote the rule ("allow:0", "default", ...)."""
        words = (self.comment or "").split()
        return words[1] if len(words) > 1 and words[0] == TAG else None

    @property
    def unconditional(self) -> bool:
        return not (self.src or self.dst or self.proto or self.sets or self.dports
                    or self.ctstate or self.icmp_type or self.unknown)


class Notes:
    """Warnings about the saved text, each once."""

    def __init__(self) -> None:
        self.found: list[Diagnostic] = []

    def warn(self, where: str, line: int, message: str) -> None:
        note = Diagnostic(where, line, 1, "warning", message)
        if note not in self.found:  # an entry with two bad fields is one finding
            self.found.append(note)


def parse_ipset_save(text: str, where: str, notes: Notes) -> dict[str, SavedSet]:
    """Sets from `ipset save` text; malformed lines become warnings."""
    sets: dict[str, SavedSet] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError as err:
            notes.warn(where, number, f"cannot read '{line}' ({err}); left out")
            continue
        words = [w for w in words if w not in ("-exist", "-!")]
        command = words[0].lstrip("-")
        if command in ("create", "N", "n") and len(words) >= 3:
            family = _option(words, "family") or "inet"
            sets[words[1]] = SavedSet(words[1], words[2], 6 if family == "inet6" else 4, number,
                                      int(_option(words, "maxelem") or 65536))
        elif command in ("add", "A", "a") and len(words) >= 3:
            target = sets.get(words[1])
            if target is None:
                notes.warn(where, number, f"'add {words[1]}' before 'create {words[1]}'; left out")
                continue
            if "nomatch" in words[3:]:
                notes.warn(where, number, f"'nomatch' entries are not supported; {words[2]} left out")
                continue
            target.elements.append(Element(
                tuple(words[2].split(",")), _option(words[3:], "comment"), number,
                int(_option(words[3:], "packets") or 0), int(_option(words[3:], "bytes") or 0)))
        else:
            notes.warn(where, number, f"'{line}' is not a create or add line; left out")
    return sets


def _option(words: list[str], name: str) -> str | None:
    """The value after `name` in an ipset line's options."""
    for i, word in enumerate(words[:-1]):
        if word == name:
            return words[i + 1]
    return None


def parse_iptables_save(text: str, where: str, notes: Notes) -> dict[str, list[Rule]]:
    """The filter table's chains, rules in order (`-A`, and `-I` as iptables inserts)."""
    chains: dict[str, list[Rule]] = {}
    table = "filter"
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
            continue
        if table != "filter" or not line or line.startswith(("#", "COMMIT")):
            continue
        if line.startswith(":"):
            chains.setdefault(line[1:].split()[0], [])
            continue
        line = re.sub(r"^\[\d+:\d+\]\s+", "", line)
        try:
            words = shlex.split(line)
        except ValueError as err:
            notes.warn(where, number, f"cannot read '{line}' ({err}); left out")
            continue
        if len(words) < 2 or words[0] not in ("-A", "-I"):
            notes.warn(where, number, f"'{line}' is neither -A nor -I; left out")
            continue
        position = None
        rest = words[2:]
        if words[0] == "-I" and rest and rest[0].isdigit():
            position, rest = int(rest[0]), rest[1:]
        rule = _parse_rule(words[1], number, rest)
        rules = chains.setdefault(words[1], [])
        if words[0] == "-A":
            rules.append(rule)
        else:
            rules.insert((position or 1) - 1, rule)
    return chains


def _parse_rule(chain: str, line: int, words: list[str]) -> Rule:
    values: dict[str, object] = {}
    sets: list[SetMatch] = []
    unknown: list[str] = []
    negate = False
    i = 0
    while i < len(words):
        word = words[i]
        arg = words[i + 1] if i + 1 < len(words) else ""
        i += 2
        if word == "!":
            negate = True
            i -= 1
            continue
        if word == "--match-set":
            sets.append(SetMatch(arg, tuple(words[i].split(",")) if i < len(words) else (), negate))
            i += 1
        elif negate:
            unknown.append(f"! {word} {arg}")
        elif word in ("-s", "--source"):
            values["src"] = arg
        elif word in ("-d", "--destination"):
            values["dst"] = arg
        elif word in ("-p", "--protocol"):
            values["proto"] = arg
        elif word in ("-m", "--match", "--reject-with"):
            pass  # modules load with their options; how a REJECT answers is not policy
        elif word in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            values["dports"] = tuple(_port_range(p) for p in arg.split(","))
        elif word in ("--ctstate", "--state"):
            values["ctstate"] = frozenset(arg.split(","))
        elif word in ("--icmp-type", "--icmpv6-type"):
            values["icmp_type"] = arg
        elif word == "--comment":
            values["comment"] = arg
        elif word in ("-j", "--jump"):
            values["target"] = arg
        else:
            unknown.append(f"{word} {arg}".strip())
        negate = False
    return Rule(chain, line, sets=tuple(sets), unknown=tuple(unknown), **values)  # type: ignore[arg-type]


def _port_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low or 0), int(high or (low if not text.endswith(":") else 65535))
