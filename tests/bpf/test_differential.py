"""The program against the reference evaluator on random traffic over random policies.

Each episode loads a random policy (tests/policygen.py) into the one compiled
program as a new generation, clears the connection state, and sends a random
sequence of frames: new connections, replies, FIN and RST from either side,
ICMP errors quoting tracked and untracked flows, fragments in order and later
fragments without a first, truncated and malformed frames, VLAN tags, IPv4
options, IPv6 extension headers. Some episodes switch policy midway, by sweep
or by the datapath's lazy re-judging. Every frame goes through XDP or TC (at
random; they share the state) and through `evaluate.Conntrack.step`, and the
two must agree on the verdict and on the rule whose counter moved.

ISOEBPF_DIFF_SEED and ISOEBPF_DIFF_EPISODES change the run (a failure prints
the seed, episode and step that reproduce it).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import netaddr
import pytest

from isoebpf import pipeline
from isoebpf.ir.evaluate import (
    ICMP_ECHO_REPLY,
    ICMP_ERRORS,
    IPPROTO_ICMPV6,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Classifier,
    Conntrack,
    Packet,
)
from isoebpf.ir.tables import IR, PROTO_ICMP, PROTO_TCP
from tests.bpf.harness import PROGRAMS, Datapath, expected, reply_problems
from tests.packets import (
    BROADCAST_MAC,
    ETH_P_ARP,
    IPPROTO_DSTOPTS,
    IPPROTO_HOPOPTS,
    IPPROTO_ROUTING,
    VLAN_TPIDS,
    Wire,
    build,
    build_other,
    vlan_tags,
)
from tests.policygen import GeneratedPolicy, random_address, random_first_packet, random_policy

pytestmark = pytest.mark.bpf

SEED = int(os.environ.get("ISOEBPF_DIFF_SEED", "20240611"))
EPISODES = int(os.environ.get("ISOEBPF_DIFF_EPISODES", "250"))
FRAMES_PER_EPISODE = 400
MIN_FRAMES = 100_000
SWITCH_SHARE = 0.3  # episodes that change policy midway
# The evaluator's clock advances this much per frame. Episodes with an
# "instant" timeout make that kind of connection expire between any two frames
# in both clocks (the kernel's frames are microseconds apart), which makes
# closing and idle expiry observable without waiting.
TICK = 0.001
INSTANT = 1e-6

# What each frame is, by weight.
KINDS = {
    "new": 26, "reply": 16, "again": 10, "fin": 6, "rst": 4, "icmp-error": 9, "first-fragment": 6,
    "later-fragment": 6, "truncated": 6, "odd-icmp": 3, "non-ip": 2, "malformed": 3,
    "broadcast": 3,
}


@dataclass
class Episode:
    """Random traffic about one policy's addresses, remembering what it sent."""

    rng: random.Random
    generated: GeneratedPolicy
    flows: list[Packet] = field(default_factory=list)  # first packets sent
    fragments: list[Packet] = field(default_factory=list)  # first fragments sent

    def wire(self, pkt: Packet) -> Wire:
        rng = self.rng
        options = b""
        ext: tuple[int, ...] = ()
        if pkt.src.version == 4 and rng.random() < 0.1:
            options = bytes([0x01] * rng.choice([1, 4, 8, 40]))
        if pkt.src.version == 6 and rng.random() < 0.12:
            choices = (IPPROTO_HOPOPTS, IPPROTO_DSTOPTS, IPPROTO_ROUTING)
            ext = tuple(rng.choice(choices) for _ in range(rng.choice([1, 2, 3, 9])))
        payload_len = rng.choice([0, 0, 1, 3, 17, 64]) if rng.random() < 0.9 else rng.randint(500, 1400)
        tags: tuple[tuple[int, int], ...] = ()
        if rng.random() < 0.1:  # one VLAN tag or two (QinQ), of either kind
            tags = tuple((rng.choice(VLAN_TPIDS), rng.randrange(65536)) for _ in range(rng.choice([1, 2])))
        return Wire(tags=tags, ip_options=options,
                    ext_headers=ext, seq=rng.getrandbits(32), ack=rng.getrandbits(32),
                    payload=rng.randbytes(payload_len), ttl=rng.choice([1, 64, 255]))

    def known(self) -> Packet:
        if not self.flows:
            self.flows.append(random_first_packet(self.rng, self.generated))
        return self.rng.choice(self.flows)

    def address(self, version: int) -> netaddr.IPAddress:
        return random_address(self.rng, self.generated, version)

    def frame(self) -> tuple[str, bytes]:
        rng = self.rng
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        if kind == "non-ip":
            return kind, build_other(ETH_P_ARP)
        if kind == "new":
            pkt = random_first_packet(rng, self.generated)
            if pkt.proto == PROTO_TCP and rng.random() < 0.15:
                pkt = replace(pkt, tcp_flags=rng.choice([TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST, 0]))
            self.flows.append(pkt)
            return kind, build(pkt, self.wire(pkt))
        if kind in ("reply", "again", "fin", "rst"):
            pkt = self.follow_up(kind, self.known())
            return kind, build(pkt, self.wire(pkt))
        if kind == "icmp-error":
            pkt = self.icmp_error()
            quote = None if rng.random() < 0.7 else rng.choice([20, 24, 27, 28, 40, 44, 48])
            return kind, build(pkt, replace(self.wire(pkt), quote=quote))
        if kind == "first-fragment":
            first = self.known() if rng.random() < 0.5 else random_first_packet(rng, self.generated)
            pkt = replace(first, frag_id=rng.randrange(1, 6), more_fragments=True)
            self.fragments.append(pkt)
            return kind, build(pkt, self.wire(pkt))
        if kind == "later-fragment":
            first = rng.choice(self.fragments) if self.fragments and rng.random() < 0.8 else self.known()
            pkt = Packet(first.src, first.dst, first.proto, frag_id=first.frag_id or rng.randrange(1, 6),
                         frag_offset=rng.randint(1, 8191), more_fragments=rng.random() < 0.5)
            return kind, build(pkt, replace(self.wire(pkt), ext_headers=()))
        if kind == "truncated":
            pkt = self.follow_up("reply", self.known()) if rng.random() < 0.3 else self.known()
            frame = build(pkt, self.wire(pkt))
            return kind, frame[: rng.randint(14, len(frame) - 1)]
        if kind == "odd-icmp":
            return kind, build(*self.odd_icmp())
        if kind == "broadcast":
            pkt = self.follow_up(rng.choice(["reply", "again"]), self.known())
            return kind, build(pkt, replace(self.wire(pkt), dst_mac=BROADCAST_MAC))
        return kind, self.malformed()

    def follow_up(self, kind: str, first: Packet) -> Packet:
        rng = self.rng
        backwards = kind == "reply" or (kind in ("fin", "rst") and rng.random() < 0.5)
        pkt = first
        if backwards:
            pkt = replace(first, src=first.dst, dst=first.src, sport=first.dport, dport=first.sport)
            if first.is_icmp and first.icmp_type in (8, 128):
                pkt = replace(pkt, icmp_type=ICMP_ECHO_REPLY[first.proto])
        if pkt.proto != PROTO_TCP:
            return pkt
        flags = {"reply": TCP_SYN | TCP_ACK if rng.random() < 0.5 else TCP_ACK, "again": TCP_ACK | 0x08,
                 "fin": TCP_FIN | TCP_ACK, "rst": rng.choice([TCP_RST, TCP_RST | TCP_ACK])}[kind]
        return replace(pkt, tcp_flags=flags)

    def icmp_error(self) -> Packet:
        rng = self.rng
        about = self.known()
        if rng.random() < 0.3:
            about = self.follow_up("reply", about)
        version = about.src.version
        proto = PROTO_ICMP if version == 4 else IPPROTO_ICMPV6
        # Mostly from the quoted packet's destination back to its sender, as errors travel.
        src = about.dst if rng.random() < 0.7 else self.address(version)
        dst = about.src if rng.random() < 0.85 else self.address(version)
        kind = rng.choice(sorted(ICMP_ERRORS[proto]))
        inner = replace(about, tcp_flags=0, frag_id=0, more_fragments=False)
        return Packet(src, dst, proto, icmp_type=kind, icmp_code=rng.randrange(16), inner=inner)

    def odd_icmp(self) -> tuple[Packet, Wire]:
        """ICMP that is neither echo nor a flow error: other errors, informational types."""
        rng = self.rng
        version = 6 if rng.random() < 0.3 else 4
        proto = PROTO_ICMP if version == 4 else IPPROTO_ICMPV6
        kind = rng.choice([4, 5, 12, 13, 17] if version == 4 else [4, 130, 133, 135, 136, 143])
        pkt = Packet(self.address(version), self.address(version), proto, icmp_type=kind,
                     icmp_id=rng.randrange(65536))
        return pkt, self.wire(pkt)

    def malformed(self) -> bytes:
        rng = self.rng
        pkt = self.known()
        frame = bytearray(build(pkt, self.wire(pkt)))
        at = 14 + 4 * len(vlan_tags(frame))
        if pkt.src.version == 4:
            damage = rng.choice(["ihl", "version", "total"])
            if damage == "ihl":
                frame[at] = 0x40 | rng.randrange(5)
            elif damage == "version":
                frame[at] = (rng.choice([0, 5, 6, 15]) << 4) | (frame[at] & 0xF)
            else:
                frame[at + 2 : at + 4] = rng.randrange((frame[at] & 0xF) * 4).to_bytes(2, "big")
        else:
            frame[at] = (rng.choice([0, 4, 7]) << 4) | (frame[at] & 0xF)
        return bytes(frame)


