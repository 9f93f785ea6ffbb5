"""The eBPF backend with real sockets: load, verdicts, counters, update, unload."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import policies
from isoebpf import pipeline
from isoebpf.backends.ebpf import bpfsys, capacity, program
from isoebpf.backends.state import LAYOUT, Scope
from isoebpf.cli import main
from isoebpf.errors import BackendError, ProgramRejected
from isoebpf.lab.testbed import Testbed
from tests.conftest import PATHS_TAKEN
from tests.integration.conftest import (
    SEED,
    SEED_RULE_ABOVE,
    WEB,
    assert_clean,
    counts_by_identity,
    isoebpf,
)
from tests.scenarios import IT_HR_TRIES, expected_outcome

# A rejected try must be answered at once, not by a timeout.
PROMPT_MS = 500


def outcomes(testbed: Testbed, policy_path: Path) -> list[tuple[tuple[str, str, str, int], str, str]]:
    ir = pipeline.read(policy_path).ir
    found = []
    for client, proto, target, port in IT_HR_TRIES:
        want = expected_outcome(ir, testbed, client, proto, target, port)
        seen = testbed.probe(client, proto, target, port, timeout=1.0)
        if want in ("refused", "unreachable"):
            assert float(str(seen["ms"])) < PROMPT_MS, f"{client}->{target} {proto}: slow {seen}"
        found.append(((client, proto, target, port), want, str(seen["outcome"])))
    return found


@pytest.mark.parametrize(("mode", "attached_as"), [
    ("tc", "tc"), pytest.param("auto", "tc", marks=pytest.mark.vm), ("xdp", "xdpgeneric")])
def test_seed_policy_verdicts_counters_and_unload(testbed: Testbed, mode: str,
                                                  attached_as: str) -> None:
    try:
        loaded = isoebpf("load", str(SEED), "--netns", testbed.router, "--iface", "v-*",
                         "--mode", mode)
        assert "generation 1" in loaded.stdout and "compiled the program" in loaded.stdout
        for try_, want, seen in outcomes(testbed, SEED):
            assert seen == want, try_
        record = json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout)
        if mode == "auto":
            modes = sorted({a["mode"] for a in record["attachments"]})
            PATHS_TAKEN.append(f"backend {record['backend']}, attached as {', '.join(modes)}")
        moved = {c["rule"]: c["packets"] for c in record["counters"] if c["packets"]}
        for rule in ("allow:0", "default", "hairpin:it", "hairpin:hr", "unfiltered", "established"):
            assert moved.get(rule, 0) > 0, f"counter {rule} did not move: {moved}"
        assert {a["ifname"] for a in record["attachments"]} == {
            testbed.veth(h.name) for h in testbed.hosts}
        assert all(a["mode"] == attached_as and a["state"] == "attached"
                   for a in record["attachments"])
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)
    again = isoebpf("unload", "--netns", testbed.router)
    assert "nothing was loaded" in again.stdout


@pytest.mark.vm
def test_update_is_applied_without_recompiling_and_unload_restores_everything(
    testbed: Testbed, tmp_path: Path,
) -> None:
    opened = tmp_path / "opened.yaml"
    opened.write_text(SEED.read_text().replace(
        "deny_action: reject", "deny_action: drop").replace(
        "ports: [tcp/80]", "ports: [tcp/80, tcp/22, icmp]"))
    try:
        isoebpf("load", str(SEED), "--netns", testbed.router, "--iface", "v-*")
        updated = isoebpf("load", str(opened), "--netns", testbed.router, "--iface", "v-*")
        assert "generation 2" in updated.stdout and "compiled" not in updated.stdout
        for try_, want, seen in outcomes(testbed, opened):
            assert seen == want, try_
        assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "timeout"
        assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "connected"
        same = isoebpf("load", str(opened), "--netns", testbed.router, "--iface", "v-*")
        assert "generation 2" in same.stdout, "loading the same policy again changes nothing"
        # Back to the seed policy: a live ssh session it forbids is cut, web stays.
        ssh, web = testbed.session("hr1", "it1", 22), testbed.session("hr1", "it1", 80)
        try:
            assert ssh.exchange() == web.exchange() == "echoed"
            isoebpf("load", str(SEED), "--netns", testbed.router, "--iface", "v-*")
            assert ssh.exchange() == "reset"
            assert web.exchange() == "echoed"
        finally:
            ssh.close()
            web.close()
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)
    for try_, _, seen in outcomes(testbed, SEED):
        assert seen == "connected", f"{try_} still filtered after unload"


def test_counters_survive_an_update_that_renames_the_rule(testbed: Testbed,
                                                          tmp_path: Path) -> None:
    above = tmp_path / "above.yaml"
    above.write_text(SEED_RULE_ABOVE)
    load = ("--netns", testbed.router, "--iface", "v-*")

    def counted() -> dict[str, tuple[str, int]]:
        return counts_by_identity(json.loads(isoebpf("status", *load[:2], "--json").stdout))

    try:
        isoebpf("load", str(SEED), *load)
        for _ in range(3):
            assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
        before = counted()
        assert before[WEB] == ("allow:0", 3), "each connection's first packet"
        assert "generation 2" in isoebpf("load", str(above), *load).stdout
        after = counted()
        assert after[WEB] == ("allow:1", 3)
        assert after["allow it -> hr udp/53"] == ("allow:0", 0), "a new rule starts at 0"
        assert all(after[rule][1] >= packets for rule, (_, packets) in before.items())
        assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
        # The same policy again writes nothing and carries nothing twice.
        assert "generation 2" in isoebpf("load", str(above), *load).stdout
        assert counted()[WEB] == ("allow:1", 4)
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)


def test_state_from_an_older_layout_is_torn_down_not_reused(testbed: Testbed) -> None:
    scope = Scope(testbed.router)
    scope.pin_dir.mkdir(parents=True)
    scope.write({"backend": "ebpf", "generation": 7, "attachments": []})
    record = json.loads(scope.record_path.read_text())
    scope.record_path.write_text(json.dumps({**record, "layout": 0}))
    try:
        loaded = isoebpf("load", str(SEED), "--netns", testbed.router, "--iface", "v-*")
        assert "removed older state (layout 0 state" in loaded.stdout
        assert "generation 1" in loaded.stdout
        status = json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout)
        assert status["layout"] == LAYOUT and status["programs"]["tc"] > 0
        assert all(a["prog_id"] == status["programs"]["tc"] for a in status["attachments"])
        assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)


def test_auto_falls_back_to_iptables_when_the_kernel_refuses_the_program(
    testbed: Testbed, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise ProgramRejected("the kernel refused the program (E2BIG)")

    monkeypatch.setattr(program, "compile_program", refuse)
    try:
        result = CliRunner().invoke(main, ["load", str(SEED), "--netns", testbed.router,
                                           "--iface", "v-*"])
        assert result.exit_code == 0, result.output
        assert "backend iptables: this kernel refused the eBPF program" in result.output
        assert Scope(testbed.router).read()["backend"] == "iptables"  # type: ignore[index]
        assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "connected"


def test_a_one_rule_change_writes_only_that_rules_entries(testbed: Testbed, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule inserted first, then one rule's port changed, in a 2,000-rule policy: each
    update writes and deletes only those rules' entries in the policy maps (the
    numbering in force is kept, so no other rule's entry moves)."""
    written: dict[str, int] = {}
    deleted: dict[str, int] = {}
    update_packed, delete_many = bpfsys.map_update_packed, bpfsys.map_delete_many

    def counting_update(fd: int, keys: bytes, values: bytes, count: int) -> None:
        name = bpfsys.map_info(fd).name
        written[name] = written.get(name, 0) + count
        update_packed(fd, keys, values, count)

    def counting_delete(fd: int, keys: Sequence[bytes]) -> int:
        name = bpfsys.map_info(fd).name
        deleted[name] = deleted.get(name, 0) + len(keys)
        return delete_many(fd, keys)

    text = policies.scaled_policy(2000)
    steps = [text, text.replace("allow:\n", "allow:\n  - {from: 10.100.9.9, to: 10.101.7.0/24, "
                                            "ports: [udp/53]}\n"),
             policies.changed_policy(2000).replace(
                 "allow:\n", "allow:\n  - {from: 10.100.9.9, to: 10.101.7.0/24, ports: [udp/53]}\n")]
    files = []
    for i, step in enumerate(steps):
        files.append(tmp_path / f"{i}.yaml")
        files[-1].write_text(step)
    load = ["load", "--backend", "ebpf", "--netns", testbed.router, "--iface", "v-*"]
    try:
        first = CliRunner().invoke(main, [*load, str(files[0])])
        assert first.exit_code == 0, first.output
        monkeypatch.setattr(bpfsys, "map_update_packed", counting_update)
        monkeypatch.setattr(bpfsys, "map_delete_many", counting_delete)
        inserted = CliRunner().invoke(main, [*load, str(files[1])])
        assert inserted.exit_code == 0, inserted.output
        # The new rule's entry, and its new class 10.100.9.9/32 (10.101.7.0/24 is named already).
        policy_maps = ("classes_v4", "classes_v6", "exceptions", "hairpins", "allowed")
        assert {m: written.get(m, 0) for m in policy_maps} == {
            "classes_v4": 1, "classes_v6": 0, "exceptions": 0, "hairpins": 0, "allowed": 1}
        assert not any(deleted.get(m) for m in policy_maps), deleted
        written.clear()
        deleted.clear()
        changed = CliRunner().invoke(main, [*load, str(files[2])])
        assert changed.exit_code == 0, changed.output
        # Written into the other slot, which still holds the first policy: the inserted
        # rule and its class catch up there, and the changed port moves.
        assert {m: written.get(m, 0) for m in policy_maps} == {
            "classes_v4": 1, "classes_v6": 0, "exceptions": 0, "hairpins": 0, "allowed": 2}
        assert {m: deleted.get(m, 0) for m in policy_maps} == {
            "classes_v4": 0, "classes_v6": 0, "exceptions": 0, "hairpins": 0, "allowed": 1}
    finally:
        monkeypatch.undo()
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)


