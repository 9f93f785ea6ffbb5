"""iptables backend, pure half: the iptables + ipset form of a compiled policy, as restore text: no kernel, no I/O.

The layout is the DC/OS guide's, in the order that makes it work (the guide
appends its allow rules after the final REJECT, where they are dead, and never
fills `overlays`):

    FORWARD  "isoebpf forwarded": no target, counts what reaches our jump
    FORWARD  overlays src, overlays dst [, ! overlay-exceptions src,dst]  -> CHAIN
    CHAIN    IPv6 only: neighbour discovery RETURN (never filtered)
             degraded: one RETURN per exception
             RELATED,ESTABLISHED RETURN          (the contract's step a)
             per non-isolated overlay: OV src, OV dst RETURN (hairpin, step b)
             full: the tuples set, the ICMP pairs set, the pairs set (step c)
             degraded: the allow rules, one group of lines each, in file order (step c)
             default: REJECT tcp-reset / icmp admin-prohibited, DROP, or RETURN (step d);
                      in audit mode RETURN, its comment saying what enforcing would do

Two layouts, one policy:

- full (the kernel has hash:net,net and hash:net,port,net): exceptions, allowed
  network pairs and allowed network/port/network tuples live in sets, one
  iptables rule each. Every element names its rule in an ipset comment and
  counts in ipset counters. ipset looks up the most specific source, then the
  most specific destination, first; elements are written per address class and
  the tuples are tried before the pairs, so the element that answers is the
  one the reference evaluator's longest-prefix lookup picks, and the counter
  that moves is the right rule's.
- degraded (either type missing): only hash:net sets, one per overlay. Each
  exception and allow rule becomes iptables lines matching `-s`/`-d` or an
  overlay's set, in rule order; the first line that matches is the first rule
  in file order that allows the packet, so iptables' own rule counters are the
  per-rule counters.

Sets are named in the `dcos-` namespace the guide reserves for exactly this
("future versions may create the overlay ipsets for you"): `dcos-overlays`,
`dcos.<overlay>`, ... and `dcos6-...` for IPv6 (ipset sets have one family).

Written by `backend`, read back through `saved`, named by `importer`; reads only the IR.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from ...errors import BackendError
from ...ir.tables import IR, PORT_BITS, PROTO_BITS, PROTO_ICMP, PROTO_TCP, PROTO_UDP, AllowEntry, ClassPrefix

DEFAULT_CHAIN = "dcos-isolation"
TAG = "isoebpf"  # first word of every rule comment we write: how unload finds our rules

NET = "hash:net"
NET_NET = "hash:net,net"
NET_PORT_NET = "hash:net,port,net"
SET_TYPES = (NET, NET_NET, NET_PORT_NET)  # every type a layout can use
FULL = "full"
DEGRADED = "degraded"

CHAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,27}\Z")  # iptables: 28 characters
RESERVED_CHAINS = {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING", "ACCEPT", "DROP",
                   "RETURN", "REJECT", "QUEUE"}
FAMILY = {4: "inet", 6: "inet6"}
SET_PREFIX = {4: "dcos", 6: "dcos6"}
ROLES = ("overlays", "overlay-exceptions", "allowed", "allowed-icmp", "allowed-ports")
DEFAULT_MAXELEM = 65536
MAX_COMMENT = 255  # xt_comment and ipset comments hold 255 characters
# multiport takes 15 ports per rule, a range counting as two.
MULTIPORT_SLOTS = 15
# Neighbour discovery (RS, RA, NS, NA, redirect) passes untouched (contract, semantics 1).
ND_TYPES = (133, 134, 135, 136, 137)
REJECT_WITH = {4: "icmp-admin-prohibited", 6: "icmp6-adm-prohibited"}
ICMP_PROTO = {4: "icmp", 6: "ipv6-icmp"}
PROTO_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp"}
ALLOWING_TARGETS = ("RETURN", "ACCEPT")  # our chain hands a packet it allows back to FORWARD


def target_action(target: str | None) -> str:
    """What a rule with this iptables target does to a packet, in our words."""
    return "drop" if target == "DROP" else "reject" if target == "REJECT" else "allow"


# Audit mode's default line says in its comment what enforcing would do.
AUDIT_WOULD = "audit: would "


def audited_action(note: str) -> str | None:
    """What an audit line's comment says enforcing would do (None: not an audit line)."""
    _, found, action = note.partition(AUDIT_WOULD)
    return action.split()[0] if found and action else None

