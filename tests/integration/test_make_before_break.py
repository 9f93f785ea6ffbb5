"""A failed change never opens a node: every switch between backends and every update
is make-before-break, so a failure injected at any step (a bad interface glob, a
refused kernel feature, a full map, a tool or syscall failing, a killed process)
leaves the old policy enforcing, exactly, and no packet passes that neither policy
allows. Also: a plain `load` never switches backends, `--dry-run` says when one
would, an update that cannot fit beside the policy in force is refused (and the
first load warns of it), and a narrower `--iface` says what it detached.

Failures are injected into the CLI's own code in this process (CliRunner and
monkeypatch), at the nth call of the step, or by SIGKILL in a forked CLI that
kills itself at the step.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from isoebpf import pipeline
from isoebpf.backends import links, registry
from isoebpf.backends.ebpf import backend as ebpf
from isoebpf.backends.ebpf import bpfsys, capacity, program
from isoebpf.backends.iptables import backend as iptables_backend
from isoebpf.backends.state import Scope
from isoebpf.cli import main
from isoebpf.errors import BackendError, ProgramRejected
from isoebpf.ir.tables import IR
from isoebpf.lab.testbed import Testbed
from tests.integration.conftest import POLICY_B, isoebpf
from tests.integration.test_crash import ebpf_in_force, fork_cli, fully, load_args, probed
from tests.scenarios import expected_outcome

# Tries that both A and B refuse: whatever fails, none of them may ever connect.
NEITHER = [("it1", "tcp", "hr1", 22), ("it1", "udp", "hr1", 53)]
Policies = dict[str, tuple[Path, IR]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Policies:
    """Policies A (the seed) and B, and B with HR isolated (for the bridge check)."""
    folder = tmp_path_factory.mktemp("policies")
    seed = (Path(__file__).resolve().parents[2] / "examples" / "it-hr.yaml").read_text()
    isolated = POLICY_B.replace("subnets: [192.168.0.0/16]",
                                "subnets: [192.168.0.0/16]\n    isolated: true")
    assert isolated != POLICY_B
    found = {}
    for name, text in (("A", seed), ("B", POLICY_B), ("B-isolated", isolated)):
        path = folder / f"{name}.yaml"
        path.write_text(text)
        found[name] = (path, pipeline.read(path).ir)
    return found


@pytest.fixture(scope="module", autouse=True)
def nothing_left(testbed: Testbed) -> Iterator[None]:
    yield
    isoebpf("unload", "--netns", testbed.router)
    assert not backend_objects(testbed), "a backend's objects were left behind"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def in_force_with(testbed: Testbed, pair: Policies, name: str, backend_name: str) -> None:
    """Policy `name` enforced by `backend_name` alone (loaded when it is not)."""
    done = cli(*load_args(pair[name][0], testbed, backend_name))
    assert done.exit_code == 0, done.output
    assert_enforcing(testbed, pair, name, backend_name)


def backend_objects(testbed: Testbed) -> set[str]:
    """Which backends have anything of ours in the router: pins, attachments, rules, sets."""
    found = set()
    scope = Scope(testbed.router)
    with links.netlink(testbed.router) as sock:
        attached = any(links.has_our_tc(sock, link.index) or links.xdp_state(sock, link.index)[0]
                       for link in links.links(sock))
    if scope.pin_dir.exists() or attached:
        found.add("ebpf")
    rules = "".join(testbed.run_in(testbed.router, tool).stdout
                    for tool in ("iptables-save", "ip6tables-save"))
    sets = testbed.run_in(testbed.router, "ipset", "list", "-n").stdout.split()
    if "isoebpf" in rules or any(iptables_backend.OUR_SET.match(name) for name in sets):
        found.add("iptables")
    return found


def assert_enforcing(testbed: Testbed, pair: Policies, name: str, backend_name: str) -> None:
    """`name` is in force, exactly, by `backend_name` alone, and the record says so."""
    record = Scope(testbed.router).read()
    assert record is not None and record["backend"] == backend_name, record
    assert record["digest"] == pair[name][1].digest
    assert backend_objects(testbed) == {backend_name}
    assert not Scope(testbed.router).switch_path.exists()
    if backend_name == "ebpf":
        assert ebpf_in_force(testbed, {name: pair[name]}) == (name, fully(testbed))
    assert probed(testbed, {k: pair[k] for k in ("A", "B")}) == {name}
    assert_neither_connects(testbed)


def assert_neither_connects(testbed: Testbed) -> None:
    for client, proto, target, port in NEITHER:
        seen = testbed.probe(client, proto, target, port, timeout=1.0)["outcome"]
        assert seen != "connected", f"{client} -> {target} {proto}/{port}: neither policy allows it"


def fail_at(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, nth: int = 1,
            error: Callable[[str], Exception] = BackendError) -> None:
    """Make the nth call of owner.name raise `error` (the earlier calls work)."""
    real = getattr(owner, name)
    calls = itertools.count(1)

    def failing(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == nth:
            raise error(f"injected: call {nth} of {name} failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def read_back_fails(monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
    monkeypatch.setattr(module, "drift", lambda scope, ir: ["injected: read back differs"])


# Each step of a switch from iptables to eBPF, made to fail.
TO_EBPF: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "the kernel refuses the program": lambda m: fail_at(m, program, "compile_program",
                                                        error=ProgramRejected),
    "pinning": lambda m: fail_at(m, bpfsys, "obj_pin", nth=3),
    "writing the policy": lambda m: fail_at(m, bpfsys, "map_update_packed", nth=2),
    "the third attach": lambda m: fail_at(m, links, "attach_tc", nth=3),
    "writing the record": lambda m: fail_at(m, Scope, "write"),
    "the read-back": lambda m: read_back_fails(m, ebpf),
}

# Each step of a switch from eBPF to iptables, made to fail.
TO_IPTABLES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "asking for set types": lambda m: fail_at(m, iptables_backend, "set_types"),
    "filling the sets": lambda m: fail_at(m, iptables_backend._Tools, "ipset"),
    "the IPv4 transaction": lambda m: fail_at(m, iptables_backend._Tools, "restore"),
    "the IPv6 transaction": lambda m: fail_at(m, iptables_backend._Tools, "restore", nth=2),
    "cutting connections": lambda m: fail_at(m, iptables_backend, "revoke"),
    "writing the record": lambda m: fail_at(m, Scope, "write"),
    "the read-back": lambda m: read_back_fails(m, iptables_backend),
}


SWITCH_STEPS = {("iptables", "ebpf"): TO_EBPF, ("ebpf", "iptables"): TO_IPTABLES}


@pytest.mark.parametrize(("old", "new", "step"), [
    (old, new, step) for (old, new), steps in SWITCH_STEPS.items() for step in steps])
def test_a_switch_that_fails_leaves_the_old_backend_enforcing(
        testbed: Testbed, pair: Policies, monkeypatch: pytest.MonkeyPatch, old: str, new: str,
        step: str) -> None:
    in_force_with(testbed, pair, "A", old)
    SWITCH_STEPS[(old, new)][step](monkeypatch)
    done = cli(*load_args(pair["B"][0], testbed, new))
    assert done.exit_code == 1, done.output
    assert "injected" in done.output and "fail-closed: the policy in force" in done.output
    monkeypatch.undo()
    assert_enforcing(testbed, pair, "A", old)


def test_switches_refused_by_the_environment_leave_the_old_backend(
        testbed: Testbed, pair: Policies, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's cases: a glob that matches nothing, a policy too big for the maps,
    and bridged traffic that would skip iptables (bridge-nf-call-iptables=0)."""
    in_force_with(testbed, pair, "A", "iptables")
    bad_glob = load_args(pair["B"][0], testbed, "ebpf")
    bad_glob[bad_glob.index("v-*")] = "zz*"
    done = cli(*bad_glob)
    assert done.exit_code == 1 and "no interface in namespace" in done.output, done.output
    assert_enforcing(testbed, pair, "A", "iptables")
    monkeypatch.setenv("ISOEBPF_MAX_CLASSES", "1")
    done = cli(*load_args(pair["B"][0], testbed, "ebpf"))
    assert done.exit_code == 1 and "raise ISOEBPF_MAX_CLASSES" in done.output, done.output
    monkeypatch.delenv("ISOEBPF_MAX_CLASSES")
    assert_enforcing(testbed, pair, "A", "iptables")

    in_force_with(testbed, pair, "A", "ebpf")
    sysctl = "net.bridge.bridge-nf-call-iptables"
    testbed.run_in(testbed.router, "sysctl", "-qw", f"{sysctl}=0")
    try:
        done = cli(*load_args(pair["B-isolated"][0], testbed, "iptables"))
        assert done.exit_code == 1 and f"{sysctl} is 0" in done.output, done.output
    finally:
        testbed.run_in(testbed.router, "sysctl", "-qw", f"{sysctl}=1")
    assert_enforcing(testbed, pair, "A", "ebpf")


