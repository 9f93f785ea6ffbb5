"""iptables backend, pure half: a hand-built DC/OS-style iptables + ipset layout, read back
into a policy file (`isoebpf import`).

Pure: it reads the text of `iptables-save` (and `ip6tables-save`) and of
`ipset save` (or an `ipset restore` file: the same format), never the kernel;
`saved` parses those texts, `layout` names what our own layout looks like, and
the policy it writes is checked by `isoebpf.pipeline`.

What the layout *meant* becomes the policy; where the layout does something
else today, a warning says so and says what will change once isoebpf enforces
the policy. The guide's own example is the model case: its allow rules and its
RELATED,ESTABLISHED rule sit after the final REJECT (dead), its `overlays` set
is never filled (the jump never matches, so nothing is filtered), and one
subnet is written `192.168.0.0./16` (ipset refuses it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import netaddr

from ... import pipeline
from ...errors import Diagnostic, IsoebpfError, PolicyError
from ...policy.cidr import parse_cidr
from .layout import (
    ALLOWING_TARGETS,
    NET,
    NET_NET,
    NET_PORT_NET,
    SET_PREFIX,
    target_action,
)
from .saved import Notes, Rule, SavedSet, parse_ipset_save, parse_iptables_save

LIST_SET = "list:set"
RESERVED = ("dcos-", "mesos-")
RULE_COMMENT = re.compile(r"(allow|exception):(\d+)\Z")
PORT_FIELD = re.compile(r"(?:(tcp|udp):)?(\d+)(?:-(\d+))?\Z")


class LayoutError(IsoebpfError):
    """The saved rules are not a layout this importer can read."""


@dataclass(frozen=True)
class Imported:
    text: str  # the policy file
    warnings: list[Diagnostic]


# -- the policy they mean ----------------------------------------------------------------


@dataclass
class _Overlay:
    name: str
    subnets: list[netaddr.IPNetwork] = field(default_factory=list)
    # The families a hairpin rule was read in (as in _Allow): isoebpf's per-family
    # sets (dcos.o1, dcos6.o1) make a hairpin in one family's file that family's alone.
    hairpin: set[int | None] = field(default_factory=set)


@dataclass(frozen=True)
class _Allow:
    src: str
    dst: str
    ports: tuple[str, ...]  # () means every protocol and port
    order: tuple[float, int]  # (rule index named in a comment, or inf; position)
    family: int | None = None  # read from one family's sets of overlays that have both


class _Importer:
    def __init__(self, sets: dict[str, SavedSet], set_file: str, notes: Notes) -> None:
        self.sets = sets
        self.set_file = set_file
        self.notes = notes
        self.overlays: dict[str, _Overlay] = {}  # by overlay name
        self.overlay_of_set: dict[str, str | None] = {}  # None: not usable as an overlay
        self.allows: list[_Allow] = []
        # (src, dst) -> the families it was read in (as in _Allow), in the order first read
        self.exceptions: dict[tuple[str, str], set[int | None]] = {}
        self.default: str | None = None  # "allow" | "reject" | "drop"
        self.position = 0

    # overlays are the hash:net sets the layout uses as one
    def overlay_for(self, set_name: str, where: str, line: int) -> str | None:
        if set_name in self.overlay_of_set:
            return self.overlay_of_set[set_name]
        saved = self.sets.get(set_name)
        self.overlay_of_set[set_name] = None
        if saved is None:
            self.notes.warn(where, line, f"set '{set_name}' is not in {self.set_file}; "
                                         "its rules are left out")
            return None
        if saved.type != NET:
            self.notes.warn(where, line, f"set '{set_name}' is {saved.type}, not hash:net: "
                                         "it cannot stand for an overlay; its rules are left out")
            return None
        name = self._name(set_name)
        overlay = self.overlays.setdefault(name, _Overlay(name))
        for element in saved.elements:
            net = self.cidr(element.fields[0], set_name, element.line)
            if net is not None and net not in overlay.subnets:
                overlay.subnets.append(net)
        self.overlay_of_set[set_name] = name
        return name

    def _name(self, set_name: str) -> str:
        for version in (4, 6):
            if set_name.startswith(f"{SET_PREFIX[version]}."):
                # isoebpf's own per-overlay sets: dcos.<name> and dcos6.<name> are one overlay.
                return set_name[len(SET_PREFIX[version]) + 1:]
        name = re.sub(r"[^a-z0-9_-]", "-", set_name.lower())[:24]
        if not name[:1].isalpha() or name.startswith(RESERVED):
            name = f"o-{name}"[:24]
        base, n = name, 2
        while name in self.overlays:
            name = f"{base[:21]}-{n}"
            n += 1
        if name != set_name:
            self.notes.warn(self.set_file, self.sets[set_name].line,
                            f"set '{set_name}' becomes overlay '{name}' (overlay names are 1-24 of "
                            "a-z 0-9 _ -, start with a letter, and dcos-/mesos- are reserved)")
        return name

    def cidr(self, text: str, set_name: str, line: int) -> netaddr.IPNetwork | None:
        try:
            return parse_cidr(text)
        except ValueError as err:
            loose = _loose(text)
            if loose is None:
                self.notes.warn(self.set_file, line, f"'{text}' in set '{set_name}' is malformed "
                                                     f"({err}); ipset refuses it, so it is left out")
                return None
            self.notes.warn(self.set_file, line, f"{err} (in set '{set_name}'); ipset stores "
                                                 f"{loose}, and so does this import")
            return loose

    def endpoint(self, net: netaddr.IPNetwork) -> str | None:
        """An overlay's name when `net` is all of it, else the CIDR; None if in no overlay."""
        for overlay in self.overlays.values():
            if overlay.subnets == [net]:
                return overlay.name
        if any(net in subnet for o in self.overlays.values() for subnet in o.subnets):
            return _cidr_text(net)
        return None

    def pair(self, fields: tuple[str, ...], set_name: str, line: int) -> tuple[str, str] | None:
        nets = [self.cidr(f, set_name, line) for f in (fields[0], fields[-1])]
        if nets[0] is None or nets[1] is None:
            return None
        ends = [self.endpoint(n) for n in nets]
        for net, end in zip(nets, ends, strict=True):
            if end is None:
                self.notes.warn(self.set_file, line, f"{net} (in set '{set_name}') lies in no "
                                                     "overlay, so it can never be filtered; left out")
        if ends[0] is None or ends[1] is None:
            return None
        return ends[0], ends[1]

    def add_allow(self, src: str, dst: str, ports: tuple[str, ...], tag: str | None,
                  family: int | None = None) -> None:
        index = RULE_COMMENT.match(tag or "")
        self.position += 1
        order = (float(index.group(2)) if index else float("inf"), self.position)
        self.allows.append(_Allow(src, dst, ports, order, family))

    def add_exception(self, src: str, dst: str, family: int | None = None) -> None:
        self.exceptions.setdefault((src, dst), set()).add(family)

    def families(self, end: str) -> set[int]:
        """The address families an endpoint (an overlay's name or a CIDR) has addresses in."""
        overlay = self.overlays.get(end)
        if overlay is None:
            return {netaddr.IPNetwork(end.strip('"')).version}
        return {net.version for net in overlay.subnets}

    def within(self, end: str, family: int) -> list[str]:
        """An endpoint's subnets of one family, as policy text."""
        overlay = self.overlays.get(end)
        if overlay is None:
            return [end] if family in self.families(end) else []
        return [_cidr_text(net) for net in overlay.subnets if net.version == family]


