"""iptables backend, kernel half: the `Backend` itself: the policy as the DC/OS guide's iptables + ipset layout.

For nodes that cannot run the eBPF program. Everything runs inside the scope's
network namespace (`ip netns exec`, argument lists only), under the scope's
lock, and touches only what is ours: our chain, our two FORWARD rules (found by
their `isoebpf` comments) and our sets (found by their `dcos-`/`dcos6-` names).

Load, and every update, is atomic per address family (a packet is judged wholly
by the old or wholly by the new policy):
- only rules changed: one `iptables-restore --noflush` replaces our chain's
  rules and our FORWARD rules in one transaction;
- sets changed too: the new contents are filled into temporary sets, one
  transaction switches the rules over to them (the new policy is now in force,
  whole), the named sets are refilled through `ipset swap`, and a second
  transaction switches back to the names, so operators' runbooks keep them.
Then connection-tracking entries of connections the new policy does not allow
are deleted, so their next packets are judged afresh (contract, semantics 6).

Its neighbours: `layout` (what to write), `saved` (reading back), `nftrace` (trace); the
shared floor below, `registry`/`enforcer` above.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import netaddr
from pyroute2 import Conntrack, NetlinkError
from pyroute2.ipset import IPSet
from pyroute2.netlink.exceptions import IPSetError

from ...errors import BackendError, StateError
from ...ir.compiler import Delta
from ...ir.evaluate import IPPROTO_ICMPV6, Classifier, Packet, first_packet
from ...ir.tables import IR, PROTO_ICMP
from .. import counts, docker_user
from ..interface import Attachment, LoadReport, state_record
from ..state import Scope
from . import nftrace
from .layout import (
    DEFAULT_CHAIN,
    FORWARDED,
    FULL,
    JUMP,
    ROLES,
    SET_PREFIX,
    SET_TYPES,
    TAG,
    IpSet,
    Layout,
    audited_action,
    build,
    ipset_restore,
    iptables_restore,
    rename_sets,
    target_action,
)
from .saved import Notes, SavedSet, parse_ipset_save

BACKEND = "iptables"
TMP_PREFIX = "isoebpf-tmp-"
# For tests: ipset types to treat as missing even when the kernel has them
# (space-separated), so the degraded layout can be exercised anywhere.
TEST_MISSING_TYPES = "ISOEBPF_TEST_MISSING_SET_TYPES"
LOCK_WAIT_SECONDS = "10"  # -w: wait this long for the xtables lock (legacy iptables)
IPSET_ERR_FIND_TYPE = 4098  # the kernel has no such set type
IP_VERSIONS = {4: "iptables", 6: "ip6tables"}
NOT_MEASURED = ("fragment", "malformed")  # the kernel's defrag and parsers decide these
OUR_SET = re.compile(
    rf"(dcos6?-({'|'.join(ROLES)})|dcos6?\.[a-z][a-z0-9_-]{{0,23}}|{TMP_PREFIX}\d+)\Z")
SAVED_RULE = re.compile(r"\[(\d+):(\d+)\] -A (\S+) (.*)\Z")
BRIDGE_SYSCTL = {4: "net.bridge.bridge-nf-call-iptables", 6: "net.bridge.bridge-nf-call-ip6tables"}

# Phases of a long load, for the CLI to show on a terminal (the "isoebpf" logger's INFO).
_progress = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Tools:
    """iptables, ipset and friends, run in one network namespace."""

    netns: str | None
    flavour: str  # "nft" or "legacy"

    @property
    def where(self) -> str:
        return f"namespace '{self.netns}'" if self.netns else "this namespace"

    def run(self, args: Sequence[str], stdin: str | None = None) -> str:
        command = ["ip", "netns", "exec", self.netns, *args] if self.netns else list(args)
        try:
            done = subprocess.run(command, input=stdin, capture_output=True, text=True,
                                  check=False)
        except FileNotFoundError as err:
            raise BackendError(f"{args[0]} is not installed: run scripts/setup.sh") from err
        if done.returncode != 0:
            raise BackendError(f"{' '.join(args[:2])} failed in {self.where}: "
                               f"{(done.stderr or done.stdout).strip()}")
        return done.stdout

    def tool(self, version: int, verb: str = "") -> str:
        """`iptables-nft-save`, `iptables-nft` and the like; the plain name where only
        that exists."""
        suffix = f"-{verb}" if verb else ""
        flavoured = f"{IP_VERSIONS[version]}-{self.flavour}{suffix}"
        return flavoured if shutil.which(flavoured) else f"{IP_VERSIONS[version]}{suffix}"

    def save(self, version: int) -> str:
        return self.run([self.tool(version, "save"), "-c", "-t", "filter"])

    def restore(self, version: int, text: str) -> None:
        self.run([self.tool(version, "restore"), "-w", LOCK_WAIT_SECONDS, "--noflush"], text)

    def ipset(self, text: str) -> None:
        if text:
            self.run(["ipset", "restore"], text)

    def sets(self) -> dict[str, SavedSet]:
        return parse_ipset_save(self.run(["ipset", "save"]), "ipset save", Notes())


def flavour() -> str:
    """'nft' or 'legacy': which iptables this machine's `iptables` command drives."""
    try:
        done = subprocess.run(["iptables", "-V"], capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise BackendError("iptables is not installed: run scripts/setup.sh") from err
    if "nf_tables" in done.stdout:
        return "nft"
    if "legacy" in done.stdout:
        return "legacy"
    raise BackendError(f"cannot tell iptables-nft from iptables-legacy: '{done.stdout.strip()}'")


def set_types() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(set types the kernel has, set types hidden by the test switch), asked read-only.

    Set types are global to the kernel, so the question needs no namespace.
    """
    hidden = tuple(t for t in os.environ.get(TEST_MISSING_TYPES, "").split() if t in SET_TYPES)
    found: list[str] = []
    try:
        ipset = IPSet()
    except OSError as err:
        raise BackendError(f"cannot ask the kernel for ipset types ({err}): are you root?") from err
    try:
        for kind in SET_TYPES:
            try:
                ipset.get_supported_revisions(kind)
            except IPSetError as err:
                if err.code != IPSET_ERR_FIND_TYPE:
                    raise BackendError(f"cannot ask the kernel about ipset type {kind}: {err}") \
                        from err
                continue
            if kind not in hidden:
                found.append(kind)
    finally:
        ipset.close()
    return tuple(found), hidden


# Where our jump goes: first in FORWARD, or where Docker runs first in DOCKER-USER, which
# FORWARD jumps to before anything else and a dockerd restart leaves in place
# (backends.docker_user).
HOSTS = ("FORWARD", docker_user.CHAIN)


@dataclass
class _Family:
    """Our part of one family's filter table, as iptables-save shows it."""

    # Our rules in each chain that may hold our jump: position, spec, counters.
    placed: dict[str, list[tuple[int, str, int, int]]] = field(default_factory=lambda: {h: [] for h in HOSTS})
    chains: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)  # every chain

    @property
    def host(self) -> str:
        """The chain our jump belongs in: DOCKER-USER where FORWARD starts by jumping there
        (Docker runs), else FORWARD itself. A dockerd with --live-restore puts its
        isolation jump first when it restarts: ours then go first in FORWARD, above it."""
        first = next(iter(self.chains.get("FORWARD", [])), ("", 0, 0))[0]
        return docker_user.CHAIN if first == f"-j {docker_user.CHAIN}" else "FORWARD"

    @property
    def forward(self) -> list[tuple[int, str, int, int]]:
        """Our rules where they belong (see `host`)."""
        return self.placed.get(self.host, [])

    @property
    def stray(self) -> list[tuple[str, int]]:
        """(chain, position) of our rules where they no longer belong (Docker came or went)."""
        return [(h, p) for h in HOSTS if h != self.host for p, _, _, _ in self.placed.get(h, [])]

    @property
    def jump_targets(self) -> list[str]:
        return [target for h in HOSTS for _, spec, _, _ in self.placed.get(h, []) if (target := _target(spec))]


