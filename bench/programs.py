"""The reference programs the suite measures isoebpf against (bcc-compiled).

`empty_*`: return at once (the floor of BPF_PROG_TEST_RUN: B1 divides by it);
`xdp_drop`: drop everything (the machine's ceiling for discarding, B2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bcc import BPF

from isoebpf.backends.ebpf import program

_SOURCE = b"""
int bench_empty_xdp(struct xdp_md *ctx) { return XDP_PASS; }
int bench_empty_tc(struct __sk_buff *skb) { return -1; /* TC_ACT_UNSPEC, as ours passes */ }
int bench_xdp_drop(struct xdp_md *ctx) { return XDP_DROP; }
"""


@dataclass
class References:
    bpf: Any
    empty: dict[str, int]  # "xdp", "tc" -> fd
    xdp_drop: int

    def close(self) -> None:
        self.bpf.cleanup()


def references() -> References:
    bpf = program.bcc_compile(_SOURCE, ["-Wall", "-Werror"])
    empty = {"xdp": int(bpf.load_func(b"bench_empty_xdp", BPF.XDP).fd),
             "tc": int(bpf.load_func(b"bench_empty_tc", BPF.SCHED_CLS).fd)}
    drop = int(bpf.load_func(b"bench_xdp_drop", BPF.XDP).fd)
    return References(bpf, empty, drop)
