"""IR stage: policy model -> IR, in pure Python; the same policy always gives the same tables.

A `Compiler` holds a compiled policy in a form that a changed policy can be
compiled against: `update` keeps the numbering (a class keeps its id while the
policy names its CIDR, a rule its id while its identity stays, see
tables.rule_identities, or while it stays where the caller says which rules
changed), recompiles only what the allow rules that came and went touch, and
says which entries changed (`Delta`), so a one-rule change costs that rule's
entries and the address classes it splits or merges, not the policy's size.
Told which rules changed (`RuleEdit`), it reads no other rule; the IR itself is
made when first read after a change, from tables kept sorted as the update
goes. Changes to overlays or exceptions compile afresh under the same
numbering. `compile_policy` is a fresh Compiler's IR: ids in file order.

Reads the policy stage's model (`isoebpf.policy.model`), builds `tables.IR`; its
neighbours are `lint` (warnings about what it built) and `evaluate` (the
reference semantics on what it built).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter
from typing import TypeVar

import netaddr

from ..policy.model import AllowRule, Endpoint, Policy, PortSpec
from .tables import (
    FIRST_POLICY_RULE,
    FIXED_RULES,
    IR,
    PORT_BITS,
    PROTO_BITS,
    PROTO_CODES,
    AllowEntry,
    ClassPrefix,
    ExceptionPair,
    OverlayInfo,
    RuleInfo,
    rule_identities,
)

PrefixKey = tuple[int, int, int]  # (proto, port, match_bits)
NetKey = tuple[int, int, int]  # (version, network address, prefix length)
Pair = tuple[NetKey, NetKey]  # (source class, destination class), by CIDR
AllowKey = tuple[int, int, int, int, int]  # (match bits, src class, dst class, proto, port): the map's key
K = TypeVar("K")

# Between neighbouring allow rules' ranks as first given: room for 32 rules inserted
# one after another into one gap before every rule is ranked afresh (O(rules)).
RANK_GAP = 1 << 32


def port_prefixes(low: int, high: int) -> Iterator[tuple[int, int]]:
    """Cover [low, high] with the fewest aligned (port, prefix bits) blocks: at most 30."""
    while low <= high:
        size = low & -low if low else 1 << PORT_BITS
        while low + size - 1 > high:
            size >>= 1
        yield low, PORT_BITS - (size.bit_length() - 1)
        low += size


def spec_prefixes(spec: PortSpec) -> Iterator[PrefixKey]:
    if spec.proto == "any":
        yield 0, 0, 0
    elif spec.proto == "icmp":
        yield PROTO_CODES["icmp"], 0, PROTO_BITS
    else:
        for port, bits in port_prefixes(spec.low, spec.high):
            yield PROTO_CODES[spec.proto], port, PROTO_BITS + bits


def _ancestors(key: PrefixKey) -> Iterator[PrefixKey]:
    """The shorter prefixes of (protocol, port) that contain `key`, longest first."""
    proto, port, bits = key
    for shorter in range(bits - 1, PROTO_BITS - 1, -1):
        mask = ((1 << (shorter - PROTO_BITS)) - 1) << (PORT_BITS - (shorter - PROTO_BITS))
        yield proto, port & mask, shorter
    if bits > 0:
        yield 0, 0, 0


def _key(net: netaddr.IPNetwork) -> NetKey:
    """A policy CIDR's identity as plain ints: cheap to hash and to sort, where
    netaddr computes `first`/`last` on each call (a large policy names 200k CIDRs)."""
    return net.version, net.value, net.prefixlen


def _contains(outer: NetKey, inner: NetKey) -> bool:
    width = 32 if outer[0] == 4 else 128
    return (outer[0] == inner[0] and outer[2] <= inner[2]
            and inner[1] >> (width - outer[2]) == outer[1] >> (width - outer[2]))


def _describe(rule: AllowRule) -> str:
    ports = ", ".join(str(p) for p in rule.ports)
    return f"{rule.src.text} -> {rule.dst.text} {ports}"


@dataclass(frozen=True)
class _Said:
    """An exception or allow rule as the compiler reads it: what it names and lists."""

    text: str
    src: tuple[NetKey, ...]
    dst: tuple[NetKey, ...]
    keys: tuple[PrefixKey, ...]  # allow rules; () for exceptions


@dataclass
class Delta:
    """The entries an update changed, by table, in the numbering of the IR it made:
    what to write (new or changed) and what to delete. Pure values, keyed as the
    IR's tables are (classes by network key, the others by class ids)."""

    classes_written: dict[NetKey, tuple[int, int]] = field(default_factory=dict)  # (class, overlay)
    classes_deleted: list[NetKey] = field(default_factory=list)
    exceptions_written: dict[tuple[int, int], int] = field(default_factory=dict)
    exceptions_deleted: list[tuple[int, int]] = field(default_factory=list)
    allowed_written: dict[AllowKey, int] = field(default_factory=dict)
    allowed_deleted: list[AllowKey] = field(default_factory=list)
    base: str = ""  # the digest of the policy it changes
    rules_new: list[int] = field(default_factory=list)  # ids that count a rule they did not before
    # Entries per table afterwards, as a backend sizes its tables ("classes_v4",
    # "classes_v6", "exceptions", "hairpins", "allowed"), and "rules": one past the
    # highest rule id.
    sizes: dict[str, int] = field(default_factory=dict)
    # The numbering the new IR is compiled under, as Numbering.of(ir) gives it, at the
    # price of copying the compiler's ids rather than reading every rule of the IR.
    numbering: Numbering | None = None


