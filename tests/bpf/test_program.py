"""The program's other duties: events, readers for `status`, pins, and map limits."""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from isoebpf import pipeline
from isoebpf.backends import counts
from isoebpf.backends.ebpf import abi, bpfsys, capacity, entries, program, ringbuf
from isoebpf.backends.ebpf.backend import EarlyCompile
from isoebpf.errors import BackendError, CapacityError
from isoebpf.ir import evaluate
from isoebpf.ir.compiler import Compiler
from isoebpf.ir.evaluate import TCP_RST, TCP_SYN
from isoebpf.ir.tables import IR
from isoebpf.policy import parse
from tests.bpf.cases import HR, HR5, IT, IT3, POLICY, SYN_22, SYN_80, tcp
from tests.bpf.harness import Datapath, policy_entries, slot_contents, slot_wanted
from tests.packets import build

pytestmark = pytest.mark.bpf

THREE_OVERLAYS = """\
version: 1
overlays:
  a: {subnets: [10.1.0.0/16]}
  b: {subnets: [10.2.0.0/16]}
  c: {subnets: [10.3.0.0/16]}
allow:
  - {from: a, to: b}
  - {from: b, to: c}
"""


@pytest.fixture
def one_cpu() -> Iterator[None]:
    """Per-CPU token buckets: keep every test run on one CPU."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.fixture
def loaded(datapath: Datapath) -> Datapath:
    datapath.load(pipeline.loads(POLICY).ir)
    datapath.clear_state()
    return datapath


def test_events_are_rate_limited(loaded: Datapath, one_cpu: None) -> None:
    """Through the reader `isoebpf trace` uses: libbpf's, on the ring buffer's map fd."""
    ring = ringbuf.RingBuffer(loaded.maps["events"])
    try:
        ring.drain()
        suppressed, lost = program.undelivered_events(loaded.maps)
        program.set_event_rate(loaded.maps, 3)
        for sport in range(10):
            loaded.run("xdp", build(tcp(HR, IT, 80, sport=50000 + sport)))
        program.set_event_rate(loaded.maps, 0)
        for sport in range(10):
            loaded.run("xdp", build(tcp(HR, IT, 22, sport=50000 + sport)))
        seen = [abi.VerdictEvent.from_buffer_copy(raw) for raw in ring.poll(0.2)]
    finally:
        program.set_event_rate(loaded.maps, 0)
        ring.close()
    assert len(seen) == 3
    assert program.undelivered_events(loaded.maps) == (suppressed + 7, lost), (
        "not tracing: nothing is suppressed; nothing lost")
    first = seen[0]
    assert program.address(first.family, first.src) == HR
    assert program.address(first.family, first.dst) == IT
    assert (first.dport, first.proto, abi.ACTION_NAMES[first.action], first.audit) == (80, 6, "allow", 0)
    names = {r.id: r.name for r in pipeline.loads(POLICY).ir.rules}
    assert names[first.rule] == "allow:0"
    assert [e.sport for e in seen] == [50000, 50001, 50002], "in the order they were sent"


def test_events_beyond_the_ring_are_counted_lost(loaded: Datapath, one_cpu: None) -> None:
    """A ring nobody reads fills up; every event after that is counted, none half written."""
    ring = ringbuf.RingBuffer(loaded.maps["events"])
    # Each record: the event after the ring's 8-byte header, rounded up to 8 bytes.
    record = (8 + ctypes.sizeof(abi.VerdictEvent) + 7) // 8 * 8
    # The kernel keeps what is written below the ring's size (not up to it): one record less.
    room = (bpfsys.map_info(loaded.maps["events"]).max_entries - 1) // record
    sent = room + 1000
    try:
        ring.drain()
        suppressed, lost = program.undelivered_events(loaded.maps)
        # A billion tokens a second: a token a nanosecond, faster than the program runs.
        program.set_event_rate(loaded.maps, 10**9)
        # A reset is denied and not answered, so every repetition meets the same frame.
        bpfsys.prog_test_run(loaded.compiled.prog_fds["xdp"], build(tcp(HR, IT, 22, flags=TCP_RST)),
                             repeat=sent)
        program.set_event_rate(loaded.maps, 0)
        assert program.undelivered_events(loaded.maps) == (suppressed, lost + sent - room)
        events = [abi.VerdictEvent.from_buffer_copy(raw) for raw in ring.poll(0.2)]
        assert len(events) == room
        default = {r.name: r.id for r in pipeline.loads(POLICY).ir.rules}["default"]
        assert {(e.rule, e.dport, e.sport) for e in events} == {(default, 22, 40000)}
        assert ring.drain() == 0 and list(ring.poll(0.01)) == [], "read once"
    finally:
        program.set_event_rate(loaded.maps, 0)
        ring.close()


def test_status_readers(loaded: Datapath) -> None:
    loaded.run("tc", build(SYN_80))
    flows = {program.flow_of(key): state for key, state in program.connections(loaded.maps)}
    assert (6, HR, 40000, IT, 80) in flows
    assert flows[(6, HR, 40000, IT, 80)].gen == loaded.gen
    assert program.count_connections(loaded.maps) == len(flows)
    rule = {r.name: r.id for r in pipeline.loads(POLICY).ir.rules}["allow:0"]
    assert program.read_counters(loaded.maps, [rule])[rule] == program.read_counter(
        loaded.maps, rule) == (1, len(build(SYN_80)))
    fill = program.map_fill(loaded.maps)
    assert fill["conntrack"]["entries"] == len(flows)
    first = next(k for k, _ in program.connections(loaded.maps))
    assert evaluate.first_packet(program.flow_of(first)).tcp_flags == TCP_SYN


def test_counters_are_read_one_by_one_where_the_kernel_has_no_batches(
    loaded: Datapath, monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded.run("tc", build(SYN_80))
    rules = [r.id for r in pipeline.loads(POLICY).ir.rules]
    batched = program.read_counters(loaded.maps, rules)
    assert sum(packets for packets, _ in batched.values()) == 1
    syscall = bpfsys._bpf

    def without_batches(cmd: int, attr: ctypes.Structure) -> int:
        if cmd == bpfsys.BPF_MAP_LOOKUP_BATCH:
            raise OSError(errno.EINVAL, "Invalid argument")
        return syscall(cmd, attr)

    monkeypatch.setattr(bpfsys, "_bpf", without_batches)
    assert program.read_counters(loaded.maps, rules) == batched


def test_pins_and_names(loaded: Datapath) -> None:
    pin = Path(f"/sys/fs/bpf/isoebpf-test-{os.getpid()}")
    bpfsys.obj_pin(loaded.maps["conntrack"], str(pin))
    try:
        with pytest.raises(BackendError, match="exists already"):
            bpfsys.obj_pin(loaded.maps["conntrack"], str(pin))
        fd = bpfsys.obj_get(str(pin))
        try:
            info = bpfsys.map_info(fd)
            assert (info.name, info.key_size) == ("conntrack", ctypes.sizeof(abi.FlowKey))
        finally:
            os.close(fd)
    finally:
        pin.unlink()
    with pytest.raises(BackendError, match="no pinned object"):
        bpfsys.obj_get(str(pin))
    prog = bpfsys.prog_info(loaded.compiled.prog_fds["xdp"])
    assert bpfsys.prog_name(prog.id) == program.XDP_NAME


def test_run_time_statistics_count_each_run_while_on(loaded: Datapath) -> None:
    """What the bench reads as a program's own time per packet (bench/traffic.py)."""
    fd = loaded.compiled.prog_fds["xdp"]
    statistics = bpfsys.run_time_statistics()
    try:
        before = bpfsys.prog_info(fd)
        bpfsys.prog_test_run(fd, build(SYN_80), repeat=100)
        after = bpfsys.prog_info_by_id(before.id)
    finally:
        os.close(statistics)
    assert after is not None
    assert after.run_cnt - before.run_cnt == 100
    assert after.run_time_ns > before.run_time_ns
    assert bpfsys.prog_info_by_id(2**32 - 1) is None


