"""Random policies and packets for property and differential tests.

Policies come out as YAML text, so every generated case also goes through the
loader. A naive evaluator judges packets straight from the policy model, in
file order, with none of the compiler's tricks: the independent second opinion.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import netaddr

from isoebpf.ir.evaluate import ICMP_ECHO_REQUEST, IPPROTO_ICMPV6, TCP_SYN, Packet
from isoebpf.ir.tables import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from isoebpf.policy.model import Policy, PortSpec

OTHER_PROTO = 47  # GRE: an IP protocol that only `any` rules match


@dataclass(frozen=True)
class GeneratedPolicy:
    text: str
    cidrs: list[netaddr.IPNetwork]  # every subnet and endpoint it names
    ports: list[int]  # ports its rules mention, and their neighbours


def random_policy(rng: random.Random) -> GeneratedPolicy:
    overlays = rng.randint(1, 4)
    lines = ["version: 1", f"default: {rng.choice(['allow', 'deny'])}",
             f"deny_action: {rng.choice(['reject', 'drop'])}", "overlays:"]
    subnets: dict[str, list[netaddr.IPNetwork]] = {}
    for i in range(overlays):
        name = f"o{i}"
        nets = [netaddr.IPNetwork(f"10.{i * 16}.0.0/12")]
        if rng.random() < 0.5:
            nets.append(netaddr.IPNetwork(f"fd00:{i + 1:x}::/32"))
        if rng.random() < 0.3:
            nets.append(netaddr.IPNetwork(f"172.{16 + i}.0.0/16"))
        subnets[name] = nets
        lines += [f"  {name}:", f"    subnets: [{', '.join(repr(str(n)) for n in nets)}]"]
        if rng.random() < 0.3:
            lines.append("    isolated: true")
    cidrs = [n for nets in subnets.values() for n in nets]
    ports: set[int] = {1, 65535}

    def endpoint() -> str:
        name = rng.choice(list(subnets))
        if rng.random() < 0.4:
            return name
        base = rng.choice(subnets[name])
        width = 32 if base.version == 4 else 128
        length = rng.randint(base.prefixlen, min(base.prefixlen + 12, width))
        offset = rng.getrandbits(length - base.prefixlen) << (width - length)
        net = netaddr.IPNetwork(f"{netaddr.IPAddress(base.first + offset, base.version)}/{length}")
        cidrs.append(net)
        return repr(str(net))

    def port_spec() -> str:
        kind = rng.choice(["tcp", "udp", "tcp", "icmp", "any"])
        if kind in ("icmp", "any"):
            return kind
        low = rng.choice([rng.randint(1, 65535), rng.randint(1, 1024), 80, 443])
        high = low if rng.random() < 0.5 else min(65535, low + rng.randint(0, 3000))
        ports.update(p for p in (low - 1, low, high, high + 1) if 1 <= p <= 65535)
        return f"{kind}/{low}" if low == high else f"{kind}/{low}-{high}"

    exceptions = [f"  - {{from: {endpoint()}, to: {endpoint()}}}"
                  for _ in range(rng.choice([0, 0, 1, 2]))]
    if exceptions:
        lines += ["exceptions:", *exceptions]
    rules = []
    for _ in range(rng.randint(0, 8)):
        src, dst = endpoint(), endpoint()
        if rng.random() < 0.2:
            rules.append(f"  - {{from: {src}, to: {dst}}}")
        else:
            specs = ", ".join(port_spec() for _ in range(rng.randint(1, 3)))
            rules.append(f"  - {{from: {src}, to: {dst}, ports: [{specs}]}}")
    if rules:
        lines += ["allow:", *rules]
    return GeneratedPolicy("\n".join(lines) + "\n", cidrs, sorted(ports))


def random_address(rng: random.Random, gen: GeneratedPolicy, version: int) -> netaddr.IPAddress:
    """Mostly inside a named CIDR (often at its edges), sometimes outside all."""
    nets = [n for n in gen.cidrs if n.version == version]
    if not nets or rng.random() < 0.1:
        outside = "203.0.113.0/24" if version == 4 else "2001:db8::/32"
        net = netaddr.IPNetwork(outside)
    else:
        net = rng.choice(nets)
    pick = rng.random()
    if pick < 0.15:
        value = net.first
    elif pick < 0.3:
        value = net.last
    else:
        value = net.first + rng.randrange(net.size)
    return netaddr.IPAddress(value, version)


def random_first_packet(rng: random.Random, gen: GeneratedPolicy, version: int | None = None) -> Packet:
    version = version or (6 if rng.random() < 0.3 else 4)
    src = random_address(rng, gen, version)
    dst = random_address(rng, gen, version)
    kind = rng.choice(["tcp", "tcp", "udp", "icmp", "other"])
    if kind == "icmp":
        proto = PROTO_ICMP if version == 4 else IPPROTO_ICMPV6
        return Packet(src, dst, proto, icmp_type=ICMP_ECHO_REQUEST[proto],
                      icmp_id=rng.randint(0, 65535))
    if kind == "other":
        return Packet(src, dst, OTHER_PROTO)
    dport = rng.choice(gen.ports) if rng.random() < 0.6 else rng.randint(1, 65535)
    proto = PROTO_TCP if kind == "tcp" else PROTO_UDP
    return Packet(src, dst, proto, sport=rng.randint(1024, 65535), dport=dport, tcp_flags=TCP_SYN)


def _port_matches(spec: PortSpec, pkt: Packet) -> bool:
    if spec.proto == "any":
        return True
    if spec.proto == "icmp":
        return pkt.proto in (PROTO_ICMP, IPPROTO_ICMPV6)
    wanted = PROTO_TCP if spec.proto == "tcp" else PROTO_UDP
    return pkt.proto == wanted and spec.low <= pkt.dport <= spec.high


def naive_verdict(policy: Policy, pkt: Packet) -> tuple[str, str]:
    """(action, rule name) for the first packet of a connection, read off the policy."""

    def overlay_of(addr: netaddr.IPAddress) -> str | None:
        for overlay in policy.overlays:
            if any(addr in net for net in overlay.subnets):
                return overlay.name
        return None

    def inside(addr: netaddr.IPAddress, cidrs: tuple[netaddr.IPNetwork, ...]) -> bool:
        return any(addr in net for net in cidrs)

    src, dst = overlay_of(pkt.src), overlay_of(pkt.dst)
    if src is None or dst is None:
        return "allow", "unfiltered"
    for exc in policy.exceptions:
        if inside(pkt.src, exc.src.cidrs) and inside(pkt.dst, exc.dst.cidrs):
            return "allow", f"exception:{exc.index}"
    if src == dst and not policy.overlay(src).isolated:
        return "allow", f"hairpin:{src}"
    for rule in policy.rules:
        if (inside(pkt.src, rule.src.cidrs) and inside(pkt.dst, rule.dst.cidrs)
                and any(_port_matches(spec, pkt) for spec in rule.ports)):
            return "allow", f"allow:{rule.index}"
    if policy.default == "allow":
        return "allow", "default"
    return policy.deny_action, "default"


# -- policies of a chosen size, to fill (or overfill) the program's maps ----------------


def many_overlays(count: int, isolated: bool = False) -> str:
    """`count` overlays of one /24 each: as many classes, and hairpins unless isolated."""
    lines = ["version: 1", "default: deny", "overlays:"]
    for n in range(count):
        lines += [f"  o{n}:", f"    subnets: [10.{n // 256}.{n % 256}.0/24]"]
        if isolated:
            lines.append("    isolated: true")
    return "\n".join(lines) + "\n"


def _between_a_and_b(section: str, items: str) -> str:
    return ("version: 1\ndefault: deny\noverlays:\n  a:\n    subnets: [10.1.0.0/16]\n"
            f"  b:\n    subnets: [10.2.0.0/16]\n{section}:\n{items}")


def many_ports(count: int) -> str:
    """`count` allow rules of one port each: as many rules and allow entries."""
    return _between_a_and_b("allow", "".join(
        f"  - {{from: a, to: b, ports: [tcp/{1000 + n}]}}\n" for n in range(count)))


def many_ranges(count: int) -> str:
    """Rules whose odd port ranges take a few dozen allow entries each."""
    return _between_a_and_b("allow", "".join(
        f"  - {{from: a, to: b, ports: [tcp/{n * 3000 + 1}-{n * 3000 + 2998}]}}\n"
        for n in range(count)))


def many_exceptions(count: int) -> str:
    return _between_a_and_b("exceptions", "".join(
        f"  - {{from: 10.1.{n}.0/24, to: 10.2.{n}.0/24}}\n" for n in range(count)))
