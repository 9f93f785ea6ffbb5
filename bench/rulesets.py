"""The peers' rule sets, as text: what the iptables-ipset and nft enforcers load.

Both enforce bench.policies.scaled_policy(N) for IPv4 (the benchmark's traffic
is IPv4): the same overlays, exception, hairpins and rules, in the contract's
order, rejecting what is left (TCP with a reset, the rest with ICMP
admin-prohibited).
"""

from __future__ import annotations

from bench import policies

# The five overlays of scaled_policy, IPv4 subnets, and which have hairpins.
OVERLAYS = {"it": "10.250.0.0/16", "hr": "192.168.0.0/16", "lab": "172.20.0.0/16",
            "fa": "10.100.0.0/16", "fb": "10.101.0.0/16"}
HAIRPINS = ("it", "hr", "fa", "fb")
EXCEPTION = ("10.250.7.0/24", "192.168.9.0/24")
# The policy's non-filler rules: (src, dst, proto, ports) in file order; ports "" = any.
RULES = (
    ("192.168.0.0/16", "10.250.0.0/16", "tcp", "80"),
    ("192.168.5.0/24", "10.250.3.0/24", "", ""),
    ("10.250.0.0/16", "172.20.0.0/16", "udp", "5000-5010"),
    ("10.250.0.0/16", "172.20.0.0/16", "icmp", ""),
    ("10.250.0.0/16", "172.20.0.0/16", "tcp", "443"),
    ("192.168.0.0/16", "10.250.0.0/16", "tcp", str(policies.BENCH_PORT)),
    ("192.168.0.0/16", "10.250.0.0/16", "udp", str(policies.BENCH_PORT)),
)


def _port(ports: str, sep: str) -> str:
    return ports.replace("-", sep)


def ipset_rules(rules: int) -> tuple[str, str]:
    """(ipset restore input, iptables-restore input) of the iptables-ipset enforcer."""
    sets = ["create isob-overlays hash:net family inet"]
    sets += [f"add isob-overlays {net}" for net in OVERLAYS.values()]
    count = policies.filler_count(rules)
    sets.append(f"create isob-allowed hash:ip,port,net family inet maxelem {max(65536, 2 * count)}")
    sets += [f"add isob-allowed {f.src},tcp:{f.port},{f.dst}" for f in policies.fillers(count)]
    chain = ["*filter", ":isob-iso - [0:0]",
             "-I FORWARD 1 -m set --match-set isob-overlays src -m set --match-set isob-overlays dst -j isob-iso",
             f"-A isob-iso -s {EXCEPTION[0]} -d {EXCEPTION[1]} -j RETURN",
             "-A isob-iso -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"]
    chain += [f"-A isob-iso -s {OVERLAYS[o]} -d {OVERLAYS[o]} -j RETURN" for o in HAIRPINS]
    chain.append("-A isob-iso -m set --match-set isob-allowed src,dst,dst -j RETURN")
    for src, dst, proto, ports in RULES:
        match = f"-p {proto} " if proto else ""
        if ports:
            match += f"--dport {_port(ports, ':')} "
        chain.append(f"-A isob-iso -s {src} -d {dst} {match}-j RETURN")
    chain += ["-A isob-iso -p tcp -j REJECT --reject-with tcp-reset",
              "-A isob-iso -j REJECT --reject-with icmp-admin-prohibited", "COMMIT", ""]
    return "\n".join(sets) + "\n", "\n".join(chain)


