"""IR stage: the compiled policy, flat tables that every backend writes as they are.

No backend reads YAML; each turns these tables into its kernel objects (eBPF
maps, ipsets and chains). The numbering here is an ABI shared with
`bpf/abi.h` (see `abi.py`): fixed rule ids are never renumbered.

Address classes. Every CIDR the policy names (overlay subnets and rule or
exception endpoints) becomes one class. Overlays are disjoint and endpoints lie
inside overlays, so the named CIDRs form a tree of nested prefixes, and the
longest named prefix that holds an address decides every question the policy
can ask about it ("is it in X?" is "is its class at or below X?"). A
longest-prefix-match table from prefix to class is therefore exact, however the
CIDRs overlap. Class 0 means "in no overlay".

Made by `compiler`, judged by `evaluate`; the bottom of the IR stage, importing nothing of ours.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import netaddr

# Fixed rule ids (bpf/abi.h mirrors these). Policy rules start at FIRST_POLICY_RULE.
RULE_UNFILTERED = 0  # source or destination outside every overlay, or not IP
RULE_ESTABLISHED = 1  # a packet of a tracked connection, or an ICMP error about one
RULE_DEFAULT = 2  # no exception, hairpin or allow rule matched
RULE_FRAGMENT = 3  # a later fragment whose first fragment was not seen
RULE_MALFORMED = 4  # a filtered packet whose transport header is cut short
FIRST_POLICY_RULE = 16

FIXED_RULES = {
    RULE_UNFILTERED: "unfiltered",
    RULE_ESTABLISHED: "established",
    RULE_DEFAULT: "default",
    RULE_FRAGMENT: "fragment",
    RULE_MALFORMED: "malformed",
}

# Protocol codes in the allow table. ICMP and ICMPv6 share one code because
# the policy's `icmp` means both; other IP protocols keep their own number.
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_CODES = {"icmp": PROTO_ICMP, "tcp": PROTO_TCP, "udp": PROTO_UDP}

# An allow entry matches on (source class, destination class) and then on the
# first `match_bits` bits of (protocol byte, 16-bit destination port):
# 0 bits = any protocol, 8 = one protocol, 8 + k = a port prefix of k bits.
PROTO_BITS = 8
PORT_BITS = 16


@dataclass(frozen=True)
class RuleInfo:
    """One line of the rule table that counters and traces are named after."""

    id: int
    name: str  # "unfiltered", "exception:0", "hairpin:it", "allow:2", ...
    text: str  # what the rule says, for humans
    line: int = 0  # where the policy file says it (0 for fixed rules)


@dataclass(frozen=True)
class OverlayInfo:
    id: int  # 1-based; 0 is "no overlay"
    name: str
    isolated: bool
    hairpin_rule: int  # 0 when isolated: same-overlay traffic is judged by rules


@dataclass(frozen=True)
class ClassPrefix:
    """One longest-prefix-match entry: addresses under `network` are `class_id`."""

    network: netaddr.IPNetwork
    class_id: int
    overlay_id: int


@dataclass(frozen=True)
class ExceptionPair:
    src_class: int
    dst_class: int
    rule: int


@dataclass(frozen=True, order=True)
class AllowEntry:
    """(src class, dst class) plus a prefix of (protocol, port) -> the first rule allowing it."""

    src_class: int
    dst_class: int
    proto: int
    port: int
    match_bits: int
    rule: int


@dataclass(frozen=True)
class IR:
    default_action: str  # "allow" | "reject" | "drop"
    deny_action: str  # "reject" | "drop": also what default `deny` does
    timeouts: dict[str, int]
    overlays: tuple[OverlayInfo, ...]
    classes: tuple[ClassPrefix, ...]
    exceptions: tuple[ExceptionPair, ...]
    allowed: tuple[AllowEntry, ...]
    rules: tuple[RuleInfo, ...]
    interfaces: tuple[str, ...] | None
    audit: bool = False  # every backend lets what the policy denies through, counted and traced as denied
    digest: str = field(default="", compare=False)

    def rule(self, rule_id: int) -> RuleInfo:
        return self._rules_by_id()[rule_id]

    def _rules_by_id(self) -> dict[int, RuleInfo]:
        cached: dict[int, RuleInfo] | None = self.__dict__.get("_by_id")
        if cached is None:
            cached = {r.id: r for r in self.rules}
            object.__setattr__(self, "_by_id", cached)
        return cached

    def canonical(self) -> dict[str, object]:
        """A JSON-able form with a stable order: what the digest is taken over."""
        return {
            "default_action": self.default_action,
            "deny_action": self.deny_action,
            "timeouts": dict(sorted(self.timeouts.items())),
            "overlays": [[o.id, o.name, o.isolated, o.hairpin_rule] for o in self.overlays],
            "classes": [[str(c.network), c.class_id, c.overlay_id] for c in self.classes],
            "exceptions": [[e.src_class, e.dst_class, e.rule] for e in self.exceptions],
            "allowed": [
                [a.src_class, a.dst_class, a.proto, a.port, a.match_bits, a.rule]
                for a in self.allowed
            ],
            "rules": [[r.id, r.name, r.text, r.line] for r in self.rules],
            "interfaces": list(self.interfaces) if self.interfaces is not None else None,
            # Only when set: every enforcing policy keeps the digest it always had.
            **({"audit": True} if self.audit else {}),
        }


def rule_identities(rules: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Rule name -> what the rule is, for the (name, text) rules of one policy, in
    rule order: the same in every version of the policy that keeps the rule.

    Names number exception and allow rules by their place in the file, so
    inserting a rule renames those after it; identities do not: a fixed rule
    is its name, a hairpin its overlay, an exception or allow rule its kind and
    text, with " #n" from its second occurrence among rules of equal kind and
    text on (editing a rule's text makes it another rule).

    Rules of one identity have one text (a hairpin's and a fixed rule's follow
    from the name), and a rule's identity depends on the rules of its text
    alone: a caller may pass only the rules of the texts it cares about.
    """
    found: dict[str, str] = {}
    seen: dict[str, int] = {}
    for name, text in rules:
        kind, _, what = name.partition(":")
        if kind == "hairpin":
            found[name] = f"{kind} {what}"
        elif kind in ("exception", "allow"):
            identity = f"{kind} {text}"
            seen[identity] = seen.get(identity, 0) + 1
            found[name] = identity if seen[identity] == 1 else f"{identity} #{seen[identity]}"
        else:
            found[name] = name
    return found


def with_digest(ir: IR) -> IR:
    text = json.dumps(ir.canonical(), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()
    return replace(ir, digest=digest)
