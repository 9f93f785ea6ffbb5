"""Policy stage: the checks every policy file passes, whatever its format.

A reader (`parse` for YAML, `jsonfile` for JSON) turns the file into a document
of plain values (dict, list, str, int, float, bool, None) and hands it here
with a `Locator`, which says where a value is in the file. The checks read the
plain values and ask the locator only when they have something to say, or for
the places the model keeps (each overlay's name, each exception and rule):
so a valid policy costs no more positions than that, and both formats give
the same messages at the same places, located as FILE:LINE:COL. The contract
is `shared/policy-format.md`; where it is silent, docs/policy.md says what we chose.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol

import netaddr

from ..errors import Diagnostic, PolicyError
from .cidr import parse_cidr
from .model import ANY_PORT, AllowRule, Endpoint, Exception_, Location, Overlay, Policy, PortSpec

SUPPORTED_VERSIONS = (1,)
RESERVED_PREFIXES = ("dcos-", "mesos-")
OVERLAY_NAME = re.compile(r"[a-z][a-z0-9_-]{0,23}\Z")
# Linux interface names are at most IFNAMSIZ-1 = 15 bytes.
IFACE_GLOB = re.compile(r"[A-Za-z0-9_.:@*?\[\]!-]{1,15}\Z")
PORT_SPEC = re.compile(r"(tcp|udp)/(0|[1-9][0-9]*)(?:-(0|[1-9][0-9]*))?\Z")
CIDR_LIKE = re.compile(r"[.:/]")  # an endpoint that is no overlay's name is meant as a CIDR
DEFAULT_TIMEOUTS = {"tcp": 21600, "tcp_closing": 10, "udp": 60, "icmp": 30}
TOP_KEYS = ("version", "default", "deny_action", "overlays", "exceptions", "allow", "interfaces",
            "timeouts", "audit")
MERGE_TAG = "tag:yaml.org,2002:merge"
INT_TAG = "tag:yaml.org,2002:int"

# A value's place in the document: the keys and list indexes that lead to it.
Path = tuple[str | int, ...]
# A Docker network's subnets by its name; LookupError (its text said) when it has none
# to give: no such network, no engine to ask.
Networks = Callable[[str], Sequence[str]]
# Docker's own rule for network names.
DOCKER_NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


class Locator(Protocol):
    """Where the values of one document are in its file."""

    def value(self, path: Path) -> Location:
        """Where the value at `path` starts."""

    def key(self, path: Path) -> Location:
        """Where the key of the member `path` names is (its first, where it is repeated)."""

    def member(self, path: Path, index: int) -> Location:
        """Where the key of the `index`th member (from 0, in file order) of the mapping
        at `path` is: for the members an `IrregularMapping` lists."""

    def written(self, path: Path) -> str:
        """The scalar at `path` as the file writes it (`no`, `0x50`, `1.50`)."""

    def elements(self, path: Path) -> list[Location]:
        """Where each element of the list at `path` starts."""


class OtherScalar:
    """A YAML scalar of a type no policy value has (a date, a merge key `<<`, a custom
    tag, `!!int x`): its tag says what it is, in messages."""

    def __init__(self, tag: str) -> None:
        self.tag = tag


class IrregularMapping(dict[str, Any]):
    """A mapping with members a dict cannot hold: a repeated key (the dict holds the
    first member of that name) or, in YAML, a key that is not a string. `others`
    lists them in file order as (member index, key)."""

    def __init__(self, members: Iterable[tuple[str, Any]], others: list[tuple[int, Any]]) -> None:
        super().__init__(members)
        self.others = others


_KINDS = {
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "empty",
}


def kind(value: Any) -> str:
    """What a value is, in a message: 'a list', 'a number', ..."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, OtherScalar):
        return _KINDS.get(value.tag, value.tag)
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "a string"


def check(document: Any, locator: Locator, path: str, networks: Networks | None = None) -> Policy:
    """Validate a policy `document` read from the file `path`; raise PolicyError with every
    error found. The model keeps the file's own warnings; those that need the compiled
    form are `isoebpf.ir.lint`'s. `networks` gives the subnets of the Docker networks
    overlays name (None: there is no engine to ask, and an overlay that names one is an error)."""
    checker = _Checker(locator, path, networks)
    policy = checker.check(document)
    if policy is None:
        raise PolicyError(sorted(checker.diagnostics))
    return replace(policy, warnings=tuple(sorted(checker.diagnostics)))


