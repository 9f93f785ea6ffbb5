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