def import_layout(rule_files: Sequence[tuple[str, int, str]], set_file: tuple[str, str]) -> Imported:
    """The policy a saved layout means: `rule_files` are (name, 4 or 6, iptables-save text),
    `set_file` is (name, ipset save text)."""
    notes = Notes()
    sets = parse_ipset_save(set_file[1], set_file[0], notes)
    importer = _Importer(sets, set_file[0], notes)
    jumps = 0
    for where, _version, text in rule_files:
        chains = parse_iptables_save(text, where, notes)
        jumps += _read_family(importer, chains, where, notes)
    if not jumps:
        raise LayoutError("no FORWARD rule jumps to an isolation chain on an overlays set as source "
                          "and destination, and there is no dcos-isolation chain: this is not a "
                          "DC/OS-style isolation layout")
    return Imported(*_policy_text(importer, [f for f, _, _ in rule_files] + [set_file[0]], notes))


def _read_family(imp: _Importer, chains: dict[str, list[Rule]], where: str, notes: Notes) -> int:
    """Read one family's jump and chain; return how many isolation chains it had (0 or 1)."""
    jumps = [r for r in chains.get("FORWARD", []) if r.target in chains and r.target != "FORWARD"
             and _overlays_set(r)]
    if not jumps and "dcos-isolation" in chains:
        notes.warn(where, 1, "no FORWARD rule jumps to dcos-isolation: it filters nothing today")
        jumps = [Rule("FORWARD", 1, target="dcos-isolation")]
    if not jumps:
        return 0
    for extra in jumps[1:]:
        notes.warn(where, extra.line, f"a second isolation jump (to {extra.target}); only the first "
                                      "is imported")
    jump = jumps[0]
    assert jump.target is not None
    rules = chains[jump.target]
    # Overlays first (the sets of the overlays list, hairpins and endpoint rules), so that
    # pairs read later can name them.
    overlays = _overlays_set(jump)
    saved = imp.sets.get(overlays or "")
    if saved is not None and saved.type == LIST_SET:
        for element in saved.elements:
            imp.overlay_for(element.fields[0], imp.set_file, element.line)
    for rule in rules:
        if _classify(rule) in ("hairpin", "endpoints"):
            for match in rule.sets:
                imp.overlay_for(match.name, where, rule.line)
    for name, known in imp.sets.items():
        if any(name.startswith(f"{prefix}.") for prefix in SET_PREFIX.values()):
            imp.overlay_for(name, imp.set_file, known.line)  # isoebpf's own: one per overlay
    if overlays is not None:
        _check_overlays(imp, overlays, jump, where)
    for match in jump.sets:
        if match.negated and match.dirs == ("src", "dst"):
            _read_pairs(imp, match.name, where, jump.line, None)
    _read_chain(imp, rules, where, notes)
    return 1