@dataclass(frozen=True)
class Numbering:
    """The ids an IR gave its classes (by CIDR), overlays (by name) and rules (by
    identity): what a later compile keeps, so that what stays keeps its entries."""

    classes: dict[NetKey, int]
    overlays: dict[str, int]
    rules: dict[str, int]

    @classmethod
    def of(cls, ir: IR) -> Numbering:
        """The numbering `ir` was compiled under."""
        identities = rule_identities((r.name, r.text) for r in ir.rules)
        return cls({_key(c.network): c.class_id for c in ir.classes},
                   {o.name: o.id for o in ir.overlays},
                   {identities[r.name]: r.id for r in ir.rules if r.id >= FIRST_POLICY_RULE})


@dataclass(frozen=True)
class RuleEdit:
    """Which allow rules a new policy changes, by place, from a caller that knows (the
    cluster agent knows which rule keys changed): `removed`, indexes in the policy
    compiled now of the rules that go; `added`, indexes in the new policy of the
    rules that come. A rule changed in place is removed and added at its index.

    The caller promises that the new policy's other allow rules are the old ones,
    in the same order, each saying what it said (where the file says it may move).
    Compiler.update checks what it can without reading them: the lengths, the
    indexes, and the text of the rules on either side of each one named."""

    removed: tuple[int, ...] = ()
    added: tuple[int, ...] = ()


