"""Policy stage: JSON policy files, for the programs that write policies.

The same schema, checks and model as `parse`; chosen by the file's extension
(`.json`), or else by its content (its first character other than white space
is `{`). A valid policy with nothing to say is read at the speed of Python's
`json` module: plain values are checked, and only the places the model keeps
(each overlay's name, each exception and rule) are found in the text, by
scanning their arrays in C. Any error or warning sends the text to `parse`'s
checker instead: JSON is YAML, and that checker locates every message as
FILE:LINE:COL (tests/unit/test_json_policies.py holds the two to one result).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import Diagnostic, PolicyError
from . import parse
from .cidr import parse_cidr
from .model import ANY_PORT, AllowRule, Endpoint, Exception_, Location, Overlay, Policy, PortSpec

_TOP_KEYS = {"version", "default", "deny_action", "overlays", "exceptions", "allow", "interfaces",
             "timeouts"}
_SPACE = re.compile(r"[ \t\n\r]*")
# The C scanner behind json.loads, one value at an offset: (value, offset past it).
_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def is_json(text: str, path: str) -> bool:
    """Read as JSON: a `.json` file, or a file that is neither `.yaml` nor `.yml` and
    starts (white space aside) with `{`."""
    lowered = path.lower()
    if lowered.endswith(".json"):
        return True
    if lowered.endswith((".yaml", ".yml")):
        return False
    return text.lstrip()[:1] == "{"


class _Something(Exception):
    """The fast reading met something to say: `parse`'s checker says it, located."""


def loads(text: str, path: str) -> Policy:
    """Validate a JSON policy; raise PolicyError with every error found."""
    if not text.strip():
        return parse.loads(text, path)  # "the policy file is empty", as for YAML
    try:
        document = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except json.JSONDecodeError as err:
        raise PolicyError([Diagnostic(path, err.lineno, err.colno, "error",
                                      f"not valid JSON: {err.msg}")]) from err
    except _Something:
        return parse.loads(text, path)  # a duplicate key, said where it is
    try:
        return _checked(document, text, path)
    except _Something:
        return parse.loads(text, path)


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise _Something
    return found


def _ensure(condition: bool) -> None:
    if not condition:
        raise _Something


def _checked(document: Any, text: str, path: str) -> Policy:
    """The policy `document` (read from `text`) says, when `parse`'s checker would find
    nothing to say."""
    _ensure(isinstance(document, dict) and set(document) <= _TOP_KEYS)
    places = _Places(text)
    _ensure(type(document.get("version")) is int and document["version"] in parse.SUPPORTED_VERSIONS)
    default = document.get("default", "allow")
    deny_action = document.get("deny_action", "reject")
    _ensure(default in ("allow", "deny") and deny_action in ("reject", "drop"))
    overlays = _overlays(document.get("overlays"), places)
    index = parse._OverlayIndex(overlays)
    endpoints: dict[str, Endpoint] = {}
    ports: dict[tuple[str, ...], tuple[PortSpec, ...]] = {}
    exceptions = [Exception_(i, *_ends(item, ("from", "to"), index, endpoints), where)
                  for i, (item, where) in enumerate(_entries(document, "exceptions", places))]
    rules = [AllowRule(i, *_ends(item, ("from", "to", "ports"), index, endpoints), _ports(item, ports), where)
             for i, (item, where) in enumerate(_entries(document, "allow", places))]
    return Policy(path, document["version"], default, deny_action, tuple(overlays), tuple(exceptions),
                  tuple(rules), _interfaces(document.get("interfaces")), _timeouts(document.get("timeouts")))


def _overlays(found: Any, places: _Places) -> list[Overlay]:
    _ensure(isinstance(found, dict) and bool(found))
    where = places.keys("overlays")
    overlays = []
    for name, body in found.items():
        _ensure(bool(parse.OVERLAY_NAME.match(name)) and not name.startswith(parse.RESERVED_PREFIXES))
        _ensure(isinstance(body, dict) and "subnets" in body and set(body) <= {"subnets", "isolated"})
        subnets = body["subnets"]
        _ensure(isinstance(subnets, list) and bool(subnets) and all(type(s) is str for s in subnets))
        isolated = body.get("isolated", False)
        _ensure(type(isolated) is bool)
        overlays.append(Overlay(name, tuple(_cidr(s) for s in subnets), isolated, where[name]))
    # Any two subnets that overlap, in one overlay (a warning) or two (an error).
    ordered = sorted((n for o in overlays for n in o.subnets), key=lambda n: (n.version, n.first, -n.last))
    for before, after in itertools.pairwise(ordered):
        _ensure(before.version != after.version or after.first > before.last)
    return overlays


def _cidr(text: str) -> Any:
    try:
        return parse_cidr(text)
    except ValueError as err:
        raise _Something from err


def _entries(document: dict[str, Any], key: str, places: _Places) -> Iterator[tuple[dict[str, Any], Location]]:
    items = document.get(key, [])
    _ensure(isinstance(items, list))
    yield from zip(items, places.elements(key) if items else [], strict=True)