def test_updates_write_the_difference_and_leave_each_slot_exact(tmp_path: Path) -> None:
    """After every update the live slot holds exactly its policy and the other
    exactly the one before, as its file says, so the next difference is right;
    a slot whose file is gone (a killed update) is rewritten whole."""
    texts = [POLICY, THREE_OVERLAYS, THREE_OVERLAYS.replace("{from: b, to: c}", "{from: c, to: a}"),
             POLICY]
    irs = [pipeline.loads(text).ir for text in texts]
    compiled = program.compile_program()
    try:
        maps = compiled.map_fds
        slots = program.SlotFiles(tmp_path)
        program.first_generation(maps, irs[0], slots)
        assert slot_contents(maps, 0) == slot_wanted(irs[0], 0)
        assert slot_contents(maps, 1) == slot_wanted(irs[0], 1)
        for before, ir in itertools.pairwise(irs):
            gen = program.next_generation(maps, ir, slots)
            slot = program.slot_of(gen)
            assert slot_contents(maps, slot) == slot_wanted(ir, slot)
            assert slot_contents(maps, 1 - slot) == slot_wanted(before, 1 - slot)
            assert slots.read(maps, slot) == entries.tables_of(ir)
        # Killed while writing: the next slot's file gone, half of some policy in it.
        slot = program.slot_of(program.active_generation(maps) + 1)
        slots.forget(slot)
        for name, key, value in list(policy_entries(irs[1], slot))[::2]:
            bpfsys.map_update(maps[name], key, value)
        program.next_generation(maps, irs[2], slots)
        assert slot_contents(maps, slot) == slot_wanted(irs[2], slot)
        # A file about other maps (a load since) says nothing.
        assert program.SlotFiles(tmp_path).read({**maps, "allowed": maps["hairpins"]}, slot) is None
    finally:
        compiled.close()