def _overlays_set(rule: Rule) -> str | None:
    """The set a jump matches as both source and destination."""
    src = {m.name for m in rule.sets if m.dirs == ("src",) and not m.negated}
    dst = {m.name for m in rule.sets if m.dirs == ("dst",) and not m.negated}
    return min(src & dst, default=None)


def _check_overlays(imp: _Importer, name: str, jump: Rule, where: str) -> None:
    """The jump's overlays set: present, filled, and holding every overlay."""
    saved = imp.sets.get(name)
    if saved is None:
        imp.notes.warn(where, jump.line, f"set '{name}' that the FORWARD jump matches is not in "
                                         f"{imp.set_file}: nothing reaches the isolation chain today")
        return
    if not saved.elements:
        imp.notes.warn(imp.set_file, saved.line, f"set '{name}' is empty: the FORWARD jump never "
                                                 "matches, so this layout filters nothing today; "
                                                 "the imported policy filters between its overlays")
        return
    if saved.type == LIST_SET:
        listed = {e.fields[0] for e in saved.elements}
        for set_name, overlay in imp.overlay_of_set.items():
            if overlay is not None and set_name not in listed:
                imp.notes.warn(imp.set_file, saved.line, f"set '{name}' is missing '{set_name}': "
                                                         f"overlay '{overlay}' is not filtered today")
        return
    covered: list[netaddr.IPNetwork] = []
    for element in saved.elements:
        net = imp.cidr(element.fields[0], name, element.line)
        if net is None:
            continue
        covered.append(net)
        if imp.endpoint(net) is None:
            fresh = f"overlay-{len(imp.overlays) + 1}"
            imp.overlays[fresh] = _Overlay(fresh, [net])
            imp.notes.warn(imp.set_file, element.line, f"{net} is in '{name}' but in no overlay "
                                                       f"set: imported as overlay '{fresh}'")
    for known in imp.overlays.values():
        for subnet in known.subnets:
            if subnet.version == saved.version and not any(subnet in net for net in covered):
                imp.notes.warn(imp.set_file, saved.line, f"set '{name}' is missing {subnet} "
                                                         f"(overlay '{known.name}'): its traffic "
                                                         "is not filtered today")


