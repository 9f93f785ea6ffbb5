"""B6's peers: the same allow entries loaded, and changed, by the kernel's other tools.

The entries are the fillers of bench.policies.scaled_policy(N) (src host, dst /24,
TCP port; N less the policy's four own rules), written by bench.rulesets:

- a first load: `ipset restore` of one hash:ip,port,net set (this kernel lacks
  hash:net,port,net and hash:net,net; a filler's source is one host, so
  ip,port,net says it exactly), `iptables-restore` of one chain with a rule per
  filler, and `nft -f` of one table with one concatenated interval set
  (saddr . dport . daddr) and one rule that looks it up;
- one change: `ipset add` then `ipset del` of the change's element (the first
  filler on another port, as bench.policies.changed_policy), and `nft add
  element` then `nft delete element` of it: each a process of its own, as a
  user's script runs them, timed CHANGE_REPEATS times a round.

Every command runs in a network namespace the bench makes for the purpose and
deletes (never the root namespace's firewall), entered by `nsenter --net`; what
that costs is timed too (`nsenter true`: a process doing nothing in the
namespace), the floor under every one-element change. Restore files are written
before the clock starts; what a load leaves is removed, untimed, before the next
tool loads, and the namespace is deleted on every path.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import policies, rulesets, topology

TOOLS = ("ipset", "iptables", "nft")
CHANGE_REPEATS = 5
TIMEOUT_S = 1800.0  # one command; nft -f of a million elements took 74 s on the bench machine
IPSET_TYPE = "hash:ip,port,net"


def in_netns(netns: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}", *argv]


def _run(argv: list[str], stdin: Path | None = None) -> tuple[str, float]:
    """(stdout, seconds) of one process; its stderr said when it fails."""
    with open(stdin or os.devnull, "rb") as source:
        started = time.perf_counter()
        done = subprocess.run(argv, stdin=source, capture_output=True, timeout=TIMEOUT_S, check=False)
        seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"B6 peers: {' '.join(argv)[:200]} exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace').strip()[-500:]}")
    return done.stdout.decode(errors="replace"), seconds


def ipset_header(listing: str) -> dict[str, int]:
    """Entries and kernel bytes from `ipset list -terse`."""
    found = {}
    for key, label in (("entries", "Number of entries"), ("bytes", "Size in memory")):
        match = re.search(rf"^{label}: (\d+)$", listing, re.M)
        if match is None:
            raise RuntimeError(f"B6 peers: no {label!r} in ipset's listing:\n{listing}")
        found[key] = int(match.group(1))
    return found


# What each tool loads from, and how: nft names its file, the others read theirs on stdin.
_LOAD: dict[str, tuple[Callable[[int], str], list[str]]] = {
    "ipset": (rulesets.peer_ipset, ["ipset", "restore"]),
    "iptables": (rulesets.peer_iptables, ["iptables-restore"]),
    "nft": (rulesets.peer_nft, ["nft", "-f"]),
}
# What clears a tool's load again (untimed).
_CLEAR = {"ipset": [["ipset", "destroy", rulesets.PEER_SET]],
          "iptables": [["iptables", "-F", "FORWARD"], ["iptables", "-F", rulesets.PEER_CHAIN],
                       ["iptables", "-X", rulesets.PEER_CHAIN]],
          "nft": [["nft", "delete", "table", "ip", rulesets.PEER_TABLE]]}


def one_round(rules: int, round_index: int) -> dict[str, Any]:
    """One round at `rules`: every tool's first load, then its one-element changes.
    Seconds as lists (the changes: CHANGE_REPEATS each)."""
    netns = f"{topology.PREFIX}-b6p"
    changes = rulesets.peer_change()
    taken: dict[str, Any] = {"entries": policies.filler_count(rules)}
    for key in ("ipset_add_s", "ipset_del_s", "nft_add_s", "nft_del_s", "spawn_s"):
        taken[key] = []
    order = TOOLS[round_index % len(TOOLS):] + TOOLS[:round_index % len(TOOLS)]
    topology.run("ip", "netns", "add", netns)
    try:
        with tempfile.TemporaryDirectory(prefix="isoebpf-b6p-") as where:
            for tool in order:
                write, argv = _LOAD[tool]
                path = Path(where, f"peer.{tool}")
                path.write_text(write(rules), encoding="utf-8")
                try:
                    if tool == "nft":
                        _, taken["nft_restore_s"] = _run(in_netns(netns, *argv, str(path)))
                    else:
                        _, taken[f"{tool}_restore_s"] = _run(in_netns(netns, *argv), stdin=path)
                    if tool == "ipset":
                        header = ipset_header(_run(in_netns(netns, "ipset", "list", "-terse",
                                                           rulesets.PEER_SET))[0])
                        if header["entries"] != taken["entries"]:
                            raise RuntimeError(f"B6 peers: ipset holds {header['entries']} entries, "
                                               f"not {taken['entries']}")
                        taken["ipset_bytes"] = header["bytes"]
                    if tool in ("ipset", "nft"):
                        for _ in range(CHANGE_REPEATS):
                            for step in ("add", "del"):
                                key = f"{tool}_{step}"
                                taken[f"{key}_s"].append(_run(in_netns(netns, *changes[key]))[1])
                    if tool == "ipset":  # the floor: a process doing nothing, entered the same way
                        taken["spawn_s"] += [_run(in_netns(netns, "true"))[1] for _ in range(CHANGE_REPEATS)]
                finally:
                    path.unlink(missing_ok=True)
                    for clear in _CLEAR[tool]:
                        subprocess.run(in_netns(netns, *clear), capture_output=True, check=False,
                                       timeout=TIMEOUT_S)
    finally:
        topology.run("ip", "netns", "del", netns, check=False)
    return taken


def say_round(rules: int, one: dict[str, Any], say: Callable[[str], None]) -> None:
    def ms(key: str) -> str:
        return f"{sorted(one[key])[len(one[key]) // 2] * 1000:.1f}"
    say(f"B6 peers {rules:>7} rules ({one['entries']} entries): ipset restore {one['ipset_restore_s']:.2f}s, "
        f"iptables-restore {one['iptables_restore_s']:.2f}s, nft -f {one['nft_restore_s']:.2f}s; "
        f"ipset add/del {ms('ipset_add_s')}/{ms('ipset_del_s')} ms, nft add/delete element "
        f"{ms('nft_add_s')}/{ms('nft_del_s')} ms, nsenter true {ms('spawn_s')} ms; "
        f"ipset {one['ipset_bytes'] / 2**20:.1f} MiB")