def _target(spec: str) -> str:
    """A rule's `-j` target ("" for none), as iptables-save writes it."""
    return spec.rsplit(" -j ", 1)[1].split()[0] if " -j " in spec else ""


def _action(spec: str) -> tuple[str, bool]:
    """(what a rule does, whether audit mode let it pass instead) by its target and comment."""
    audited = audited_action(_note(spec) or "")
    return (audited, True) if audited else (target_action(_target(spec)), False)


def _note(spec: str) -> str | None:
    """The comment of one of our rules; None if not ours."""
    if f'--comment "{TAG} ' not in spec:
        return None
    words = shlex.split(spec)
    return words[words.index("--comment") + 1]


def _tag(spec: str) -> str | None:
    """Our name for a rule ("allow:0", "jump", ...) from its comment; None if not ours."""
    note = (_note(spec) or "").split()
    return note[1] if len(note) > 1 and note[0] == TAG else None


def _read_family(tools: _Tools, version: int) -> _Family:
    family = _Family()
    for line in tools.save(version).splitlines():
        if line.startswith(":"):
            family.chains.setdefault(line[1:].split()[0], [])
            continue
        match = SAVED_RULE.match(line)
        if not match:
            continue
        packets, octets, chain, spec = int(match[1]), int(match[2]), match[3], match[4]
        family.chains.setdefault(chain, []).append((spec, packets, octets))
        if chain in HOSTS and _tag(spec) in (FORWARDED, JUMP):
            family.placed.setdefault(chain, []).append((len(family.chains[chain]), spec, packets, octets))
    return family


