"""Policy stage: the validated policy model, what `parse` builds from a file.

Plain frozen dataclasses and nothing else: the compiler (`isoebpf.ir`) reads
them, and no layer below knows they exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import netaddr

from ..errors import Diagnostic


@dataclass(frozen=True)
class Location:
    line: int
    column: int


@dataclass(frozen=True)
class Overlay:
    name: str
    subnets: tuple[netaddr.IPNetwork, ...]  # all of them: the file's and the Docker network's
    isolated: bool
    where: Location
    docker_network: str | None = None  # the Docker network whose subnets it takes too
    from_docker: tuple[netaddr.IPNetwork, ...] = ()  # those of `subnets` that network gave


@dataclass(frozen=True)
class Endpoint:
    """A rule's `from` or `to`: a whole overlay, or one CIDR inside an overlay."""

    text: str
    overlay: str
    cidrs: tuple[netaddr.IPNetwork, ...]


@dataclass(frozen=True)
class PortSpec:
    """`tcp/80`, `udp/5000-5010`, `icmp` (ICMP and ICMPv6) or `any`."""

    proto: str
    low: int = 0
    high: int = 0

    def __str__(self) -> str:
        if self.proto in ("icmp", "any"):
            return self.proto
        if self.low == self.high:
            return f"{self.proto}/{self.low}"
        return f"{self.proto}/{self.low}-{self.high}"


ANY_PORT = PortSpec("any")


@dataclass(frozen=True)
class Exception_:
    index: int
    src: Endpoint
    dst: Endpoint
    where: Location


@dataclass(frozen=True)
class AllowRule:
    index: int
    src: Endpoint
    dst: Endpoint
    ports: tuple[PortSpec, ...]  # (ANY_PORT,) when the file gives none
    where: Location


@dataclass(frozen=True)
class Policy:
    path: str
    version: int
    default: str  # "allow" | "deny"
    deny_action: str  # "reject" | "drop"
    overlays: tuple[Overlay, ...]
    exceptions: tuple[Exception_, ...]
    rules: tuple[AllowRule, ...]
    interfaces: tuple[str, ...] | None
    timeouts: dict[str, int]
    audit: bool = False  # judge and count as the policy says, deny nothing
    # What the file itself deserves a warning for (the compiled form's are ir.lint's).
    warnings: tuple[Diagnostic, ...] = field(default=(), compare=False)

    def overlay(self, name: str) -> Overlay:
        return next(o for o in self.overlays if o.name == name)
