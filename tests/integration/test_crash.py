"""SIGKILL anywhere: the CLI and the agent killed at random points of load, update and unload.

After every kill, enforcement is wholly the old policy or wholly the new one
(never absent where a policy was loaded, never a mix): for eBPF the live
generation's map entries are exactly one policy's and every interface carries
the program; for iptables real tries answer as one policy. The next command
succeeds, and at the end nothing is left (pins, attachments, chains, sets,
records). Kill points are drawn from a printed seed: ISOEBPF_CRASH_SEED=N
replays a run.

The CLI is killed as a fork of this process running the CLI's own entry point
(`cli.main`): the same code as `isoebpf load`, minus ~0.5 s of interpreter start,
so a random delay lands inside the command's work rather than in its imports.
The agent is killed as the real `isoebpf agent` process.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from isoebpf.backends import links
from isoebpf.backends.ebpf import backend as ebpf
from isoebpf.backends.ebpf import program
from isoebpf.backends.iptables import backend as iptables_backend
from isoebpf.backends.state import Scope
from isoebpf.cli import main
from isoebpf.ir.tables import IR
from isoebpf.lab.testbed import Testbed
from tests.bpf.harness import by_address, slot_contents, slot_wanted
from tests.integration.conftest import AgentProcess, assert_clean, isoebpf
from tests.integration.test_iptables_traffic import snapshot
from tests.scenarios import expected_outcome

CRASH_SEED = int(os.environ.get("ISOEBPF_CRASH_SEED") or random.randrange(2**32))
# Tries that policies A and B answer differently: they tell which one is in force.
TELLING = [("hr1", "tcp", "it1", 80), ("hr1", "tcp", "it1", 22), ("it1", "tcp", "hr1", 80)]
# Most kills land in eBPF updates (milliseconds each); a first load compiles for seconds
# and an iptables command runs a dozen tools, so those get fewer in CI (x10 in the soak).
KILLS = {"ebpf-load": 2, "ebpf-update": 200, "ebpf-unload": 2, "iptables-load": 2,
         "iptables-update": 10, "iptables-unload": 2, "agent-ebpf": 2, "agent-iptables": 1}
SOAK_FACTOR = 10
# How many times KILLS: CI's run, and `make soak`'s.
SCALES = [pytest.param(1, id="ci"), pytest.param(SOAK_FACTOR, marks=pytest.mark.soak, id="soak")]
# Attempts per kill wanted: a kind whose kills land less often than that fails its count.
ATTEMPTS_PER_KILL = 5
# Every this many landed eBPF update kills, real tries confirm what the maps say.
PROBE_EVERY = 25


@pytest.fixture(scope="module")
def rng() -> random.Random:
    print(f"\ncrash seed {CRASH_SEED} (ISOEBPF_CRASH_SEED={CRASH_SEED} replays it)")
    return random.Random(CRASH_SEED)


def fork_cli(args: Sequence[str]) -> int:
    """Run the CLI in a forked child; its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            result = main.main(args=list(args), standalone_mode=False)
            code = result if isinstance(result, int) else 0
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def run_cli(*args: str) -> None:
    """The CLI's entry point in this process, to completion: it must succeed."""
    result = main.main(args=list(args), standalone_mode=False)
    assert result in (None, 0), f"{args} exited {result}"


def kill_after(pid: int, delay: float) -> bool:
    """SIGKILL `pid` after `delay` s; True if the kill landed (it had not finished)."""
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def attempts(landed: Counter[str], kind: str, wanted: int) -> Iterator[int]:
    """Attempts at killing: until `wanted` kills of `kind` landed, at most
    ATTEMPTS_PER_KILL x `wanted` of them (the caller then asserts the count)."""
    for attempt in range(ATTEMPTS_PER_KILL * wanted):
        if landed[kind] >= wanted:
            return
        yield attempt


def timed(args: Sequence[str]) -> float:
    """How long one unkilled run of the CLI takes (it must succeed)."""
    started = time.monotonic()
    pid = fork_cli(args)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"{args} failed"
    return time.monotonic() - started


def load_args(path: Path, testbed: Testbed, name: str) -> list[str]:
    return ["load", str(path), "--backend", name, "--netns", testbed.router, "--iface", "v-*",
            "--mode", "tc"]


# -- what is in force ----------------------------------------------------------------


def ebpf_in_force(testbed: Testbed, policies: dict[str, tuple[Path, IR]]) -> tuple[str, int]:
    """(which policy the datapath enforces: "A", "B" or "none", on how many interfaces).

    Fails on a mix: a live generation that is neither policy whole."""
    scope = Scope(testbed.router)
    with links.netlink(testbed.router) as sock:
        attached = sum(1 for link in links.links(sock) if link.name.startswith("v-")
                       and links.has_our_tc(sock, link.index))
    if not scope.pin_dir.exists():
        assert attached == 0, "the program is attached but its pins are gone"
        return "none", 0
    try:
        maps = ebpf._open_maps(scope)
    except Exception:
        assert attached == 0, "attached, with some pins missing"
        return "none", 0
    try:
        live = program.active_generation(maps)
        if live == 0:
            assert attached == 0, "attached before a generation was live"
            return "none", 0
        slot = program.slot_of(live)
        # By address: the agent compiles a change under the ids in force, the IRs here are
        # compiled afresh; the same policy either way.
        entries = by_address(slot_contents(maps, slot))
        for name, (_, ir) in policies.items():
            if entries == by_address(slot_wanted(ir, slot)):
                return name, attached
        raise AssertionError(f"generation {live} is neither policy whole")
    finally:
        for fd in maps.values():
            os.close(fd)


