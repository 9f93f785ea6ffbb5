"""Policy stage: JSON policy files, for the programs that write policies.

The same schema, checks (`check`), model and messages as YAML files; chosen by
the file's extension (`.json`), or else by its content (its first character
other than white space is `{`). Python's `json` module reads the file into
plain values in C, keeping no positions; the text is walked to find where a
value is only for the places the model keeps (each overlay's name, each
exception and rule) and for messages, one container at a time, the values in
between skipped by the same C scanner.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable
from typing import Any

from .check import IrregularMapping, Networks, Path, check, refuse
from .model import Location, Policy

_SPACE = re.compile(r"[ \t\n\r]*")
# What follows a member or element: a ',' and the next one, or the container's end.
_AFTER = re.compile(r"[ \t\n\r]*([,\]}])[ \t\n\r]*")
_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")
# Python's json reads these, but they are not JSON; found outside strings to say where.
_NOT_JSON = re.compile(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)')
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


def loads(text: str, path: str = "<policy>", networks: Networks | None = None) -> Policy:
    """Validate JSON policy text; `path` only names the file in messages. Raise
    PolicyError with every error found."""
    if not text.strip():
        raise refuse(path, Location(1, 1), "the policy file is empty")
    try:
        document = json.loads(text, object_pairs_hook=_mapping, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise refuse(path, Location(err.lineno, err.colno), f"not valid JSON: {err.msg}") from err
    except _NotJSON as err:
        constant = next(m for m in _NOT_JSON.finditer(text) if m.group(1))
        raise refuse(path, _JsonPlaces(text).location(constant.start()),
                     f"not valid JSON: {err.constant} is not a JSON value") from err
    except (ValueError, RecursionError) as err:  # a number of more digits than Python reads, too deep
        raise refuse(path, Location(1, 1), f"not valid JSON: {err}") from err
    return check(document, _JsonPlaces(text), path, networks)


class _NotJSON(Exception):
    """The file has NaN, Infinity or -Infinity, which Python's json reads and JSON has not."""

    def __init__(self, constant: str) -> None:
        self.constant = constant


def _refuse_constant(constant: str) -> Any:
    raise _NotJSON(constant)


def _mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object, as a dict of its first member of each name (YAML's reading; json's
    keeps the last); one with a repeated name says which, for `check` to refuse."""
    found = dict(pairs)
    if len(found) == len(pairs):
        return found
    first: dict[str, Any] = {}
    repeated = []
    for index, (key, value) in enumerate(pairs):
        if key in first:
            repeated.append((index, key))
        else:
            first[key] = value
    return IrregularMapping(first.items(), repeated)


class _JsonPlaces:
    """Where the values of a JSON text are. A container is walked when a place in it
    is first asked for (each value in between skipped by the C scanner), and
    remembered: asking for every rule's place walks the rules' array once. An
    object is walked only as far as the member asked for, so that finding the
    rules does not skip over them first."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._objects: dict[int, _Object] = {}  # by offset
        self._arrays: dict[int, list[int]] = {}  # an array's elements' offsets, by its offset
        self._line_starts: list[int] | None = None

    def value(self, path: Path) -> Location:
        return self.location(self._offset(path))

    def key(self, path: Path) -> Location:
        *container, key = path
        return self.location(self._object(self._offset(tuple(container))).member(str(key))[0])

    def member(self, path: Path, index: int) -> Location:
        return self.location(self._object(self._offset(path)).nth(index)[0])

    def written(self, path: Path) -> str:
        start = self._offset(path)
        return self._text[start:_SCAN(self._text, start)[1]]

    def elements(self, path: Path) -> list[Location]:
        starts = self._starts()
        found, line = [], 1
        for offset in self._elements(self._offset(path)):  # in order: each line search starts at the last
            line = bisect.bisect_right(starts, offset, line)
            found.append(Location(line, offset - starts[line - 1] + 1))
        return found

    def location(self, offset: int) -> Location:
        """Line and column (from 1, in characters) of an offset."""
        starts = self._starts()
        line = bisect.bisect_right(starts, offset)
        return Location(line, offset - starts[line - 1] + 1)

    def _starts(self) -> list[int]:
        """Each line's offset."""
        if self._line_starts is None:
            self._line_starts = [0] + [m.end() for m in re.finditer("\n", self._text)]
        return self._line_starts

    def _offset(self, path: Path) -> int:
        offset = _SPACE.match(self._text).end()  # type: ignore[union-attr]
        for step in path:
            offset = self._elements(offset)[step] if isinstance(step, int) else self._object(offset).member(step)[1]
        return offset

    def _object(self, offset: int) -> _Object:
        found = self._objects.get(offset)
        if found is None:
            found = self._objects[offset] = _Object(self._text, offset)
        return found

    def _elements(self, offset: int) -> list[int]:
        elements = self._arrays.get(offset)
        if elements is None:
            elements = self._arrays[offset] = []
            text, scan, after_pattern = self._text, _SCAN, _AFTER
            at = _SPACE.match(text, offset + 1).end()  # type: ignore[union-attr]
            while text[at] != "]":
                elements.append(at)
                after = after_pattern.match(text, scan(text, at)[1])
                assert after is not None  # the text is JSON: json.loads read it
                at = after.end() if after.group(1) == "," else after.start(1)
        return elements


class _Object:
    """The members of the object at an offset of a JSON text, walked as far as asked."""

    def __init__(self, text: str, offset: int) -> None:
        self._text = text
        self._members: list[tuple[int, int]] = []  # (key's offset, value's offset)
        self._first: dict[str, int] = {}  # each key's first member
        self._at: int | None = offset  # the '{', or the last member's value: what the walk goes on past

    def member(self, key: str) -> tuple[int, int]:
        """The offsets of the first member named `key`: of its key and of its value."""
        while key not in self._first and self._walk():
            pass
        return self._members[self._first[key]]

    def nth(self, index: int) -> tuple[int, int]:
        while len(self._members) <= index and self._walk():
            pass
        return self._members[index]

    def _walk(self) -> bool:
        """Read one more member; False at the end. Its value is skipped only when the
        walk goes on past it."""
        text, at = self._text, self._at
        if at is None:
            return False
        if self._members:
            after = _AFTER.match(text, _SCAN(text, at)[1])
            assert after is not None  # the text is JSON: json.loads read it
            at = after.end() if after.group(1) == "," else after.start(1)
        else:
            at = _SPACE.match(text, at + 1).end()  # type: ignore[union-attr]
        if text[at] == "}":
            self._at = None
            return False
        key, past_key = _SCAN(text, at)
        value_at = _COLON.match(text, past_key).end()  # type: ignore[union-attr]
        self._first.setdefault(key, len(self._members))
        self._members.append((at, value_at))
        self._at = value_at
        return True
