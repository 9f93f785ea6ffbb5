"""What can sit in the router: isoebpf's two backends and the peers it is compared with.

Every enforcer enforces the same policy (bench.policies.scaled_policy: the
table's policy with fillers), IPv4 only for the peers written here:

- none: forwarding with no filter;
- xdp-drop: a bare XDP_DROP program on r-gen (generic XDP, the mode isoebpf's
  `--mode xdp` takes on a veth): the machine's ceiling for discarding;
- ebpf-xdp, ebpf-tc: isoebpf's eBPF backend, `--mode xdp` and `--mode tc`
  (`--mode auto` picks TC on veths);
- ebpf-xdp-drop: the same as ebpf-xdp under `deny_action: drop`, the one to
  hold against the bare XDP_DROP (REJECT also sends, and the generator's
  namespace also receives, an answer per packet);
- iptables: isoebpf's iptables backend (the documented layout; here the
  degraded one: one plain line group per allow rule);
- iptables-ipset: the same chain order with the fillers in one
  `hash:ip,port,net` set (this kernel lacks the guide's hash:net,port,net);
- nft: an nftables table whose allow rules are one concatenated interval set
  (saddr . daddr . protocol . port), the modern non-eBPF peer;
- xdp-filter: the XDP project's own filter (xdp-tools), generic XDP on r-gen
  as ours: the XDP baseline users would compare with. It matches single
  fields (an exact address, a port, a MAC) against lists and drops or passes;
  it has no prefixes, no (source, destination, port) combination, no
  connection tracking and no REJECT, so no rule of it says "overlay A may
  reach B on tcp/80". Its equivalent here is what the traffic needs: drop
  TCP to the denied SYNs' port (everything else passes), and beside it one
  source-address entry per filler rule, which no benchmark packet matches,
  so that its lists grow with the policy as our tables do.

All but ebpf-xdp-drop, xdp-drop and xdp-filter reject denied TCP with a reset
and the rest with ICMP admin-prohibited.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from bench import policies
from bench.rulesets import ipset_rules, nft_ruleset
from bench.topology import ROUTER_IFACES, Topology, run
from isoebpf.backends import registry
from isoebpf.backends.ebpf import backend as ebpf
from isoebpf.backends.ebpf import bpfsys
from isoebpf.backends.state import Scope
from isoebpf.ir.tables import IR, with_digest

ALL = ("none", "xdp-drop", "ebpf-xdp-drop", "xdp-filter", "ebpf-xdp", "ebpf-tc", "iptables", "iptables-ipset",
       "nft")
SCALING = ("ebpf-xdp", "ebpf-tc", "xdp-filter", "iptables", "iptables-ipset", "nft")

# xdp-filter pins its maps under one directory whatever the namespace; its
# address list's value is a bit set per CPU, the bit that says "source address".
XDP_FILTER_PINS = "/sys/fs/bpf/xdp-filter"
XDP_FILTER_SRC = 1

@contextmanager
def enforcing(name: str, topo: Topology, rules: int, ir: IR, xdp_drop: int) -> Iterator[float]:
    """Enforce with `name` in the router for the block; yields the seconds setting up took.
    `xdp_drop` is the fd of a bare XDP_DROP program."""
    up, down = _SETUPS[name](topo, rules, ir, xdp_drop)
    # Connections the last enforcer's traffic left would be swept one by one by a load.
    topo.exec(topo.router, "conntrack", "-F", check=False)
    started = time.monotonic()
    try:
        up()
        yield time.monotonic() - started
    finally:
        down()


Setup = Callable[[Topology, int, IR, int], tuple[Callable[[], None], Callable[[], None]]]


def program_ids(name: str, topo: Topology, xdp_drop: int) -> list[int]:
    """Ids of the BPF programs enforcer `name` runs (none for the netfilter ones)."""
    if name == "xdp-drop":
        return [bpfsys.prog_info(xdp_drop).id]
    if name == "xdp-filter":
        link = json.loads(topo.exec(topo.router, "ip", "-j", "-d", "link", "show", "r-gen").stdout)[0]
        return [int(link["xdp"]["prog"]["id"])]
    if not name.startswith("ebpf-"):
        return []
    return list(ebpf.program_ids(Scope(topo.router)).values())


def _none(topo: Topology, rules: int, ir: IR, drop: int) -> tuple[Callable[[], None], Callable[[], None]]:
    return (lambda: None), (lambda: None)


def _xdp_drop(topo: Topology, rules: int, ir: IR, drop: int) -> tuple[Callable[[], None], Callable[[], None]]:
    def up() -> None:
        topo.xdp(topo.router, "r-gen", drop, "xdpgeneric")

    def down() -> None:
        topo.xdp(topo.router, "r-gen", None, "xdpgeneric")
    return up, down


def _isoebpf(kind: str, mode: str, deny_action: str = "reject") -> Setup:
    def setup(topo: Topology, rules: int, ir: IR, drop: int) -> tuple[Callable[[], None], Callable[[], None]]:
        if deny_action != ir.deny_action:
            ir = with_digest(replace(ir, default_action=deny_action, deny_action=deny_action))
        scope = Scope(topo.router)
        policy_file = Path(tempfile.gettempdir()) / f"{topo.prefix}-policy.yaml"

        def up() -> None:
            text = policies.scaled_policy(rules).replace("deny_action: reject", f"deny_action: {deny_action}")
            policy_file.write_text(text, encoding="utf-8")
            sizes = policies.map_sizes(rules)
            saved = {k: os.environ.get(k) for k in sizes}
            os.environ.update({k: str(v) for k, v in sizes.items()})
            try:
                registry.get(kind).load(ir, scope, list(ROUTER_IFACES), mode, str(policy_file))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

        def down() -> None:
            registry.get(kind).unload(scope)
            policy_file.unlink(missing_ok=True)
        return up, down
    return setup


def _restore(topo: Topology, tool: str, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".rules", delete=False) as f:
        f.write(text)
    try:
        if tool == "nft":
            topo.exec(topo.router, "nft", "-f", f.name)
        elif tool == "ipset":
            topo.exec(topo.router, "ipset", "restore", "-file", f.name)
        else:
            topo.exec(topo.router, "sh", "-c", f"iptables-restore -w --noflush < {f.name}")
    finally:
        os.unlink(f.name)


def _iptables_ipset(topo: Topology, rules: int, ir: IR, drop: int) -> tuple[Callable[[], None], Callable[[], None]]:
    sets, chain = ipset_rules(rules)

    def up() -> None:
        _restore(topo, "ipset", sets)
        _restore(topo, "iptables", chain)

    def down() -> None:
        for args in (("iptables", "-w", "-F", "FORWARD"), ("iptables", "-w", "-F", "isob-iso"),
                     ("iptables", "-w", "-X", "isob-iso"), ("ipset", "destroy", "isob-allowed"),
                     ("ipset", "destroy", "isob-overlays")):
            topo.exec(topo.router, *args, check=False)
    return up, down


def _nft(topo: Topology, rules: int, ir: IR, drop: int) -> tuple[Callable[[], None], Callable[[], None]]:
    def up() -> None:
        _restore(topo, "nft", nft_ruleset(rules))

    def down() -> None:
        topo.exec(topo.router, "nft", "delete", "table", "ip", "isobench", check=False)
    return up, down


def _xdp_filter(topo: Topology, rules: int, ir: IR, drop: int) -> tuple[Callable[[], None], Callable[[], None]]:
    def xdp_filter(*args: str, check: bool = True) -> None:
        # nsenter, not `ip netns exec`: that mounts a sysfs of its own, without the bpffs.
        run("nsenter", f"--net=/run/netns/{topo.router}", "xdp-filter", *args, check=check)

    def up() -> None:
        xdp_filter("load", "--mode", "skb", "--policy", "allow", "r-gen")
        xdp_filter("port", "--mode", "dst", "--proto", "tcp", str(policies.DENIED_PORT))
        # Written into its pinned list directly: a process per entry takes minutes at 10k.
        fd = bpfsys.obj_get(f"{XDP_FILTER_PINS}/filter_ipv4")
        try:
            source = XDP_FILTER_SRC.to_bytes(8, sys.byteorder) * bpfsys.possible_cpus()
            for f in policies.fillers(policies.filler_count(rules)):
                bpfsys.map_update(fd, ipaddress.IPv4Address(f.src).packed, source)
        finally:
            os.close(fd)

    def down() -> None:
        xdp_filter("unload", "r-gen", check=False)
    return up, down


_SETUPS: dict[str, Setup] = {
    "none": _none,
    "xdp-drop": _xdp_drop,
    "ebpf-xdp": _isoebpf("ebpf", "xdp"),
    "ebpf-xdp-drop": _isoebpf("ebpf", "xdp", "drop"),
    "ebpf-tc": _isoebpf("ebpf", "tc"),
    "iptables": _isoebpf("iptables", "auto"),
    "iptables-ipset": _iptables_ipset,
    "nft": _nft,
    "xdp-filter": _xdp_filter,
}
