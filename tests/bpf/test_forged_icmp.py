"""Forged ICMP errors open nothing that policy denies.

An ICMP error about a tracked connection passes (the contract's step 1: it
travels back to the quoted packet's sender, whoever sent it, as routers on the
path do). A forged one must get no further than that: quoting a flow policy
denies, quoting a connection that does not exist yet, sent from a denied pair,
sent to someone other than the quoted sender, nested inside another error, it
is judged as policy says, and it leaves no connection state behind: the denied
flows it names stay denied afterwards, both ways, and the program's connection
table holds exactly the evaluator's connections.
"""

from __future__ import annotations

import pytest

from isoebpf.backends.ebpf import program
from isoebpf.ir.evaluate import TCP_ACK
from tests.bpf.cases import (
    HR,
    HR6,
    HR9,
    IT,
    IT6,
    IT7,
    LAB,
    SYN_22,
    SYN_80,
    Case,
    echo,
    icmp_error,
    reverse,
    step,
    tcp,
    udp,
)
from tests.bpf.harness import PROGRAMS, Datapath
from tests.bpf.test_table import play

pytestmark = pytest.mark.bpf

DENIED_22 = tcp(IT, HR, 22)  # it -> hr: nothing allowed

FORGED = (
    Case("denied-flow", "an error quoting a denied flow neither passes nor lets that flow through", (
        step(icmp_error(HR, IT, DENIED_22), "drop", "default"),
        step(DENIED_22, "tx", "default"),
        step(reverse(DENIED_22), "tx", "default"),
        step(icmp_error(HR6, IT6, tcp(IT6, HR6, 22), kind=1, code=4), "drop", "default"),
        step(tcp(IT6, HR6, 22), "tx", "default"),)),
    Case("before-the-connection", "an error quoting an allowed flow nobody opened does not open it", (
        step(icmp_error(IT, HR, SYN_80), "drop", "default"),
        step(reverse(SYN_80), "tx", "default"),
        step(reverse(SYN_80, TCP_ACK), "tx", "default"),)),
    Case("from-a-denied-pair", "an error about a live connection from a denied source passes, "
         "and opens nothing between that source and anyone", (
        step(SYN_80, "pass", "allow:0"),
        step(icmp_error(LAB, HR, SYN_80), "pass", "established"),
        step(tcp(LAB, HR, 80), "tx", "default"),
        step(tcp(HR, LAB, 80), "tx", "default"),
        step(echo(LAB, HR), "tx", "default"),
        step(udp(LAB, HR, 53), "tx", "default"),
        step(reverse(SYN_22), "tx", "default"),)),
    Case("to-someone-else", "an error about a live connection sent to anyone but the quoted sender "
         "is judged as a new packet", (
        step(SYN_80, "pass", "allow:0"),
        step(icmp_error(LAB, IT, SYN_80), "drop", "default"),
        step(icmp_error(HR, IT, SYN_80), "drop", "default"),
        step(icmp_error(IT, LAB, SYN_80), "pass", "allow:2"),
        step(tcp(LAB, IT, 80), "tx", "default"),)),
    Case("nested", "an error quoting an error about a live connection names no connection", (
        step(SYN_80, "pass", "allow:0"),
        step(icmp_error(IT, HR, icmp_error(HR, IT, reverse(SYN_80))), "drop", "default"),)),
    Case("about-an-exception", "an error quoting an exception's flow from a denied pair", (
        step(tcp(IT7, HR9, 22), "pass", "exception:0"),
        step(icmp_error(LAB, IT7, tcp(IT7, HR9, 22)), "pass", "established"),
        step(tcp(LAB, IT7, 22), "tx", "default"),
        step(tcp(HR9, IT7, 22), "tx", "default"),)),
    Case("forged-replies", "an echo reply or a mid-stream ACK nobody asked for is a new packet", (
        step(echo(IT, HR, reply=True), "tx", "default"),
        step(echo(HR, IT), "tx", "default"),
        step(echo(IT, HR, reply=True), "tx", "default"),
        step(tcp(IT, HR, 40000, flags=TCP_ACK, sport=80), "tx", "default"),
        step(tcp(IT, HR, 40000, flags=TCP_ACK, sport=80), "tx", "default"),)),
)


@pytest.mark.parametrize("prog", PROGRAMS)
@pytest.mark.parametrize("case", FORGED, ids=[c.name for c in FORGED])
def test_forged_icmp_error_opens_nothing(datapath: Datapath, prog: str, case: Case,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    conntrack = play(datapath, prog, case, monkeypatch)
    tracked = program.map_fill(datapath.maps)["conntrack"]["entries"]
    assert tracked == len(conntrack.connections), (
        f"the program tracks {tracked} connections, the evaluator {len(conntrack.connections)}")