def _read_chain(imp: _Importer, rules: list[Rule], where: str, notes: Notes) -> None:
    terminal: Rule | None = None
    for rule in rules:
        if rule.tag in ("unfiltered", "forwarded", "jump"):
            continue
        if terminal is not None:
            notes.warn(where, rule.line, _dead(rule, terminal))
        kind = _classify(rule)
        if kind == "default":
            if terminal is None:
                imp.default = target_action(rule.target)
                if rule.unconditional:
                    terminal = rule
        elif kind == "established":
            continue
        elif kind == "hairpin":
            overlay = imp.overlay_for(rule.sets[0].name, where, rule.line)
            if overlay is not None:
                version = imp.sets[rule.sets[0].name].version
                imp.overlays[overlay].hairpin.add(
                    version if imp.families(overlay) != {version} else None)
        elif kind == "pairs":
            _read_pairs(imp, rule.sets[0].name, where, rule.line, rule)
        elif kind == "endpoints":
            _read_endpoints(imp, rule, where)
        else:
            notes.warn(where, rule.line, f"rule not understood ({_describe(rule)}); left out")
    if terminal is None and imp.default is None:
        imp.default = "allow"


def _classify(rule: Rule) -> str:
    if rule.target in ("REJECT", "DROP") and not (rule.src or rule.dst or rule.sets or rule.dports
                                                  or rule.ctstate or rule.unknown):
        return "default"
    if rule.target not in ALLOWING_TARGETS or rule.unknown or rule.icmp_type:
        return "other"
    if rule.unconditional:
        return "default"
    if rule.ctstate:
        return "established" if "ESTABLISHED" in rule.ctstate else "other"
    plain = [m for m in rule.sets if not m.negated]
    if len(plain) != len(rule.sets):
        return "other"
    if (len(plain) == 2 and plain[0].name == plain[1].name and not (rule.src or rule.dst or rule.proto)
            and {plain[0].dirs, plain[1].dirs} == {("src",), ("dst",)}):
        return "hairpin"
    if len(plain) == 1 and plain[0].dirs in (("src", "dst"), ("src", "dst", "dst")) \
            and not (rule.src or rule.dst or rule.dports):
        return "pairs"
    src_sets = [m for m in plain if m.dirs == ("src",)]
    dst_sets = [m for m in plain if m.dirs == ("dst",)]
    if len(src_sets) + len(dst_sets) == len(plain) and len(src_sets) + bool(rule.src) == 1 \
            and len(dst_sets) + bool(rule.dst) == 1:
        return "endpoints"
    return "other"


def _dead(rule: Rule, terminal: Rule) -> str:
    what = "the RELATED,ESTABLISHED rule" if "ESTABLISHED" in rule.ctstate else "this rule"
    consequence = (": replies of allowed connections are refused today; isoebpf lets them pass"
                   if "ESTABLISHED" in rule.ctstate else
                   "; the imported policy applies it, so what it allows will pass")
    return (f"{what} can never be reached: it comes after the unconditional "
            f"{terminal.target} at line {terminal.line}{consequence}")


def _describe(rule: Rule) -> str:
    parts = [f"-j {rule.target}" if rule.target else "no target", *rule.unknown]
    if rule.icmp_type:
        parts.append(f"icmp type {rule.icmp_type}")
    return ", ".join(parts)


def _proto_ports(rule: Rule) -> tuple[str, ...] | None:
    """The policy's ports for a rule's -p/--dport; None when it cannot say it."""
    if rule.proto is None:
        return ()
    proto = {"ipv6-icmp": "icmp", "icmpv6": "icmp", "58": "icmp", "1": "icmp", "6": "tcp",
             "17": "udp"}.get(rule.proto, rule.proto)
    if proto == "icmp":
        return ("icmp",)
    if proto not in ("tcp", "udp"):
        return None
    spans = rule.dports or ((1, 65535),)
    return tuple(f"{proto}/{lo}" if lo == hi else f"{proto}/{max(lo, 1)}-{hi}" for lo, hi in spans)


