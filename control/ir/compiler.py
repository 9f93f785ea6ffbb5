"""IR stage: policy model -> IR, in pure Python; the same policy always gives the same tables.

Reads the policy stage's model (`isoebpf.policy.model`), builds `tables.IR`; its
neighbours are `lint` (warnings about what it built) and `evaluate` (the
reference semantics on what it built).
"""

from __future__ import annotations

from collections.abc import Iterator

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
    with_digest,
)

PrefixKey = tuple[int, int, int]  # (proto, port, match_bits)


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


NetKey = tuple[int, int, int]  # (version, network address, prefix length)


def _key(net: netaddr.IPNetwork) -> NetKey:
    """A policy CIDR's identity as plain ints: cheap to hash and to sort, where
    netaddr computes `first`/`last` on each call (a large policy names 200k CIDRs)."""
    return net.version, net.value, net.prefixlen


class _ClassTree:
    """Named prefixes in depth-first order, so each prefix's subtree is one slice."""

    def __init__(self, policy: Policy) -> None:
        # Every CIDR the policy names, with the overlay that holds it.
        named: dict[NetKey, tuple[netaddr.IPNetwork, str]] = {}
        for overlay in policy.overlays:
            for net in overlay.subnets:
                named[_key(net)] = (net, overlay.name)
        for endpoint in _endpoints(policy):
            for net in endpoint.cidrs:
                named.setdefault(_key(net), (net, endpoint.overlay))
        # Policy CIDRs have no host bits, so (version, address, length) sorts as
        # (version, first, -last): containers before what they contain.
        keys = sorted(named)
        self.order = [named[k][0] for k in keys]
        self.owners = [named[k][1] for k in keys]
        self.class_of = {k: i + 1 for i, k in enumerate(keys)}
        # end[i]: one past the last descendant of order[i] in depth-first order.
        self.end = [0] * len(keys)
        stack: list[tuple[int, int, int]] = []  # (index, version, last address)
        for i, (version, first, length) in enumerate(keys):
            while stack and not (stack[-1][1] == version and first <= stack[-1][2]):
                self.end[stack.pop()[0]] = i
            width = 32 if version == 4 else 128
            stack.append((i, version, first | ((1 << (width - length)) - 1)))
        for i, _, _ in stack:
            self.end[i] = len(keys)

    def classes(self, endpoint: Endpoint) -> list[int]:
        """Every class whose addresses lie inside the endpoint."""
        found: list[int] = []
        for net in endpoint.cidrs:
            first = self.class_of[_key(net)] - 1
            found.extend(range(first + 1, self.end[first] + 1))
        return found


def _endpoints(policy: Policy) -> Iterator[Endpoint]:
    for exc in policy.exceptions:
        yield from (exc.src, exc.dst)
    for rule in policy.rules:
        yield from (rule.src, rule.dst)


def compile_policy(policy: Policy) -> IR:
    tree = _ClassTree(policy)
    rules = [RuleInfo(rule_id, name, name) for rule_id, name in FIXED_RULES.items()]
    next_id = FIRST_POLICY_RULE

    exceptions: dict[tuple[int, int], int] = {}
    for exc in policy.exceptions:
        rules.append(RuleInfo(next_id, f"exception:{exc.index}",
                              f"{exc.src.text} -> {exc.dst.text} unfiltered", exc.where.line))
        for pair in _pairs(tree, exc.src, exc.dst):
            exceptions.setdefault(pair, next_id)
        next_id += 1

    overlays: list[OverlayInfo] = []
    overlay_id = {}
    for number, overlay in enumerate(policy.overlays, start=1):
        hairpin = 0
        if not overlay.isolated:
            hairpin = next_id
            rules.append(RuleInfo(next_id, f"hairpin:{overlay.name}",
                                  f"{overlay.name} -> {overlay.name}", overlay.where.line))
            next_id += 1
        overlays.append(OverlayInfo(number, overlay.name, overlay.isolated, hairpin))
        overlay_id[overlay.name] = number

    hairpin_overlays = {o.id for o in overlays if o.hairpin_rule}
    class_overlay = {i: overlay_id[name] for i, name in enumerate(tree.owners, start=1)}

    def decided_earlier(pair: tuple[int, int]) -> bool:
        src_overlay = class_overlay[pair[0]]
        return pair in exceptions or (
            src_overlay == class_overlay[pair[1]] and src_overlay in hairpin_overlays
        )

    # For each class pair, (proto, port, bits) -> the lowest rule id listing it.
    listed: dict[tuple[int, int], dict[PrefixKey, int]] = {}
    for rule in policy.rules:
        rules.append(RuleInfo(next_id, f"allow:{rule.index}", _describe(rule), rule.where.line))
        keys = [key for spec in rule.ports for key in spec_prefixes(spec)]
        for pair in _pairs(tree, rule.src, rule.dst):
            if decided_earlier(pair):
                continue
            table = listed.setdefault(pair, {})
            for key in keys:
                table.setdefault(key, next_id)
        next_id += 1

    allowed = sorted(_first_match_entries(listed))
    classes = tuple(
        ClassPrefix(net, i, overlay_id[name])
        for i, (net, name) in enumerate(zip(tree.order, tree.owners, strict=True), start=1)
    )
    ir = IR(
        default_action="allow" if policy.default == "allow" else policy.deny_action,
        deny_action=policy.deny_action,
        timeouts=dict(policy.timeouts),
        overlays=tuple(overlays),
        classes=classes,
        exceptions=tuple(ExceptionPair(s, d, r) for (s, d), r in sorted(exceptions.items())),
        allowed=tuple(allowed),
        rules=tuple(rules),
        interfaces=policy.interfaces,
    )
    return with_digest(ir)


def _pairs(tree: _ClassTree, src: Endpoint, dst: Endpoint) -> Iterator[tuple[int, int]]:
    dst_classes = tree.classes(dst)
    for s in tree.classes(src):
        for d in dst_classes:
            yield s, d


def _first_match_entries(
    listed: dict[tuple[int, int], dict[PrefixKey, int]],
) -> Iterator[AllowEntry]:
    """Turn 'rule R lists prefix P' into entries that a longest-prefix match reads
    as 'the first rule that allows this packet'.

    A packet matches every listed prefix that contains it, and the lookup
    returns only the longest. So each entry carries the lowest rule id among
    itself and its listed ancestors; an entry whose value equals its nearest
    listed ancestor's adds nothing and is left out.
    """
    for (src, dst), table in listed.items():
        if len(table) == 1:  # the common case: nothing to inherit from
            ((proto, port, bits), rule), = table.items()
            yield AllowEntry(src, dst, proto, port, bits, rule)
            continue
        resolved: dict[PrefixKey, int] = {}
        # Shorter prefixes first, so every ancestor is resolved before its children.
        for key in sorted(table, key=lambda k: k[2]):
            nearest = next((a for a in _ancestors(key) if a in table), None)
            inherited = resolved[nearest] if nearest is not None else None
            rule = table[key] if inherited is None else min(table[key], inherited)
            resolved[key] = rule
            if rule != inherited:
                yield AllowEntry(src, dst, key[0], key[1], key[2], rule)


def _describe(rule: AllowRule) -> str:
    ports = ", ".join(str(p) for p in rule.ports)
    return f"{rule.src.text} -> {rule.dst.text} {ports}"
