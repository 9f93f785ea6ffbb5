"""The command line's contract on real namespaces: what `status` exits with, what
`load --json` and `unload --json` say, and a namespace that does not exist."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from isoebpf.backends.ebpf import entries
from isoebpf.backends.state import Scope
from isoebpf.ir.tables import IR
from isoebpf.lab.testbed import Testbed
from tests.integration.conftest import ROOT, SEED, isoebpf, packets_by_rule


def one_document(out: str) -> dict[str, Any]:
    """--json's stdout: exactly one JSON object, on one line."""
    assert out.endswith("\n") and out.count("\n") == 1, out
    document = json.loads(out)
    assert isinstance(document, dict)
    return document


def status(testbed: Testbed, *more: str) -> subprocess.CompletedProcess[str]:
    return isoebpf("status", "--netns", testbed.router, *more, check=False)


def test_status_exits_1_while_the_last_change_failed_or_a_hook_is_gone(
        testbed: Testbed, policies: dict[str, tuple[Path, IR]], unloaded: None) -> None:
    (path_a, ir_a), (path_b, ir_b) = policies["A"], policies["B"]
    load = ["load", "--backend", "iptables", "--netns", testbed.router]
    scope = Scope(testbed.router)
    scope.clear_failure()  # what an earlier module's refused change may have left
    idle = status(testbed)
    assert idle.returncode == 0, "nothing loaded in a namespace that exists is a valid state"
    assert idle.stdout == f"nothing loaded in namespace {testbed.router}\n"
    nothing = one_document(status(testbed, "--json").stdout)
    assert (nothing["ok"], nothing["backend"], nothing["problems"]) == (True, None, [])

    isoebpf(*load[:1], str(path_a), *load[1:])
    assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
    healthy = status(testbed, "--json")
    assert healthy.returncode == 0 and healthy.stderr == ""
    record = one_document(healthy.stdout)
    assert (record["ok"], record["problems"], record["digest"]) == (True, [], ir_a.digest)
    assert packets_by_rule(record)["allow:0"] > 0

    # A change that cannot be applied (our lock held by another) leaves A in force.
    holder = subprocess.Popen(["flock", "--no-fork", "-x", str(scope.lock_path), "sleep", "30"])
    try:
        time.sleep(0.3)
        refused = isoebpf(*load[:1], str(path_b), *load[1:], check=False,
                          env={"ISOEBPF_LOCK_WAIT": "1"})
        assert refused.returncode == 1 and "fail-closed: the policy in force" in refused.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    failed = status(testbed)
    assert failed.returncode == 1
    assert failed.stdout.startswith("LAST CHANGE FAILED at ")
    assert f"(digest {ir_a.digest[:12]})" in failed.stdout, "the policy in force is still shown"
    assert "allow:0" in failed.stdout and "tracked connections:" in failed.stdout
    assert failed.stderr == "isoebpf: status: the last change failed\n"
    failed_json = status(testbed, "--json")
    assert failed_json.returncode == 1
    record = one_document(failed_json.stdout)
    assert record["ok"] is False and record["problems"] == ["the last change failed"]
    assert record["error"] == "the last change failed"
    assert (record["digest"], record["failure"]["wanted"]) == (ir_a.digest, ir_b.digest)
    assert packets_by_rule(record)["allow:0"] > 0, "the counters are there, failure or not"

    # A change that works ends the failure.
    isoebpf(*load[:1], str(path_b), *load[1:])
    assert status(testbed).returncode == 0

    # Someone flushes FORWARD: our IPv4 jump into the isolation chain is gone.
    testbed.run_in(testbed.router, "iptables", "-F", "FORWARD")
    detached = status(testbed)
    assert detached.returncode == 1
    assert detached.stderr == "isoebpf: status: FORWARD (iptables) detached\n"
    assert "detached" in detached.stdout and "allow:0" in detached.stdout
    record = one_document(status(testbed, "--json").stdout)
    assert record["problems"] == ["FORWARD (iptables) detached"]


