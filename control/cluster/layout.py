"""Cluster stage: where a policy lives in etcd, and what a push writes. Pure.

Under a prefix (default `/isoebpf/`; clusters sharing one etcd take one each):

    policy/header              version, default, deny_action, timeouts, interfaces, audit
    policy/overlays/NAME       {"subnets": [...], "isolated": bool}
    policy/exceptions/POS      {"from": ..., "to": ...}
    policy/allow/POS           {"from": ..., "to": ..., "ports": [...]}
    policy/head                what a complete version is: its number, IR digest, items hash
    nodes/NODE/status          what the node enforces (written by its agent)
    nodes/NODE/alive           the node's heartbeat, under its lease

One key per overlay, exception and rule, so a one-rule change is one key. POS
is a position (`spread`): decimal digits read as a fraction, so keys sort in
file order and a rule inserted between two others takes a key between theirs;
the rules that stay keep their keys. A push writes the items first (in as many
transactions as etcd allows) and the head last: an agent enforces what the
items are when a head says they are complete (its `items_hash` matches), so it
meets the old version or the new one, never a mix.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import Diagnostic
from ..policy.model import Overlay, Policy

DEFAULT_PREFIX = "/isoebpf/"
# The lists of the policy file, by the key a list's items are kept under.
SEQUENCES = ("exceptions", "allow")
HASH_MODULUS = 1 << 128


@dataclass(frozen=True)
class Layout:
    """The keys of one cluster's policy and nodes."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not (self.prefix.startswith("/") and self.prefix.endswith("/")):
            raise ValueError(f"an etcd prefix starts and ends with '/': {self.prefix!r}")

    @property
    def policy(self) -> str:
        return self.prefix + "policy/"

    @property
    def head(self) -> str:
        return self.policy + "head"

    @property
    def header(self) -> str:
        return self.policy + "header"

    @property
    def nodes(self) -> str:
        return self.prefix + "nodes/"

    def item(self, kind: str, name: str) -> str:
        return f"{self.policy}{kind}/{name}"

    def node_status(self, node: str) -> str:
        return f"{self.nodes}{node}/status"

    def node_alive(self, node: str) -> str:
        return f"{self.nodes}{node}/alive"

    def node_of(self, key: str) -> tuple[str, str] | None:
        """(node, "status" | "alive") of a key under nodes/."""
        node, _, what = key.removeprefix(self.nodes).rpartition("/")
        return (node, what) if key.startswith(self.nodes) and node else None


def canonical(value: Any) -> str:
    """The one text of a value: what is stored, compared and hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# -- a policy as the values to store ---------------------------------------------


@dataclass(frozen=True)
class Parts:
    """A policy as the values its keys hold (items in file order)."""

    header: dict[str, Any]
    overlays: dict[str, dict[str, Any]]
    exceptions: list[dict[str, Any]]
    allow: list[dict[str, Any]]


def parts(policy: Policy) -> Parts:
    header: dict[str, Any] = {"version": policy.version, "default": policy.default,
                              "deny_action": policy.deny_action, "timeouts": dict(policy.timeouts)}
    if policy.interfaces is not None:
        header["interfaces"] = list(policy.interfaces)
    if policy.audit:
        header["audit"] = True
    return Parts(
        header=header,
        overlays={o.name: _overlay(o) for o in policy.overlays},
        exceptions=[{"from": e.src.text, "to": e.dst.text} for e in policy.exceptions],
        allow=[{"from": r.src.text, "to": r.dst.text, "ports": [str(p) for p in r.ports]}
               for r in policy.rules],
    )


def _overlay(overlay: Overlay) -> dict[str, Any]:
    """An overlay's value: a Docker network's subnets are the node's engine's to say, so its
    name is kept, not what it gave here."""
    value: dict[str, Any] = {"isolated": overlay.isolated}
    given = [str(n) for n in overlay.subnets if n not in overlay.from_docker]
    if given or not overlay.docker_network:
        value["subnets"] = given
    if overlay.docker_network:
        value["docker_network"] = overlay.docker_network
    return value


# -- positions ---------------------------------------------------------------------


def spread(low: str, high: str | None, count: int) -> list[str]:
    """`count` positions in order strictly between `low` ("" : the start) and `high`
    (None: the end), evenly spaced. A position is decimal digits read as a fraction,
    with no trailing zero: so comparing two as strings compares the fractions."""
    digits = max(len(low), len(high or "")) + len(str(count)) + 1
    start = int(low.ljust(digits, "0") or 0)
    end = int(high.ljust(digits, "0")) if high is not None else 10 ** digits
    step = (end - start) // (count + 1)  # >= 10: the extra digits leave room
    return [str(start + step * (n + 1)).zfill(digits).rstrip("0") for n in range(count)]


# -- what a push writes ------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to write and delete to make the stored items a policy's."""

    puts: dict[str, str] = field(default_factory=dict)
    deletes: tuple[str, ...] = ()
    # Per kind ("header", "overlays", "exceptions", "allow"): added, changed, removed.
    counts: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.puts or self.deletes)

    def summary(self) -> str:
        said = [f"{kind}: +{a} ~{c} -{r}" for kind, (a, c, r) in self.counts.items() if a or c or r]
        return ", ".join(said) or "no change"