# POLICY with a rule inserted first (its allow:0 becomes allow:1) and its allow:1
# (192.168.5.0/24 -> 10.250.3.0/24) removed.
POLICY_RULE_ABOVE = POLICY.replace("allow:\n", "allow:\n  - {from: lab, to: hr, ports: [tcp/22]}\n") \
    .replace("  - {from: 192.168.5.0/24, to: 10.250.3.0/24}\n", "")


def recorded(ir: IR) -> list[list[object]]:
    """The rules as the state record lists them."""
    return [[r.id, r.name, r.text] for r in ir.rules]


def totals(datapath: Datapath, ir: IR, carried: counts.Carried) -> dict[str, counts.Count]:
    """What status would show for `ir`, live in `datapath`'s generation: name -> total."""
    live = program.read_counters(datapath.maps, [r.id for r in ir.rules])
    return counts.totals({ir.rule(i).name: count for i, count in live.items()}, carried)


def test_counts_survive_an_update_by_rule_identity(datapath: Datapath) -> None:
    """Each rule the new policy keeps carries what it counted, under its new name; a
    removed rule's count goes with it; a new rule starts at 0; no total goes down."""
    first, second = (pipeline.loads(text).ir for text in (POLICY, POLICY_RULE_ABOVE))
    syn = len(build(SYN_80))  # every SYN below has this length
    datapath.load(first)
    datapath.clear_state()
    for sport in range(41000, 41003):
        datapath.run("tc", build(tcp(HR, IT, 80, sport=sport)))
    datapath.run("tc", build(tcp(HR5, IT3, 9999)))  # allow:1, which the second policy drops
    datapath.run("tc", build(SYN_22))  # default
    before = totals(datapath, first, {})
    assert (before["allow:0"], before["allow:1"], before["default"]) == (
        (3, 3 * syn), (1, syn), (1, syn))

    # Each compiled afresh: its rules numbered in file order, so the kept rule's id moved.
    carried, fresh = program.counters_across(datapath.maps, recorded(first), {}, second)
    datapath.load(second, fresh=fresh)
    after = totals(datapath, second, carried)
    assert after["allow:1"] == (3, 3 * syn), "hr -> it tcp/80 is allow:1 now, its count with it"
    assert after["allow:0"] == (0, 0), "the inserted rule starts at 0"
    assert after["default"] == (1, syn)
    assert sum(packets for packets, _ in after.values()) == 4, "the removed rule's packet is gone"

    # Counting on, then back: the removed rule returns at 0, the kept ones keep theirs.
    datapath.run("tc", build(tcp(HR, IT, 80, sport=41003)))
    assert totals(datapath, second, carried)["allow:1"] == (4, 4 * syn)
    carried, fresh = program.counters_across(datapath.maps, recorded(second), carried, first)
    datapath.load(first, fresh=fresh)
    again = totals(datapath, first, carried)
    assert (again["allow:0"], again["allow:1"]) == ((4, 4 * syn), (0, 0))
    assert all(again[name] >= before[name] for name in before if name != "allow:1")


def test_map_limits_say_what_to_raise() -> None:
    """What _update catches to move to new maps: CapacityError, before anything is written."""
    small = program.compile_program({"ISOEBPF_MAX_HAIRPINS": 2, "ISOEBPF_MAX_RULES": 20})
    try:
        assert program.max_rules(small.map_fds) == 20
        three = pipeline.loads(THREE_OVERLAYS).ir
        with pytest.raises(CapacityError, match=r"needs 21 rule counters, and the program holds 20 "
                                                r"\(ISOEBPF_MAX_RULES in"):
            program.write_generation(small.map_fds, three, 1)
        without_rules = pipeline.loads(THREE_OVERLAYS.split("allow:")[0]).ir
        with pytest.raises(CapacityError, match=r"needs 3 entries in map hairpins, and the program "
                                                r"holds 2 \(ISOEBPF_MAX_HAIRPINS in"):
            program.write_generation(small.map_fds, without_rules, 1)
        # Refused before a single entry was written.
        assert all(fill["entries"] == 0 for fill in program.map_fill(small.map_fds).values())
    finally:
        small.close()