def _read_pairs(imp: _Importer, set_name: str, where: str, line: int, rule: Rule | None) -> None:
    """A pairs or tuples set's entries as allow rules; with no rule, as exceptions."""
    saved = imp.sets.get(set_name)
    if saved is None:
        imp.notes.warn(where, line, f"set '{set_name}' is not in {imp.set_file}; left out")
        return
    exception = rule is None
    wanted = NET_PORT_NET if rule is not None and len(rule.sets[0].dirs) == 3 else NET_NET
    if saved.type != wanted:
        imp.notes.warn(where, line, f"set '{set_name}' is {saved.type}; this match needs "
                                    f"{wanted}; left out")
        return
    extra = _proto_ports(rule) if rule is not None else ()
    if extra is None:
        imp.notes.warn(where, line, "a protocol that a policy cannot name; left out")
        return
    grouped: dict[tuple[str, str, str | None], list[str]] = {}
    for element in saved.elements:
        if len(element.fields) != (3 if wanted == NET_PORT_NET else 2):
            imp.notes.warn(imp.set_file, element.line, f"'{','.join(element.fields)}' is not a "
                                                       f"{wanted} entry; left out")
            continue
        ends = imp.pair(element.fields, set_name, element.line)
        if ends is None:
            continue
        if exception:
            imp.add_exception(*ends)
            continue
        ports = list(extra)
        if wanted == NET_PORT_NET:
            port = _port_field(element.fields[1])
            if port is None:
                imp.notes.warn(imp.set_file, element.line, f"port '{element.fields[1]}' is "
                                                           "malformed or not tcp/udp; left out")
                continue
            ports = [port]
        grouped.setdefault((*ends, element.comment), []).extend(ports)
    for (src, dst, note), ports in grouped.items():
        imp.add_allow(src, dst, _merge_ports(ports), note)


def _port_field(text: str) -> str | None:
    match = PORT_FIELD.match(text)
    if not match:
        return None
    proto, low, high = match.group(1) or "tcp", int(match.group(2)), int(match.group(3) or match.group(2))
    if not 1 <= low <= high <= 65535:
        return None
    return f"{proto}/{low}" if low == high else f"{proto}/{low}-{high}"


def _merge_ports(ports: Iterable[str]) -> tuple[str, ...]:
    """tcp/80, tcp/81, tcp/82 -> tcp/80-82; icmp and whole-protocol entries kept as they are."""
    spans: dict[str, list[tuple[int, int]]] = {}
    others: list[str] = []
    for port in ports:
        proto, _, numbers = port.partition("/")
        if not numbers:
            if port not in others:
                others.append(port)
            continue
        first, _, last = numbers.partition("-")
        spans.setdefault(proto, []).append((int(first), int(last or first)))
    merged: list[str] = []
    for proto, found in spans.items():
        current: list[tuple[int, int]] = []
        for low, high in sorted(found):
            if current and low <= current[-1][1] + 1:
                current[-1] = (current[-1][0], max(high, current[-1][1]))
            else:
                current.append((low, high))
        merged += [f"{proto}/{lo}" if lo == hi else f"{proto}/{lo}-{hi}" for lo, hi in current]
    return tuple(merged + others)


def _read_endpoints(imp: _Importer, rule: Rule, where: str) -> None:
    ends: list[str] = []
    # isoebpf's per-family sets of one overlay (dcos.o0, dcos6.o0) stand for the
    # overlay's subnets of that family only: a rule found in one family's file
    # alone must not become a rule for the whole overlay.
    family: int | None = None
    for address, direction in ((rule.src, "src"), (rule.dst, "dst")):
        if address is not None:
            net = imp.cidr(address, f"-{direction[0]}", rule.line)
            end = imp.endpoint(net) if net is not None else None
        else:
            match = next(m for m in rule.sets if m.dirs == (direction,))
            end = imp.overlay_for(match.name, where, rule.line)
            if end is not None and imp.families(end) != {imp.sets[match.name].version}:
                family = imp.sets[match.name].version
        if end is None:
            imp.notes.warn(where, rule.line, f"the {direction} of this rule lies in no overlay; "
                                             "left out")
            return
        ends.append(end)
    ports = _proto_ports(rule)
    if ports is None:
        imp.notes.warn(where, rule.line, f"protocol '{rule.proto}' cannot be said in a policy; "
                                         "left out")
        return
    if (rule.tag or "").startswith("exception:"):
        imp.add_exception(ends[0], ends[1], family)
        return
    imp.add_allow(ends[0], ends[1], ports, rule.tag, family)


def _spelled(imp: _Importer, src: str, dst: str, seen: set[int | None]) -> list[tuple[str, str]]:
    """The endpoint pairs that say a rule read in the families `seen` (None: not one
    family's). Read in every family both ends have addresses in, it is the rule
    between the overlays; otherwise it is the rule between their subnets of each
    family it was read in."""
    if None in seen or seen >= imp.families(src) & imp.families(dst):
        return [(src, dst)]
    return [(s, d) for family in sorted(f for f in seen if f is not None)
            for s in imp.within(src, family) for d in imp.within(dst, family)]