class Compiler:
    """One policy compiled, and the state that compiles the next one as a difference."""

    policy: Policy
    # The class tree: every CIDR the policy names, the overlay that holds it, how many
    # subnets and endpoints name it, its nearest named ancestor and its named children.
    owner: dict[NetKey, str]
    nets: dict[NetKey, netaddr.IPNetwork]
    namers: dict[NetKey, int]
    parent: dict[NetKey, NetKey | None]
    kids: dict[NetKey, list[NetKey]]
    # The numbering: kept by an update for what both policies name.
    class_ids: dict[NetKey, int]
    free_class_ids: _Ids
    overlay_ids: dict[str, int]
    rule_ids: dict[str, int]  # by rule identity; exceptions, hairpins, allow rules
    free_rule_ids: _Ids
    hairpin: dict[str, bool]  # overlay -> does traffic inside it pass as hairpin
    exceptions: list[_Said]
    said: dict[int, _Said]  # rule id -> the exception or allow rule
    order: list[int]  # the allow rules' ids, in file order
    # Allow rule id -> a number that sorts as the rules do: kept, with gaps between
    # neighbours, so that a rule inserted costs one number, not renumbering those after.
    rank: dict[int, int]
    exception_rank: dict[int, int]  # exception id -> its place, in file order
    # Allow rule text -> the rules of that text, in file order: the one says
    # `text`'s identity, the second `text #2`, ... (tables.rule_identities).
    by_text: dict[str, list[int]]
    users: dict[NetKey, set[int]]  # CIDR -> the rules and exceptions naming it
    exception_pairs: dict[Pair, list[int]]  # -> the exceptions making it unfiltered
    listed: dict[Pair, dict[PrefixKey, list[int]]]  # -> prefix -> the allow rules listing it
    resolved: dict[Pair, dict[PrefixKey, int]]  # -> the allowed map's entries of the pair
    sizes: dict[str, int]  # entries per table, as Delta.sizes says them
    _seen: _Seen | None  # while an update runs: what it touched, as it was
    # The IR's tables, kept as an update goes so that making the IR costs no sorting:
    # the named CIDRs in address order and their class entries, the pairs with
    # allowed entries in address order and their entries.
    _class_order: list[NetKey]
    _prefixes: dict[NetKey, ClassPrefix]
    _pair_order: list[Pair]
    _entries: dict[Pair, tuple[AllowEntry, ...]]
    _ir: IR | None  # the IR last made: of the policy compiled now unless `_ir_stale`
    _ir_stale: bool
    _digest: str | None

    def __init__(self, policy: Policy, numbering: Numbering | None = None) -> None:
        """Compile `policy`; with a `numbering`, keep its ids for what it numbers."""
        self._build(policy, numbering)

    def numbering(self) -> Numbering:
        return Numbering(dict(self.class_ids), dict(self.overlay_ids), dict(self.rule_ids))

    @property
    def ir(self) -> IR:
        """The IR of the policy compiled now, made when first read after a change."""
        if self._ir is None or self._ir_stale:
            self._ir, self._ir_stale = self._made_ir(self._ir), False
        return self._ir

    @property
    def digest(self) -> str:
        """The policy's digest (policy_digest), taken when first asked for after a change:
        it hashes every rule's text (100k rules: about 11 ms)."""
        if self._digest is None:
            said = self.said.__getitem__
            self._digest = policy_digest(self.policy, (s.text for s in self.exceptions),
                                         map(attrgetter("text"), map(said, self.order)))
        return self._digest

    # -- compiling afresh ------------------------------------------------------

    def _build(self, policy: Policy, numbering: Numbering | None) -> None:
        self.policy = policy
        self._seen = None
        self._ir, self._ir_stale, self._digest = None, False, None
        self.owner = {}
        self.nets = {}
        self.namers = {}
        for overlay in policy.overlays:
            for net in overlay.subnets:
                self._name(_key(net), net, overlay.name)
        for endpoint in _endpoints(policy):
            for net in endpoint.cidrs:
                self._name(_key(net), net, endpoint.overlay)
        self.parent = {}
        self.kids = {}
        stack: list[NetKey] = []
        # Policy CIDRs have no host bits, so (version, address, length) sorts as
        # (version, first, -last): containers before what they contain.
        self._class_order = sorted(self.owner)
        for key in self._class_order:
            while stack and not _contains(stack[-1], key):
                stack.pop()
            above = stack[-1] if stack else None
            self.parent[key] = above
            if above is not None:
                self.kids.setdefault(above, []).append(key)
            stack.append(key)

        old = numbering or Numbering({}, {}, {})
        self.class_ids, self.free_class_ids = _numbered(self._class_order, old.classes, 1)
        self.overlay_ids, _ = _numbered([o.name for o in policy.overlays], old.overlays, 1)
        self.hairpin = {o.name: not o.isolated for o in policy.overlays}
        self._prefixes = {key: self._prefix(key) for key in self._class_order}

        self.exceptions = _exceptions_said(policy)
        rules = [_said_of(_describe(r), r) for r in policy.rules]
        exception_identities = _told_apart("exception", [s.text for s in self.exceptions])
        allow_identities = _told_apart("allow", [s.text for s in rules])
        self.rule_ids, self.free_rule_ids = _numbered(
            [*exception_identities, *(f"hairpin {o.name}" for o in policy.overlays if not o.isolated),
             *allow_identities], old.rules, FIRST_POLICY_RULE)
        self.exception_rank = {self.rule_ids[identity]: n for n, identity in enumerate(exception_identities)}
        self.order = [self.rule_ids[identity] for identity in allow_identities]
        self.said = {**dict(zip(self.exception_rank, self.exceptions, strict=True)),
                     **dict(zip(self.order, rules, strict=True))}
        self.rank = {rule_id: n * RANK_GAP for n, rule_id in enumerate(self.order)}
        self.by_text = {}
        for rule_id, said in zip(self.order, rules, strict=True):
            self.by_text.setdefault(said.text, []).append(rule_id)

        # Who names each CIDR (for the classes a new CIDR splits off its ancestors).
        self.users = {}
        self.exception_pairs = {}
        for rule_id in self.exception_rank:
            said = self.said[rule_id]
            self._use(said, rule_id)
            for pair in self._pairs(said):
                self.exception_pairs.setdefault(pair, []).append(rule_id)
        self.listed = {}
        for rule_id in self.order:
            said = self.said[rule_id]
            self._use(said, rule_id)
            self._list(said, rule_id, self._pairs(said))
        self.resolved = {
            pair: self._resolve(table) for pair, table in self.listed.items()}
        self._pair_order = sorted(self.resolved)
        self._entries = {pair: self._allow_entries(pair, self.resolved[pair]) for pair in self._pair_order}
        self.sizes = {
            "classes_v4": sum(1 for key in self.owner if key[0] == 4),
            "classes_v6": sum(1 for key in self.owner if key[0] == 6),
            "exceptions": len(self.exception_pairs),
            "hairpins": sum(self.hairpin.values()),
            "allowed": sum(len(table) for table in self.resolved.values()),
            "rules": self.free_rule_ids.next,
        }

    def _name(self, key: NetKey, net: netaddr.IPNetwork, overlay: str) -> None:
        self.owner.setdefault(key, overlay)
        self.nets.setdefault(key, net)
        self.namers[key] = self.namers.get(key, 0) + 1

    def _use(self, said: _Said, rule_id: int) -> None:
        for key in (*said.src, *said.dst):
            self.users.setdefault(key, set()).add(rule_id)

    def _unuse(self, said: _Said, rule_id: int) -> None:
        for key in (*said.src, *said.dst):
            users = self.users.get(key)
            if users is not None:
                users.discard(rule_id)
                if not users:
                    del self.users[key]

    # -- compiling a change ----------------------------------------------------

    def update(self, policy: Policy, edit: RuleEdit | None = None) -> Delta | None:
        """Compile `policy` as a change of the policy compiled now, keeping the numbering;
        the entries that changed. None: compiled afresh under the same numbering (the
        overlays or exceptions changed, or rules that stay changed their order), and
        the caller compares whole tables.

        `edit`: which allow rules changed, where the caller knows (see RuleEdit; a
        ValueError where it visibly does not fit): then no other rule is read, and
        a rule it keeps keeps its id, whatever rules of its text come and go around
        it. Without, the edit is found by comparing every rule's identity."""
        if (_overlays_of(policy) != _overlays_of(self.policy)
                or _exceptions_said(policy) != self.exceptions):
            self._build(policy, self.numbering())
            return None
        if edit is None:
            edit = self._edit_to(policy)
            if edit is None:
                self._build(policy, self.numbering())
                return None
        else:
            self._check(edit, policy)
        return self._apply(policy, sorted(edit.removed), sorted(edit.added))

    def _edit_to(self, policy: Policy) -> RuleEdit | None:
        """The edit that turns the allow rules compiled now into `policy`'s, rule by
        identity; None when rules both have are in another order."""
        was = _told_apart("allow", [self.said[rule_id].text for rule_id in self.order])
        now = _told_apart("allow", [_describe(r) for r in policy.rules])
        before, after = set(was), set(now)
        if [i for i in was if i in after] != [i for i in now if i in before]:
            return None
        return RuleEdit(tuple(n for n, identity in enumerate(was) if identity not in after),
                        tuple(n for n, identity in enumerate(now) if identity not in before))

    def _check(self, edit: RuleEdit, policy: Policy) -> None:
        """Refuse (ValueError) an edit that cannot turn the rules compiled now into
        `policy`'s, as far as the rules it names and their neighbours show."""
        removed, added = sorted(edit.removed), sorted(edit.added)
        for name, indexes, count in (("removed", removed, len(self.order)),
                                     ("added", added, len(policy.rules))):
            if len(set(indexes)) != len(indexes) or (indexes and not 0 <= indexes[0] <= indexes[-1] < count):
                raise ValueError(f"RuleEdit.{name}: {indexes} are not distinct indexes below {count}")
        kept = len(self.order) - len(removed)
        if len(policy.rules) != kept + len(added):
            raise ValueError(f"RuleEdit: {len(self.order)} rules, {len(removed)} removed and "
                             f"{len(added)} added cannot make {len(policy.rules)}")
        # The kept rules on either side of each edit, by their place among the kept: an
        # edit at `index` with `n` edits before it has `index - n` kept rules before it.
        around = {index - n + side for edits in (removed, added)
                  for n, index in enumerate(edits) for side in (-1, 0)}
        for n in sorted(k for k in around if 0 <= k < kept):
            old, new = self.order[_nth_outside(removed, n)], policy.rules[_nth_outside(added, n)]
            if self.said[old].text != _describe(new):
                raise ValueError(f"RuleEdit: allow[{new.index}] is not the rule it keeps "
                                 f"({_describe(new)!r}, was {self.said[old].text!r})")

    def _apply(self, policy: Policy, removed: list[int], added: list[int]) -> Delta:
        """Compile the change of the rules at `removed` (old indexes) for those at
        `added` (new indexes), both rising."""
        base = self.digest  # known already where the last change's was read
        gone = [self.order[index] for index in removed]
        made = [_said_of(_describe(policy.rules[index]), policy.rules[index]) for index in added]
        texts = {self.said[rule_id].text for rule_id in gone} | {said.text for said in made}
        for text in texts:  # their identities change below: named afresh once all is in place
            for identity in _told_apart("allow", [text] * len(self.by_text.get(text, ()))):
                del self.rule_ids[identity]
        self._seen = _Seen()
        left = [self.said.pop(rule_id) for rule_id in gone]
        for rule_id, said in zip(gone, left, strict=True):
            self._unlist(said, rule_id)
            self._unuse(said, rule_id)
            for key in (*said.src, *said.dst):
                self.namers[key] -= 1
            self.by_text[said.text].remove(rule_id)
            del self.rank[rule_id]
        for index in reversed(removed):
            del self.order[index]
        new = []
        for index, said in zip(added, made, strict=True):
            rule_id = self.free_rule_ids.take()
            self.said[rule_id] = said
            self._place(rule_id, index)
            bisect.insort(self.by_text.setdefault(said.text, []), rule_id, key=self.rank.__getitem__)
            new.append(rule_id)
        # Only now: an id that a rule of this change gave up is not another's in the
        # same change, so no packet of the outgoing generation counts under a new rule.
        for rule_id in gone:
            self.free_rule_ids.give_back(rule_id)
        for text in texts:
            ids = self.by_text[text]
            if ids:
                self.rule_ids.update(zip(_told_apart("allow", [text] * len(ids)), ids, strict=True))
            else:
                del self.by_text[text]
        for index, rule_id in zip(added, new, strict=True):
            said, rule = self.said[rule_id], policy.rules[index]
            for keys, endpoint in ((said.src, rule.src), (said.dst, rule.dst)):
                for key, net in zip(keys, endpoint.cidrs, strict=True):
                    if key not in self.owner:
                        self._split(key, net, endpoint.overlay)
                    self.namers[key] += 1
        for key in {k for said in left for k in (*said.src, *said.dst)}:
            if self.namers.get(key) == 0:
                self._merge(key)
        for rule_id in new:
            said = self.said[rule_id]
            self._use(said, rule_id)
            self._list(said, rule_id, self._pairs(said))
        delta = self._delta()
        delta.base = base
        delta.rules_new = new
        self._seen = None
        self.policy = policy
        delta.numbering = self.numbering()
        # The IR made before stays until the next is made from it: an update neither
        # makes it nor frees it (100k rules: 5 ms).
        self._ir_stale, self._digest = True, None
        return delta

    def _place(self, rule_id: int, index: int) -> None:
        """Put allow rule `rule_id` at `index` of the order, ranked between its neighbours;
        where they leave no room, every rule is ranked afresh."""
        order, rank = self.order, self.rank
        order.insert(index, rule_id)
        before = rank[order[index - 1]] if index > 0 else None
        after = rank[order[index + 1]] if index + 1 < len(order) else None
        if before is None:
            rank[rule_id] = 0 if after is None else after - RANK_GAP
        elif after is None:
            rank[rule_id] = before + RANK_GAP
        elif after - before > 1:
            rank[rule_id] = (before + after) // 2
        else:
            self.rank = {ranked: n * RANK_GAP for n, ranked in enumerate(order)}

    def _delta(self) -> Delta:
        """What the entries the update touched were, against what they are now."""
        seen, ids, sizes = self._seen, self.class_ids, self.sizes
        assert seen is not None
        delta = Delta()
        for key, was_class in seen.classes.items():
            now_class = (ids[key], self.overlay_ids[self.owner[key]]) if key in ids else None
            family = "classes_v4" if key[0] == 4 else "classes_v6"
            if now_class is None and was_class is not None:
                delta.classes_deleted.append(key)
                sizes[family] -= 1
            elif now_class is not None and now_class != was_class:
                delta.classes_written[key] = now_class
                sizes[family] += was_class is None
        for pair, was_exception in seen.exceptions.items():
            now_exception = self._numbered_exception(pair)
            if was_exception is not None and (now_exception is None or now_exception[0] != was_exception[0]):
                delta.exceptions_deleted.append(was_exception[0])
                sizes["exceptions"] -= 1
            if now_exception is not None and now_exception != was_exception:
                delta.exceptions_written[now_exception[0]] = now_exception[1]
                sizes["exceptions"] += was_exception is None or now_exception[0] != was_exception[0]
        for pair, was in seen.pairs.items():
            table = self.listed.get(pair)
            resolved = self._resolve(table) if table else {}
            if resolved:
                if pair not in self.resolved:
                    bisect.insort(self._pair_order, pair)
                self.resolved[pair] = resolved
                self._entries[pair] = self._allow_entries(pair, resolved)
            elif pair in self.resolved:
                del self.resolved[pair], self._entries[pair]
                del self._pair_order[bisect.bisect_left(self._pair_order, pair)]
            now = self._numbered_entries(pair, resolved)
            gone = [key for key in was if key not in now]
            delta.allowed_deleted += gone
            delta.allowed_written.update({key: rule for key, rule in now.items() if was.get(key) != rule})
            sizes["allowed"] += sum(1 for key in now if key not in was) - len(gone)
        sizes["rules"] = self.free_rule_ids.next
        delta.sizes = dict(sizes)
        return delta

    def _numbered_entries(self, pair: Pair, table: dict[PrefixKey, int]) -> dict[AllowKey, int]:
        """A pair's entries keyed as the allowed map keys them: (bits, src, dst, proto, port)."""
        if not table:
            return {}
        s, d = self.class_ids[pair[0]], self.class_ids[pair[1]]
        return {(bits, s, d, proto, port): rule for (proto, port, bits), rule in table.items()}

    def _numbered_exception(self, pair: Pair) -> tuple[tuple[int, int], int] | None:
        listers = self.exception_pairs.get(pair)
        if not listers:
            return None
        return ((self.class_ids[pair[0]], self.class_ids[pair[1]]),
                min(listers, key=self.exception_rank.__getitem__))

    def _touch(self, pair: Pair) -> None:
        """Remember a pair's entries as they were, before the update changes them."""
        seen = self._seen
        assert seen is not None, "touched outside an update"
        if pair not in seen.pairs:
            seen.pairs[pair] = self._numbered_entries(pair, self.resolved.get(pair, {}))
            seen.exceptions[pair] = self._numbered_exception(pair)

    def _unlist(self, said: _Said, rule_id: int) -> None:
        for pair in self._pairs(said):
            table = self.listed.get(pair)
            if table is None:
                continue  # decided earlier: never listed
            self._touch(pair)
            for key in said.keys:
                listers = table.get(key)
                if listers and rule_id in listers:
                    listers.remove(rule_id)
                    if not listers:
                        del table[key]
            if not table:
                del self.listed[pair]

    def _ancestry(self, key: NetKey) -> list[NetKey]:
        """`key`'s named ancestors, nearest first."""
        found = []
        above = self.parent.get(key)
        while above is not None:
            found.append(above)
            above = self.parent[above]
        return found

    def _pairs_through(self, key: NetKey) -> Iterator[tuple[int, Pair]]:
        """(rule id, pair) for every pair with class `key` that the rules and
        exceptions naming one of its ancestors make."""
        ancestors = self._ancestry(key)
        within = set(ancestors)
        for rule_id in {r for a in ancestors for r in self.users.get(a, ())}:
            rule = self.said[rule_id]
            pairs: set[Pair] = set()
            if within.intersection(rule.src):
                pairs.update((key, d) for d in self._classes(rule.dst))
            if within.intersection(rule.dst):
                pairs.update((s, key) for s in self._classes(rule.src))
            for pair in pairs:
                yield rule_id, pair

    def _split(self, key: NetKey, net: netaddr.IPNetwork, overlay: str) -> None:
        """A new CIDR becomes a class of its own, taking its addresses from its nearest
        named ancestor; the rules and exceptions that name an ancestor cover it too."""
        width = 32 if key[0] == 4 else 128
        above = None
        for length in range(key[2] - 1, -1, -1):
            candidate = (key[0], key[1] >> (width - length) << (width - length) if length else 0, length)
            if candidate in self.owner:
                above = candidate
                break
        assert self._seen is not None
        self._seen.classes.setdefault(key, None)
        self.owner[key], self.nets[key], self.namers[key] = overlay, net, 0
        self.parent[key] = above
        if above is not None:
            siblings = self.kids.get(above, [])
            inside = [k for k in siblings if _contains(key, k)] if key[2] < width else []
            self.kids[above] = sorted([k for k in siblings if k not in inside] + [key])
            if inside:
                self.kids[key] = inside
                for kid in inside:
                    self.parent[kid] = key
        self.class_ids[key] = self.free_class_ids.take()
        bisect.insort(self._class_order, key)
        self._prefixes[key] = self._prefix(key)
        found = list(self._pairs_through(key))
        for rule_id, pair in found:
            if rule_id in self.exception_rank:
                self._touch(pair)
                self.exception_pairs.setdefault(pair, []).append(rule_id)
        for rule_id, pair in found:
            if rule_id in self.rank:
                self._list(self.said[rule_id], rule_id, [pair])

    def _merge(self, key: NetKey) -> None:
        """A CIDR nothing names any more: its addresses go back to its nearest named
        ancestor's class, and every pair of its class goes."""
        assert self._seen is not None
        self._seen.classes.setdefault(key, (self.class_ids[key], self.overlay_ids[self.owner[key]]))
        for _, pair in list(self._pairs_through(key)):
            self._touch(pair)
            self.exception_pairs.pop(pair, None)
            self.listed.pop(pair, None)
        for pair in [p for p in self._seen.pairs if key in p]:
            self.listed.pop(pair, None)
        above = self.parent.pop(key)
        kids = self.kids.pop(key, [])
        for kid in kids:
            self.parent[kid] = above
        if above is not None:
            self.kids[above] = sorted([k for k in self.kids[above] if k != key] + kids)
            if not self.kids[above]:
                del self.kids[above]
        self.free_class_ids.give_back(self.class_ids.pop(key))
        del self.owner[key], self.nets[key], self.namers[key], self._prefixes[key]
        del self._class_order[bisect.bisect_left(self._class_order, key)]

    # -- classes and pairs -----------------------------------------------------

    def subtree(self, key: NetKey) -> list[NetKey]:
        """`key` and every named CIDR inside it: the classes of an endpoint naming it."""
        found = [key]
        kids = self.kids.get(key)
        if kids:
            for kid in kids:
                found.extend(self.subtree(kid))
        return found

    def _classes(self, keys: Iterable[NetKey]) -> list[NetKey]:
        return [c for key in keys for c in self.subtree(key)]

    def _pairs(self, said: _Said) -> Iterator[Pair]:
        dst = self._classes(said.dst)
        for s in self._classes(said.src):
            for d in dst:
                yield s, d

    def _decided_earlier(self, pair: Pair) -> bool:
        """Is every packet of `pair` decided before the allow rules (exception, hairpin)?"""
        if pair in self.exception_pairs:
            return True
        overlay = self.owner[pair[0]]
        return overlay == self.owner[pair[1]] and self.hairpin[overlay]

    def _list(self, said: _Said, rule_id: int, pairs: Iterable[Pair]) -> None:
        """Record that `rule_id` lists its keys for `pairs`."""
        for pair in pairs:
            if self._decided_earlier(pair):
                continue
            if self._seen is not None:
                self._touch(pair)
            table = self.listed.setdefault(pair, {})
            for key in said.keys:
                table.setdefault(key, []).append(rule_id)

    def _resolve(self, table: dict[PrefixKey, list[int]]) -> dict[PrefixKey, int]:
        """Turn 'rules R list prefix P' into entries that a longest-prefix match reads
        as 'the first rule in file order that allows this packet'.

        A packet matches every listed prefix that contains it, and the lookup
        returns only the longest. So each entry carries the first rule among its
        own and its listed ancestors'; an entry whose rule equals its nearest
        listed ancestor's adds nothing and is left out."""
        rank = self.rank
        if len(table) == 1:  # the common case: nothing to inherit from
            ((key, listers),) = table.items()
            return {key: listers[0] if len(listers) == 1 else min(listers, key=rank.__getitem__)}
        chosen: dict[PrefixKey, int] = {}
        entries: dict[PrefixKey, int] = {}
        # Shorter prefixes first, so every ancestor is resolved before its children.
        for key in sorted(table, key=lambda k: k[2]):
            nearest = next((a for a in _ancestors(key) if a in table), None)
            inherited = chosen[nearest] if nearest is not None else None
            rule = min(table[key], key=rank.__getitem__)
            if inherited is not None and rank[inherited] < rank[rule]:
                rule = inherited
            chosen[key] = rule
            if rule != inherited:
                entries[key] = rule
        return entries

    # -- the IR ----------------------------------------------------------------

    def _prefix(self, key: NetKey) -> ClassPrefix:
        return ClassPrefix(self.nets[key], self.class_ids[key], self.overlay_ids[self.owner[key]])

    def _allow_entries(self, pair: Pair, table: dict[PrefixKey, int]) -> tuple[AllowEntry, ...]:
        """A pair's allowed entries as the IR lists them, by (protocol, port, bits)."""
        s, d = self.class_ids[pair[0]], self.class_ids[pair[1]]
        return tuple(AllowEntry(s, d, proto, port, bits, rule)
                     for (proto, port, bits), rule in sorted(table.items()))

    def _made_ir(self, previous: IR | None) -> IR:
        """The IR of what is compiled now. Its tables are kept sorted as updates go;
        only the rule table is made afresh (its names say each rule's place), taking
        the allow rules that kept their place from the `previous` IR."""
        policy, said = self.policy, self.said
        rules = [RuleInfo(rule_id, name, name) for rule_id, name in FIXED_RULES.items()]
        rules += [RuleInfo(rule_id, f"exception:{n}", said[rule_id].text, e.where.line)
                  for n, (rule_id, e) in enumerate(zip(self.exception_rank, policy.exceptions, strict=True))]
        overlays = []
        for overlay in policy.overlays:
            hairpin = self.rule_ids[f"hairpin {overlay.name}"] if not overlay.isolated else 0
            if hairpin:
                rules.append(RuleInfo(hairpin, f"hairpin:{overlay.name}",
                                      f"{overlay.name} -> {overlay.name}", overlay.where.line))
            overlays.append(OverlayInfo(self.overlay_ids[overlay.name], overlay.name,
                                        overlay.isolated, hairpin))
        # `previous` has as many rules before its allow rules: an update changes allow rules alone.
        was = previous.rules[len(rules):] if previous is not None else ()
        texts = map(attrgetter("text"), map(said.__getitem__, self.order))
        for n, (rule_id, text, rule) in enumerate(zip(self.order, texts, policy.rules, strict=True)):
            info = was[n] if n < len(was) else None
            if info is None or info.id != rule_id or info.line != rule.where.line or info.text != text:
                info = RuleInfo(rule_id, f"allow:{n}", text, rule.where.line)
            rules.append(info)
        ids = self.class_ids
        exception_rank = self.exception_rank.__getitem__
        return IR(
            default_action="allow" if policy.default == "allow" else policy.deny_action,
            deny_action=policy.deny_action,
            timeouts=dict(policy.timeouts),
            overlays=tuple(overlays),
            classes=tuple(map(self._prefixes.__getitem__, self._class_order)),
            # In address order, not id order: an IR compiled as a change lists its
            # entries as one compiled afresh does (the iptables layout follows it).
            exceptions=tuple(ExceptionPair(ids[s], ids[d], min(self.exception_pairs[(s, d)],
                                                               key=exception_rank))
                             for s, d in sorted(self.exception_pairs)),
            allowed=tuple(chain.from_iterable(map(self._entries.__getitem__, self._pair_order))),
            rules=tuple(rules),
            interfaces=policy.interfaces,
            audit=policy.audit,
            digest=self.digest,
        )


