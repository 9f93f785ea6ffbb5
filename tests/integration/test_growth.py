"""A policy that does not fit beside the one in force moves to new eBPF maps: no packet
meets a mix of policies, tracked connections live on, counts go on, and a move that
fails, or a command killed anywhere in it, leaves one whole program everywhere."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bench.policies import FILLER_OVERLAYS, fillers
from isoebpf import pipeline
from isoebpf.backends import enforcer, links
from isoebpf.backends.ebpf import backend as ebpf
from isoebpf.backends.ebpf import capacity, program
from isoebpf.backends.state import Scope
from isoebpf.cli import main
from isoebpf.errors import BackendError
from isoebpf.lab.testbed import Testbed
from tests.integration.conftest import SEED, WEB, assert_clean, isoebpf
from tests.integration.test_crash import fork_cli
from tests.integration.test_update_under_traffic import LOOPS, Clients
from tests.scenarios import expected_outcome

# tcp/22 from hr to it: B opens it, A does not (the tries tell which is in force).
OPEN_SSH = "  - {from: hr, to: it, ports: [tcp/22]}\n"


def with_fillers(count: int, more: str = "") -> str:
    """The seed with `count` filler rules between two overlays of their own (bench/policies.py:
    one host to one /24, a class each) ahead of its own rules."""
    rules = "".join(f"  - {{from: {f.src}, to: {f.dst}, ports: [tcp/{f.port}]}}\n"
                    for f in fillers(count))
    return (SEED.read_text().replace("overlays:\n", "overlays:\n" + FILLER_OVERLAYS)
            .replace("allow:\n", "allow:\n" + more + rules))


# Under traffic, with no setting: A fits the default maps, B is ten times A and needs
# more than they hold beside it. Failures: A in maps an environment bound keeps small,
# B a hundred rules more.
SMALL_A, LARGE_B = with_fillers(1_500), with_fillers(15_000, OPEN_SSH)
BOUNDED = {"ISOEBPF_MAX_CLASSES": "64"}
BOUNDED_B = with_fillers(100, OPEN_SSH)


def programs_on(testbed: Testbed) -> dict[str, int]:
    """Interface -> the id of the program of ours on it (XDP, or our TC filter's, as tc shows it)."""
    found = {}
    with links.netlink(testbed.router) as sock:
        for link in links.links(sock):
            xdp, _ = links.xdp_state(sock, link.index)
            if xdp:
                found[link.name] = xdp
            elif links.has_our_tc(sock, link.index):
                shown = testbed.run_in(testbed.router, "tc", "filter", "show", "dev", link.name,
                                       "ingress").stdout
                found[link.name] = int(re.findall(rf"{links.TC_NAME}.* id (\d+)", shown)[0])
    return found


def pinned_program(scope: Scope, mode: str) -> int:
    """The id of the pinned program `mode` attaches (TC's, or XDP's)."""
    return ebpf.program_ids(scope)["tc" if mode == "tc" else "xdp"]


def counted(testbed: Testbed, identity: str) -> int:
    """Packets `status` counts for the rule of `identity`."""
    record = json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout)
    return next(int(c["packets"]) for c in record["counters"] if c["identity"] == identity)


