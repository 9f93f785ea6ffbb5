"""Policy stage: the policy file (version 1), YAML text in, a validated `Policy` model out.

Every problem is collected and reported at once, located as FILE:LINE:COL, and
nothing downstream ever sees an invalid policy. The contract is
`shared/policy-format.md`; where it is silent, docs/policy.md says what we chose.
Its neighbours: `model` (what it builds), `cidr` (strict CIDR spelling); the
next stage, `isoebpf.ir`, compiles what it returns (`isoebpf.pipeline` chains them).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import netaddr
import yaml

from ..errors import Diagnostic, PolicyError
from .cidr import parse_cidr
from .model import (
    ANY_PORT,
    AllowRule,
    Endpoint,
    Exception_,
    Location,
    Overlay,
    Policy,
    PortSpec,
)

SUPPORTED_VERSIONS = (1,)
RESERVED_PREFIXES = ("dcos-", "mesos-")
OVERLAY_NAME = re.compile(r"[a-z][a-z0-9_-]{0,23}\Z")
# Linux interface names are at most IFNAMSIZ-1 = 15 bytes.
IFACE_GLOB = re.compile(r"[A-Za-z0-9_.:@*?\[\]!-]{1,15}\Z")
PORT_SPEC = re.compile(r"(tcp|udp)/(0|[1-9][0-9]*)(?:-(0|[1-9][0-9]*))?\Z")
# Bounds the work an adversarial file (anchors that expand exponentially) can cause.
MAX_NODES = 2_000_000

DEFAULT_TIMEOUTS = {"tcp": 21600, "tcp_closing": 10, "udp": 60, "icmp": 30}


def loads(text: str, path: str = "<policy>") -> Policy:
    """Validate policy text; `path` only names the file in messages. The model keeps
    the file's own warnings; those that need the compiled form are `isoebpf.ir.lint`'s."""
    checker = _Checker(path)
    policy = checker.check(text)
    errors = [d for d in checker.diagnostics if d.severity == "error"]
    if errors or policy is None:
        raise PolicyError(sorted(checker.diagnostics))
    return replace(policy, warnings=tuple(sorted(checker.diagnostics)))


def _compose(text: str) -> yaml.Node | None:
    """The YAML tree, by libyaml when present (a 100k-rule policy: seconds, not minutes);
    a document libyaml refuses is composed again in Python, whose messages we show."""
    if _FastLoader is not None:
        try:
            return yaml.compose(text, Loader=_FastLoader)
        except yaml.YAMLError:
            pass
    return yaml.compose(text, Loader=yaml.SafeLoader)


def _fast_loader() -> type | None:
    """libyaml's loader, minus the Python work it repeats for every node (a 100k-rule
    policy has 800k): path resolvers, which the safe loader never has, and resolving
    a scalar's tag, which depends only on its text and quoting, so is remembered."""
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


def _where(node: yaml.Node) -> Location:
    return Location(node.start_mark.line + 1, node.start_mark.column + 1)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return {
        "tag:yaml.org,2002:int": "a number",
        "tag:yaml.org,2002:float": "a number",
        "tag:yaml.org,2002:bool": "a boolean",
        "tag:yaml.org,2002:null": "empty",
        "tag:yaml.org,2002:str": "a string",
    }.get(node.tag, node.tag)