def _overlays_of(policy: Policy) -> list[tuple[str, tuple[netaddr.IPNetwork, ...], bool]]:
    return [(o.name, o.subnets, o.isolated) for o in policy.overlays]


def _endpoints(policy: Policy) -> Iterator[Endpoint]:
    for exc in policy.exceptions:
        yield from (exc.src, exc.dst)
    for rule in policy.rules:
        yield from (rule.src, rule.dst)


def _exceptions_said(policy: Policy) -> list[_Said]:
    return [_Said(f"{e.src.text} -> {e.dst.text} unfiltered", _keys_of(e.src), _keys_of(e.dst), ())
            for e in policy.exceptions]


def _said_of(text: str, rule: AllowRule) -> _Said:
    return _Said(text, _keys_of(rule.src), _keys_of(rule.dst),
                 tuple(k for spec in rule.ports for k in spec_prefixes(spec)))


def _keys_of(endpoint: Endpoint) -> tuple[NetKey, ...]:
    return tuple(_key(c) for c in endpoint.cidrs)


def _told_apart(kind: str, texts: list[str]) -> list[str]:
    """The identities of rules of these texts, as tables.rule_identities gives them: the
    kind and text, and ' #n' from the second rule of one text on."""
    seen: dict[str, int] = {}
    found = []
    for text in texts:
        n = seen[text] = seen.get(text, 0) + 1
        found.append(f"{kind} {text}" if n == 1 else f"{kind} {text} #{n}")
    return found