# Rule comments that are not policy rules.
FORWARDED = "forwarded"
JUMP = "jump"

# (protocol, first port, last port): 0 = any protocol, PROTO_ICMP = ICMP/ICMPv6 (no ports).
Item = tuple[int, int, int]
ANY: Item = (0, 0, 0)


def set_name(version: int, role: str) -> str:
    return f"{SET_PREFIX[version]}-{role}"


def overlay_set(version: int, overlay: str) -> str:
    # '.' cannot occur in an overlay name, so these never meet the fixed names.
    return f"{SET_PREFIX[version]}.{overlay}"


def comment(name: str, text: str = "") -> str:
    """`-m comment` argument: our tag, the rule's name, what it says (for `iptables -L`)."""
    words = f"{TAG} {name}" if not text or text == name else f"{TAG} {name} {text}"
    return words if len(words) <= MAX_COMMENT else words[:MAX_COMMENT - 3] + "..."


@dataclass(frozen=True)
class IpSet:
    name: str
    type: str
    version: int
    elements: tuple[tuple[str, str | None], ...]  # (element, comment naming its rule)
    counters: bool = False  # per-element counters and comments: rule counters in the full layout

    @property
    def maxelem(self) -> int:
        """Room for every element; a port range adds one element per port."""
        total = sum(_element_count(element) for element, _ in self.elements)
        return max(DEFAULT_MAXELEM, total)

    def create(self, name: str | None = None) -> str:
        line = f"create {name or self.name} {self.type} family {FAMILY[self.version]}"
        if self.counters:
            line += " counters comment"
        if self.maxelem != DEFAULT_MAXELEM:
            line += f" maxelem {self.maxelem}"
        return line

    def adds(self, name: str | None = None) -> Iterator[str]:
        for element, note in self.elements:
            yield f'add {name or self.name} {element}' + (f' comment "{note}"' if note else "")


def _element_count(element: str) -> int:
    parts = element.split(",")
    if len(parts) == 3 and "-" in parts[1]:
        low, high = parts[1].split(":")[1].split("-")
        return int(high) - int(low) + 1
    return 1


@dataclass(frozen=True)
class FamilyRules:
    forward: tuple[str, ...]  # our FORWARD rules, in order, without "-A FORWARD"
    chain: tuple[str, ...]  # the isolation chain's rules, without "-A CHAIN"; () for no chain


@dataclass(frozen=True)
class Layout:
    chain: str
    kind: str  # FULL | DEGRADED
    sets: tuple[IpSet, ...]
    families: dict[int, FamilyRules] = field(default_factory=dict)

    def set_named(self, name: str) -> IpSet:
        return next(s for s in self.sets if s.name == name)


def layout_kind(set_types: Iterable[str]) -> str:
    """The layout the present set types allow; hash:net is needed by both."""
    present = set(set_types)
    if NET not in present:
        raise BackendError("the kernel has no ipset type hash:net, which every iptables layout "
                           "needs (CONFIG_IP_SET_HASH_NET): use the eBPF backend here")
    return FULL if {NET_NET, NET_PORT_NET} <= present else DEGRADED