def _our_chains(family: _Family, *names: str | None) -> list[str]:
    """Our chains present: those our jumps name, and the given names if all their rules are ours."""
    found = [c for c in family.jump_targets if c in family.chains]
    for name in names:
        rules = family.chains.get(name or "")
        if name and name not in found and rules and all(_tag(spec) for spec, _, _ in rules):
            found.append(name)
    return found


def _elements(fields_and_notes: Iterable[tuple[Sequence[str], str | None]]) -> set[tuple[Any, ...]]:
    """Set elements in one spelling: CIDRs with their length, a port range as its ports."""
    found: set[tuple[Any, ...]] = set()
    for fields, note in fields_and_notes:
        ends = [str(netaddr.IPNetwork(fields[0]).cidr), str(netaddr.IPNetwork(fields[-1]).cidr)]
        if len(fields) == 1:
            found.add((ends[0], note))
        elif len(fields) == 2:
            found.add((*ends, note))
        else:
            proto, _, ports = fields[1].partition(":")
            low, _, high = ports.partition("-")
            found.update((ends[0], proto, port, ends[1], note)
                         for port in range(int(low), int(high or low) + 1))
    return found


def _same_set(wanted: IpSet, saved: SavedSet | None) -> bool:
    if saved is None or saved.type != wanted.type or saved.version != wanted.version:
        return False
    return _elements((e.split(","), n) for e, n in wanted.elements) == _elements(
        (e.fields, e.comment) for e in saved.elements)


@dataclass
class _State:
    families: dict[int, _Family]
    sets: dict[str, SavedSet]  # ours only


def _read_state(tools: _Tools) -> _State:
    sets = {n: s for n, s in tools.sets().items() if OUR_SET.match(n)}
    return _State({v: _read_family(tools, v) for v in (4, 6)}, sets)


def differences(layout: Layout, state: _State) -> list[str]:
    """What in the kernel differs from `layout`, as '<kind>: <what>' lines (empty: in force)."""
    found = [f"set: {s.name} {'differs' if s.name in state.sets else 'is missing'}"
             for s in layout.sets if not _same_set(s, state.sets.get(s.name))]
    wanted = {s.name for s in layout.sets}
    found += [f"set: {name} is left over" for name in state.sets if name not in wanted]
    for version, family in state.families.items():
        rules = layout.families[version]
        tool = IP_VERSIONS[version]
        positions = [p for p, _, _, _ in family.forward]
        if [spec for _, spec, _, _ in family.forward] != list(rules.forward) or \
                positions != list(range(1, len(positions) + 1)):
            found.append(f"jump: {tool} {family.host} rules are missing, changed or not first")
        if family.stray:
            found.append(f"jump: {tool} has our rules in {family.stray[0][0]}, where they no longer belong")
        if rules.chain and [spec for spec, _, _ in family.chains.get(layout.chain, [])] != \
                list(rules.chain):
            found.append(f"chain: {tool} {layout.chain} is missing or changed")
        found += [f"chain: {tool} {c} is left over" for c in _stale_chains(layout, version, family)]
    return found


def _stale_chains(layout: Layout, version: int, family: _Family) -> list[str]:
    """Our chains present that `layout` does not have in this family."""
    keep = layout.chain if layout.families[version].chain else None
    return [c for c in _our_chains(family, layout.chain) if c != keep]


