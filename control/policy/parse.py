"""Policy stage: YAML policy files (version 1), text in, a validated `Policy` model out.

The file is read into plain values straight from the parser's events (libyaml's
when present), without building YAML's node tree: `check` checks them, and the
same checks read JSON files (`jsonfile`). What is YAML's alone is said here or
kept for `check` to say: a file that is not YAML, aliases that expand beyond
MAX_NODES, nesting beyond MAX_DEPTH, repeated keys, merge keys (`<<`) and keys
that are not strings.
Positions are kept only for the places the model keeps (the collections down
to the rules, and the keys of the top two levels); a message about anything
else composes the file again to say where it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

from .check import IrregularMapping, Networks, OtherScalar, Path, check, refuse
from .model import Location, Policy

# Bound the work an adversarial file can cause: anchors that expand exponentially,
# and collections nested deeper than any policy's (4) until composing them overflows
# Python's stack.
MAX_NODES = 2_000_000
MAX_DEPTH = 100
_STR = "tag:yaml.org,2002:str"
# The scalar types a policy's values have; a scalar of any other tag stays an OtherScalar.
_CONSTRUCTED = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
                "tag:yaml.org,2002:null")
# Positions kept while reading: of collections this deep (the policy is 0, its
# rules 2), and of the keys of mappings this deep (the overlays' names are 1).
_MARKED_DEPTH = 2
_KEYED_DEPTH = 1
# Collections composed alone to locate a message, at most: beyond, the whole file once.
_PIECES = 100


def loads(text: str, path: str = "<policy>", networks: Networks | None = None) -> Policy:
    """Validate YAML policy text; `path` only names the file in messages. Raise
    PolicyError with every error found."""
    try:
        document, places = _read(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = Location(mark.line + 1, mark.column + 1) if mark else Location(1, 1)
        raise refuse(path, at, f"not valid YAML: {err.problem or err.context}") from err
    except yaml.YAMLError as err:
        raise refuse(path, Location(1, 1), f"not valid YAML: {err}") from err
    except _Refused as err:
        raise refuse(path, err.where, err.message) from err
    return check(document, places, path, networks)


class _Refused(Exception):
    """A YAML document refused as a whole: empty, or too large or deep to check."""

    def __init__(self, where: Location, message: str) -> None:
        self.where = where
        self.message = message


class _ComposerProblem(Exception):
    """Something YAML's composer refuses (an undefined or repeated anchor, a second
    document): PyYAML's own composer says it."""


def _fast_loader() -> type | None:
    """libyaml's loader, minus the Python work it repeats for every node when composing
    (which messages need, see _YamlPlaces): path resolvers, which the safe loader never
    has, and resolving a scalar's tag, which depends only on its text and quoting."""
    base = getattr(yaml, "CSafeLoader", None)
    if base is None:
        return None

    class Loader(base):  # type: ignore[misc, valid-type]
        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self._tags: dict[tuple[Any, ...], str] = {}

        def descend_resolver(self, current_node: Any, current_index: Any) -> None:
            pass

        def ascend_resolver(self) -> None:
            pass

        def resolve(self, kind: type, value: Any, implicit: Any) -> str:
            key = (kind, value, implicit)
            tag = self._tags.get(key)
            if tag is None:
                tag = self._tags[key] = super().resolve(kind, value, implicit)
            return tag

    return Loader


_FastLoader = _fast_loader()


def _read(text: str) -> tuple[Any, _YamlPlaces]:
    """The document and where its values are: read by libyaml when present; a file
    libyaml refuses is read again in Python, whose messages we show."""
    loaders = [loader for loader in (_FastLoader, yaml.SafeLoader) if loader is not None]
    for loader in loaders:
        try:
            reader = _Reader(loader(text))
            document = reader.read()
        except yaml.YAMLError:
            if loader is loaders[-1]:
                raise
            continue
        except _ComposerProblem:
            yaml.compose(text, Loader=yaml.SafeLoader)  # raises what PyYAML says of it
            raise yaml.YAMLError("the document could not be composed") from None
        return document, _YamlPlaces(text, loader, document, reader)
    raise AssertionError("no YAML loader")


class _Sequence:
    """A list being read."""

    __slots__ = ("anchor", "nodes_before", "value")

    def __init__(self, anchor: str | None, nodes_before: int) -> None:
        self.value: list[Any] = []
        self.anchor = anchor
        self.nodes_before = nodes_before


class _Mapping:
    """A mapping being read: members so far, and those a dict cannot hold."""

    __slots__ = ("anchor", "key", "key_marks", "members", "nodes_before", "others", "value")

    def __init__(self, anchor: str | None, nodes_before: int, keyed: bool) -> None:
        self.value: dict[str, Any] = {}
        self.anchor = anchor
        self.nodes_before = nodes_before
        self.key: Any = _NO_KEY  # read, its value not yet
        self.members = 0
        self.others: list[tuple[int, Any]] = []
        self.key_marks: dict[str, Any] | None = {} if keyed else None