def build(ir: IR, chain: str = DEFAULT_CHAIN, set_types: Iterable[str] = SET_TYPES,
          accepting: Collection[int] = ()) -> Layout:
    """The sets and rules that enforce `ir`, using only the given ipset types.
    `accepting`: the IP versions whose chain ACCEPTs what it allows between overlays
    (where Docker runs, whose isolation would drop it after a RETURN:
    backends.docker_user); elsewhere it RETURNs to FORWARD."""
    if not CHAIN_NAME.match(chain) or chain.upper() in RESERVED_CHAINS:
        raise BackendError(f"'{chain}' cannot name our chain: 1-28 letters, digits, _ . or -, "
                           "and not a built-in chain or target")
    kind = layout_kind(set_types)
    sets: list[IpSet] = []
    families: dict[int, FamilyRules] = {}
    for version in (4, 6):
        tree = _ClassTree(ir, version)
        if not tree.classes:
            # Nothing to judge in this family; still count what passes, as `unfiltered`.
            families[version] = FamilyRules((f'-m comment --comment "{comment(FORWARDED)}"',), ())
            continue
        builder = _FamilyBuilder(ir, tree, chain, kind, "ACCEPT" if version in accepting else "RETURN")
        families[version] = builder.rules()
        sets += builder.sets
    return Layout(chain, kind, tuple(sets), families)


def render(ir: IR, chain: str = DEFAULT_CHAIN,
           set_types: Iterable[str] = SET_TYPES) -> tuple[str, str, str]:
    """(ipset restore input, iptables-restore input, ip6tables-restore input) for a first load.

    A family the policy has no subnets in gets only the rule counting what passes.
    """
    layout = build(ir, chain, set_types)
    return ipset_restore(layout), iptables_restore(layout, 4), iptables_restore(layout, 6)


def ipset_restore(layout: Layout, names: Mapping[str, str] | None = None,
                  only: Iterable[str] | None = None) -> str:
    """`ipset restore` input creating and filling the sets (under other names if given)."""
    wanted = set(only) if only is not None else None
    lines: list[str] = []
    for s in layout.sets:
        if wanted is not None and s.name not in wanted:
            continue
        name = (names or {}).get(s.name, s.name)
        lines.append(s.create(name))
        lines.extend(s.adds(name))
    return "".join(f"{line}\n" for line in lines)


def rename_sets(spec: str, names: Mapping[str, str]) -> str:
    """A rule spec with its `--match-set` names replaced."""
    words = spec.split(" ")
    for i in range(1, len(words)):
        if words[i - 1] == "--match-set":
            words[i] = names.get(words[i], words[i])
    return " ".join(words)


def iptables_restore(layout: Layout, version: int, forward_ops: Iterable[str] | None = None,
                     names: Mapping[str, str] | None = None) -> str:
    """`iptables-restore --noflush` input: (re)fill our chain, put our FORWARD rules in place.

    The chain line flushes our chain and nothing else; `forward_ops` are the
    FORWARD edits (default: insert ours at the top, as on a first load).
    """
    rules = layout.families[version]
    mapping = names or {}
    if forward_ops is None:
        forward_ops = [f"-I FORWARD {i} {rename_sets(spec, mapping)}"
                       for i, spec in enumerate(rules.forward, start=1)]
    chain = [f":{layout.chain} - [0:0]"] if rules.chain else []
    lines = ["*filter", *chain, *forward_ops,
             *(f"-A {layout.chain} {rename_sets(spec, mapping)}" for spec in rules.chain),
             "COMMIT"]
    return "".join(f"{line}\n" for line in lines)