def refuse(path: str, where: Location, message: str) -> PolicyError:
    """A file refused before its values could be checked (not valid YAML or JSON, empty)."""
    return PolicyError([Diagnostic(path, where.line, where.column, "error", message)])


class _Checker:
    """Checks a document, asking `locator` where the values it has something to say about are."""

    def __init__(self, locator: Locator, path: str, networks: Networks | None = None) -> None:
        self.locator = locator
        self.path = path
        self.networks = networks
        self.diagnostics: list[Diagnostic] = []
        self._errors = 0
        # Every overlay subnet with its owner and place, for the overlap check.
        self._subnets: list[tuple[netaddr.IPNetwork, str, Path]] = []
        # Endpoints by their text, once valid: large policies name the same ones often.
        self._endpoints: dict[str, Endpoint] = {}
        # Port lists by their texts, once valid with nothing to say about them.
        self._port_lists: dict[tuple[str, ...], tuple[PortSpec, ...]] = {}

    def error(self, where: Path | Location, message: str) -> None:
        self._errors += 1
        self._say(where, "error", message)

    def warn(self, where: Path | Location, message: str) -> None:
        self._say(where, "warning", message)

    def _say(self, where: Path | Location, severity: str, message: str) -> None:
        at = where if isinstance(where, Location) else self.locator.value(where)
        self.diagnostics.append(Diagnostic(self.path, at.line, at.column, severity, message))

    # -- shapes --------------------------------------------------------------

    def string(self, value: Any, path: Path, what: str) -> str | None:
        if type(value) is str:
            return value
        self.error(path, f"{what} must be a string, not {kind(value)}")
        return None

    def mapping(self, value: Any, path: Path, what: str, allowed: tuple[str, ...] | None) -> dict[str, Any]:
        """The mapping's members by key, without those in error: repeated and unknown
        keys, keys that are not strings."""
        if not isinstance(value, dict):
            self.error(path, f"{what} must be a mapping, not {kind(value)}")
            return {}
        if isinstance(value, IrregularMapping):
            for index, key in value.others:
                self.irregular_key(path, index, key, what, allowed)
        if allowed is None or set(allowed).issuperset(value):
            return value
        known = {}
        for key, member in value.items():
            if key in allowed:
                known[key] = member
            else:
                self.unknown_key(self.locator.key((*path, key)), key, what, allowed)
        return known

    def irregular_key(self, path: Path, index: int, key: Any, what: str,
                      allowed: tuple[str, ...] | None) -> None:
        where = self.locator.member(path, index)
        if isinstance(key, OtherScalar) and key.tag == MERGE_TAG:
            self.error(where, "merge keys (<<) are not supported in a policy")
        elif type(key) is not str:
            self.error(where, f"keys of {what} must be strings, not {kind(key)}")
        elif allowed is not None and key not in allowed:
            self.unknown_key(where, key, what, allowed)  # each time: as if never seen
        else:
            first = self.locator.key((*path, key))
            self.error(where, f"duplicate key '{key}' in {what} (first at line {first.line})")

    def unknown_key(self, where: Location, key: str, what: str, allowed: tuple[str, ...]) -> None:
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f": did you mean '{close[0]}'?" if close else f" (known: {', '.join(allowed)})"
        self.error(where, f"unknown key '{key}' in {what}{hint}")

    def sequence(self, value: Any, path: Path, what: str) -> list[Any]:
        if isinstance(value, list):
            return value
        self.error(path, f"{what} must be a list, not {kind(value)}")
        return []

    # -- the policy ----------------------------------------------------------

    def check(self, document: Any) -> Policy | None:
        top = self.mapping(document, (), "the policy", TOP_KEYS)
        if not isinstance(document, dict):
            return None
        version = self.version(top)
        default = self.choice(top, "default", ("allow", "deny"), "allow")
        deny_action = self.choice(top, "deny_action", ("reject", "drop"), "reject")
        overlays = self.overlays(top)
        index = _OverlayIndex(overlays)
        exceptions = self.exceptions(top, index)
        rules = self.rules(top, index)
        interfaces = self.interfaces(top)
        timeouts = self.timeouts(top)
        audit = self.flag(top, (), "audit")
        if self._errors:
            return None
        assert version is not None
        return Policy(self.path, version, default, deny_action, tuple(overlays), tuple(exceptions),
                      tuple(rules), interfaces, timeouts, audit)

    def flag(self, fields: dict[str, Any], at: Path, key: str) -> bool:
        """`fields[key]`, true or false (false when it is not there)."""
        value = fields.get(key, False)
        if type(value) is bool:
            return value
        self.error((*at, key), f"'{key}' must be true or false, not {kind(value)}")
        return False

    def version(self, top: dict[str, Any]) -> int | None:
        if "version" not in top:
            self.error((), "missing 'version' (this tool reads 'version: 1')")
            return None
        value = top["version"]
        if type(value) is not int:
            self.error(("version",), f"version must be the number 1, not {kind(value)}")
            return None
        if value not in SUPPORTED_VERSIONS:
            self.error(("version",), f"unknown version {value}: this tool reads version 1")
            return None
        return value

    def choice(self, top: dict[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
        if key not in top:
            return default
        value = top[key]
        if isinstance(value, dict | list):
            shown = kind(value)
        else:  # a scalar as written: `default: no` is 'no', not a boolean
            shown = value if type(value) is str else self.locator.written((key,))
            if shown in allowed:
                return shown
        self.error((key,), f"{key} must be {' or '.join(allowed)}, not '{shown}'")
        return default

    def overlays(self, top: dict[str, Any]) -> list[Overlay]:
        if "overlays" not in top:
            self.error((), "missing 'overlays': a policy needs at least one overlay")
            return []
        path: Path = ("overlays",)
        value = top["overlays"]
        found = self.mapping(value, path, "overlays", None)
        if type(value) is dict and not value:
            self.error(path, "'overlays' is empty: a policy needs at least one overlay")
        overlays: list[Overlay] = []
        for name, body in found.items():
            at = (*path, name)
            name_place = self.locator.key(at)
            if not OVERLAY_NAME.match(name):
                self.error(name_place, f"overlay name '{name}' must be 1-24 characters of a-z 0-9 _ -, "
                                       "starting with a letter")
            elif name.startswith(RESERVED_PREFIXES):
                self.error(name_place, f"overlay name '{name}' is reserved (dcos- and mesos- are DC/OS's)")
            fields = self.mapping(body, at, f"overlay '{name}'", ("subnets", "isolated", "docker_network"))
            network = self.docker_network(fields, at, name)
            subnets = self.overlay_subnets(fields, at, name, name_place, needed="docker_network" not in fields)
            from_docker = self.network_subnets(network, (*at, "docker_network"), name) if network else []
            subnets += from_docker
            isolated = self.flag(fields, at, "isolated")
            overlays.append(Overlay(name, tuple(s for s, _ in subnets), isolated, name_place, network,
                                    tuple(s for s, _ in from_docker)))
            self._subnets.extend((s, name, p) for s, p in subnets)
        self.check_overlap()
        return overlays

    def docker_network(self, fields: dict[str, Any], at: Path, name: str) -> str | None:
        if "docker_network" not in fields:
            return None
        path = (*at, "docker_network")
        network = self.string(fields["docker_network"], path, "a Docker network's name")
        if network is not None and not DOCKER_NETWORK_NAME.match(network):
            self.error(path, f"'{network}' is no Docker network name (letters, digits, _ . -, "
                             "starting with a letter or digit)")
            return None
        return network

    def network_subnets(self, network: str, path: Path, name: str) -> list[tuple[netaddr.IPNetwork, Path]]:
        """The subnets Docker gives the overlay's network (each said at the network's name)."""
        if self.networks is None:
            self.error(path, f"overlay '{name}' names Docker network '{network}', and no Docker "
                             "engine is asked here")
            return []
        try:
            texts = self.networks(network)
        except LookupError as err:
            self.error(path, f"overlay '{name}': {err.args[0] if err.args else err}")
            return []
        if not texts:
            self.error(path, f"overlay '{name}': Docker network '{network}' has no subnet")
        subnets = []
        for text in texts:
            try:
                subnets.append((parse_cidr(text), path))
            except ValueError as err:
                self.error(path, f"overlay '{name}': Docker network '{network}' gives {text}: {err}")
        return subnets

    def overlay_subnets(self, fields: dict[str, Any], at: Path, name: str,
                        name_place: Location, needed: bool = True) -> list[tuple[netaddr.IPNetwork, Path]]:
        if "subnets" not in fields:
            if needed:
                self.error(name_place, f"overlay '{name}' needs 'subnets' (at least one) or 'docker_network'")
            return []
        path = (*at, "subnets")
        items = self.sequence(fields["subnets"], path, f"subnets of '{name}'")
        if isinstance(fields["subnets"], list) and not items and needed:
            self.error(path, f"overlay '{name}' needs at least one subnet")
        subnets: list[tuple[netaddr.IPNetwork, Path]] = []
        for i, item in enumerate(items):
            text = self.string(item, (*path, i), "a subnet")
            if text is None:
                continue
            try:
                subnets.append((parse_cidr(text), (*path, i)))
            except ValueError as err:
                self.error((*path, i), str(err))
        return subnets

    def check_overlap(self) -> None:
        """Subnets of different overlays must be disjoint; report each clash once."""
        entries = sorted(self._subnets, key=lambda e: (e[0].version, e[0].first, -e[0].last))
        open_: tuple[netaddr.IPNetwork, str, Path] | None = None
        for entry in entries:
            net, name, path = entry
            if open_ is not None and open_[0].version == net.version and net.first <= open_[0].last:
                other, other_name, _ = open_
                if other_name != name:
                    self.error(path, f"subnet {net} of overlay '{name}' overlaps {other} of overlay '{other_name}'")
                else:
                    self.warn(path, f"subnet {net} lies inside {other}, already in overlay '{name}'")
                continue
            open_ = entry

    def endpoint(self, value: Any, path: Path, index: _OverlayIndex) -> Endpoint | None:
        """The `from` or `to` at `path` (exceptions[i].from, allow[i].to), not read before."""
        what = f"{path[0]}[{path[1]}].{path[2]}"
        text = self.string(value, path, what)
        if text is None:
            return None
        if text in index.by_name:
            overlay = index.by_name[text]
            endpoint = self._endpoints[text] = Endpoint(text, overlay.name, overlay.subnets)
            return endpoint
        if not CIDR_LIKE.search(text):
            close = difflib.get_close_matches(text, list(index.by_name), n=1)
            hint = f": did you mean '{close[0]}'?" if close else ""
            self.error(path, f"{what} '{text}' is neither an overlay nor a CIDR{hint}")
            return None
        try:
            net = parse_cidr(text)
        except ValueError as err:
            self.error(path, str(err))
            return None
        owner = index.owner(net)
        if owner is None:
            wider = index.covered_by(net)
            if wider:
                self.error(path, f"{what} {net} is wider than overlay '{wider}': name the overlay or narrow the CIDR")
            else:
                self.error(path, f"{what} {net} lies in no overlay, so this can never match")
            return None
        endpoint = self._endpoints[text] = Endpoint(text, owner, (net,))
        return endpoint

    def entries(self, top: dict[str, Any], what: str, keys: tuple[str, ...],
                index: _OverlayIndex) -> Iterator[tuple[int, dict[str, Any], Endpoint | None, Endpoint | None]]:
        """The entries of the list `what` (exceptions, allow) that are mappings: each one's
        index, known fields, source and destination (None where in error)."""
        if what not in top:
            return
        path: Path = (what,)
        allowed = set(keys)
        known = self._endpoints
        for i, item in enumerate(self.sequence(top[what], path, what)):
            if type(item) is dict and allowed.issuperset(item) and "from" in item and "to" in item:
                fields = item  # the common case: nothing to say about its shape
            else:
                fields = self.mapping(item, (*path, i), f"{what}[{i}]", keys)
                if not isinstance(item, dict):
                    continue
                for needed in ("from", "to"):
                    if needed not in fields:
                        self.error((*path, i), f"{what}[{i}] needs '{needed}'")
            src = dst = None
            if "from" in fields:
                value = fields["from"]
                src = known.get(value) if type(value) is str else None
                src = src or self.endpoint(value, (what, i, "from"), index)
            if "to" in fields:
                value = fields["to"]
                dst = known.get(value) if type(value) is str else None
                dst = dst or self.endpoint(value, (what, i, "to"), index)
            yield i, fields, src, dst

    def exceptions(self, top: dict[str, Any], index: _OverlayIndex) -> list[Exception_]:
        found = [(i, src, dst) for i, _, src, dst in self.entries(top, "exceptions", ("from", "to"), index)
                 if src and dst]
        places = self.locator.elements(("exceptions",)) if found else []
        return [Exception_(i, src, dst, places[i]) for i, src, dst in found]

    def rules(self, top: dict[str, Any], index: _OverlayIndex) -> list[AllowRule]:
        found = []
        for i, fields, src, dst in self.entries(top, "allow", ("from", "to", "ports"), index):
            ports = self.ports(fields["ports"], ("allow", i, "ports")) if "ports" in fields else (ANY_PORT,)
            if src and dst and ports:
                found.append((i, src, dst, ports))
        places = self.locator.elements(("allow",)) if found else []
        return [AllowRule(i, src, dst, ports, places[i]) for i, src, dst, ports in found]

    def ports(self, value: Any, path: Path) -> tuple[PortSpec, ...]:
        """A rule's ports; () when they are in error."""
        if type(value) is list:
            try:
                known = self._port_lists.get(tuple(value))
            except TypeError:  # a list or mapping among them: said below
                known = None
            if known is not None:
                return known
        items = self.sequence(value, path, "ports")
        if isinstance(value, list) and not items:
            self.error(path, "'ports' is empty: omit it to allow every protocol and port")
        said = len(self.diagnostics)
        specs: list[PortSpec] = []
        ok = True
        for i, item in enumerate(items):
            # A number, or YAML's `!!int x`, a number by its tag.
            if type(item) is int or (isinstance(item, OtherScalar) and item.tag == INT_TAG):
                written = self.locator.written((*path, i))
                self.error((*path, i), f"port {written} needs a protocol: write 'tcp/{written}' or 'udp/{written}'")
                ok = False
                continue
            text = self.string(item, (*path, i), "a port")
            spec = self.port(text, (*path, i)) if text is not None else None
            if spec is None:
                ok = False
            elif spec in specs:
                self.warn((*path, i), f"'{spec}' is listed twice")
            else:
                specs.append(spec)
        if ANY_PORT in specs and len(specs) > 1:
            self.warn(path, "'any' already covers every protocol and port; the others add nothing")
        if not ok:
            return ()
        if len(self.diagnostics) == said and items:
            self._port_lists[tuple(items)] = tuple(specs)
        return tuple(specs)

    def port(self, text: str, path: Path) -> PortSpec | None:
        if text in ("icmp", "any"):
            return PortSpec(text)
        match = PORT_SPEC.match(text)
        if not match:
            self.error(path, f"'{text}' is not a port: write tcp/N, udp/N, tcp/N-M, udp/N-M, icmp or any")
            return None
        proto, low_text, high_text = match.groups()
        low = int(low_text)
        high = int(high_text) if high_text is not None else low
        for value in (low, high):
            if not 1 <= value <= 65535:
                self.error(path, f"port {value} in '{text}' is out of range (1-65535)")
                return None
        if low > high:
            self.error(path, f"'{text}': the range must run low to high ({proto}/{high}-{low})")
            return None
        return PortSpec(proto, low, high)

    def interfaces(self, top: dict[str, Any]) -> tuple[str, ...] | None:
        if "interfaces" not in top:
            return None
        path: Path = ("interfaces",)
        globs: list[str] = []
        for i, item in enumerate(self.sequence(top["interfaces"], path, "interfaces")):
            text = self.string(item, (*path, i), "an interface glob")
            if text is None:
                continue
            if not IFACE_GLOB.match(text):
                self.error((*path, i), f"'{text}' is not an interface name or glob (at most 15 characters, "
                                        "no / or spaces)")
            else:
                globs.append(text)
        return tuple(globs)

    def timeouts(self, top: dict[str, Any]) -> dict[str, int]:
        timeouts = dict(DEFAULT_TIMEOUTS)
        if "timeouts" not in top:
            return timeouts
        path: Path = ("timeouts",)
        for key, value in self.mapping(top["timeouts"], path, "timeouts", tuple(DEFAULT_TIMEOUTS)).items():
            if type(value) is not int or not 1 <= value <= 86400 * 30:
                self.error((*path, key), f"timeouts.{key} must be a whole number of seconds from 1 to 2592000")
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
