"""Policy stage: strict CIDR parsing, one spelling per network, so a typo is an error, not a surprise.

Used by `parse` (and the iptables importer); netaddr underneath.
"""

from __future__ import annotations

import re

import netaddr

_IPV4_MAPPED = netaddr.IPNetwork("::ffff:0:0/96")
_DECIMAL = re.compile(r"(0|[1-9][0-9]*)\Z")
# The common case, a canonical IPv4 CIDR, parsed without netaddr's general parser
# (a 100k-rule policy names 200k of them); anything else takes the strict path.
_OCTET = r"(0|[1-9][0-9]{0,2})"
_PLAIN_IPV4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/(0|[1-9][0-9]?))?\Z")


def parse_cidr(text: str) -> netaddr.IPNetwork:
    """Parse `ADDR/LEN` (or a bare address, a host route) strictly.

    Raises ValueError with a message that says what is wrong and, where it can
    tell, what was meant.
    """
    plain = _plain_ipv4(text)
    if plain is not None:
        return plain
    address, slash, length = text.partition("/")
    ip = _parse_address(text, address)
    width = 32 if ip.version == 4 else 128
    if not slash:
        prefixlen = width
    elif not _DECIMAL.match(length) or int(length) > width:
        raise ValueError(f"'{text}': prefix length must be a number from 0 to {width}")
    else:
        prefixlen = int(length)
    network = netaddr.IPNetwork(f"{ip}/{prefixlen}", version=ip.version)
    if network.ip != network.network:
        raise ValueError(f"'{text}' has host bits set: did you mean {network.cidr}?")
    if ip.version == 6 and network in _IPV4_MAPPED:
        raise ValueError(
            f"'{text}' is IPv4-mapped IPv6 space ({_IPV4_MAPPED}); write the IPv4 subnet instead"
        )
    return network.cidr


def _plain_ipv4(text: str) -> netaddr.IPNetwork | None:
    """The network a canonical, valid IPv4 CIDR names; None for anything else."""
    match = _PLAIN_IPV4.match(text)
    if match is None:
        return None
    a, b, c, d, length = match.groups()
    octets = (int(a), int(b), int(c), int(d))
    prefixlen = 32 if length is None else int(length)
    if max(octets) > 255 or prefixlen > 32:
        return None
    value = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
    if value & ((1 << (32 - prefixlen)) - 1):
        return None  # host bits set: the strict path says what was meant
    return netaddr.IPNetwork((value, prefixlen), version=4)


def _parse_address(text: str, address: str) -> netaddr.IPAddress:
    if "%" in address:
        raise ValueError(f"'{text}': a zone index (%...) has no place in a subnet")
    try:
        # INET_PTON: exactly inet_pton(3)'s grammar, so '10.1' or '010.1.2.3'
        # (octal to some parsers) are refused instead of guessed at. The version
        # given, as only IPv6 has a ':': netaddr would try IPv4 first, and the
        # exception it raises holds its frame, so our callers' frames (and the
        # whole document being checked) in a cycle that a paused collector keeps.
        return netaddr.IPAddress(address, version=6 if ":" in address else 4, flags=netaddr.INET_PTON)
    except (netaddr.AddrFormatError, ValueError):
        pass
    if address.endswith("."):
        hint = f": remove the trailing dot ('{address[:-1]}')"
    elif re.search(r"(^|\.)0[0-9]", address):
        hint = ": leading zeros are not allowed (some tools read them as octal)"
    elif re.fullmatch(r"[0-9.]+", address) and address.count(".") != 3:
        hint = ": an IPv4 address has four dot-separated numbers"
    elif re.fullmatch(r"[0-9.]+", address):
        hint = ": each IPv4 number must be 0 to 255"
    else:
        hint = ""
    raise ValueError(f"'{text}' is not a valid CIDR{hint}")