class _ClassTree:
    """One family's address classes: which contain which, and each overlay's subnets."""

    def __init__(self, ir: IR, version: int) -> None:
        self.version = version
        ordered = sorted((c for c in ir.classes if c.network.version == version),
                         key=lambda c: (c.network.first, -c.network.last))
        self.classes: dict[int, ClassPrefix] = {c.class_id: c for c in ordered}
        # Where each class stands in address order: what lines and elements are sorted
        # by, so that the layout does not depend on how the IR numbers its classes.
        self.place = {c.class_id: i for i, c in enumerate(ordered)}
        self.ancestors: dict[int, tuple[int, ...]] = {}  # itself and every class holding it
        self.roots: dict[int, list[ClassPrefix]] = {}  # overlay id -> its subnets
        stack: list[ClassPrefix] = []
        for c in ordered:
            # CIDRs nest or are disjoint: sorted by start, the stack holds the containers.
            while stack and c.network.first > stack[-1].network.last:
                stack.pop()
            self.ancestors[c.class_id] = (*(s.class_id for s in stack), c.class_id)
            if not stack:
                self.roots.setdefault(c.overlay_id, []).append(c)
            stack.append(c)
        self.root_ids = {o: frozenset(c.class_id for c in cs) for o, cs in self.roots.items()}

    def cidr(self, class_id: int) -> str:
        return str(self.classes[class_id].network.cidr)

    def prefixlen(self, class_id: int) -> int:
        return int(self.classes[class_id].network.prefixlen)

    def holds(self, outer: int, inner: int) -> bool:
        return outer in self.ancestors[inner]


def _item(entry: AllowEntry) -> Item:
    if entry.match_bits == 0:
        return ANY
    if entry.proto == PROTO_ICMP:
        return PROTO_ICMP, 0, 0
    port_bits = entry.match_bits - PROTO_BITS
    return entry.proto, entry.port, entry.port + (1 << (PORT_BITS - port_bits)) - 1


def _item_holds(outer: Item, inner: Item) -> bool:
    return outer[0] == 0 or (outer[0] == inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2])


def _breadth(item: Item) -> int:
    return 1 << 17 if item[0] == 0 else item[2] - item[1] + 1