def test_sizes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOEBPF_MAX_CONNECTIONS", "4096")
    assert program.size_flags({"ISOEBPF_MAX_RULES": 64}) == [
        "-DISOEBPF_MAX_CONNECTIONS=4096", "-DISOEBPF_MAX_RULES=64"]
    monkeypatch.setenv("ISOEBPF_MAX_CONNECTIONS", "lots")
    with pytest.raises(BackendError, match="positive number"):
        program.size_flags()


def test_a_rule_kept_under_its_id_counts_on_and_a_new_one_starts_at_0(datapath: Datapath) -> None:
    """Compiled as a change, the kept rules keep their ids: nothing to carry, their
    counters go on; only the inserted rule's id starts at 0."""
    compiler = Compiler(parse.loads(POLICY))
    first = compiler.ir
    datapath.load(first)
    datapath.clear_state()
    for sport in range(42000, 42003):
        datapath.run("tc", build(tcp(HR, IT, 80, sport=sport)))
    delta = compiler.update(parse.loads(POLICY_RULE_ABOVE))
    assert delta is not None
    second = compiler.ir
    carried, fresh = program.counters_across(datapath.maps, recorded(first), {}, second)
    assert carried == {} and fresh == delta.rules_new and len(fresh) == 1
    datapath.load(second, fresh=fresh)
    after = totals(datapath, second, carried)
    assert after["allow:1"][0] == 3, "hr -> it tcp/80, renamed allow:1, counts on in its counter"
    assert after["allow:0"] == (0, 0)


def test_changes_written_as_differences_leave_each_slot_exact(tmp_path: Path) -> None:
    """Updates that come as compiled differences write only those (and what the slot
    they write into missed of the change before): the slots end exactly as the
    policies they hold, as updates that compare whole tables would leave them."""
    texts = [POLICY, POLICY_RULE_ABOVE,
             POLICY_RULE_ABOVE.replace("ports: [tcp/22]}", "ports: [tcp/22, udp/53]}"), POLICY]
    compiler = Compiler(parse.loads(texts[0]))
    compiled = program.compile_program()
    try:
        maps = compiled.map_fds
        slots = program.SlotFiles(tmp_path)
        program.first_generation(maps, compiler.ir, slots)
        before = compiler.ir
        for text in texts[1:]:
            delta = compiler.update(parse.loads(text))
            assert delta is not None
            change = entries.change_of(delta)
            # Exactly the entries that differ, as comparing the whole tables finds them.
            assert change.plan.counts() == entries.diff(entries.tables_of(before),
                                                        entries.tables_of(compiler.ir)).counts()
            gen = program.next_generation(maps, compiler.ir, slots, fresh=delta.rules_new,
                                          change=change)
            slot = program.slot_of(gen)
            assert slot_contents(maps, slot) == slot_wanted(compiler.ir, slot)
            assert slot_contents(maps, 1 - slot) == slot_wanted(before, 1 - slot)
            assert slots.read(maps, slot) is None, "the whole tables were not made"
            before = compiler.ir
        # A slot whose way to the live generation is gone (a killed update) is written whole.
        slots.forget_pending(program.slot_of(program.active_generation(maps) + 1))
        delta = compiler.update(parse.loads(texts[1]))
        assert delta is not None
        gen = program.next_generation(maps, compiler.ir, slots, fresh=delta.rules_new,
                                      change=entries.change_of(delta))
        assert slot_contents(maps, program.slot_of(gen)) == slot_wanted(compiler.ir, program.slot_of(gen))
    finally:
        compiled.close()


def test_compiles_on_several_threads_take_turns() -> None:
    """A failed load abandons its early compile, which may still run when the next load
    compiles; bcc's in-process clang is not safe on two threads at once (it crashed
    the process when they overlapped). Both compile, one after the other."""
    early = [EarlyCompile(capacity.default_sizes()) for _ in range(2)]
    early[0].abandon()
    compiled = program.compile_program()
    try:
        assert early[1].succeeded()
        taken, _ = early[1].take(capacity.default_sizes())
        assert taken is not None
        taken.close()
    finally:
        compiled.close()
    assert early[0].succeeded()