class _Reader:
    """Plain values from a YAML parser's events, as PyYAML's composer and safe
    constructor would make them, with the positions `_YamlPlaces` keeps."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader
        # Each collection's start mark (to depth _MARKED_DEPTH), by id().
        self.marks: dict[int, Any] = {}
        # Where each of those collections ends, by id().
        self.ends: dict[int, Any] = {}
        # Each key's mark, by the id() of its mapping (to depth _KEYED_DEPTH).
        self.key_marks: dict[int, dict[str, Any]] = {}
        # Values of repeated keys, which no mapping holds: kept alive, so that no
        # other value takes their id() while the marks are in use.
        self._unheld: list[Any] = []

    def read(self) -> Any:
        """The document's value; its size (aliases expanded) is bounded by MAX_NODES."""
        loader = self._loader
        try:
            return self._build(loader.get_event)
        finally:
            loader.dispose()

    def _build(self, next_event: Callable[[], Any]) -> Any:
        resolve = self._loader.resolve
        tags: dict[str, str] = {}  # a plain scalar's tag, by its text
        scalars: dict[tuple[str, str], Any] = {}  # a scalar's value, by tag and text, but strings
        anchors: dict[str, Any] = {}
        sizes: dict[str, int] = {}  # an anchored node's size, once it has ended
        stack: list[_Sequence | _Mapping] = []  # the collections being read
        nodes = documents = 0
        root = None
        too_deep: Location | None = None  # where the first collection MAX_DEPTH deep starts
        while True:
            event = next_event()
            kind = type(event)
            if kind is ScalarEvent:
                nodes += 1
                tag, text = event.tag, event.value
                if tag is None:
                    if event.implicit[0]:
                        tag = tags.get(text)
                        if tag is None:
                            tag = tags[text] = resolve(yaml.ScalarNode, text, (True, False))
                    else:
                        tag = _STR
                elif tag == "!":
                    tag = resolve(yaml.ScalarNode, text, event.implicit)
                if tag == _STR:
                    value = text
                else:
                    value = scalars.get((tag, text), scalars)
                    if value is scalars:
                        value = scalars[(tag, text)] = _construct(tag, text)
                if event.anchor is not None:
                    _anchor(anchors, event.anchor, value)
                    sizes[event.anchor] = 1
            elif kind is MappingStartEvent or kind is SequenceStartEvent:
                nodes += 1
                depth = len(stack)
                if depth == MAX_DEPTH and too_deep is None:
                    too_deep = _location(event.start_mark)
                frame = (_Mapping(event.anchor, nodes, depth <= _KEYED_DEPTH) if kind is MappingStartEvent
                         else _Sequence(event.anchor, nodes))
                if depth <= _MARKED_DEPTH:
                    self.marks[id(frame.value)] = event.start_mark
                if event.anchor is not None:
                    _anchor(anchors, event.anchor, frame.value)
                stack.append(frame)
                continue
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                frame = stack.pop()
                value = self._made(frame) if isinstance(frame, _Mapping) else frame.value
                if len(stack) <= _MARKED_DEPTH:
                    self.ends[id(value)] = event.end_mark
                if frame.anchor is not None:
                    anchors[frame.anchor] = value
                    sizes[frame.anchor] = nodes - frame.nodes_before + 1
            elif kind is AliasEvent:
                if event.anchor not in anchors:
                    raise _ComposerProblem
                value = anchors[event.anchor]
                nodes += sizes.get(event.anchor, 1)  # 1: an alias inside its own anchor
            elif kind is DocumentStartEvent:
                documents += 1
                if documents > 1:
                    raise _ComposerProblem
                continue
            elif kind is StreamEndEvent:  # said once the whole file is known to be YAML:
                if not documents:
                    raise _Refused(Location(1, 1), "the policy file is empty")
                if too_deep is not None:
                    raise _Refused(too_deep, f"the policy nests collections more than {MAX_DEPTH} deep")
                if nodes > MAX_NODES:
                    raise _Refused(_location(self.marks[id(root)]),
                                   f"the policy expands to more than {MAX_NODES} YAML nodes")
                return root
            else:
                continue
            if not stack:
                root = value
                continue
            parent = stack[-1]
            if isinstance(parent, _Sequence):
                parent.value.append(value)
            elif parent.key is _NO_KEY:
                parent.key = value
                if parent.key_marks is not None and kind is ScalarEvent and type(value) is str:
                    parent.key_marks.setdefault(value, event.start_mark)
            else:
                key = parent.key
                if type(key) is str and key not in parent.value:
                    parent.value[key] = value
                else:
                    parent.others.append((parent.members, key))
                    self._unheld.append(value)
                parent.key = _NO_KEY
                parent.members += 1

    def _made(self, frame: _Mapping) -> dict[str, Any]:
        """The mapping a frame read: an IrregularMapping in place of the dict if some
        members were not string keys seen once."""
        made = frame.value
        if frame.others:
            mark = self.marks.pop(id(made), None)
            made = IrregularMapping(made.items(), frame.others)
            if mark is not None:
                self.marks[id(made)] = mark
        if frame.key_marks is not None:
            self.key_marks[id(made)] = frame.key_marks
        return made