def _nth_outside(excluded: list[int], n: int) -> int:
    """The `n`th (from 0) of the indexes 0, 1, ... that rising `excluded` leaves out."""
    index = n
    for taken in excluded:
        if taken > index:
            break
        index += 1
    return index


@dataclass
class _Seen:
    """What an update touched, as it was before: entries keyed as the maps key them."""

    classes: dict[NetKey, tuple[int, int] | None] = field(default_factory=dict)
    exceptions: dict[Pair, tuple[tuple[int, int], int] | None] = field(default_factory=dict)
    pairs: dict[Pair, dict[AllowKey, int]] = field(default_factory=dict)


class _Ids:
    """Ids from `first` up, the lowest free one first: an id that goes is given again."""

    def __init__(self, first: int, taken: Iterable[int] = ()) -> None:
        used = set(taken)
        self.next = max(used, default=first - 1) + 1
        self.freed = [n for n in range(first, self.next) if n not in used]  # sorted: a heap

    def take(self) -> int:
        if self.freed:
            return heapq.heappop(self.freed)
        self.next += 1
        return self.next - 1

    def give_back(self, n: int) -> None:
        heapq.heappush(self.freed, n)


def _numbered(things: list[K], previous: dict[K, int], first: int) -> tuple[dict[K, int], _Ids]:
    """An id for each of `things`: its `previous` id where it had one, else the lowest
    free one; and what gives the next ones."""
    ids = {t: previous[t] for t in things if t in previous}
    allocator = _Ids(first, ids.values())
    for thing in things:
        if thing not in ids:
            ids[thing] = allocator.take()
    return ids, allocator