def probed(testbed: Testbed, policies: dict[str, tuple[Path, IR]]) -> set[str]:
    """Which policies every telling try's outcome agrees with ("none": no enforcement)."""
    candidates = {name: [expected_outcome(ir, testbed, *t) for t in TELLING]
                  for name, (_, ir) in policies.items()}
    candidates["none"] = ["connected"] * len(TELLING)
    seen = [str(testbed.probe(*t, timeout=1.5)["outcome"]) for t in TELLING]
    return {name for name, want in candidates.items() if want == seen}


def fully(testbed: Testbed) -> int:
    return len(testbed.hosts)


# -- the eBPF backend -------------------------------------------------------------------


@pytest.mark.parametrize("factor", SCALES)
def test_ebpf_killed_anywhere(testbed: Testbed, policies: dict[str, tuple[Path, IR]],
                              rng: random.Random, factor: int) -> None:
    landed: Counter[str] = Counter()
    try:
        _ebpf_kills(testbed, policies, rng, landed, factor)
    finally:
        isoebpf("unload", "--netns", testbed.router)
        print(f"\neBPF kills landed: {dict(landed)} (seed {CRASH_SEED})")
    assert_clean(testbed)
    for kind in ("ebpf-load", "ebpf-update", "ebpf-unload"):
        assert landed[kind] >= KILLS[kind] * factor, landed


def _ebpf_kills(testbed: Testbed, policies: dict[str, tuple[Path, IR]], rng: random.Random,
                landed: Counter[str], factor: int) -> None:
    args = {name: load_args(path, testbed, "ebpf") for name, (path, _) in policies.items()}
    unload = ["unload", "--netns", testbed.router]
    first_load = timed(args["A"])
    update = max(timed(args["B"]), timed(args["A"]))
    unloading = timed(unload)
    # First loads: killed mostly after the compile, where pins and attachments appear.
    for _ in attempts(landed, "ebpf-load", KILLS["ebpf-load"] * factor):
        delay = rng.uniform(0.6, 1.15) * first_load
        if kill_after(fork_cli(args["A"]), delay):
            landed["ebpf-load"] += 1
        in_force, attached = ebpf_in_force(testbed, policies)
        assert in_force in ("A", "none"), in_force
        recovery = rng.choice(["load", "unload"])
        if recovery == "load":
            run_cli(*args["A"])
            assert ebpf_in_force(testbed, policies) == ("A", fully(testbed))
        run_cli(*unload)
        assert_clean(testbed)
    # Updates between A and B: never a gap, never a mix.
    isoebpf(*args["A"])
    current = "A"
    checks = 0
    for _ in attempts(landed, "ebpf-update", KILLS["ebpf-update"] * factor):
        target = "B" if current == "A" else "A"
        hit = kill_after(fork_cli(args[target]), rng.uniform(0, 1.2) * update)
        if hit:
            landed["ebpf-update"] += 1
        in_force, attached = ebpf_in_force(testbed, policies)
        assert in_force in (current, target) and attached == fully(testbed), (in_force, attached)
        if hit and landed["ebpf-update"] % PROBE_EVERY == 0:  # a kill just landed, the 25th, 50th...
            checks += 1
            assert in_force in probed(testbed, policies)
        current = rng.choice(["A", "B"])
        run_cli(*args[current])  # the next command succeeds
        assert ebpf_in_force(testbed, policies) == (current, fully(testbed))
        record = Scope(testbed.router).read()
        assert record is not None and record["digest"] == policies[current][1].digest
    assert checks > 0 and checks == landed["ebpf-update"] // PROBE_EVERY, (checks, landed)
    # Unloads: each interface either still enforces the policy whole, or nothing does.
    for _ in attempts(landed, "ebpf-unload", KILLS["ebpf-unload"] * factor):
        if kill_after(fork_cli(unload), rng.uniform(0, 1.1) * unloading):
            landed["ebpf-unload"] += 1
        in_force, _ = ebpf_in_force(testbed, policies)
        assert in_force in (current, "none"), in_force
        run_cli(*args[current])  # recovery: loading again works from whatever was left
        assert ebpf_in_force(testbed, policies) == (current, fully(testbed))
    isoebpf(*unload)


# -- the iptables backend ---------------------------------------------------------------