def _forward_ops(family: _Family, specs: Sequence[str]) -> list[str]:
    """Put our jump rules first in their chain (FORWARD, or DOCKER-USER: `_Family.host`):
    replaced where they are first already, else (gone, or someone inserted rules above
    them) deleted and inserted at the top; and take them out of the chain they left."""
    host = family.host
    strays = [f"-D {chain} {p}" for chain, p in sorted(family.stray, reverse=True)]
    positions = [p for p, _, _, _ in family.forward]
    if positions == list(range(1, len(specs) + 1)):
        return [*strays, *(f"-R {host} {p} {spec}" for p, spec in zip(positions, specs, strict=True))]
    return [*strays, *(f"-D {host} {p}" for p in reversed(positions)),
            *(f"-I {host} {i} {spec}" for i, spec in enumerate(specs, start=1))]


def _switch(tools: _Tools, layout: Layout, names: dict[str, str],
            before: _State | None = None) -> None:
    """One transaction per family: our rules as `layout` says, sets under `names`.
    `before`: the state to put back in a family already switched when a later
    family's transaction fails, so no family is left on the new policy alone."""
    switched: list[int] = []
    for version in (4, 6):
        family = _read_family(tools, version)
        drop = [op for c in _stale_chains(layout, version, family) for op in (f"-F {c}", f"-X {c}")]
        specs = [rename_sets(spec, names) for spec in layout.families[version].forward]
        try:
            tools.restore(version, iptables_restore(layout, version,
                                                    _forward_ops(family, specs) + drop, names))
        except BackendError:
            if before is not None:
                for done in switched:
                    _put_back(tools, done, before.families[done], layout)
            raise
        switched.append(version)


def _put_back(tools: _Tools, version: int, saved: _Family, layout: Layout) -> None:
    """Our FORWARD rules and chains of one family as `saved` read them, in one transaction."""
    now = _read_family(tools, version)
    chains = _our_chains(saved)
    gone = [c for c in _our_chains(now, layout.chain) if c not in chains]
    lines = ["*filter", *(f":{c} - [0:0]" for c in chains),
             *_forward_ops(now, [spec for _, spec, _, _ in saved.forward]),
             *(f"-A {c} {spec}" for c in chains for spec, _, _ in saved.chains[c]),
             *(op for c in gone for op in (f"-F {c}", f"-X {c}")), "COMMIT"]
    tools.restore(version, "".join(f"{line}\n" for line in lines))


def _in_use(state: _State) -> set[str]:
    """The sets our rules match on now."""
    specs = [spec for family in state.families.values()
             for spec in (*(f[1] for f in family.forward),
                          *(r[0] for c in _our_chains(family) for r in family.chains[c]))]
    return {words[i + 1] for words in (spec.split(" ") for spec in specs)
            for i, word in enumerate(words[:-1]) if word == "--match-set"}


def _fill_named(layout: Layout, sets: Sequence[IpSet], state: _State,
                fresh: Iterator[str]) -> str:
    """ipset input giving each named set its new contents: filled where it is new, else
    filled under a temporary name and swapped in."""
    temp = {s.name: next(fresh) for s in sets if s.name in state.sets}
    lines = ipset_restore(layout, only=[s.name for s in sets if s.name not in state.sets])
    lines += ipset_restore(layout, temp, only=temp)
    for s in sets:
        saved = state.sets.get(s.name)
        if saved is None:
            continue
        if (saved.type, saved.version) != (s.type, s.version):  # no swap between types
            lines += f"destroy {s.name}\n{s.create()}\n"
        lines += f"swap {temp[s.name]} {s.name}\ndestroy {temp[s.name]}\n"
    return lines