def _anchor(anchors: dict[str, Any], anchor: str, value: Any) -> None:
    if anchor in anchors:
        raise _ComposerProblem
    anchors[anchor] = value


def _construct(tag: str, text: str) -> Any:
    """A scalar's value, as the safe constructor makes it: the policy's types only."""
    if tag not in _CONSTRUCTED:
        return OtherScalar(tag)
    constructor = yaml.constructor.SafeConstructor
    try:
        return constructor.yaml_constructors[tag](constructor(), yaml.ScalarNode(tag, text))
    except (ValueError, KeyError):  # `!!int abc`: a number that is none
        return OtherScalar(tag)


_NO_KEY = object()  # a mapping frame waits for a key


def _location(mark: Any, line: int = 0) -> Location:
    """A mark's place, in a text that starts on `line` of the file."""
    return Location(line + mark.line + 1, mark.column + 1)


class _YamlPlaces:
    """Where the values of a YAML document are: from the marks the reader kept, or else
    composed again (only for messages, which are few): the text of the smallest kept
    collection that holds the value (a rule, say), or the whole file."""

    def __init__(self, text: str, loader: type, document: Any, reader: _Reader) -> None:
        self._text = text
        self._loader = loader
        self._document = document
        self._marks = reader.marks
        self._ends = reader.ends
        self._key_marks = reader.key_marks
        # Composed texts by the id() of their collection: (root node, the line it starts on),
        # or None where the collection's text does not compose alone.
        self._trees: dict[int, tuple[Any, int] | None] = {}
        # A mapping node's first member of each string key, by id(), once asked.
        self._members: dict[int, dict[str, tuple[yaml.Node, yaml.Node]]] = {}

    def value(self, path: Path) -> Location:
        mark = self._marks.get(id(self._follow(path)))
        if mark is not None:
            return _location(mark)
        node, line = self._node(path)
        return _location(node.start_mark, line)

    def key(self, path: Path) -> Location:
        *mapping, key = path
        mark = self._key_marks.get(id(self._follow(tuple(mapping))), {}).get(str(key))
        if mark is not None:
            return _location(mark)
        node, line = self._node(tuple(mapping))
        return _location(self._members_of(node)[str(key)][0].start_mark, line)

    def member(self, path: Path, index: int) -> Location:
        node, line = self._node(path)
        return _location(node.value[index][0].start_mark, line)

    def written(self, path: Path) -> str:
        return str(self._node(path)[0].value)

    def elements(self, path: Path) -> list[Location]:
        marks = self._marks
        return [_location(marks[id(item)]) if id(item) in marks else self.value((*path, i))
                for i, item in enumerate(self._follow(path))]

    def _follow(self, path: Path) -> Any:
        value = self._document
        for step in path:
            value = value[step]
        return value

    def _node(self, path: Path) -> tuple[Any, int]:
        """The node at `path`, and the line (from 0) its composed text starts on."""
        cut = len(path)
        tree = self._tree(self._follow(path))
        while tree is None:  # the whole file, at the latest, composes
            cut -= 1
            tree = self._tree(self._follow(path[:cut]))
        node, line = tree
        for step in path[cut:]:
            node = node.value[step] if isinstance(step, int) else self._members_of(node)[step][1]
        return node, line

    def _tree(self, value: Any) -> tuple[Any, int] | None:
        key = id(value)
        if key not in self._trees:
            self._trees[key] = self._compose(value)
        return self._trees[key]

    def _compose(self, value: Any) -> tuple[Any, int] | None:
        start, end = self._marks.get(id(value)), self._ends.get(id(value))
        if value is self._document:
            return yaml.compose(self._text, Loader=self._loader), 0
        # Alone, the collection's text keeps its columns (its first line padded) and
        # composes to the same nodes. Not: where libyaml counts offsets past a BOM, or
        # once the whole file composed once costs less than many pieces.
        if start is None or end is None or self._text.startswith("\ufeff") or len(self._trees) > _PIECES:
            return None
        try:
            return yaml.compose(" " * start.column + self._text[start.index:end.index], Loader=self._loader), start.line
        except yaml.YAMLError:  # an alias to an anchor outside it, say
            return None

    def _members_of(self, node: yaml.Node) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        members = self._members.get(id(node))
        if members is None:
            members = self._members[id(node)] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag == _STR:
                    members.setdefault(key.value, (key, value))
        return members