def test_a_100k_rule_policy_loads_with_no_setting_and_bounds_it_exceeds_are_named_at_once(
        testbed: Testbed, tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text(policies.policy_text(100_000, ".json"))
    load = ["load", "--backend", "ebpf", "--netns", testbed.router, "--iface", "v-*", str(path)]
    refused = isoebpf(*load, check=False, env={"ISOEBPF_MAX_CLASSES": "1024", "ISOEBPF_MAX_RULES": "4096"})
    assert refused.returncode == 1
    assert "nothing was compiled, nothing was changed" in refused.stderr
    assert "ISOEBPF_MAX_CLASSES=1024 in the environment" in refused.stderr
    assert "ISOEBPF_MAX_RULES=4096 in the environment" in refused.stderr
    assert Scope(testbed.router).read() is None
    try:
        loaded = isoebpf(*load)
        assert "compiled the program" in loaded.stdout
        fill = json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout)["maps"]
        assert 2 * 100_000 <= fill["allowed"]["entries"] <= fill["allowed"]["max_entries"]
        assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)


def test_a_first_load_beyond_the_memory_there_is_is_refused_before_anything_compiles(
        testbed: Testbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with 1 MiB to spare (injected: capacity.Machine.here) and two bounds the
    policy exceeds: one message names all three, and neither the early compile nor the
    load's own ran; nothing is left."""
    path = tmp_path / "p.json"
    path.write_text(policies.policy_text(300, ".json"))
    tight = capacity.Machine(cpus=2, available=2**20, available_from="the test's cgroup", memlock=None)
    compiled: list[object] = []

    def compile_program(*args: object, **kwargs: object) -> None:
        compiled.append(args)
        raise BackendError("compiled")

    monkeypatch.setattr(capacity.Machine, "here", classmethod(lambda cls, *a, **k: tight))
    monkeypatch.setattr(program, "compile_program", compile_program)
    done = CliRunner().invoke(main, ["load", "--backend", "ebpf", "--netns", testbed.router,
                                     "--iface", "v-*", str(path)],
                              env={"ISOEBPF_MAX_CLASSES": "64", "ISOEBPF_MAX_RULES": "128"})
    assert done.exit_code == 1 and not compiled, done.output
    said = done.output.split("nothing was compiled, nothing was changed:\n", 1)[1].splitlines()
    assert "ISOEBPF_MAX_CLASSES=64 in the environment allows 64" in said[0]
    assert "ISOEBPF_MAX_RULES=128 in the environment allows 128" in said[1]
    assert said[2].endswith("MiB, and the test's cgroup leaves 1 MiB")
    assert Scope(testbed.router).read() is None
    assert_clean(testbed)