def _apply(tools: _Tools, layout: Layout, state: _State) -> tuple[set[str], list[str]]:
    """Make the kernel match `layout`, switching each family over in one transaction;
    returns the names of the sets it filled anew (their counters start at 0), and
    what is left to finish (empty when all is done).

    Sets our rules do not use yet are filled under their own names before the
    switch. Sets they use cannot change under them (a packet would meet new
    sets and old rules): those are filled under temporary names, the rules
    switch to them, the named sets are refilled, and the rules switch back.
    The first switch commits: a failure before it leaves the policy in force as
    it was; after it the new policy is in force whole, and what failed is only
    the tidying (names, temporary sets), which the next load or repair redoes.
    """
    changed = [s for s in layout.sets if not _same_set(s, state.sets.get(s.name))]
    in_use = _in_use(state)
    fresh = (f"{TMP_PREFIX}{i}" for i in itertools.count() if f"{TMP_PREFIX}{i}" not in state.sets)
    temp: dict[str, str] = {}
    committed = False
    try:
        tools.ipset(_fill_named(layout, [s for s in changed if s.name not in in_use], state, fresh))
        busy = [s for s in changed if s.name in in_use]
        if busy:
            temp = {s.name: next(fresh) for s in busy}
            tools.ipset(ipset_restore(layout, temp, only=temp))
            _switch(tools, layout, temp, before=state)
            committed = True  # from here on the new policy is in force, whole
            tools.ipset(_fill_named(layout, busy, state, fresh))
            _switch(tools, layout, {})
        else:
            _switch(tools, layout, {}, before=state)
            committed = True
        wanted = {s.name for s in layout.sets}
        tools.ipset(_destroy_text([*temp.values(), *(n for n in state.sets if n not in wanted)]))
    except BackendError as err:
        if committed:
            return {s.name for s in changed}, [
                f"the new policy is in force, but tidying up after the change failed ({err}); "
                "the next 'isoebpf load' or the agent's repair finishes it"]
        _drop_unused_temps(tools, [s.name for s in changed if s.name not in state.sets])
        raise BackendError(f"{err}\nnothing of the new policy was put in force") from err
    return {s.name for s in changed}, []


def _drop_unused_temps(tools: _Tools, made: Sequence[str]) -> None:
    """Destroy the temporary sets, and the sets `made` by a failed change, that no
    rule uses (those in use carry the policy in force)."""
    listing = tools.run(["ipset", "list", "-t"])
    names = "|".join([rf"{TMP_PREFIX}\d+", *map(re.escape, made)])
    unused = re.findall(rf"^Name: ({names})\n(?:.+\n)*?References: 0$", listing, re.MULTILINE)
    tools.ipset(_destroy_text(unused))


def _destroy_text(names: Iterable[str]) -> str:
    return "".join(f"destroy {name}\n" for name in names)


# -- connection tracking ------------------------------------------------------------------


def _conntrack(netns: str | None, family: int) -> Any:
    try:
        return Conntrack(nfgen_family=family, **({"netns": netns} if netns else {}))
    except (OSError, NetlinkError) as err:
        raise BackendError(f"cannot open conntrack netlink in {netns or 'this namespace'}: {err}") \
            from err


def _first_packet(entry: Any) -> Packet:
    """The packet that opened a tracked connection, as the evaluator reads it."""
    t = entry.tuple_orig
    proto = int(t.proto)
    if proto in (PROTO_ICMP, IPPROTO_ICMPV6):
        sport = dport = int(t.icmp_id or 0)  # the evaluator's flow key for echo
    else:
        sport, dport = int(t.sport or 0), int(t.dport or 0)
    return first_packet((proto, netaddr.IPAddress(t.saddr), sport, netaddr.IPAddress(t.daddr),
                         dport))


def revoke(netns: str | None, ir: IR) -> int:
    """Delete the conntrack entries of connections `ir` does not allow; return how many."""
    classifier = Classifier(ir)
    cut = 0
    for family in (socket.AF_INET, socket.AF_INET6):
        ct = _conntrack(netns, family)
        try:
            doomed = [e for e in ct.dump_entries()
                      if classifier.judge(_first_packet(e)).action != "allow"]
            for entry in doomed:
                try:
                    ct.delete(entry)
                except NetlinkError as err:
                    if err.code != errno.ENOENT:  # gone already: ended or timed out meanwhile
                        raise BackendError(f"cannot delete a conntrack entry: {err}") from err
            cut += len(doomed)
        finally:
            ct.close()
    return cut


def _count_connections(netns: str | None, overlays: netaddr.IPSet) -> int:
    """Tracked connections between two overlay addresses: those the policy judges."""
    count = 0
    for family in (socket.AF_INET, socket.AF_INET6):
        ct = _conntrack(netns, family)
        try:
            count += sum(1 for e in ct.dump_entries()
                         if e.tuple_orig.saddr in overlays and e.tuple_orig.daddr in overlays)
        finally:
            ct.close()
    return count


# -- the three calls ------------------------------------------------------------------------