def policy_digest(policy: Policy, exceptions: Iterable[str], rules: Iterable[str]) -> str:
    """What the policy says, hashed: the same for the same policy however it is
    spelled or numbered (formatting, comments, key order and ids aside).
    `exceptions` and `rules`: each one's text, in file order."""
    head = {
        "default": policy.default,
        "deny_action": policy.deny_action,
        "timeouts": dict(sorted(policy.timeouts.items())),
        "overlays": [[o.name, [str(n) for n in o.subnets], o.isolated] for o in policy.overlays],
        "interfaces": list(policy.interfaces) if policy.interfaces is not None else None,
        **({"audit": True} if policy.audit else {}),
    }
    hashed = hashlib.sha256(json.dumps(head, separators=(",", ":")).encode())
    for texts in (exceptions, rules):
        hashed.update(b"\0" + "\n".join(texts).encode())
    return hashed.hexdigest()


def compile_policy(policy: Policy, numbering: Numbering | None = None) -> IR:
    """`policy`'s IR: ids in file order, or kept from `numbering` where it has them."""
    return Compiler(policy, numbering).ir


def digest_of(policy: Policy) -> str:
    """The digest `policy`'s IR has, without compiling it."""
    return policy_digest(policy, (f"{e.src.text} -> {e.dst.text} unfiltered" for e in policy.exceptions),
                         (_describe(r) for r in policy.rules))