def _ends(item: Any, allowed: tuple[str, ...], index: parse._OverlayIndex,
          endpoints: dict[str, Endpoint]) -> tuple[Endpoint, Endpoint]:
    _ensure(isinstance(item, dict) and "from" in item and "to" in item and set(item) <= set(allowed))
    return _endpoint(item["from"], index, endpoints), _endpoint(item["to"], index, endpoints)


def _endpoint(text: Any, index: parse._OverlayIndex, endpoints: dict[str, Endpoint]) -> Endpoint:
    _ensure(type(text) is str)
    overlay = index.by_name.get(text)
    if overlay is not None:
        return Endpoint(text, overlay.name, overlay.subnets)
    known = endpoints.get(text)
    if known is None:
        _ensure(re.search(r"[.:/]", text) is not None)
        net = _cidr(text)
        owner = index.owner(net)
        _ensure(owner is not None)
        known = endpoints[text] = Endpoint(text, owner, (net,))  # type: ignore[arg-type]
    return known


def _ports(item: dict[str, Any], seen: dict[tuple[str, ...], tuple[PortSpec, ...]]) -> tuple[PortSpec, ...]:
    """A rule's ports; `seen`: port lists read before (generated policies repeat them)."""
    if "ports" not in item:
        return (ANY_PORT,)
    texts = item["ports"]
    _ensure(isinstance(texts, list) and bool(texts) and all(type(t) is str for t in texts))
    listed = tuple(texts)
    specs = seen.get(listed)
    if specs is None:
        specs = seen[listed] = tuple(_port(t) for t in texts)
        _ensure(len(set(specs)) == len(specs) and (ANY_PORT not in specs or len(specs) == 1))
    return specs


def _port(text: str) -> PortSpec:
    if text in ("icmp", "any"):
        return PortSpec(text)
    match = parse.PORT_SPEC.match(text)
    _ensure(match is not None)
    assert match is not None
    proto, low_text, high_text = match.groups()
    low = int(low_text)
    high = int(high_text) if high_text is not None else low
    _ensure(1 <= low <= high <= 65535)
    return PortSpec(proto, low, high)


def _interfaces(globs: Any) -> tuple[str, ...] | None:
    if globs is None:
        return None
    _ensure(isinstance(globs, list) and all(type(g) is str and parse.IFACE_GLOB.match(g) for g in globs))
    return tuple(globs)


def _timeouts(given: Any) -> dict[str, int]:
    timeouts = dict(parse.DEFAULT_TIMEOUTS)
    if given is None:
        return timeouts
    _ensure(isinstance(given, dict) and set(given) <= set(timeouts))
    for key, value in given.items():
        _ensure(type(value) is int and 1 <= value <= 86400 * 30)
        timeouts[key] = value
    return timeouts


class _Places:
    """Where the model's located parts start in the text, as YAML's marks say them:
    each overlay's name, each exception's and rule's `{`. Found by walking only the
    top-level object and those containers; each value is skipped by the C scanner."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._line = (0, 1)  # (an offset, the line it is on): counting goes on from there
        self._top = {key: value_at for key, _, value_at in self._members(self._skip(0))}

    def keys(self, name: str) -> dict[str, Location]:
        """Where each key of the top-level member `name` (an object) is."""
        return {key: self._at(key_at) for key, key_at, _ in self._members(self._top[name])}

    def elements(self, name: str) -> list[Location]:
        """Where each element of the top-level member `name` (an array) starts."""
        return [self._at(at) for at in self._walk(self._top[name], "]")]

    def _members(self, offset: int) -> list[tuple[str, int, int]]:
        """(key, its offset, its value's offset) of the object at `offset`."""
        found = []
        for key_at in self._walk(offset, "}"):
            key, after = _SCAN(self.text, key_at)
            found.append((key, key_at, self._skip(self._skip(after) + 1)))  # past the ':'
        return found

    def _walk(self, offset: int, close: str) -> Iterator[int]:
        """The offsets of the members of the container at `offset` (past each one's value)."""
        text, scan = self.text, _SCAN
        offset = self._skip(offset + 1)
        while text[offset] != close:
            yield offset
            if close == "}":  # a key, then its value
                _, offset = scan(text, offset)
                offset = self._skip(self._skip(offset) + 1)
            _, offset = scan(text, offset)
            offset = self._skip(offset)
            if text[offset] == ",":
                offset = self._skip(offset + 1)

    def _skip(self, offset: int) -> int:
        return _SPACE.match(self.text, offset).end()  # type: ignore[union-attr]

    def _at(self, offset: int) -> Location:
        """Line and column of `offset`, counting lines on from the last one asked
        (members are asked in order, so the whole text is counted about once)."""
        start, line = self._line if self._line[0] <= offset else (0, 1)
        line += self.text.count("\n", start, offset)
        self._line = (offset, line)
        return Location(line, offset - (self.text.rfind("\n", 0, offset) + 1) + 1)