@pytest.mark.parametrize("mode", ["tc", "xdp"])
def test_a_policy_ten_times_larger_moves_to_new_maps_under_traffic_with_no_setting(
        testbed: Testbed, tmp_path: Path, mode: str) -> None:
    path_a, path_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    path_a.write_text(SMALL_A)
    path_b.write_text(LARGE_B)
    ir_a, ir_b = pipeline.read(path_a).ir, pipeline.read(path_b).ir
    scope = Scope(testbed.router)
    expected = {client: [(expected_outcome(ir_a, testbed, client, *t),
                          expected_outcome(ir_b, testbed, client, *t)) for t in tries]
                for client, tries in LOOPS.items()}
    isoebpf("load", str(path_a), "--backend", "ebpf", "--netns", testbed.router, "--iface", "v-*",
            "--mode", mode)
    clients: Clients | None = None
    web = testbed.session("hr1", "it1", 80)
    try:
        before = json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout)
        assert before["maps"]["classes_v4"]["max_entries"] == capacity.default_sizes()["ISOEBPF_MAX_CLASSES"]
        clients = Clients(testbed)
        time.sleep(1.0)  # every loop running before the change
        assert web.exchange() == "echoed"
        _, report, _ = enforcer.load("ebpf", "ebpf", ir_b, scope, ["v-*"], mode, str(path_b))
        grown = capacity.sizes_for(capacity.needed_entries(ir_b), environ={})
        assert f"ISOEBPF_MAX_CLASSES={grown['ISOEBPF_MAX_CLASSES']}" in report.grown
        assert report.compiled and report.generation == 2
        assert web.exchange() == "echoed", "a tracked connection lived through the move"
        time.sleep(1.0)
        clients.stop()
        record = json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout)
        assert record["maps"]["classes_v4"]["max_entries"] == grown["ISOEBPF_MAX_CLASSES"]
        assert record["digest"] == ir_b.digest
        assert all(a["state"] == "attached" for a in record["attachments"])
        assert set(programs_on(testbed).values()) == {pinned_program(scope, mode)}
        assert not any(path.exists() for path in (ebpf._staged_dir(scope), ebpf._retired_dir(scope)))
        assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "connected"
        # Every web connection's first packet was counted, by the old program or the new.
        web_tries = [n for n, t in enumerate(LOOPS["hr1"]) if t == ("tcp", "it1", 80)]
        connected = sum(1 for a in clients.outcomes["hr1"]
                        if int(str(a["try"])) in web_tries and a["outcome"] == "connected")
        assert counted(testbed, WEB) >= connected + 1  # and the session's
    finally:
        web.close()
        if clients is not None:
            clients.stop()
        isoebpf("unload", "--netns", testbed.router)
    seen = {"A": 0, "B": 0}
    for client, outcomes in clients.outcomes.items():
        for attempt in outcomes:
            want_a, want_b = expected[client][int(str(attempt["try"]))]
            outcome = attempt["outcome"]
            assert outcome in (want_a, want_b) or (
                outcome == "reset" and {want_a, want_b} == {"connected", "refused"}), \
                (client, LOOPS[client][int(str(attempt["try"]))], want_a, want_b, outcome)
            seen["A"] += outcome == want_a != want_b
            seen["B"] += outcome == want_b != want_a
    assert seen["A"] and seen["B"], f"the move never showed: {seen}"
    assert_clean(testbed)


def fail_at(owner: Any, name: str, nth: int, act: Callable[[], None]) -> Callable[..., Any]:
    """owner.name, but its nth call does `act` first."""
    real = getattr(owner, name)
    calls = iter(range(1, 1_000))

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == nth:
            act()
        return real(*args, **kwargs)

    return wrapped


def injected() -> None:
    raise BackendError("injected: the step failed")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# Where a move fails or is killed: after two interfaces switched programs; at the
# rename that puts the new pins in place; after it (killed only: nothing is left to
# fail but the old pins' removal and the record).
STEPS = {"switching": ("_switch_program", 3), "committing": ("_commit", 1),
         "committed": ("_remove_pins", 1)}


@pytest.mark.parametrize(("how", "step"), [("failing", "switching"), ("killed", "switching"),
                                           ("failing", "committing"), ("killed", "committed")])
def test_a_move_that_fails_or_is_killed_leaves_one_whole_program_everywhere(
        testbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, step: str) -> None:
    """Failing: the old program goes back on each interface at once, the new one's pins
    go, the policy in force stays. Killed before the new pins are in place: the next
    load puts the old program back everywhere first; killed after: the next load only
    removes the old pins. Either way the next load of B succeeds, one program everywhere."""
    path_a, path_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    path_a.write_text(SEED.read_text())
    path_b.write_text(BOUNDED_B)
    load_b = ["load", str(path_b), "--backend", "ebpf", "--netns", testbed.router, "--iface", "v-*",
              "--mode", "tc"]
    isoebpf(*load_b[:1], str(path_a), *load_b[2:], env=BOUNDED)
    scope = Scope(testbed.router)
    old = pinned_program(scope, "tc")
    name, nth = STEPS[step]
    try:
        with monkeypatch.context() as patched:
            patched.setattr(ebpf, name, fail_at(ebpf, name, nth, injected if how == "failing" else die))
            if how == "failing":
                done = CliRunner().invoke(main, load_b)
                assert done.exit_code == 1 and "injected" in done.output, done.output
            else:
                pid = fork_cli(load_b)
                _, status = os.waitpid(pid, 0)
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
                assert ebpf._staged_dir(scope).exists(), "killed half way, as meant"
        if how == "failing":
            assert not ebpf._staged_dir(scope).exists()
            assert pinned_program(scope, "tc") == old and set(programs_on(testbed).values()) == {old}
            assert scope.read()["digest"] == pipeline.read(path_a).ir.digest  # type: ignore[index]
            assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "refused"
            assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
        elif step == "switching":
            assert len(set(programs_on(testbed).values())) == 2, "both programs run, as meant"
        done = CliRunner().invoke(main, load_b)
        assert done.exit_code == 0, done.output
        # After the commit the new maps were in place already: the load is an update.
        assert ("moved to new maps" in done.output) == (step != "committed"), done.output
        assert not any(path.exists() for path in (ebpf._staged_dir(scope), ebpf._retired_dir(scope)))
        assert set(programs_on(testbed).values()) == {pinned_program(scope, "tc")} != {old}
        assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "connected"
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)


