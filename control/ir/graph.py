"""IR stage: the policy as a picture (`isoebpf graph`), in Graphviz's DOT language.

Overlays are nodes; allow rules are solid edges labelled with their ports, one edge
for each pair of overlays; exceptions are dashed edges; an overlay whose members
talk freely has a dotted loop (its hairpin), an isolated one a double border and no
loop; the default, and a legend of these styles, is the picture's label.

Given a node's per-rule packet counts (by rule identity, so that counts of the
policy in force find the rules of the file drawn, however they are numbered),
edges carry the packets their rules allowed and the legend the packets the
default decided: every denial between overlays is the default's, so denials are
counted for the policy as a whole, not per pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..policy.model import Endpoint, Policy
from .tables import IR, rule_identities

# An edge shows this many of its rules; the rest are summed in one more line.
RULES_SHOWN = 6
# An overlay shows this many of its subnets.
SUBNETS_SHOWN = 3

ALLOW, EXCEPTION, HAIRPIN = "allow", "exception", "hairpin"

# How each kind of edge is drawn; the legend says the same in words.
EDGE_STYLES = {
    ALLOW: 'color="#2e7d32", fontcolor="#1b5e20"',
    EXCEPTION: 'color="#1565c0", fontcolor="#0d47a1", style=dashed',
    HAIRPIN: 'color="#9e9e9e", fontcolor="#616161", style=dotted',
}
OVERLAY_STYLE = 'fillcolor="#e8f0fe", color="#5c6bc0"'
ISOLATED_STYLE = 'fillcolor="#fdecea", color="#c62828", peripheries=2'


@dataclass(frozen=True)
class Line:
    """One rule on an edge: what it lets through, and its packets on this node."""

    rule: str  # its name: allow:0, exception:1, hairpin:it
    text: str  # tcp/80, udp/53; or, for rules of CIDRs inside overlays, those first
    packets: int | None = None  # None: no node's counts were given


@dataclass(frozen=True)
class Edge:
    kind: str  # ALLOW, EXCEPTION or HAIRPIN
    src: str  # overlay names
    dst: str
    lines: tuple[Line, ...]

    @property
    def packets(self) -> int | None:
        counted = [line.packets for line in self.lines if line.packets is not None]
        return sum(counted) if counted else None


@dataclass(frozen=True)
class Node:
    overlay: str
    subnets: tuple[str, ...]
    isolated: bool
    docker_network: str | None = None


@dataclass(frozen=True)
class Picture:
    """What `dot` draws: the policy's overlays, its edges, and the legend's lines."""

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    legend: tuple[str, ...]
    counted: bool = False  # edges carry a node's packet counts


def picture(policy: Policy, ir: IR, packets: Mapping[str, int] | None = None,
            audit: bool = False) -> Picture:
    """The picture of `policy` (compiled to `ir`); `packets`: rule identity -> packets
    counted on a node (a status record's counters), or None for the policy alone;
    `audit`: that node enforces in audit mode, where the default's denials are only
    counted."""
    identity = rule_identities((r.name, r.text) for r in ir.rules)

    def counted(name: str) -> int | None:
        return None if packets is None else packets.get(identity[name], 0)

    nodes = tuple(Node(o.name, tuple(str(s) for s in o.subnets), o.isolated, o.docker_network)
                  for o in policy.overlays)
    grouped: dict[tuple[str, str, str], list[Line]] = {}
    for n, exception in enumerate(policy.exceptions):
        name = f"exception:{n}"
        key = (EXCEPTION, exception.src.overlay, exception.dst.overlay)
        grouped.setdefault(key, []).append(
            Line(name, " ".join(filter(None, ("never filtered", _between(exception.src, exception.dst)))),
                 counted(name)))
    for overlay in policy.overlays:
        if not overlay.isolated:
            name = f"hairpin:{overlay.name}"
            grouped[(HAIRPIN, overlay.name, overlay.name)] = [Line(name, "inside: any", counted(name))]
    for n, rule in enumerate(policy.rules):
        name = f"allow:{n}"
        ports = ", ".join(map(str, rule.ports))
        between = _between(rule.src, rule.dst)
        grouped.setdefault((ALLOW, rule.src.overlay, rule.dst.overlay), []).append(
            Line(name, f"{between}: {ports}" if between else ports, counted(name)))
    edges = [Edge(kind, src, dst, tuple(lines)) for (kind, src, dst), lines in grouped.items()]
    return Picture(nodes, tuple(edges), _legend(policy, counted, audit), packets is not None)


def _between(src: Endpoint, dst: Endpoint) -> str:
    """'' for a rule between whole overlays, else its ends (a CIDR where it names one)."""
    if src.text == src.overlay and dst.text == dst.overlay:
        return ""
    return f"{src.text} → {dst.text}"


def _legend(policy: Policy, counted: Callable[[str], int | None], audit: bool) -> tuple[str, ...]:
    default = counted("default")
    if policy.default == "allow":
        said = "default allow: traffic between overlays that no rule names passes"
        tally = f" ({default} packets)" if default is not None else ""
    else:
        said = (f"default deny ({policy.deny_action}): traffic between overlays that no rule "
                "allows is " + ("rejected" if policy.deny_action == "reject" else "dropped"))
        denied = "that enforcing would deny; audit mode denies nothing" if audit else "denied"
        tally = f" ({default} packets {denied})" if default is not None else ""
    lines = [said + tally,
             "solid: allowed (ports), dashed: exception (never filtered), "
             "dotted loop: free inside the overlay",
             "double border: isolated (members talk only as rules allow)"]
    if default is not None:
        fixed = {name: counted(name) or 0 for name in ("established", "unfiltered", "fragment",
                                                       "malformed")}
        lines.append(f"replies and later packets of tracked connections: {fixed['established']} "
                     f"packets; not between overlays (unfiltered): {fixed['unfiltered']}; "
                     f"dropped as fragment or malformed: {fixed['fragment'] + fixed['malformed']}")
    return tuple(lines)


def dot(shown: Picture) -> str:
    """The picture in the DOT language, one statement a line, in policy order."""
    out = ["digraph policy {",
           f"  graph [rankdir=LR, fontname=Helvetica, fontsize=11, labelloc=b, labeljust=l, "
           f"nodesep=0.6, label={_quoted(''.join(line + chr(10) for line in shown.legend), 'l')}];",
           '  node [shape=box, style="rounded,filled", fontname=Helvetica];',
           "  edge [fontname=Helvetica, fontsize=10];"]
    for node in shown.nodes:
        subnets = list(node.subnets[:SUBNETS_SHOWN])
        if len(node.subnets) > SUBNETS_SHOWN:
            subnets.append(f"+{len(node.subnets) - SUBNETS_SHOWN} more")
        label = [node.overlay, *subnets]
        if node.docker_network:
            label.append(f"docker network {node.docker_network}")
        if node.isolated:
            label.append("isolated")
        style = ISOLATED_STYLE if node.isolated else OVERLAY_STYLE
        out.append(f"  {_quoted(node.overlay)} [label={_quoted(chr(10).join(label))}, {style}];")
    for edge in shown.edges:
        label = [_said(line) for line in edge.lines[:RULES_SHOWN]]
        rest = edge.lines[RULES_SHOWN:]
        if rest:
            label.append(_said(Line("", f"+{len(rest)} more rules",
                                    sum(line.packets or 0 for line in rest)
                                    if shown.counted else None)))
        weight = ""
        if edge.packets:  # thicker the more packets its rules passed
            weight = f", penwidth={1 + math.log10(edge.packets):.1f}"
        out.append(f"  {_quoted(edge.src)} -> {_quoted(edge.dst)} "
                   f"[label={_quoted(chr(10).join(label))}, {EDGE_STYLES[edge.kind]}{weight}];")
    out.append("}")
    return "\n".join(out) + "\n"


def _said(line: Line) -> str:
    return line.text if line.packets is None else f"{line.text} ({line.packets} packets)"


def _quoted(text: str, justify: str = "n") -> str:
    """A DOT string; each newline ends a line, centred (n) or left-justified (l)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\" + justify) + '"'