def plan(layout: Layout, stored: Mapping[str, str], policy: Policy) -> Plan:
    """The writes that turn the `stored` items (key -> text, head aside) into `policy`'s,
    touching only what differs: items that stay keep their keys."""
    want = parts(policy)
    puts: dict[str, str] = {}
    deletes: list[str] = []
    counts: dict[str, tuple[int, int, int]] = {}

    header = canonical(want.header)
    was = stored.get(layout.header)
    if was != header:
        puts[layout.header] = header
    counts["header"] = (int(was is None), int(was is not None and was != header), 0)

    had = _stored_items(layout, stored, "overlays")
    overlays = {layout.item("overlays", name): canonical(v) for name, v in want.overlays.items()}
    puts |= {k: v for k, v in overlays.items() if had.get(k) != v}
    gone = [k for k in had if k not in overlays]
    deletes += gone
    counts["overlays"] = (sum(k not in had for k in overlays),
                          sum(k in had and had[k] != v for k, v in overlays.items()), len(gone))

    for kind, values in (("exceptions", want.exceptions), ("allow", want.allow)):
        kind_puts, kind_deletes, kind_counts = _sequence(layout, kind, _stored_items(layout, stored, kind),
                                                         [canonical(v) for v in values])
        puts |= kind_puts
        deletes += kind_deletes
        counts[kind] = kind_counts
    return Plan(puts, tuple(deletes), counts)


def _stored_items(layout: Layout, stored: Mapping[str, str], kind: str) -> dict[str, str]:
    """The stored items of one kind, in key order (file order)."""
    under = layout.item(kind, "")
    return {k: stored[k] for k in sorted(k for k in stored if k.startswith(under))}