class _FamilyBuilder:
    def __init__(self, ir: IR, tree: _ClassTree, chain: str, kind: str, allowing: str = "RETURN") -> None:
        self.ir = ir
        self.allowing = allowing  # the target of what the policy allows between overlays
        self.tree = tree
        self.version = tree.version
        self.chain = chain
        self.kind = kind
        self.sets: list[IpSet] = []
        names = {o.id: o.name for o in ir.overlays}
        self.overlay_sets = {o_id: overlay_set(self.version, names[o_id]) for o_id in tree.roots}
        # Rules in file order and overlays in policy order, whatever their ids (an
        # update keeps the ids of what stays, so ids need not follow the file).
        self.rank = {r.id: i for i, r in enumerate(ir.rules)}
        self.overlay_rank = {o.id: i for i, o in enumerate(ir.overlays)}

    def name(self, rule: int) -> str:
        return self.ir.rule(rule).name

    def note(self, rule: int) -> str:
        info = self.ir.rule(rule)
        return comment(info.name, info.text)

    def rules(self) -> FamilyRules:
        v = self.version
        overlays = set_name(v, "overlays")
        self.sets.append(IpSet(overlays, NET, v, tuple(
            (self.tree.cidr(c.class_id), None) for cs in self.tree.roots.values() for c in cs)))
        for o_id, cs in sorted(self.tree.roots.items(), key=lambda item: self.overlay_rank[item[0]]):
            self.sets.append(IpSet(self.overlay_sets[o_id], NET, v,
                                   tuple((self.tree.cidr(c.class_id), None) for c in cs)))
        jump = f"-m set --match-set {overlays} src -m set --match-set {overlays} dst"
        if self.kind == FULL:
            exceptions = set_name(v, "overlay-exceptions")
            self.sets.append(IpSet(exceptions, NET_NET, v, tuple(
                (f"{self.tree.cidr(e.src_class)},{self.tree.cidr(e.dst_class)}", self.name(e.rule))
                for e in self.ir.exceptions if self._ours(e.src_class, e.dst_class)), counters=True))
            jump += f" -m set ! --match-set {exceptions} src,dst"
        forward = (f'-m comment --comment "{comment(FORWARDED)}"',
                   f'{jump} -m comment --comment "{comment(JUMP)}" -j {self.chain}')

        chain: list[str] = []
        if v == 6:
            unfiltered = comment("unfiltered")
            chain += [f'-p ipv6-icmp -m icmp6 --icmpv6-type {t} -m comment --comment "{unfiltered}"'
                      " -j RETURN" for t in ND_TYPES]
        if self.kind == DEGRADED:
            by_rule: dict[int, list[tuple[int, int, Item]]] = {}
            for e in self.ir.exceptions:
                if self._ours(e.src_class, e.dst_class):
                    by_rule.setdefault(e.rule, []).append((e.src_class, e.dst_class, ANY))
            for rule in sorted(by_rule, key=self.rank.__getitem__):
                chain += self._rule_lines(rule, by_rule[rule])
        chain.append('-m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment '
                     f'"{comment("established")}" -j {self.allowing}')
        for overlay in self.ir.overlays:
            if overlay.hairpin_rule and overlay.id in self.overlay_sets:
                ov = self.overlay_sets[overlay.id]
                chain.append(f"-m set --match-set {ov} src -m set --match-set {ov} dst "
                             f'-m comment --comment "{self.note(overlay.hairpin_rule)}" -j RETURN')
        chain += self._full_allow() if self.kind == FULL else self._degraded_allow()
        chain += self._default()
        return FamilyRules(forward, tuple(chain))

    def _ours(self, src: int, dst: int) -> bool:
        """Both classes in this family (an overlay spanning both families pairs across them)."""
        return src in self.tree.classes and dst in self.tree.classes

    def _allowed(self) -> Iterator[AllowEntry]:
        return (a for a in self.ir.allowed if self._ours(a.src_class, a.dst_class))

    def _default(self) -> list[str]:
        note = comment("default")
        if self.ir.default_action == "allow":
            return [f'-m comment --comment "{note}" -j {self.allowing}']
        if self.ir.audit:
            # Counted as the default, and passed on as the policy's allows are.
            audited = comment("default", AUDIT_WOULD + self.ir.default_action)
            return [f'-m comment --comment "{audited}" -j {self.allowing}']
        if self.ir.default_action == "drop":
            return [f'-m comment --comment "{note}" -j DROP']
        return [f'-p tcp -m comment --comment "{note}" -j REJECT --reject-with tcp-reset',
                f'-m comment --comment "{note}" -j REJECT --reject-with {REJECT_WITH[self.version]}']

    # -- degraded: one group of lines per rule, in rule order -------------------

    def _degraded_allow(self) -> list[str]:
        by_rule: dict[int, list[tuple[int, int, Item]]] = {}
        for a in self._allowed():
            by_rule.setdefault(a.rule, []).append((a.src_class, a.dst_class, _item(a)))
        lines: list[str] = []
        for rule in sorted(by_rule, key=self.rank.__getitem__):
            lines += self._rule_lines(rule, by_rule[rule], self.allowing)
        return lines

    def _rule_lines(self, rule: int, entries: list[tuple[int, int, Item]],
                    target: str = "RETURN") -> list[str]:
        """Lines matching every packet some entry of `rule` matches.

        A line may match a packet of a nested class too; that packet's own
        first rule is never later than `rule` (a rule covering a class covers
        the classes inside it), and lines go in rule order, so the first line
        to match is still the first rule in file order.
        """
        tree = self.tree
        # Drop entries another entry of the same rule already covers: widest first.
        kept: list[tuple[int, int, Item]] = []
        for entry in sorted(entries, key=lambda e: (tree.prefixlen(e[0]) + tree.prefixlen(e[1]),
                                                    -_breadth(e[2]), tree.place[e[0]],
                                                    tree.place[e[1]], e[2])):
            s, d, item = entry
            if not any(tree.holds(ks, s) and tree.holds(kd, d) and _item_holds(ki, item)
                       for ks, kd, ki in kept):
                kept.append(entry)
        items_of: dict[tuple[int, int], set[Item]] = {}
        for s, d, item in kept:
            items_of.setdefault((s, d), set()).add(item)
        # Pairs with the same ports, factored into (sources x destinations) blocks.
        by_items: dict[frozenset[Item], dict[int, list[int]]] = {}
        for (s, d), pair_items in sorted(items_of.items(),
                                         key=lambda item: (tree.place[item[0][0]], tree.place[item[0][1]])):
            by_items.setdefault(frozenset(pair_items), {}).setdefault(s, []).append(d)
        lines: list[str] = []
        note = self.note(rule)
        for items, dsts_of in by_items.items():
            blocks: dict[tuple[int, ...], list[int]] = {}
            for s, dst_list in dsts_of.items():
                blocks.setdefault(tuple(dst_list), []).append(s)
            for dsts, srcs in blocks.items():
                for src in self._endpoint(srcs, "s", "src"):
                    for dst in self._endpoint(list(dsts), "d", "dst"):
                        for proto, match in self._ports(items):
                            lines.append(_spec(src, dst, proto, match, note, target))
        return lines

    def _endpoint(self, class_ids: list[int], flag: str, direction: str) -> list[tuple[str, str]]:
        """(address option, set match) alternatives that together match these classes."""
        wanted = frozenset(class_ids)
        for o_id, roots in self.tree.root_ids.items():
            if roots == wanted:
                return [("", f"-m set --match-set {self.overlay_sets[o_id]} {direction}")]
        return [(f"-{flag} {self.tree.cidr(c)}", "") for c in class_ids]

    def _ports(self, items: frozenset[Item]) -> list[tuple[str, str]]:
        """(protocol option, port match) alternatives covering these items."""
        if ANY in items:
            return [("", "")]
        found: list[tuple[str, str]] = []
        for proto in (PROTO_TCP, PROTO_UDP):
            ranges = _merge(sorted((i[1], i[2]) for i in items if i[0] == proto))
            name = PROTO_NAMES[proto]
            for chunk in _multiport_chunks(ranges):
                ports = ",".join(_port_text(r, ":") for r in chunk)
                match = f"-m {name} --dport {ports}" if len(chunk) == 1 else \
                    f"-m multiport --dports {ports}"
                found.append((f"-p {name}", match))
        if any(i[0] == PROTO_ICMP for i in items):
            found.append((f"-p {ICMP_PROTO[self.version]}", ""))
        return found

    # -- full: three sets, most specific first ---------------------------------

    def _full_allow(self) -> list[str]:
        v = self.version
        tree = self.tree
        table: dict[tuple[int, int], list[AllowEntry]] = {}
        for a in self._allowed():
            table.setdefault((a.src_class, a.dst_class), []).append(a)
        tuples: list[tuple[str, str | None]] = []
        icmp_pairs: list[tuple[str, str | None]] = []
        pairs: list[tuple[str, str | None]] = []
        for (s, d), entries in sorted(table.items(), key=lambda item: (tree.place[item[0][0]],
                                                                       tree.place[item[0][1]])):
            # Every pair holding this one: their elements match this pair's packets too,
            # so this pair needs its own element wherever any of them has one.
            around = [table[(os_, od)] for os_ in tree.ancestors[s] for od in tree.ancestors[d]
                      if (os_, od) in table]
            pair = f"{tree.cidr(s)},{tree.cidr(d)}"
            any_rule = next((e.rule for e in entries if e.match_bits == 0), None)
            for proto in (PROTO_TCP, PROTO_UDP):
                covered = _merge(sorted((_item(e)[1], _item(e)[2]) for es in around for e in es
                                        if e.proto == proto and e.match_bits))
                for low, high, rule in _paint(entries, proto, any_rule):
                    for clip_low, clip_high in _clip((low, high), covered):
                        ports = _port_text((clip_low, clip_high), "-")
                        tuples.append((f"{tree.cidr(s)},{PROTO_NAMES[proto]}:{ports},{tree.cidr(d)}",
                                       self.name(rule)))
            if any(e.proto == PROTO_ICMP and e.match_bits for es in around for e in es):
                icmp_rule = next((e.rule for e in entries if e.proto == PROTO_ICMP and e.match_bits),
                                 any_rule)
                if icmp_rule is not None:
                    icmp_pairs.append((pair, self.name(icmp_rule)))
            if any_rule is not None:
                pairs.append((pair, self.name(any_rule)))
        names = {role: set_name(v, role) for role in ("allowed-ports", "allowed-icmp", "allowed")}
        self.sets += [IpSet(names["allowed-ports"], NET_PORT_NET, v, tuple(tuples), counters=True),
                      IpSet(names["allowed-icmp"], NET_NET, v, tuple(icmp_pairs), counters=True),
                      IpSet(names["allowed"], NET_NET, v, tuple(pairs), counters=True)]
        return [
            f"-m set --match-set {names['allowed-ports']} src,dst,dst "
            f'-m comment --comment "{comment("allowed-ports", "network/port/network tuples")}" '
            f"-j {self.allowing}",
            f"-p {ICMP_PROTO[v]} -m set --match-set {names['allowed-icmp']} src,dst "
            f'-m comment --comment "{comment("allowed-icmp", "network pairs, ICMP")}" -j {self.allowing}',
            f"-m set --match-set {names['allowed']} src,dst "
            f'-m comment --comment "{comment("allowed", "network pairs")}" -j {self.allowing}',
        ]