class _Checker:
    """Walks the composed YAML tree, keeping each node's position for messages."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.diagnostics: list[Diagnostic] = []
        self._constructor = yaml.constructor.SafeConstructor()
        # Every overlay subnet with its owner and node, for the overlap check.
        self._subnet_nodes: list[tuple[netaddr.IPNetwork, str, yaml.Node]] = []
        # Valid CIDR endpoints by their text: large policies name the same ones often.
        self._cidr_endpoints: dict[str, Endpoint] = {}

    def error(self, node: yaml.Node | Location, message: str) -> None:
        self._say(node, "error", message)

    def warn(self, node: yaml.Node | Location, message: str) -> None:
        self._say(node, "warning", message)

    def _say(self, node: yaml.Node | Location, severity: str, message: str) -> None:
        at = node if isinstance(node, Location) else _where(node)
        self.diagnostics.append(Diagnostic(self.path, at.line, at.column, severity, message))

    # -- YAML shapes ---------------------------------------------------------

    def scalar(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def string(self, node: yaml.Node, what: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            return str(node.value)
        self.error(node, f"{what} must be a string, not {_kind(node)}")
        return None

    def mapping(
        self, node: yaml.Node, what: str, allowed: tuple[str, ...] | None
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Keys to (key node, value node); flags duplicates and unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping, not {_kind(node)}")
            return {}
        seen: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.error(key_node, "merge keys (<<) are not supported in a policy")
                continue
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag.endswith(":str")):
                self.error(key_node, f"keys of {what} must be strings, not {_kind(key_node)}")
                continue
            key = str(key_node.value)
            if key in seen:
                first = _where(seen[key][0])
                self.error(key_node, f"duplicate key '{key}' in {what} (first at line {first.line})")
                continue
            if allowed is not None and key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f": did you mean '{close[0]}'?" if close else f" (known: {', '.join(allowed)})"
                self.error(key_node, f"unknown key '{key}' in {what}{hint}")
                continue
            seen[key] = (key_node, value_node)
        return seen

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        self.error(node, f"{what} must be a list, not {_kind(node)}")
        return []

    # -- the policy ----------------------------------------------------------

    def check(self, text: str) -> Policy | None:
        try:
            root = _compose(text)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            at = Location(mark.line + 1, mark.column + 1) if mark else Location(1, 1)
            self.error(at, f"not valid YAML: {err.problem or err.context}")
            return None
        except yaml.YAMLError as err:
            self.error(Location(1, 1), f"not valid YAML: {err}")
            return None
        if root is None:
            self.error(Location(1, 1), "the policy file is empty")
            return None
        if _size(root, {}) > MAX_NODES:
            self.error(root, f"the policy expands to more than {MAX_NODES} YAML nodes")
            return None
        top = self.mapping(
            root,
            "the policy",
            (
                "version", "default", "deny_action", "overlays", "exceptions",
                "allow", "interfaces", "timeouts",
            ),
        )
        if not top and not isinstance(root, yaml.MappingNode):
            return None

        version = self.version(top.get("version"), root)
        default = self.choice(top.get("default"), "default", ("allow", "deny"), "allow")
        deny_action = self.choice(top.get("deny_action"), "deny_action", ("reject", "drop"), "reject")
        overlays = self.overlays(top.get("overlays"), root)
        index = _OverlayIndex(overlays)
        exceptions = self.exceptions(top.get("exceptions"), index)
        rules = self.rules(top.get("allow"), index)
        interfaces = self.interfaces(top.get("interfaces"))
        timeouts = self.timeouts(top.get("timeouts"))
        if any(d.severity == "error" for d in self.diagnostics):
            return None
        assert version is not None
        return Policy(
            self.path, version, default, deny_action, tuple(overlays), tuple(exceptions),
            tuple(rules), interfaces, timeouts,
        )

    def version(self, entry: tuple[yaml.Node, yaml.Node] | None, root: yaml.Node) -> int | None:
        if entry is None:
            self.error(root, "missing 'version' (this tool reads 'version: 1')")
            return None
        node = entry[1]
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if type(value) is not int:
            self.error(node, f"version must be the number 1, not {_kind(node)}")
            return None
        if value not in SUPPORTED_VERSIONS:
            self.error(node, f"unknown version {value}: this tool reads version 1")
            return None
        return value

    def choice(
        self, entry: tuple[yaml.Node, yaml.Node] | None, what: str, allowed: tuple[str, ...],
        default: str,
    ) -> str:
        if entry is None:
            return default
        node = entry[1]
        if isinstance(node, yaml.ScalarNode) and node.value in allowed:
            return str(node.value)
        shown = node.value if isinstance(node, yaml.ScalarNode) else _kind(node)
        self.error(node, f"{what} must be {' or '.join(allowed)}, not '{shown}'")
        return default

    def overlays(self, entry: tuple[yaml.Node, yaml.Node] | None, root: yaml.Node) -> list[Overlay]:
        if entry is None:
            self.error(root, "missing 'overlays': a policy needs at least one overlay")
            return []
        node = entry[1]
        found = self.mapping(node, "overlays", None)
        if isinstance(node, yaml.MappingNode) and not node.value:
            self.error(node, "'overlays' is empty: a policy needs at least one overlay")
        overlays: list[Overlay] = []
        for name, (name_node, body) in found.items():
            if not OVERLAY_NAME.match(name):
                self.error(
                    name_node,
                    f"overlay name '{name}' must be 1-24 characters of a-z 0-9 _ -, "
                    "starting with a letter",
                )
            elif name.startswith(RESERVED_PREFIXES):
                self.error(name_node, f"overlay name '{name}' is reserved (dcos- and mesos- are DC/OS's)")
            fields = self.mapping(body, f"overlay '{name}'", ("subnets", "isolated"))
            subnets = self.overlay_subnets(fields.get("subnets"), name, name_node)
            isolated = False
            if "isolated" in fields:
                flag = fields["isolated"][1]
                if isinstance(flag, yaml.ScalarNode) and flag.tag.endswith(":bool"):
                    isolated = bool(self.scalar(flag))
                else:
                    self.error(flag, f"'isolated' must be true or false, not {_kind(flag)}")
            overlays.append(Overlay(name, tuple(s for s, _ in subnets), isolated, _where(name_node)))
            self._subnet_nodes.extend((s, name, n) for s, n in subnets)
        self.check_overlap()
        return overlays

    def overlay_subnets(
        self, entry: tuple[yaml.Node, yaml.Node] | None, name: str, name_node: yaml.Node
    ) -> list[tuple[netaddr.IPNetwork, yaml.Node]]:
        if entry is None:
            self.error(name_node, f"overlay '{name}' needs 'subnets' (at least one)")
            return []
        items = self.sequence(entry[1], f"subnets of '{name}'")
        if isinstance(entry[1], yaml.SequenceNode) and not items:
            self.error(entry[1], f"overlay '{name}' needs at least one subnet")
        subnets: list[tuple[netaddr.IPNetwork, yaml.Node]] = []
        for item in items:
            text = self.string(item, "a subnet")
            if text is None:
                continue
            try:
                subnets.append((parse_cidr(text), item))
            except ValueError as err:
                self.error(item, str(err))
        return subnets

    def check_overlap(self) -> None:
        """Subnets of different overlays must be disjoint; report each clash once."""
        entries = sorted(
            self._subnet_nodes,
            key=lambda e: (e[0].version, e[0].first, -e[0].last),
        )
        open_: tuple[netaddr.IPNetwork, str, yaml.Node] | None = None
        for entry in entries:
            net, name, node = entry
            if open_ is not None and open_[0].version == net.version and net.first <= open_[0].last:
                other, other_name, _ = open_
                if other_name != name:
                    self.error(
                        node,
                        f"subnet {net} of overlay '{name}' overlaps {other} of overlay '{other_name}'",
                    )
                else:
                    self.warn(node, f"subnet {net} lies inside {other}, already in overlay '{name}'")
                continue
            open_ = entry

    def endpoint(self, node: yaml.Node, what: str, index: _OverlayIndex) -> Endpoint | None:
        text = self.string(node, what)
        if text is None:
            return None
        if text in index.by_name:
            overlay = index.by_name[text]
            return Endpoint(text, overlay.name, overlay.subnets)
        known = self._cidr_endpoints.get(text)
        if known is not None:
            return known
        if not re.search(r"[.:/]", text):
            close = difflib.get_close_matches(text, list(index.by_name), n=1)
            hint = f": did you mean '{close[0]}'?" if close else ""
            self.error(node, f"{what} '{text}' is neither an overlay nor a CIDR{hint}")
            return None
        try:
            net = parse_cidr(text)
        except ValueError as err:
            self.error(node, str(err))
            return None
        owner = index.owner(net)
        if owner is None:
            wider = index.covered_by(net)
            if wider:
                self.error(
                    node,
                    f"{what} {net} is wider than overlay '{wider}': name the overlay or narrow the CIDR",
                )
            else:
                self.error(node, f"{what} {net} lies in no overlay, so this can never match")
            return None
        endpoint = self._cidr_endpoints[text] = Endpoint(text, owner, (net,))
        return endpoint

    def pair_entries(
        self, entry: tuple[yaml.Node, yaml.Node] | None, what: str, keys: tuple[str, ...]
    ) -> Iterator[tuple[int, yaml.Node, dict[str, tuple[yaml.Node, yaml.Node]]]]:
        if entry is None:
            return
        for i, item in enumerate(self.sequence(entry[1], what)):
            fields = self.mapping(item, f"{what}[{i}]", keys)
            for needed in ("from", "to"):
                if isinstance(item, yaml.MappingNode) and needed not in fields:
                    self.error(item, f"{what}[{i}] needs '{needed}'")
            yield i, item, fields

    def ends(
        self, fields: dict[str, tuple[yaml.Node, yaml.Node]], what: str, index: _OverlayIndex
    ) -> tuple[Endpoint | None, Endpoint | None]:
        src = self.endpoint(fields["from"][1], f"{what}.from", index) if "from" in fields else None
        dst = self.endpoint(fields["to"][1], f"{what}.to", index) if "to" in fields else None
        return src, dst

    def exceptions(
        self, entry: tuple[yaml.Node, yaml.Node] | None, index: _OverlayIndex
    ) -> list[Exception_]:
        found: list[Exception_] = []
        for i, item, fields in self.pair_entries(entry, "exceptions", ("from", "to")):
            src, dst = self.ends(fields, f"exceptions[{i}]", index)
            if src and dst:
                found.append(Exception_(i, src, dst, _where(item)))
        return found

    def rules(self, entry: tuple[yaml.Node, yaml.Node] | None, index: _OverlayIndex) -> list[AllowRule]:
        found: list[AllowRule] = []
        for i, item, fields in self.pair_entries(entry, "allow", ("from", "to", "ports")):
            src, dst = self.ends(fields, f"allow[{i}]", index)
            ports = self.ports(fields["ports"][1]) if "ports" in fields else (ANY_PORT,)
            if src and dst and ports:
                found.append(AllowRule(i, src, dst, ports, _where(item)))
        return found

    def ports(self, node: yaml.Node) -> tuple[PortSpec, ...]:
        items = self.sequence(node, "ports")
        if isinstance(node, yaml.SequenceNode) and not items:
            self.error(node, "'ports' is empty: omit it to allow every protocol and port")
        specs: list[PortSpec] = []
        ok = True
        for item in items:
            if isinstance(item, yaml.ScalarNode) and item.tag.endswith(":int"):
                self.error(item, f"port {item.value} needs a protocol: write 'tcp/{item.value}' or 'udp/{item.value}'")
                ok = False
                continue
            text = self.string(item, "a port")
            spec = self.port(item, text) if text is not None else None
            if spec is None:
                ok = False
            elif spec in specs:
                self.warn(item, f"'{spec}' is listed twice")
            else:
                specs.append(spec)
        if ANY_PORT in specs and len(specs) > 1:
            self.warn(node, "'any' already covers every protocol and port; the others add nothing")
        return tuple(specs) if ok else ()

    def port(self, node: yaml.Node, text: str) -> PortSpec | None:
        if text in ("icmp", "any"):
            return PortSpec(text)
        match = PORT_SPEC.match(text)
        if not match:
            self.error(
                node,
                f"'{text}' is not a port: write tcp/N, udp/N, tcp/N-M, udp/N-M, icmp or any",
            )
            return None
        proto, low_text, high_text = match.groups()
        low = int(low_text)
        high = int(high_text) if high_text is not None else low
        for value in (low, high):
            if not 1 <= value <= 65535:
                self.error(node, f"port {value} in '{text}' is out of range (1-65535)")
                return None
        if low > high:
            self.error(node, f"'{text}': the range must run low to high ({proto}/{high}-{low})")
            return None
        return PortSpec(proto, low, high)

    def interfaces(self, entry: tuple[yaml.Node, yaml.Node] | None) -> tuple[str, ...] | None:
        if entry is None:
            return None
        globs: list[str] = []
        for item in self.sequence(entry[1], "interfaces"):
            text = self.string(item, "an interface glob")
            if text is None:
                continue
            if not IFACE_GLOB.match(text):
                self.error(item, f"'{text}' is not an interface name or glob (at most 15 characters, no / or spaces)")
            else:
                globs.append(text)
        return tuple(globs)

    def timeouts(self, entry: tuple[yaml.Node, yaml.Node] | None) -> dict[str, int]:
        timeouts = dict(DEFAULT_TIMEOUTS)
        if entry is None:
            return timeouts
        for key, (_, node) in self.mapping(entry[1], "timeouts", tuple(DEFAULT_TIMEOUTS)).items():
            value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
            if type(value) is not int or not 1 <= value <= 86400 * 30:
                self.error(node, f"timeouts.{key} must be a whole number of seconds from 1 to 2592000")
            else:
                timeouts[key] = value
        return timeouts


class _OverlayIndex:
    """Which overlay holds a CIDR, in one dict probe per distinct subnet length."""

    def __init__(self, overlays: list[Overlay]) -> None:
        self.by_name = {o.name: o for o in overlays}
        self._by_prefix: dict[tuple[int, int], dict[int, str]] = {}
        for overlay in overlays:
            for net in overlay.subnets:
                self._by_prefix.setdefault((net.version, net.prefixlen), {})[net.first] = overlay.name
        self._lengths = sorted(self._by_prefix)

    def owner(self, net: netaddr.IPNetwork) -> str | None:
        width = 32 if net.version == 4 else 128
        for version, length in self._lengths:
            if version != net.version or length > net.prefixlen:
                continue
            mask = ((1 << length) - 1) << (width - length)
            owner = self._by_prefix[(version, length)].get(net.first & mask)
            if owner is not None:
                return owner
        return None

    def covered_by(self, net: netaddr.IPNetwork) -> str | None:
        for overlay in self.by_name.values():
            if any(s.version == net.version and s in net for s in overlay.subnets):
                return overlay.name
        return None


def _size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in the tree with aliases expanded, computed without expanding them."""
    if type(node) is yaml.ScalarNode:  # most nodes: no need to remember them
        return 1
    key = id(node)
    if key not in memo:
        memo[key] = 1  # a cycle counts once instead of recursing forever
        if isinstance(node, yaml.MappingNode):
            memo[key] = 1 + sum(_size(k, memo) + _size(v, memo) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            memo[key] = 1 + sum(_size(v, memo) for v in node.value)
        memo[key] = min(memo[key], MAX_NODES + 1)
    return memo[key]
