"""Service stage: `isoebpf trace`'s filters and formats for verdict events.

The backend's tracer turns its raw events into `interface.Verdict`s (naming the
rule from the state record and the interface from its index); this module only
filters and formats them, so it needs neither bcc nor a kernel.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import netaddr

from ..backends.interface import Verdict
from ..errors import IsoebpfError


@dataclass(frozen=True)
class Filters:
    """Which verdicts to show; an empty criterion lets everything through."""

    overlays: Mapping[str, netaddr.IPSet]  # name -> subnets; src or dst inside any
    rules: Sequence[str]  # rule names or globs ("allow:*")
    actions: Sequence[str]
    addresses: netaddr.IPSet | None  # src or dst inside

    @staticmethod
    def build(overlays: Sequence[str], known_overlays: Mapping[str, Sequence[str]],
              rules: Sequence[str], actions: Sequence[str], addresses: Sequence[str]) -> Filters:
        unknown = [name for name in overlays if name not in known_overlays]
        if unknown:
            raise IsoebpfError(f"no overlay {', '.join(unknown)} in the loaded policy "
                               f"(it has {', '.join(sorted(known_overlays)) or 'none'})")
        try:
            wanted = netaddr.IPSet(netaddr.IPNetwork(a) for a in addresses) if addresses else None
        except (netaddr.AddrFormatError, ValueError) as err:
            raise IsoebpfError(f"--address takes addresses or CIDRs: {err}") from err
        return Filters({name: netaddr.IPSet(known_overlays[name]) for name in overlays},
                       tuple(rules), tuple(actions), wanted)

    def matches(self, v: Verdict) -> bool:
        if self.actions and v.action not in self.actions:
            return False
        if self.rules and not any(fnmatch.fnmatchcase(v.rule, r) for r in self.rules):
            return False
        if (self.addresses is not None or self.overlays) and not v.family:
            return False
        if self.addresses is not None and v.src not in self.addresses and \
                v.dst not in self.addresses:
            return False
        return not self.overlays or any(v.src in subnets or v.dst in subnets
                                        for subnets in self.overlays.values())


def line(v: Verdict, clock_offset: float) -> str:
    """One readable line; `clock_offset` turns the monotonic stamp into wall time."""
    when = v.timestamp_ns / 1e9 + clock_offset
    stamp = time.strftime("%H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
    return (f"{stamp} {v.ifname:12} {v.protocol:6} {v.endpoint(v.src, v.sport):>22} -> "
            f"{v.endpoint(v.dst, v.dport):22} {_shown_action(v):12} {v.rule}"
            + (f" ({v.text})" if v.text != v.rule else ""))


def _shown_action(v: Verdict) -> str:
    """What happened: audit mode's would-be denials say so ("AUDIT drop": it passed)."""
    return f"AUDIT {v.action}" if v.audit else v.action


def as_json(v: Verdict, clock_offset: float) -> str:
    return json.dumps({
        "time": round(v.timestamp_ns / 1e9 + clock_offset, 6), "ifname": v.ifname,
        "protocol": v.protocol, "src": v.endpoint(v.src, 0), "sport": v.sport,
        "dst": v.endpoint(v.dst, 0),
        "dport": v.dport, "action": v.action, "rule": v.rule, "text": v.text, "audit": v.audit,
    }, sort_keys=True)


def clock_offset() -> float:
    """Wall clock minus the monotonic clock the datapath stamps events with."""
    return time.time() - time.monotonic()