@pytest.mark.parametrize("factor", SCALES)
def test_iptables_killed_anywhere(testbed: Testbed, policies: dict[str, tuple[Path, IR]],
                                  rng: random.Random, factor: int) -> None:
    before = snapshot(testbed)
    landed: Counter[str] = Counter()
    args = {name: load_args(path, testbed, "iptables") for name, (path, _) in policies.items()}
    unload = ["unload", "--netns", testbed.router]
    try:
        first = timed(args["A"])
        update = max(timed(args["B"]), timed(args["A"]))
        unloading = timed(unload)
        for kind, command, span in (("iptables-load", "A", first), ("iptables-update", None, update),
                                    ("iptables-unload", "unload", unloading)):
            if kind != "iptables-load":
                isoebpf(*args["A"])
            current = "A" if kind != "iptables-load" else "none"
            for _ in attempts(landed, kind, KILLS[kind] * factor):
                target = command or ("B" if current == "A" else "A")
                argv = unload if target == "unload" else args[target]
                if kill_after(fork_cli(argv), rng.uniform(0, 1.1) * span):
                    landed[kind] += 1
                agreeing = probed(testbed, policies)
                allowed = {current, "none" if target == "unload" else target}
                assert agreeing & allowed, f"{kind}: tries agree with {agreeing}, not {allowed}"
                current = rng.choice(["A", "B"])
                run_cli(*args[current])  # the next command succeeds and enforces, whole
                record = Scope(testbed.router).read()
                assert record is not None and record["digest"] == policies[current][1].digest
                assert iptables_backend.drift(Scope(testbed.router), policies[current][1]) == []
                if kind == "iptables-load":
                    run_cli(*unload)
                    current = "none"
            isoebpf(*unload)
    finally:
        isoebpf("unload", "--netns", testbed.router)
        print(f"\niptables kills landed: {dict(landed)} (seed {CRASH_SEED})")
    assert snapshot(testbed) == before, "something was left behind"
    assert Scope(testbed.router).read() is None
    for kind in ("iptables-load", "iptables-update", "iptables-unload"):
        assert landed[kind] >= KILLS[kind] * factor, landed


# -- the agent --------------------------------------------------------------------------


@pytest.mark.parametrize("factor", SCALES)
@pytest.mark.parametrize("name", ["ebpf", "iptables"])
def test_agent_killed_while_applying(testbed: Testbed, policies: dict[str, tuple[Path, IR]],
                                     rng: random.Random, tmp_path: Path, name: str,
                                     factor: int) -> None:
    """The agent SIGKILLed at a random point after its policy file changed; a new agent
    takes over and converges."""
    options = ("--backend", name, "--mode", "tc", "--repair-interval", "0.3")
    live = tmp_path / "live.yaml"
    texts = {n: path.read_text() for n, (path, _) in policies.items()}
    live.write_text(texts["A"])
    landed = 0
    current = "A"
    try:
        isoebpf(*load_args(live, testbed, name))
        while landed < KILLS[f"agent-{name}"] * factor:
            with AgentProcess(live, testbed.router, *options) as running:
                running.wait_for("applied", timeout=60)
                target = "B" if current == "A" else "A"
                live.write_text(texts[target])
                time.sleep(rng.uniform(0, 0.6))  # the agent polls every 0.2 s, applies in ms
                running.process.kill()
                landed += 1
            if name == "ebpf":
                in_force, attached = ebpf_in_force(testbed, policies)
                assert in_force in (current, target) and attached == fully(testbed)
            else:
                assert probed(testbed, policies) & {current, target}
            with AgentProcess(live, testbed.router, *options) as running:  # the next converges
                running.wait_for("applied", timeout=60)
                current = target
                record = Scope(testbed.router).read()
                assert record is not None and record["digest"] == policies[current][1].digest
    finally:
        isoebpf("unload", "--netns", testbed.router)
        print(f"\nagent ({name}) kills: {landed} (seed {CRASH_SEED})")
    if name == "ebpf":
        assert_clean(testbed)


# -- serialization ---------------------------------------------------------------------------


def test_concurrent_loads_serialize_on_the_lock(testbed: Testbed,
                                               policies: dict[str, tuple[Path, IR]]) -> None:
    """Two loads started together both succeed, one after the other; the last one's policy
    is in force, whole, and the generation moved by two."""
    args = {name: load_args(path, testbed, "ebpf") for name, (path, _) in policies.items()}
    try:
        for _ in range(2):
            run_cli(*args["A"])
            before = Scope(testbed.router).read()
            assert before is not None
            pids = [fork_cli(args["B"]), fork_cli(args["A"])]
            statuses = [os.waitpid(pid, 0)[1] for pid in pids]  # both ended before any assert
            for status in statuses:
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            record = Scope(testbed.router).read()
            assert record is not None
            in_force, attached = ebpf_in_force(testbed, policies)
            assert attached == fully(testbed)
            assert record["digest"] == policies[in_force][1].digest
            # B then A: two new generations; A (unchanged) then B: one.
            assert record["generation"] - before["generation"] == (2 if in_force == "A" else 1)
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)