def _bridge_gap(tools: _Tools, layout: Layout, ir: IR) -> str | None:
    """Why bridged traffic would escape an isolated overlay here, or None."""
    if not any(o.isolated for o in ir.overlays):
        return None
    if not tools.run(["ip", "-o", "link", "show", "type", "bridge"]).strip():
        return None
    for version in (v for v, rules in layout.families.items() if rules.chain):
        try:
            value = tools.run(["sysctl", "-n", BRIDGE_SYSCTL[version]]).strip()
        except BackendError:
            value = "absent (br_netfilter is not loaded)"
        if value != "1":
            return (f"{tools.where} has bridges, but {BRIDGE_SYSCTL[version]} is {value}: packets "
                    "between hosts on one bridge skip iptables, so an isolated overlay would not "
                    f"be isolated there. Run 'modprobe br_netfilter' and 'sysctl -w "
                    f"{BRIDGE_SYSCTL[version]}=1' in it, or use --backend ebpf")
    return None


def _why(kind: str, found: Sequence[str], hidden: Sequence[str]) -> str:
    missing = [t for t in SET_TYPES if t not in found]
    if not missing:
        return f"{kind} layout"
    if hidden:
        return f"{kind} layout: {TEST_MISSING_TYPES} hides {', '.join(hidden)}"
    return f"{kind} layout: the kernel has no {', '.join(missing)}"


def _attachments(layout: Layout, tools: _Tools, why: str, state: _State) -> list[Attachment]:
    return [Attachment(state.families[v].host, 0, IP_VERSIONS[v],
                       f"jump to {layout.chain} (iptables-{tools.flavour}; {why})")
            for v, rules in sorted(layout.families.items()) if rules.chain]


def _accepting(state: _State) -> set[int]:
    """The IP versions where Docker runs (its DOCKER-USER chain is there): our chain
    ACCEPTs what it allows, which Docker's isolation further on would drop."""
    return {v for v, family in state.families.items() if docker_user.CHAIN in family.chains}


def load(ir: IR, scope: Scope, globs: Sequence[str], mode: str, policy_path: str,
         force: bool = False, on_failure: str = "closed", chain: str | None = None,
         compiling: Any | None = None, change: Delta | None = None) -> LoadReport:
    """Enforce `ir` in the scope's namespace, or update what is enforced there.

    `globs`, `mode`, `force`, `compiling` and `change` are the eBPF backend's: here every
    forwarded packet passes FORWARD, whatever its interface, and sets are compared
    whole (ipset restore of what differs). `chain` names the isolation
    chain (default: the one in force, else dcos-isolation). `on_failure` is
    recorded (enforcer.load acts on it).
    """
    with scope.locked():
        started = time.monotonic()
        try:
            record = scope.read()
        except StateError:
            record = None
        mine = record if record and record.get("backend") == BACKEND else None
        tools = _Tools(scope.netns, flavour())
        found, hidden = set_types()
        state = _read_state(tools)
        layout = build(ir, chain or (mine or {}).get("chain") or DEFAULT_CHAIN, found, _accepting(state))
        gap = _bridge_gap(tools, layout, ir)
        if gap:
            raise BackendError(gap)
        drifted = differences(layout, state)
        generation = int((mine or {}).get("generation", 0))
        carried = (mine or {}).get("carried", {})
        unfinished: list[str] = []
        if drifted or not mine or mine.get("digest") != ir.digest:
            _progress.info("applying %d sets and the %s chain", len(layout.sets), layout.chain)
            refilled, unfinished = _apply(tools, layout, state)
            generation += 1
            carried = _carried(mine, state, layout, ir, refilled) if mine else {}
        revoked = 0 if ir.audit else revoke(scope.netns, ir)  # audit mode forbids nothing
        why = _why(layout.kind, found, hidden)
        attachments = _attachments(layout, tools, why, state)
        scope.write(state_record(
            BACKEND, scope, ir, policy_path, generation, attachments, on_failure=on_failure,
            chain=layout.chain,
            flavour=tools.flavour, iptables_layout=layout.kind, set_types=list(found),
            sets=[s.name for s in layout.sets], revoked=revoked, carried=carried))
    return LoadReport(generation, False, 0.0, time.monotonic() - started, tuple(attachments),
                      None, (), tuple(unfinished))


def drift(scope: Scope, ir: IR) -> list[str]:
    """What in the kernel differs from the policy in force ('<kind>: <what>'); [] if nothing."""
    record = scope.read()
    if record is None or record.get("backend") != BACKEND:
        return ["state: no iptables record"]
    tools = _Tools(scope.netns, str(record["flavour"]))
    found, _ = set_types()
    state = _read_state(tools)
    return differences(build(ir, str(record["chain"]), found, _accepting(state)), state)