def _spec(src: tuple[str, str], dst: tuple[str, str], proto: str, match: str, note: str,
          target: str = "RETURN") -> str:
    """A rule in iptables-save's own order: addresses, protocol, then matches as added."""
    words = [src[0], dst[0], proto, src[1], dst[1], match, f'-m comment --comment "{note}"',
             f"-j {target}"]
    return " ".join(w for w in words if w)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for low, high in ranges:
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _clip(span: tuple[int, int], covered: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for low, high in covered:
        if low <= span[1] and span[0] <= high:
            yield max(low, span[0]), min(high, span[1])


def _paint(entries: list[AllowEntry], proto: int, any_rule: int | None) -> list[tuple[int, int, int]]:
    """[(first port, last port, rule)] for one protocol at one pair: the longest prefix wins."""
    spans: list[tuple[int, int, int | None]] = [(0, (1 << PORT_BITS) - 1, any_rule)]
    for e in sorted((e for e in entries if e.proto == proto and e.match_bits),
                    key=lambda e: e.match_bits):
        _, low, high = _item(e)
        painted: list[tuple[int, int, int | None]] = []
        for a, b, rule in spans:
            if b < low or a > high:
                painted.append((a, b, rule))
                continue
            if a < low:
                painted.append((a, low - 1, rule))
            painted.append((max(a, low), min(b, high), e.rule))
            if b > high:
                painted.append((high + 1, b, rule))
        spans = painted
    runs: list[tuple[int, int, int]] = []
    for a, b, rule in spans:
        if rule is None:
            continue
        if runs and runs[-1][2] == rule and runs[-1][1] + 1 == a:
            runs[-1] = (runs[-1][0], b, rule)
        else:
            runs.append((a, b, rule))
    return runs


def _port_text(span: tuple[int, int], sep: str) -> str:
    return str(span[0]) if span[0] == span[1] else f"{span[0]}{sep}{span[1]}"


def _multiport_chunks(ranges: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    chunk: list[tuple[int, int]] = []
    used = 0
    for span in ranges:
        cost = 1 if span[0] == span[1] else 2
        if used + cost > MULTIPORT_SLOTS:
            yield chunk
            chunk, used = [], 0
        chunk.append(span)
        used += cost
    if chunk:
        yield chunk