def _sequence(layout: Layout, kind: str, had: dict[str, str],
              texts: list[str]) -> tuple[dict[str, str], list[str], tuple[int, int, int]]:
    """A list's writes: the stored items aligned with the wanted ones (as difflib
    aligns lines), kept where equal, rewritten in place where replaced, new ones at
    positions between their neighbours', the rest deleted."""
    keys = list(had)
    old = list(had.values())
    puts: dict[str, str] = {}
    deletes: list[str] = []
    added = changed = 0
    matcher = difflib.SequenceMatcher(None, old, texts, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        reused = min(i2 - i1, j2 - j1)
        for n in range(reused):
            puts[keys[i1 + n]] = texts[j1 + n]
        changed += reused
        deletes += keys[i1 + reused:i2]
        extra = j2 - j1 - reused
        if extra:
            low = keys[i1 + reused - 1] if i1 + reused > 0 else ""
            high = keys[i2] if i2 < len(keys) else None
            # Keys are the layout's: compare positions, not the prefix they share.
            under = len(layout.item(kind, ""))
            positions = spread(low[under:], high[under:] if high else None, extra)
            for position, text in zip(positions, texts[j1 + reused:j2], strict=True):
                puts[layout.item(kind, position)] = text
            added += extra
    return puts, deletes, (added, changed, len(deletes))


# -- the stored items as a policy document ----------------------------------------


class NotAPolicy(ValueError):
    """The stored items cannot make a document (no header, a value that is not JSON)."""


def document(layout: Layout, stored: Mapping[str, str]) -> tuple[str, list[str]]:
    """The stored items as the text of a JSON policy file, one item a line, and the key
    each line comes from ("" for lines of the frame): what `cluster show` prints and
    what an agent validates and compiles, so an error's line names its key."""
    if layout.header not in stored:
        raise NotAPolicy(f"no policy stored under {layout.policy} (no {layout.header})")
    lines: list[str] = ["{"]
    keys: list[str] = [""]
    header = _value(layout.header, stored[layout.header])
    if not isinstance(header, dict):
        raise NotAPolicy(f"{layout.header} is not a JSON object")
    for name, value in header.items():
        if name in ("overlays", *SEQUENCES):
            continue  # the items' own keys say these
        lines.append(f"  {json.dumps(name)}: {json.dumps(value)},")
        keys.append(layout.header)
    for kind, opening, closing in (("overlays", "{", "}"), ("exceptions", "[", "]"), ("allow", "[", "]")):
        items = _stored_items(layout, stored, kind)
        lines.append(f"  {json.dumps(kind)}: {opening}")
        keys.append("")
        under = len(layout.item(kind, ""))
        for n, (key, text) in enumerate(items.items()):
            _value(key, text)
            named = f"{json.dumps(key[under:])}: " if kind == "overlays" else ""
            lines.append(f"    {named}{text}{',' if n < len(items) - 1 else ''}")
            keys.append(key)
        lines.append(f"  {closing}{',' if kind != 'allow' else ''}")
        keys.append("")
    lines.append("}")
    keys.append("")
    return "\n".join(lines) + "\n", keys


def located(diagnostics: Iterable[Diagnostic], line_keys: list[str]) -> list[Diagnostic]:
    """Diagnostics of a `document`, located at the key each line came from
    (`etcd:/isoebpf/policy/allow/5:1:COL`)."""
    found = []
    for d in diagnostics:
        key = line_keys[d.line - 1] if 0 < d.line <= len(line_keys) else ""
        found.append(dataclasses.replace(d, file=f"etcd:{key}", line=1) if key else d)
    return found


def _value(key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise NotAPolicy(f"{key} does not hold JSON: {err.msg}") from err


# -- the items hash ----------------------------------------------------------------


def item_hash(key: str, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}\0{text}".encode()).digest()[:16], "big")


class ItemsHash:
    """A hash of a set of (key, text) items that one put or delete updates in O(1):
    the sum of the items' own hashes. The head names the hash of the items it
    publishes; an agent keeps one of what it has seen, and enforces what it has only
    when the two agree (a push under way, or half done, leaves them apart)."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self.value = sum(item_hash(k, t) for k, t in items) % HASH_MODULUS

    def put(self, key: str, text: str, was: str | None) -> None:
        if was is not None:
            self.delete(key, was)
        self.value = (self.value + item_hash(key, text)) % HASH_MODULUS

    def delete(self, key: str, was: str) -> None:
        self.value = (self.value - item_hash(key, was)) % HASH_MODULUS

    def hex(self) -> str:
        return f"{self.value:032x}"


def policy_items(layout: Layout, stored: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """The items of `stored` that make the policy: everything under policy/ but the head."""
    return ((k, t) for k, t in stored.items() if k.startswith(layout.policy) and k != layout.head)