@dataclass
class Tally:
    frames: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    programs: Counter[str] = field(default_factory=Counter)
    switches: int = 0


def load_random(datapath: Datapath, rng: random.Random, lazy: bool = False) -> tuple[GeneratedPolicy, IR]:
    generated = random_policy(rng)
    ir = pipeline.loads(generated.text, "generated.yaml").ir
    if rng.random() < 0.5:
        instant = rng.choice(["tcp_closing", "tcp_closing", "udp", "icmp", "tcp"])
        ir = replace(ir, timeouts={**ir.timeouts, instant: INSTANT})
    datapath.load(ir, sweep=not lazy)
    return generated, ir


def names(ir: IR) -> dict[int, str]:
    return {rule.id: rule.name for rule in ir.rules}


def test_program_agrees_with_the_evaluator(datapath: Datapath) -> None:
    rng = random.Random(SEED)
    tally = Tally()
    started = time.monotonic()
    for episode_number in range(EPISODES):
        generated, ir = load_random(datapath, rng)
        datapath.clear_state()
        classifier, conntrack = Classifier(ir), Conntrack()
        counts: Counter[int] = Counter()
        named = names(ir)  # rule names by id, of this episode's policies
        episode = Episode(rng, generated)
        switch_at = rng.randrange(FRAMES_PER_EPISODE) if rng.random() < SWITCH_SHARE else -1
        for number in range(FRAMES_PER_EPISODE):
            if number == switch_at:
                generated, ir = load_random(datapath, rng, lazy=rng.random() < 0.5)
                episode.generated = generated
                classifier = Classifier(ir)
                conntrack.revalidate(classifier)
                # The new policy's rules count from 0. An id it does not have counts on: a
                # later fragment may still follow its first fragment's verdict under it.
                counts = Counter({rule: n for rule, n in counts.items() if rule not in names(ir)})
                named.update(names(ir))
                tally.switches += 1
            kind, frame = episode.frame()
            where = (f"seed {SEED} episode {episode_number} frame {number} ({kind})\n"
                     f"policy:\n{generated.text}frame: {frame.hex()}")
            parsed, want = expected(frame, conntrack=conntrack, classifier=classifier,
                                    now=number * TICK)
            programs = [p for p in PROGRAMS if datapath.runs(p, frame)]
            if not programs:
                continue
            prog = rng.choice(programs)
            run = datapath.run(prog, frame)
            counts[want.rule] += 1
            assert run.verdict == want.verdict, (
                f"{prog} said {run.verdict}, the evaluator {want.action} "
                f"({named[want.rule]}) for {parsed.packet}\n{where}")
            assert datapath.counter(want.rule)[0] == counts[want.rule], (
                f"{prog}: counter of {named[want.rule]} is off\n{where}")
            if run.verdict == "tx":
                problems = reply_problems(parsed, frame, run.frame)
                assert not problems, f"{prog}: bad reply {problems}\n{where}"
            tally.frames += 1
            tally.kinds[kind] += 1
            tally.verdicts[f"{want.verdict}:{named[want.rule].split(':')[0]}"] += 1
            tally.programs[prog] += 1
    elapsed = time.monotonic() - started
    print(f"\ndifferential: {tally.frames} frames over {EPISODES} policies ({tally.switches} "
          f"switched midway) in {elapsed:.1f}s\n  kinds {dict(tally.kinds)}\n"
          f"  verdicts {dict(tally.verdicts)}\n  programs {dict(tally.programs)}")
    if EPISODES * FRAMES_PER_EPISODE >= MIN_FRAMES:
        assert tally.frames >= MIN_FRAMES * 0.98
    # Every kind of verdict must have come up, or the generator has gone blind.
    for needed in ("pass:established", "pass:unfiltered", "pass:exception", "pass:hairpin",
                   "pass:allow", "tx:default", "drop:default", "drop:malformed", "drop:fragment"):
        assert tally.verdicts[needed], f"no {needed} verdict in the whole run"