def plan(scope: Scope, ir: IR, chain: str | None = None) -> list[str]:
    """What loading `ir` would change here ('<kind>: <what>' lines, as drift says them);
    changes nothing."""
    try:
        record = scope.read()
    except StateError:
        record = None
    mine = record if record and record.get("backend") == BACKEND else None
    found, _ = set_types()
    state = _read_state(_Tools(scope.netns, flavour()))
    layout = build(ir, chain or (mine or {}).get("chain") or DEFAULT_CHAIN, found, _accepting(state))
    return differences(layout, state) or ["nothing: this policy is in force as it is"]


def numbering(scope: Scope) -> None:
    """None: sets and rules are named, not numbered, so any numbering writes the same."""
    return None


def _first_rule(tools: _Tools, version: int, chain: str) -> str:
    """`chain`'s first rule as `-S` writes it; "" when it has none (or there is no such
    chain, or no filter table)."""
    try:
        return tools.run([tools.tool(version), "-w", LOCK_WAIT_SECONDS, "-S", chain, "1"]).strip()
    except BackendError:
        return ""


def canary(scope: Scope) -> list[str]:
    """The cheap check the agent makes between read-backs ('<kind>: <what>'; [] if fine).

    Each family's first FORWARD rule (DOCKER-USER's, where Docker runs) must be ours: an
    `iptables -F`, an `nft flush ruleset`, a restored foreign ruleset (a firewalld
    reload) and rules inserted above ours all change it, and so does Docker starting
    or going. Two commands per family at most, no set listing.
    """
    record = scope.read()
    if record is None or record.get("backend") != BACKEND:
        return []
    tools = _Tools(scope.netns, str(record["flavour"]))
    found = []
    for version, tool in IP_VERSIONS.items():
        host, first = "FORWARD", _first_rule(tools, version, "FORWARD")
        if first == f"-A FORWARD -j {docker_user.CHAIN}":  # Docker runs: ours belong first there
            host, first = docker_user.CHAIN, _first_rule(tools, version, docker_user.CHAIN)
        if _tag(first) != FORWARDED:
            found.append(f"jump: {tool} {host} does not start with our rules")
    return found


def tracer(scope: Scope, per_second: int) -> nftrace.Tracer:
    """Verdicts of our chain through nf_tables' packet tracing (iptables-nft only)."""
    record = scope.read()
    if record is None or record.get("backend") != BACKEND:
        raise BackendError("no iptables enforcement is loaded here")
    tools = _Tools(scope.netns, str(record["flavour"]))
    if tools.flavour != "nft":
        raise BackendError(
            f"tracing needs iptables-nft, and this node runs iptables-{tools.flavour}: the "
            "kernel reports no per-packet verdicts to read. Per-rule counters are there: "
            "'isoebpf status' or 'iptables -L dcos-isolation -v -n' (in the namespace)")
    chain = str(record["chain"])

    def chain_rules(version: int) -> list[tuple[str, str, bool]]:
        return [(_tag(spec) or "foreign", *_action(spec))
                for spec, _, _ in _read_family(tools, version).chains.get(chain, [])]

    return nftrace.Tracer(scope.netns, tools.run, chain, chain_rules,
                          {str(name): str(text) for _, name, text in record["rules"]}, per_second)


def _counted(families: Iterable[_Family], chain: str, sets: Iterable[SavedSet], layout_kind: str,
             rule_names: Sequence[str]) -> dict[str, counts.Count]:
    """Rule name -> (packets, bytes) as our FORWARD rules, `chain`'s rules and the
    elements of `sets` count them now."""
    counted: dict[str, counts.Count] = {}

    def count(name: str | None, packets: int, octets: int) -> None:
        if name:
            now = counted.get(name, (0, 0))
            counted[name] = (now[0] + packets, now[1] + octets)

    for family in families:
        for _, spec, packets, octets in family.forward:
            count(_tag(spec), packets, octets)
        for spec, packets, octets in family.chains.get(chain, []):
            count(_tag(spec), packets, octets)
    for s in sets:
        for element in s.elements:
            count(element.comment, element.packets, element.bytes)
    # Reached our FORWARD rules without taking the jump: outside the overlays, or (full
    # layout, where the jump itself skips them) an exception's.
    unfiltered = [counted.get(FORWARDED, (0, 0))[i] - counted.get(JUMP, (0, 0))[i] for i in (0, 1)]
    if layout_kind == FULL:
        for name in rule_names:
            if name.startswith("exception:"):
                unfiltered = [u - c for u, c in zip(unfiltered, counted.get(name, (0, 0)),
                                                    strict=True)]
    count("unfiltered", *unfiltered)
    return counted