@pytest.mark.parametrize(("old", "new"), [("iptables", "ebpf"), ("ebpf", "iptables")])
def test_removing_the_old_backend_fails_after_the_new_one_enforces(
        testbed: Testbed, pair: Policies, monkeypatch: pytest.MonkeyPatch, old: str,
        new: str) -> None:
    """Both filter (each packet must pass both), the error says so, and the next load
    finishes the switch."""
    in_force_with(testbed, pair, "A", old)
    fail_at(monkeypatch, registry.get(old), "unload")
    done = cli(*load_args(pair["B"][0], testbed, new))
    monkeypatch.undo()
    assert done.exit_code == 1 and "both filter until the next" in done.output, done.output
    assert backend_objects(testbed) == {old, new}
    assert Scope(testbed.router).switch_path.exists()
    assert probed(testbed, {k: pair[k] for k in ("A", "B")}) == set()  # A and B at once
    assert_neither_connects(testbed)
    done = cli(*load_args(pair["B"][0], testbed, new))
    assert done.exit_code == 0 and f"finished an interrupted switch from {old}" in done.output
    assert_enforcing(testbed, pair, "B", new)


def killing_itself(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
    """owner.name SIGKILLs the process that calls it (a forked CLI)."""
    def die(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(owner, name, die)


# Where a switch's process is killed: inside the new backend's load, between the
# new backend's read-back and the old one's removal, and inside that removal.
KILLED_AT = {
    ("iptables", "ebpf"): [(links, "attach_tc"), (ebpf, "drift"),
                           (iptables_backend._Tools, "restore")],
    ("ebpf", "iptables"): [(iptables_backend, "revoke"), (iptables_backend, "drift"),
                           (ebpf, "_detach_ours")],
}


@pytest.mark.parametrize(("old", "new", "at"), [
    (old, new, at) for (old, new), places in KILLED_AT.items() for at in range(len(places))])
def test_a_switch_killed_anywhere_is_finished_by_the_next_load(
        testbed: Testbed, pair: Policies, monkeypatch: pytest.MonkeyPatch, old: str, new: str,
        at: int) -> None:
    in_force_with(testbed, pair, "A", old)
    owner, name = KILLED_AT[(old, new)][at]
    with monkeypatch.context() as patched:
        killing_itself(patched, owner, name)
        pid = fork_cli(load_args(pair["B"][0], testbed, new))
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    # Whatever the kill left (A, B, or both filtering), nothing neither allows gets through.
    assert_neither_connects(testbed)
    done = cli(*load_args(pair["B"][0], testbed, new))
    assert done.exit_code == 0, done.output
    assert_enforcing(testbed, pair, "B", new)


def test_a_plain_load_keeps_the_backend_in_force_and_dry_run_shows_a_switch(
        testbed: Testbed, pair: Policies) -> None:
    in_force_with(testbed, pair, "A", "iptables")
    plain = ["load", str(pair["B"][0]), "--netns", testbed.router, "--iface", "v-*"]
    dry = cli(*plain, "--backend", "ebpf", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would switch from iptables to ebpf: ebpf is loaded and verified first" in dry.output
    planned = json.loads(cli(*plain, "--backend", "ebpf", "--dry-run", "--json").stdout)
    assert planned["switch_from"] == "iptables" and planned["backend"] == "ebpf"
    assert_enforcing(testbed, pair, "A", "iptables")
    assert "would switch" not in cli(*plain, "--dry-run").output
    done = cli(*plain)
    assert done.exit_code == 0 and "backend iptables: in force here" in done.output, done.output
    assert_enforcing(testbed, pair, "B", "iptables")
    done = cli(*plain, "--backend", "ebpf")
    assert done.exit_code == 0 and "switched from iptables: ebpf was loaded and verified" \
        in done.output, done.output
    assert_enforcing(testbed, pair, "B", "ebpf")
    done = cli("load", str(pair["A"][0]), "--netns", testbed.router, "--iface", "v-*")
    assert done.exit_code == 0 and "backend ebpf: in force here" in done.output, done.output
    assert_enforcing(testbed, pair, "A", "ebpf")


@contextmanager
def extra_interface(testbed: Testbed) -> Iterator[str]:
    """A new interface in the router that matches v-*: the next update attaches to it."""
    name = "v-extra"
    testbed.run_in(testbed.router, "ip", "link", "add", name, "type", "veth", "peer", "name",
                   "extra-peer")
    try:
        yield name
    finally:
        testbed.run_in(testbed.router, "ip", "link", "del", name, check=False)


def has_our_program(testbed: Testbed, ifname: str) -> bool:
    with links.netlink(testbed.router) as sock:
        index = next(link.index for link in links.links(sock) if link.name == ifname)
        return links.has_our_tc(sock, index)


def flips_then_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The new generation goes live, then the rest of the update fails."""
    def activate_then_fail(maps: program.Maps, ir: IR, gen: int) -> None:
        program.set_active(maps, gen)
        raise BackendError("injected: failed after the flip")

    monkeypatch.setattr(program, "activate", activate_then_fail)


# Each step of an eBPF update, made to fail.
EBPF_UPDATE: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "attaching the new interface": lambda m: fail_at(m, links, "attach_tc"),
    "writing the standby slot": lambda m: fail_at(m, bpfsys, "map_update_packed"),
    "after the flip": flips_then_fails,
    "writing the record": lambda m: fail_at(m, Scope, "write"),
}


@pytest.mark.parametrize("step", list(EBPF_UPDATE))
def test_an_ebpf_update_that_fails_leaves_the_policy_where_it_was(
        testbed: Testbed, pair: Policies, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    """Also on the interfaces: the one the failed update attached to is detached again."""
    in_force_with(testbed, pair, "A", "ebpf")
    with extra_interface(testbed) as extra:
        EBPF_UPDATE[step](monkeypatch)
        done = cli(*load_args(pair["B"][0], testbed, "ebpf"))
        monkeypatch.undo()
        assert done.exit_code == 1 and "injected" in done.output, done.output
        assert not has_our_program(testbed, extra)
    assert_enforcing(testbed, pair, "A", "ebpf")


# Each step of an iptables update, made to fail before its transaction commits.
IPTABLES_UPDATE: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "filling the sets": lambda m: fail_at(m, iptables_backend._Tools, "ipset"),
    "the IPv4 transaction": lambda m: fail_at(m, iptables_backend._Tools, "restore"),
    "the IPv6 transaction": lambda m: fail_at(m, iptables_backend._Tools, "restore", nth=2),
}


@pytest.mark.parametrize("step", list(IPTABLES_UPDATE))
def test_an_iptables_update_that_fails_before_committing_changes_nothing(
        testbed: Testbed, pair: Policies, monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    in_force_with(testbed, pair, "A", "iptables")
    before = rules_and_sets(testbed)
    IPTABLES_UPDATE[step](monkeypatch)
    done = cli(*load_args(pair["B"][0], testbed, "iptables"))
    monkeypatch.undo()
    assert done.exit_code == 1 and "nothing of the new policy was put in force" in done.output, \
        done.output
    assert rules_and_sets(testbed) == before
    assert_enforcing(testbed, pair, "A", "iptables")


def test_an_iptables_update_that_fails_after_committing_is_in_force_and_says_so(
        testbed: Testbed, pair: Policies, monkeypatch: pytest.MonkeyPatch) -> None:
    in_force_with(testbed, pair, "A", "iptables")
    fail_at(monkeypatch, iptables_backend, "_destroy_text")  # the tidying after the switch
    done = cli(*load_args(pair["B"][0], testbed, "iptables"))
    monkeypatch.undo()
    assert done.exit_code == 0, done.output
    assert "warning: the new policy is in force, but tidying up" in done.output
    assert probed(testbed, {k: pair[k] for k in ("A", "B")}) == {"B"}
    record = Scope(testbed.router).read()
    assert record is not None and record["digest"] == pair["B"][1].digest
    again = cli(*load_args(pair["B"][0], testbed, "iptables"))  # finishes what is left
    assert again.exit_code == 0 and "warning" not in again.output, again.output
    assert not iptables_backend.drift(Scope(testbed.router), pair["B"][1])


def rules_and_sets(testbed: Testbed) -> tuple[str, str]:
    """The router's filter rules (without counters) and our sets' contents."""
    rules = "\n".join(line.split("] ", 1)[-1] for tool in ("iptables-save", "ip6tables-save")
                      for line in testbed.run_in(testbed.router, tool, "-t", "filter")
                      .stdout.splitlines() if not line.startswith("#"))
    return rules, testbed.run_in(testbed.router, "ipset", "save").stdout


def test_an_update_that_cannot_fit_beside_the_policy_in_force(
        testbed: Testbed, pair: Policies, monkeypatch: pytest.MonkeyPatch) -> None:
    """Maps an environment bound keeps to one generation of the policy: the first load
    warns, the update moves to new maps within the bound, and one over the bound is
    refused before anything is written, leaving the policy in force, everywhere."""
    isoebpf("unload", "--netns", testbed.router)
    needed = {name: capacity.needed_entries(ir)["classes_v4"] for name, (_, ir) in pair.items()}
    monkeypatch.setenv("ISOEBPF_MAX_CLASSES", str(max(needed.values())))
    first = cli(*load_args(pair["A"][0], testbed, "ebpf"))
    assert first.exit_code == 0, first.output
    assert "warning: the next update needs new maps (a compile): the policy needs" in first.output
    moved = cli(*load_args(pair["B"][0], testbed, "ebpf"))
    assert moved.exit_code == 0, moved.output
    assert "did not fit beside the one in force: moved to new maps" in moved.output, moved.output
    assert_enforcing(testbed, pair, "B", "ebpf")
    monkeypatch.setenv("ISOEBPF_MAX_CLASSES", str(needed["A"] - 1))
    refused = cli(*load_args(pair["A"][0], testbed, "ebpf"))
    assert refused.exit_code == 1, refused.output
    assert "raise ISOEBPF_MAX_CLASSES (" in refused.output and "nothing was changed" in refused.output
    assert_enforcing(testbed, pair, "B", "ebpf")
    isoebpf("unload", "--netns", testbed.router)  # the next test gets maps of the usual size


def test_a_narrower_iface_says_what_it_detached(testbed: Testbed, pair: Policies) -> None:
    in_force_with(testbed, pair, "A", "ebpf")
    narrower = load_args(pair["A"][0], testbed, "ebpf")
    narrower[narrower.index("v-*")] = "v-it*"
    done = cli(*narrower, "--json")
    assert done.exit_code == 0, done.output
    assert len(json.loads(done.stdout)["detached"]) == 3
    in_force_with(testbed, pair, "A", "ebpf")
    done = cli(*narrower)
    assert done.exit_code == 0, done.output
    for host in ("hr1", "hr2", "out1"):
        assert f"detached from v-{host} (tc): no longer matches v-it*" in done.output, done.output
    record = json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout)
    assert sorted(a["ifname"] for a in record["attachments"]) == ["v-it1", "v-it2"]
    assert not has_our_program(testbed, "v-hr1") and has_our_program(testbed, "v-it1")
    # Enforced where it still is: IT's own tries are judged at IT's interfaces.
    assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"
    in_force_with(testbed, pair, "A", "ebpf")


def test_neither_policy_allows_the_neither_tries(testbed: Testbed, pair: Policies) -> None:
    """What assert_neither_connects means: A and B both refuse those tries."""
    for client, proto, target, port in NEITHER:
        for name in ("A", "B"):
            assert expected_outcome(pair[name][1], testbed, client, proto, target, port) != \
                "connected"