def _whole_hairpin(imp: _Importer, overlay: _Overlay) -> bool:
    """Was a hairpin read for every family the overlay has addresses in?"""
    return None in overlay.hairpin or overlay.hairpin >= imp.families(overlay.name)


def _loose(text: str) -> netaddr.IPNetwork | None:
    """What ipset makes of a CIDR with host bits set; None if it is not a CIDR at all."""
    address, _, length = text.partition("/")
    try:
        ip = netaddr.IPAddress(address, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError):
        return None
    width = 32 if ip.version == 4 else 128
    if length and not (length.isdigit() and int(length) <= width):
        return None
    return netaddr.IPNetwork(f"{ip}/{length or width}").cidr


def _cidr_text(net: netaddr.IPNetwork) -> str:
    return f'"{net}"' if net.version == 6 else str(net)


def _policy_text(imp: _Importer, sources: list[str],
                 notes: Notes) -> tuple[str, list[Diagnostic]]:
    for overlay in [o for o in imp.overlays.values() if not o.subnets]:
        notes.warn(imp.set_file, 1, f"overlay '{overlay.name}' has no subnets; it and the rules "
                                    "naming it are left out")
        del imp.overlays[overlay.name]
        imp.allows = [a for a in imp.allows if overlay.name not in (a.src, a.dst)]
        imp.exceptions = {pair: seen for pair, seen in imp.exceptions.items() if overlay.name not in pair}
    if not imp.overlays:
        raise LayoutError("the layout names no overlay with subnets: no hash:net set used for "
                          "hairpins or rules, or listed in the overlays set, has any")
    default = imp.default or "allow"
    lines = [f"# Imported by 'isoebpf import' from {', '.join(sources)}.",
             "# Where this differs from what those rules do today, the import said so.",
             "version: 1",
             f"default: {'allow' if default == 'allow' else 'deny'}"]
    if default != "allow":
        lines.append(f"deny_action: {default}")
    lines.append("overlays:")
    for overlay in imp.overlays.values():
        lines += [f"  {overlay.name}:",
                  f"    subnets: [{', '.join(_cidr_text(n) for n in overlay.subnets)}]"]
        if not _whole_hairpin(imp, overlay):
            lines.append("    isolated: true")
    exceptions = imp.exceptions
    if exceptions:
        lines.append("exceptions:")
        lines += [f"  - {{from: {s}, to: {d}}}" for (src, dst), seen in exceptions.items()
                  for s, d in _spelled(imp, src, dst, seen)]
    # One rule of the policy is one allow per family file: by its index when a comment names it.
    allows: dict[tuple[float, int, str, str, tuple[str, ...]], set[int | None]] = {}
    for rule in sorted(imp.allows, key=lambda a: a.order):
        key = (rule.order[0], rule.order[1] if rule.order[0] == float("inf") else 0,
               rule.src, rule.dst, rule.ports)
        allows.setdefault(key, set()).add(rule.family)
    # A hairpin read in some of its overlay's families only: an allow within those.
    partial = [(o.name, o.hairpin) for o in imp.overlays.values()
               if o.hairpin and not _whole_hairpin(imp, o)]
    if allows or partial:
        lines.append("allow:")
        for name, seen in partial:
            lines += [f"  - {{from: {s}, to: {d}}}" for s, d in _spelled(imp, name, name, seen)]
        for (_, _, src, dst, ports), seen in allows.items():
            said = f", ports: [{', '.join(ports)}]" if ports else ""
            lines += [f"  - {{from: {s}, to: {d}{said}}}" for s, d in _spelled(imp, src, dst, seen)]
    text = "\n".join(lines) + "\n"
    try:
        loaded = pipeline.loads(text, "<imported>")
    except PolicyError as err:
        numbered = "".join(f"{i:4}  {line}\n" for i, line in enumerate(text.splitlines(), 1))
        raise LayoutError(f"the layout does not make a valid policy:\n{err}\n"
                          f"the policy it made:\n{numbered}") from err
    return text, notes.found + list(loaded.warnings)