def _carried(mine: dict[str, Any], state: _State, layout: Layout, ir: IR,
             refilled: set[str]) -> counts.Carried:
    """What each rule of `ir` carries once `_apply` rewrote our rules and `refilled`
    sets: what the rules `mine` recorded had counted in `state` (read before), less
    what the sets left alone go on counting."""
    recorded = set(mine["sets"])
    before = _counted(state.families.values(), str(mine["chain"]),
                      [s for n, s in state.sets.items() if n in recorded],
                      str(mine["iptables_layout"]), [str(name) for _, name, _ in mine["rules"]])
    left_alone = [state.sets[s.name] for s in layout.sets if s.name not in refilled]
    kept = _counted([], layout.chain, left_alone, layout.kind, [r.name for r in ir.rules])
    return counts.carry(counts.totals(before, mine.get("carried", {})),
                        [(str(n), str(t)) for _, n, t in mine["rules"]],
                        [(r.name, r.text) for r in ir.rules], kept)


def status(scope: Scope) -> dict[str, Any] | None:
    record = scope.read()
    if record is None or record.get("backend") != BACKEND:
        return record
    tools = _Tools(scope.netns, str(record["flavour"]))
    chain = str(record["chain"])
    families = {v: _read_family(tools, v) for v in (4, 6)}
    saved = {n: s for n, s in tools.sets().items() if n in set(record["sets"])}
    counted = _counted(families.values(), chain, saved.values(), record["iptables_layout"],
                       [str(name) for _, name, _ in record["rules"]])
    record["counters"] = counts.report(
        [(name, text) for _, name, text in record["rules"] if name not in NOT_MEASURED], counted,
        record.get("carried", {}))
    overlays = netaddr.IPSet(netaddr.IPNetwork(e.fields[0]) for v in (4, 6)
                             for e in getattr(saved.get(f"{SET_PREFIX[v]}-overlays"), "elements", []))
    record["connections"] = _count_connections(scope.netns, overlays)
    record["sets"] = {n: {"type": s.type, "family": "inet6" if s.version == 6 else "inet",
                          "entries": len(s.elements), "max_entries": s.maxelem}
                      for n, s in sorted(saved.items())}
    for a in record["attachments"]:
        family = families[4 if a["mode"] == "iptables" else 6]
        jumps = [p for p, spec, _, _ in family.forward if spec.endswith(f"-j {chain}")]
        a["state"] = "attached" if jumps else "detached"
        if jumps:
            a["position"] = jumps[0]
    return record


def unload(scope: Scope) -> list[str]:
    """Remove our FORWARD rules, chains and sets from the scope's namespace; safe to repeat.

    Works without a state record: our rules carry the `isoebpf` comment, our
    sets have our names.
    """
    with scope.locked():
        try:
            record = scope.read()
        except StateError:
            record = None
        mine = record if record and record.get("backend") == BACKEND else None
        if scope.namespace_gone:
            removed = [f"the record of rules that went with namespace {scope.netns}"] if mine else []
        else:
            removed = _remove_ours(scope, mine)
        if mine:
            scope.forget()
        return removed


def _remove_ours(scope: Scope, mine: dict[str, Any] | None) -> list[str]:
    tools = _Tools(scope.netns, str(mine["flavour"]) if mine else flavour())
    removed: list[str] = []
    for version in (4, 6):
        family = _read_family(tools, version)
        chains = _our_chains(family, (mine or {}).get("chain"), DEFAULT_CHAIN)
        ops = [*_forward_ops(family, []), *(o for c in chains for o in (f"-F {c}", f"-X {c}"))]
        if ops:
            tools.restore(version, "\n".join(["*filter", *ops, "COMMIT", ""]))
            tool = IP_VERSIONS[version]
            removed += [f"{tool} {h} rule {_tag(spec)}" for h in HOSTS for _, spec, _, _ in family.placed.get(h, [])]
            removed += [f"{tool} chain {c}" for c in chains]
    ours = sorted(n for n in tools.sets() if OUR_SET.match(n))
    tools.ipset(_destroy_text(ours))
    removed += [f"ipset {name}" for name in ours]
    if tools.flavour == "nft" and nftrace.remove_table(tools.run):
        removed.append(f"nft table inet {nftrace.TABLE}")  # a killed trace's
    return removed
