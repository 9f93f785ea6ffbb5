"""A policy that outgrows the eBPF maps in force moves to larger ones: no packet meets a
mix of policies, and tracked connections live on."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from isoebpf import pipeline
from isoebpf.backends import enforcer
from isoebpf.backends.ebpf import backend as ebpf
from isoebpf.backends.state import Scope
from isoebpf.cli import main
from isoebpf.errors import BackendError
from isoebpf.lab.testbed import Testbed
from tests.integration.conftest import SEED, assert_clean, isoebpf
from tests.integration.test_crash import fork_cli
from tests.integration.test_update_under_traffic import LOOPS, Clients
from tests.scenarios import expected_outcome

# Policy B opens hr -> it tcp/22 (A refuses it: the tries tell which is in force) and
# names 100 hosts of its own, classes the maps of A (bounded to 64) cannot hold.
HOSTS = "".join(f"  - {{from: 192.168.77.{n}, to: 10.250.77.{n}, ports: [tcp/9000]}}\n"
                for n in range(1, 101))
POLICY_B = SEED.read_text().replace("allow:\n", "allow:\n  - {from: hr, to: it, ports: [tcp/22]}\n" + HOSTS)


@pytest.mark.parametrize("mode", ["tc", "xdp"])
def test_a_policy_that_outgrows_the_maps_moves_to_larger_ones_under_traffic(
        testbed: Testbed, tmp_path: Path, mode: str) -> None:
    path_a, path_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    path_a.write_text(SEED.read_text())
    path_b.write_text(POLICY_B)
    ir_a, ir_b = pipeline.read(path_a).ir, pipeline.read(path_b).ir
    scope = Scope(testbed.router)
    expected = {client: [(expected_outcome(ir_a, testbed, client, *t),
                          expected_outcome(ir_b, testbed, client, *t)) for t in tries]
                for client, tries in LOOPS.items()}
    isoebpf("load", str(path_a), "--backend", "ebpf", "--netns", testbed.router, "--iface", "v-*",
            "--mode", mode, env={"ISOEBPF_MAX_CLASSES": "64"})
    clients: Clients | None = None
    web = testbed.session("hr1", "it1", 80)
    try:
        clients = Clients(testbed)
        time.sleep(1.0)  # every loop running before the change
        assert web.exchange() == "echoed"
        _, report, _ = enforcer.load("ebpf", "ebpf", ir_b, scope, ["v-*"], mode, str(path_b))
        assert "ISOEBPF_MAX_CLASSES=16384" in report.grown and report.compiled
        assert report.generation == 2
        assert web.exchange() == "echoed", "a tracked connection lived through the move"
        time.sleep(1.0)
        clients.stop()
        record = json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout)
        assert record["maps"]["classes_v4"]["max_entries"] == 16384 and record["digest"] == ir_b.digest
        assert all(a["state"] == "attached" for a in record["attachments"])
        assert not (scope.pin_dir / "next").exists()
        assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "connected"
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


@pytest.mark.parametrize("how", ["failing", "killed"])
def test_a_move_that_fails_or_is_killed_leaves_the_old_program_and_policy_everywhere(
        testbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """The step after every interface switched programs fails (or SIGKILLs the command):
    the old program goes back on each (at once, or by the next load), the new one's pins
    go, and the next load moves to larger maps after all."""
    path_a, path_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    path_a.write_text(SEED.read_text())
    path_b.write_text(POLICY_B)
    load_b = ["load", str(path_b), "--backend", "ebpf", "--netns", testbed.router, "--iface", "v-*",
              "--mode", "tc"]
    isoebpf(*load_b[:1], str(path_a), *load_b[2:], env={"ISOEBPF_MAX_CLASSES": "64"})
    scope = Scope(testbed.router)
    try:
        with monkeypatch.context() as patched:
            if how == "failing":
                patched.setattr(ebpf, "_attach_all", failing)
                done = CliRunner().invoke(main, load_b)
                assert done.exit_code == 1 and "injected" in done.output, done.output
            else:
                patched.setattr(ebpf, "_attach_all", dying)
                pid = fork_cli(load_b)
                _, status = os.waitpid(pid, 0)
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
                assert (scope.pin_dir / "next").exists(), "killed half way, as meant"
        if how == "failing":
            assert not (scope.pin_dir / "next").exists()
            assert scope.read()["digest"] == pipeline.read(path_a).ir.digest  # type: ignore[index]
            assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "refused"
            assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
        done = CliRunner().invoke(main, load_b)
        assert done.exit_code == 0 and "moved to new maps" in done.output, done.output
        assert not (scope.pin_dir / "next").exists()
        assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "connected"
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)


def failing(*args: object, **kwargs: object) -> None:
    raise BackendError("injected: attaching failed")


def dying(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)