def nft_ruleset(rules: int) -> str:
    """The nft enforcer's table: allow rules with ports in one concatenated interval set."""
    elements = [f"{f.src} . {f.dst} . tcp . {f.port}" for f in policies.fillers(policies.filler_count(rules))]
    plain = []
    for src, dst, proto, ports in RULES:
        if proto in ("tcp", "udp") and ports:
            elements.append(f"{src} . {dst} . {proto} . {ports}")
        elif proto:
            plain.append(f"ip saddr {src} ip daddr {dst} meta l4proto {proto} accept")
        else:
            plain.append(f"ip saddr {src} ip daddr {dst} accept")
    hairpins = [f"ip saddr {OVERLAYS[o]} ip daddr {OVERLAYS[o]} accept" for o in HAIRPINS]
    body = "\n".join([
        "table ip isobench {",
        "  set overlays { type ipv4_addr; flags interval; elements = { "
        + ", ".join(OVERLAYS.values()) + " } }",
        "  set allowed { type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags interval; elements = { "
        + ", ".join(elements) + " } }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        "    ip saddr != @overlays accept",
        "    ip daddr != @overlays accept",
        f"    ip saddr {EXCEPTION[0]} ip daddr {EXCEPTION[1]} accept",
        "    ct state established,related accept",
        *[f"    {line}" for line in hairpins],
        "    ip saddr . ip daddr . meta l4proto . th dport @allowed accept",
        *[f"    {line}" for line in plain],
        "    meta l4proto tcp reject with tcp reset",
        "    reject with icmp type admin-prohibited",
        "  }",
        "}", ""])
    return body


# B6's peers: the policy's filler rules alone (src host, dst /24, TCP port), loaded by
# each tool the way a user's script loads them, in a namespace of the bench's own.
PEER_SET = "isobp-allowed"  # ipset's set, and the nft table's set
PEER_CHAIN = "isobp-allow"  # iptables' chain
PEER_TABLE = "isobpeer"  # nft's table (family ip)


def _power_of_two(n: int, floor: int) -> int:
    size = floor
    while size < n:
        size *= 2
    return size


def peer_ipset(rules: int) -> str:
    """`ipset restore` input: one hash:ip,port,net set (this kernel has no hash:net,port,net)
    holding the fillers of a policy of `rules` rules, sized for them beforehand as
    isoebpf's maps are (bench.policies.map_sizes), with room for the change's element."""
    count = policies.filler_count(rules)
    lines = [f"create {PEER_SET} hash:ip,port,net family inet hashsize {_power_of_two(count, 1024)} "
             f"maxelem {_power_of_two(count + 1, 65536)}"]
    lines += [f"add {PEER_SET} {f.src},tcp:{f.port},{f.dst}" for f in policies.fillers(count)]
    return "\n".join(lines) + "\n"


def peer_iptables(rules: int) -> str:
    """`iptables-restore` input: one chain with a rule per filler, jumped to from FORWARD."""
    lines = ["*filter", f":{PEER_CHAIN} - [0:0]", f"-A FORWARD -j {PEER_CHAIN}"]
    lines += [f"-A {PEER_CHAIN} -s {f.src}/32 -d {f.dst} -p tcp -m tcp --dport {f.port} -j ACCEPT"
              for f in policies.fillers(policies.filler_count(rules))]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def peer_nft(rules: int) -> str:
    """`nft -f` input: one table, one concatenated interval set of the fillers
    (saddr . dport . daddr, the /24 an interval) and one rule that looks it up."""
    elements = ",\n".join(f"    {f.src} . {f.port} . {f.dst}"
                          for f in policies.fillers(policies.filler_count(rules)))
    return "\n".join([
        f"table ip {PEER_TABLE} {{",
        f"  set {PEER_SET} {{",
        "    type ipv4_addr . inet_service . ipv4_addr; flags interval;",
        *([f"    elements = {{\n{elements}\n    }}"] if elements else []),
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        f"    meta l4proto tcp ip saddr . tcp dport . ip daddr @{PEER_SET} accept",
        "  }",
        "}", ""])


def peer_change() -> dict[str, list[str]]:
    """Command lines (run in the namespace, one process each) that add, then delete, the
    element of the one-rule change (bench.policies.changed_policy: the first filler with
    another port), by ipset and by nft."""
    first = policies.filler(0)
    port = first.port + policies.CHANGED_PORT_OFFSET
    ipset_element = f"{first.src},tcp:{port},{first.dst}"
    nft_element = f"{{ {first.src} . {port} . {first.dst} }}"
    return {"ipset_add": ["ipset", "add", PEER_SET, ipset_element],
            "ipset_del": ["ipset", "del", PEER_SET, ipset_element],
            "nft_add": ["nft", "add", "element", "ip", PEER_TABLE, PEER_SET, nft_element],
            "nft_del": ["nft", "delete", "element", "ip", PEER_TABLE, PEER_SET, nft_element]}
