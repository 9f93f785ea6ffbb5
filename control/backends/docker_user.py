"""Backends' shared floor: enforcing beside Docker's own firewall.

Docker drops all traffic between its networks (DOCKER-ISOLATION-STAGE-2, from
FORWARD), so where overlays are Docker networks a policy's allows between
them would be dropped again after isoebpf allowed them. DOCKER-USER is the
place Docker leaves to its users: FORWARD jumps there first, and a dockerd
restart keeps its content and puts that jump first again. So:

- the eBPF program marks what it allows between two overlays (`MARK`, set in
  its parameters: program.set_accept_mark), and one rule first in DOCKER-USER
  accepts what carries the mark: `ensure`. A dockerd with --live-restore puts
  its isolation jump above DOCKER-USER when it restarts, so a second rule,
  first in DOCKER-ISOLATION-STAGE-1, returns what carries the mark: Docker's
  own rules after it then forward it as they forward within a network;
- the iptables backend puts its jumps in DOCKER-USER instead of FORWARD and
  accepts what its chain allows between overlays (iptables.layout).

Traffic that is not between overlays, and exception pairs, are not isoebpf's to
judge: they carry no mark and go on to Docker's rules untouched.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence

from ..errors import BackendError

CHAIN = "DOCKER-USER"
ISOLATION = "DOCKER-ISOLATION-STAGE-1"
# A bit of the packet mark no common tool uses (Docker uses none; kube-proxy 0x4000,
# 0x8000; Calico the top 16 bits; Cilium 0x0f00 and 0x0e00).
MARK = 0x00400000
COMMENT = "isoebpf: allowed between overlays"
_MARKED = ("-m", "mark", "--mark", f"{MARK:#x}/{MARK:#x}", "-m", "comment", "--comment", COMMENT)
# Each chain of Docker's where we come first, and what we do there with a marked packet.
RULES = {CHAIN: (*_MARKED, "-j", "ACCEPT"), ISOLATION: (*_MARKED, "-j", "RETURN")}
TOOLS = ("iptables", "ip6tables")
LOCK_WAIT_SECONDS = "5"


def _run(netns: str | None, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [tool, "-w", LOCK_WAIT_SECONDS, *args]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    try:
        return subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise BackendError(f"{tool} is not installed: {err}") from err


# Each of Docker's chains where we come first -> its first rule ("" when it has none,
# None when there is no such chain), in one iptables tool's filter table.
Firsts = dict[str, str | None]


def chains(netns: str | None) -> dict[str, Firsts]:
    """For each iptables tool ("iptables", "ip6tables") whose filter table has Docker's
    DOCKER-USER chain in `netns` (where Docker runs): the first rule of each chain we
    come first in. One listing of the table per tool: a load beside Docker (also the
    one that enforces a new container's veth) reads no more."""
    found: dict[str, Firsts] = {}
    for tool in TOOLS:
        try:
            listed = _run(netns, tool, "-S")
        except BackendError:
            continue
        lines = listed.stdout.splitlines() if listed.returncode == 0 else []
        if f"-N {CHAIN}" not in lines:
            continue
        found[tool] = {chain: next((line for line in lines if line.startswith(f"-A {chain} ")), "")
                       if f"-N {chain}" in lines else None for chain in RULES}
    return found


def accepting(firsts: Firsts) -> bool:
    """Whether a tool's Docker chains start with our rules (DOCKER-USER must exist; the
    isolation chain only where it does)."""
    return all(COMMENT in first if first is not None else chain != CHAIN
               for chain in RULES for first in [firsts.get(chain)])


def ensure(netns: str | None, found: Mapping[str, Firsts]) -> list[str]:
    """Put our rules first in DOCKER-USER and DOCKER-ISOLATION-STAGE-1 of each tool of
    `found` (`chains`: what is first there now), once; what it did."""
    done = []
    for tool, firsts in found.items():
        for chain, rule in RULES.items():
            first = firsts.get(chain)
            if first is None or COMMENT in first:
                continue
            while _run(netns, tool, "-D", chain, *rule).returncode == 0:
                pass  # ours, but not first any more
            added = _run(netns, tool, "-I", chain, "1", *rule)
            if added.returncode != 0:
                raise BackendError(f"cannot let isoebpf's allowed traffic through {tool} {chain}: "
                                   f"{added.stderr.strip()}")
            done.append(f"{tool} {chain}: lets through what the program allowed between overlays")
    return done


def remove(netns: str | None, tools: Sequence[str] = TOOLS) -> list[str]:
    """Remove our rules wherever they are; safe to repeat."""
    removed = []
    for tool in tools:
        for chain, rule in RULES.items():
            try:
                while _run(netns, tool, "-D", chain, *rule).returncode == 0:
                    removed.append(f"{tool} {chain} rule")
            except BackendError:
                break
    return removed