def test_a_move_killed_between_the_two_renames_is_completed(
        testbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where bpffs cannot exchange two directories (a flag it refuses stands in for an older
    kernel), the new pins go in place in two renames; the next load completes them."""
    path_a, path_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    path_a.write_text(SEED.read_text())
    path_b.write_text(BOUNDED_B)
    load_b = ["load", str(path_b), "--backend", "ebpf", "--netns", testbed.router, "--iface", "v-*",
              "--mode", "xdp"]
    isoebpf(*load_b[:1], str(path_a), *load_b[2:], env=BOUNDED)
    scope = Scope(testbed.router)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(ebpf, "RENAME_EXCHANGE", 1 << 30)
            patched.setattr(ebpf, "_remove_pins", fail_at(ebpf, "_remove_pins", 1, die))
            pid = fork_cli(load_b)
            _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert ebpf._retired_dir(scope).exists() and not ebpf._staged_dir(scope).exists()
        new = pinned_program(scope, "xdp")
        # As if killed between the renames: the new pins not yet in place.
        os.rename(scope.pin_dir, ebpf._staged_dir(scope))
        done = CliRunner().invoke(main, load_b)
        assert done.exit_code == 0, done.output
        assert not any(path.exists() for path in (ebpf._staged_dir(scope), ebpf._retired_dir(scope)))
        assert {pinned_program(scope, "xdp")} == {new} == set(programs_on(testbed).values())
        assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "connected"
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)


def test_a_move_beyond_the_memory_there_is_is_refused_before_compiling(
        testbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with 1 MiB to spare (injected: capacity.Machine.here) and two bounds
    the policy exceeds: one message names all three, nothing is compiled, A stays."""
    path_a, path_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    path_a.write_text(SEED.read_text())
    path_b.write_text(BOUNDED_B)
    load_b = ["load", str(path_b), "--backend", "ebpf", "--netns", testbed.router, "--iface", "v-*"]
    isoebpf(*load_b[:1], str(path_a), *load_b[2:], env=BOUNDED)
    scope = Scope(testbed.router)
    before = scope.record_path.read_bytes(), ebpf.program_ids(scope), programs_on(testbed)
    tight = capacity.Machine(cpus=2, available=2**20, available_from="the test's cgroup", memlock=None)
    compiled: list[object] = []

    def compile_program(*args: object, **kwargs: object) -> None:
        compiled.append(args)
        raise BackendError("compiled")

    try:
        with monkeypatch.context() as patched:
            patched.setattr(capacity.Machine, "here", classmethod(lambda cls, *a, **k: tight))
            patched.setattr(program, "compile_program", compile_program)
            done = CliRunner().invoke(main, load_b, env={"ISOEBPF_MAX_CLASSES": "150",
                                                         "ISOEBPF_MAX_RULES": "64"})
        assert done.exit_code == 1 and not compiled, done.output
        said = done.output.split("nothing was compiled, nothing was changed:\n", 1)[1]
        assert "ISOEBPF_MAX_CLASSES=150 in the environment allows 150" in said
        assert "ISOEBPF_MAX_RULES=64 in the environment allows 64" in said
        assert "MiB, and the test's cgroup leaves 1 MiB" in said
        assert (scope.record_path.read_bytes(), ebpf.program_ids(scope), programs_on(testbed)) == before
        assert not ebpf._staged_dir(scope).exists()
        assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "refused"
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)