@pytest.mark.parametrize("name", ["ebpf", "iptables"])
def test_load_and_unload_json_name_what_was_attached_and_removed(
        testbed: Testbed, policies: dict[str, tuple[Path, IR]], unloaded: None,
        name: str) -> None:
    path, ir = policies["A"]
    scope = Scope(testbed.router)
    args = ["load", str(path), "--backend", name, "--netns", testbed.router, "--iface", "v-*",
            "--mode", "tc", "--json"]
    done = isoebpf(*args)
    assert f"backend {name}: asked for" in done.stderr, "progress goes to stderr"
    loaded = one_document(done.stdout)
    assert (loaded["ok"], loaded["dry_run"], loaded["backend"]) == (True, False, name)
    assert (loaded["digest"], loaded["netns"], loaded["generation"]) == (ir.digest, testbed.router, 1)
    assert loaded["interfaces"] == ["v-*"] and loaded["notes"] == [] and loaded["warnings"] == []
    assert loaded["apply_seconds"] > 0
    attached = {(a["ifname"], a["mode"]) for a in loaded["attachments"]}
    if name == "ebpf":
        assert attached == {(testbed.veth(h.name), "tc") for h in testbed.hosts}
        assert loaded["compiled"] is True and loaded["compile_seconds"] > 0
    else:
        assert attached == {("FORWARD", "iptables")}  # policy A has IPv4 overlays only
    in_force = scope.read()
    assert in_force is not None
    assert [a["ifname"] for a in in_force["attachments"]] == [a["ifname"] for a in loaded["attachments"]]
    assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"

    would = one_document(isoebpf(*args, "--dry-run").stdout)
    assert (would["ok"], would["dry_run"], would["backend"]) == (True, True, name)
    assert "attachments" not in would and scope.read() == in_force, "a dry run changes nothing"

    removed = one_document(isoebpf("unload", "--netns", testbed.router, "--json").stdout)
    assert (removed["ok"], removed["unloaded"], removed["namespace_gone"]) == (True, True, False)
    if name == "ebpf":
        assert set(removed["removed"]) == {f"{testbed.veth(h.name)} (tc)" for h in testbed.hosts} | {
            f"pins under {scope.pin_dir}"}
    else:
        assert "iptables chain dcos-isolation" in removed["removed"], removed
        assert any(r.startswith("iptables FORWARD rule") for r in removed["removed"]), removed
    assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "connected"
    again = one_document(isoebpf("unload", "--netns", testbed.router, "--json").stdout)
    assert (again["removed"], again["unloaded"]) == ([], False)


def test_a_namespace_that_does_not_exist_is_refused_before_anything_is_written() -> None:
    netns = f"isonone{os.getpid() % 100000}"
    scope = Scope(netns)
    said = f"isoebpf: error: no network namespace {netns} ('ip netns list' shows those there are)"
    for args in (["load", str(SEED), "--backend", "iptables"], ["load", str(SEED), "--backend", "ebpf"],
                 ["load", str(SEED), "--dry-run"], ["status"], ["unload"], ["trace", "--timeout", "1"]):
        for json_flag in ([], ["--json"]):
            done = isoebpf(*args, "--netns", netns, *json_flag, check=False)
            assert done.returncode == 1, done
            assert said in done.stderr, done.stderr
            if json_flag:
                assert one_document(done.stdout)["error"].startswith(f"no network namespace {netns}")
            else:
                assert done.stdout == ""
    agent = subprocess.run([sys.executable, "-m", "isoebpf.cli", "agent", str(SEED), "--netns", netns],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert agent.returncode == 1 and said in agent.stderr, agent
    assert not scope.run_dir.exists(), "no failure record, no state record"
    assert not scope.pin_dir.exists() and not scope.lock_path.exists()


@pytest.mark.parametrize("backend", ["ebpf", "iptables"])
def test_a_dry_run_says_what_loading_would_change_and_changes_nothing(
        testbed: Testbed, policies: dict[str, tuple[Path, IR]], unloaded: None, backend: str) -> None:
    (path_a, ir_a), (path_b, ir_b) = policies["A"], policies["B"]
    load = ["load", "--backend", backend, "--netns", testbed.router, "--iface", "v-*"]
    first = one_document(isoebpf(*load, str(path_a), "--dry-run", "--json").stdout)
    assert first["plan"][0] == ("program: compile, pin and attach (a first load)"
                                if backend == "ebpf" else "set: dcos-overlays is missing")
    assert Scope(testbed.router).read() is None, "a dry run writes nothing"
    isoebpf(*load, str(path_a))
    would = one_document(isoebpf(*load, str(path_b), "--dry-run", "--json").stdout)
    if backend == "ebpf":
        plan = entries.diff(entries.tables_of(ir_a), entries.tables_of(ir_b))
        assert would["plan"] == ["generation 1 -> 2: the pinned program is reused", *(
            f"map {name}: write {w} {'entry' if w == 1 else 'entries'}, "
            f"delete {d} {'entry' if d == 1 else 'entries'}"
            for name, (w, d) in plan.counts().items())]
    else:
        assert "chain: iptables dcos-isolation is missing or changed" in would["plan"]
    assert Scope(testbed.router).read()["digest"] == ir_a.digest, "still A after the dry run"
    assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
    isoebpf(*load, str(path_b))
    again = one_document(isoebpf(*load, str(path_b), "--dry-run", "--json").stdout)
    assert again["plan"] == (["generation 2 -> 3: the pinned program is reused", "maps: no entry changes"]
                             if backend == "ebpf" else ["nothing: this policy is in force as it is"])
    assert Scope(testbed.router).read()["digest"] == ir_b.digest
