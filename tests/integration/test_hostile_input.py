"""Hostile input against a running policy: nothing applied, the running policy untouched.

With a policy enforced in the testbed's router (each backend in turn), every
file of the bad-policy corpus and every oversized policy (one over a bound
ISOEBPF_MAX_* sets in the environment) goes to `isoebpf load` (in process: one
testbed, no recompiling). Each must exit 1 with its located errors (or,
oversized, the map, the count, the limit and the constant to raise), and leave
the state record, the pins and every policy map (eBPF) or every rule and set
(iptables) exactly as they were. An oversized first load is refused before the
program is even compiled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from packaging.requirements import Requirement

from isoebpf import pipeline
from isoebpf.backends import state
from isoebpf.backends.ebpf import bpfsys
from isoebpf.backends.state import Scope
from isoebpf.cli import main
from isoebpf.lab.testbed import Testbed
from tests.conftest import require
from tests.integration.conftest import ROOT, SEED, assert_clean
from tests.integration.test_iptables_traffic import snapshot
from tests.policygen import many_exceptions, many_overlays, many_ports, many_ranges

CORPUS = sorted((ROOT / "tests" / "policies" / "bad").glob("*.yaml"))
LOCATED = re.compile(r"^\S+\.yaml:\d+:\d+: error: ", re.MULTILINE)

# Bounds that keep the running program small, so that oversized policies stay small files.
SMALL = {"ISOEBPF_MAX_CLASSES": "64", "ISOEBPF_MAX_HAIRPINS": "16", "ISOEBPF_MAX_EXCEPTIONS": "16",
         "ISOEBPF_MAX_ALLOWED": "256", "ISOEBPF_MAX_RULES": "128"}
# The maps a policy is written to, and the two words that say which one is in force.
POLICY_MAPS = ("classes_v4", "classes_v6", "exceptions", "hairpins", "allowed", "config", "params")


# name -> (policy text, the constant its refusal must name); each over one SMALL limit.
OVERSIZED = {
    "classes": (many_overlays(70, isolated=True), "ISOEBPF_MAX_CLASSES"),
    "hairpins": (many_overlays(20), "ISOEBPF_MAX_HAIRPINS"),
    "exceptions": (many_exceptions(20), "ISOEBPF_MAX_EXCEPTIONS"),
    "allowed": (many_ranges(21), "ISOEBPF_MAX_ALLOWED"),
    "rules": (many_ports(124), "ISOEBPF_MAX_RULES"),
}


def load(testbed: Testbed, path: Path, *more: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["load", str(path), "--netns", testbed.router, "--iface", "v-*", *more],
                              env=env)


def ebpf_state(scope: Scope) -> dict[str, object]:
    """The record, the pins, and every policy map's entries, as bytes."""
    found: dict[str, object] = {"record": scope.record_path.read_bytes(),
                                "pins": sorted(p.name for p in scope.pin_dir.iterdir())}
    for name in POLICY_MAPS:
        fd = bpfsys.obj_get(str(scope.pin_dir / name))
        try:
            info = bpfsys.map_info(fd)
            found[name] = sorted((key, bpfsys.map_lookup(fd, key, info.value_size))
                                 for key in bpfsys.map_keys(fd, info.key_size))
        finally:
            os.close(fd)
    return found


def iptables_state(testbed: Testbed) -> dict[str, object]:
    return {"record": Scope(testbed.router).record_path.read_bytes(), **snapshot(testbed)}


@pytest.fixture
def oversized(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, (text, _) in OVERSIZED.items():
        paths[name] = tmp_path / f"oversized-{name}.yaml"
        paths[name].write_text(text)
    return paths


def refuse_all(testbed: Testbed, paths: list[Path], state: Callable[[], object], *more: str,
               env: dict[str, str] | None = None) -> int:
    """Each policy in `paths` against the running one; returns how many were refused."""
    before = state()
    for path in paths:
        result = load(testbed, path, *more, env=env)
        assert result.exit_code == 1, f"{path.name}: exit {result.exit_code}\n{result.output}"
        if path.parent.name == "bad":
            assert LOCATED.search(result.output) and "nothing was applied" in result.output, path.name
        else:
            macro = OVERSIZED[path.stem.removeprefix("oversized-")][1]
            assert "nothing was changed" in result.output and f"raise {macro} (" in result.output, \
                result.output
        assert state() == before, f"{path.name} changed the running policy"
    return len(paths)


# Forged ICMP errors with real traffic: a raw socket sends them, another waits for them.
LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    while sys.argv[1].encode() not in s.recv(65535):
        pass
    print("arrived")
except TimeoutError:
    print("nothing")
"""
SEND = """
import socket, sys, netaddr
from isoebpf.ir.evaluate import Packet
from tests.packets import Wire, ip_packet
src, dst, quoted_src, quoted_dst, port, marker = sys.argv[1:]
ip = netaddr.IPAddress
inner = Packet(ip(quoted_src), ip(quoted_dst), 6, sport=40000, dport=int(port))
error = Packet(ip(src), ip(dst), 1, icmp_type=3, icmp_code=3, inner=inner)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(ip_packet(error, Wire(payload=marker.encode())), (dst, 0))
"""


def forged_error_arrives(testbed: Testbed, sender: str, receiver: str, quoted: tuple[str, str, int]) -> bool:
    """Whether an ICMP port-unreachable from `sender` to `receiver`, quoting a TCP
    packet quoted[0] -> quoted[1]:quoted[2] that nobody sent, reaches `receiver`."""
    marker = f"isoebpf-forged-{sender}-{receiver}-{quoted[2]}"
    listener = subprocess.Popen(["ip", "netns", "exec", testbed.netns(receiver), sys.executable, "-c", LISTEN,
                                 marker, "1.5"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        src, dst = testbed.address_of(sender), testbed.address_of(receiver)
        testbed.run_in(testbed.netns(sender), sys.executable, "-c", SEND, src, dst,
                       testbed.address_of(quoted[0]), testbed.address_of(quoted[1]), str(quoted[2]), marker)
        return listener.stdout.readline().strip() == "arrived"
    finally:
        listener.kill()
        listener.wait()
        if listener.stdout:
            listener.stdout.close()


def assert_forged_errors_open_nothing(testbed: Testbed) -> None:
    # The channel works: an error from outside every overlay is not filtered.
    assert forged_error_arrives(testbed, "out1", "it1", ("it1", "out1", 22))
    # it -> hr is denied: an error quoting such a flow, which nobody opened, stays out ...
    assert not forged_error_arrives(testbed, "hr1", "it1", ("it1", "hr1", 22))
    # ... hr -> it is allowed only on tcp/80: an error about a tcp/22 flow from it1 too.
    assert not forged_error_arrives(testbed, "it1", "hr1", ("hr1", "it1", 22))
    # And the flows they name are still refused.
    assert testbed.probe("it1", "tcp", "hr1", 22, timeout=1.0)["outcome"] == "refused"
    assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "refused"


def test_an_oversized_first_load_is_refused_before_compiling(testbed: Testbed, oversized: dict[str, Path]) -> None:
    for name, path in oversized.items():
        result = load(testbed, path, "--backend", "ebpf", env=SMALL)
        if result.exit_code == 0:
            CliRunner().invoke(main, ["unload", "--netns", testbed.router])
        assert result.exit_code == 1, result.output
        assert f"raise {OVERSIZED[name][1]} (" in result.output, result.output
        assert "compiled the program" not in result.output
        assert_clean(testbed)


def test_iptables_bad_policies_leave_the_running_one_untouched_and_status_shows_only_ours(
    testbed: Testbed, oversized: dict[str, Path],
) -> None:
    for tool in ("iptables", "ipset"):
        if shutil.which(tool) is None:
            require(tool, "not installed")
    # Another tenant's chain and set in the same namespace: never ours to show or touch.
    testbed.run_in(testbed.router, "ipset", "create", "tenant-secret", "hash:net")
    testbed.run_in(testbed.router, "iptables", "-N", "tenant-chain")
    testbed.run_in(testbed.router, "iptables", "-A", "tenant-chain", "-s", "198.51.100.77",
                   "-m", "comment", "--comment", "tenant-secret", "-j", "DROP")
    try:
        result = load(testbed, SEED, "--backend", "iptables")
        assert result.exit_code == 0, result.output
        tried = refuse_all(testbed, CORPUS, lambda: iptables_state(testbed), "--backend", "iptables")
        assert tried == len(CORPUS) >= 50
        # Switching to eBPF with a policy its maps cannot hold keeps the iptables enforcement.
        before = iptables_state(testbed)
        switched = load(testbed, oversized["classes"], "--backend", "ebpf", env=SMALL)
        assert switched.exit_code == 1 and "raise ISOEBPF_MAX_CLASSES (" in switched.output, switched.output
        assert iptables_state(testbed) == before
        assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"
        assert_forged_errors_open_nothing(testbed)
        shown = CliRunner().invoke(main, ["status", "--netns", testbed.router, "--json"]).output
        assert "tenant" not in shown and "198.51.100.77" not in shown
        assert "10.250.1.10" not in shown, "status shows the policy's state, never connections"
    finally:
        CliRunner().invoke(main, ["unload", "--netns", testbed.router])
        testbed.run_in(testbed.router, "iptables", "-F", "tenant-chain", check=False)
        testbed.run_in(testbed.router, "iptables", "-X", "tenant-chain", check=False)
        testbed.run_in(testbed.router, "ipset", "destroy", "tenant-secret", check=False)


# The rest share one running eBPF policy (one compile).


@pytest.fixture(scope="module")
def ebpf_running(testbed: Testbed) -> Iterator[Scope]:
    scope = Scope(testbed.router)
    try:
        result = load(testbed, SEED, "--backend", "ebpf", env=SMALL)
        assert result.exit_code == 0, result.output
        yield scope
    finally:
        CliRunner().invoke(main, ["unload", "--netns", testbed.router])
    assert_clean(testbed)


def test_ebpf_bad_and_oversized_policies_leave_the_running_one_untouched(
    testbed: Testbed, ebpf_running: Scope, oversized: dict[str, Path],
) -> None:
    tried = refuse_all(testbed, [*CORPUS, *oversized.values()], lambda: ebpf_state(ebpf_running),
                       "--backend", "ebpf", env=SMALL)
    assert tried == len(CORPUS) + len(OVERSIZED) >= 55
    # And the running policy still works: the same policy again is no change at all.
    again = load(testbed, SEED, "--backend", "ebpf")
    assert again.exit_code == 0 and "generation 1" in again.output, again.output
    assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"
    assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"


def test_forged_icmp_errors_open_nothing_in_real_traffic(testbed: Testbed, ebpf_running: Scope) -> None:
    assert_forged_errors_open_nothing(testbed)


def venv_dependencies() -> Iterator[metadata.Distribution]:
    """The distributions isoebpf needs at run time, direct or not, that live in our venv
    (the rest are Debian's, readable by everyone)."""
    seen, todo = set(), ["isoebpf"]
    while todo:
        for text in metadata.distribution(todo.pop()).requires or []:
            needed = Requirement(text)
            if (needed.marker is None or needed.marker.evaluate({"extra": ""})) and needed.name not in seen:
                seen.add(needed.name)
                todo.append(needed.name)
    for name in seen:
        dist = metadata.distribution(name)
        if Path(str(dist.locate_file(""))).resolve().is_relative_to(Path(sys.prefix).resolve()):
            yield dist


@pytest.fixture(scope="module")
def readable_cli() -> Iterator[Path]:
    """The CLI, its venv dependencies and the seed policy, copied where uid 65534 can read
    them: the clone may sit under a directory only root may enter (`mktemp -d`, /root)."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # /tmp: every user may pass through it
    try:
        shutil.copytree(ROOT / "control", folder / "isoebpf")
        for dist in venv_dependencies():
            for file in dist.files or []:
                if ".." not in file.parts:  # its scripts, in the venv's bin/
                    (folder / file).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(Path(str(dist.locate_file(file))), folder / file)
        shutil.copyfile(SEED, folder / SEED.name)
        # Whatever the clone's modes and the umask.
        for parent, _, files in os.walk(folder):
            os.chmod(parent, 0o755)
            for name in files:
                os.chmod(os.path.join(parent, name), 0o644)
        yield folder
    finally:
        shutil.rmtree(folder)


def as_nobody(cli: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI (a readable copy of it) in a process of its own, as uid/gid 65534 with no
    groups and no capabilities, run by the venv's interpreter outside the venv."""
    return subprocess.run([str(Path(sys.executable).resolve()), "-m", "isoebpf.cli", *args],
                          capture_output=True, text=True, cwd=cli, env={**os.environ, "PYTHONPATH": str(cli)},
                          user=65534, group=65534, extra_groups=[], check=False)


def test_only_root_changes_state(testbed: Testbed, ebpf_running: Scope, readable_cli: Path) -> None:
    before = ebpf_state(ebpf_running)
    for args in (["load", str(readable_cli / SEED.name)], ["unload"]):
        done = as_nobody(readable_cli, *args, "--netns", testbed.router)
        assert done.returncode == 1, done
        assert f"'{args[0]}' changes this host's packet filtering, and uid 65534 may not" in done.stderr
    seen = as_nobody(readable_cli, "status", "--netns", testbed.router, "--json")
    assert seen.returncode == 1 and "isoebpf's state is root's alone; run as root" in seen.stderr, seen
    assert "digest" not in seen.stdout
    assert ebpf_state(ebpf_running) == before


def test_state_is_roots_alone(ebpf_running: Scope) -> None:
    for folder in (state.BPFFS, ebpf_running.pin_dir, state.RUN_DIR, ebpf_running.run_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        assert folder.stat().st_uid == 0, folder
    files = [*ebpf_running.pin_dir.iterdir(), ebpf_running.record_path, ebpf_running.lock_path]
    assert len(files) > 10
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_policy_others_can_write_is_refused_unless_forced(
    testbed: Testbed, ebpf_running: Scope, tmp_path: Path,
) -> None:
    shared = tmp_path / "shared.yaml"
    shared.write_text(SEED.read_text())
    shared.chmod(0o666)
    before = ebpf_state(ebpf_running)
    refused = load(testbed, shared, "--backend", "ebpf")
    assert refused.exit_code == 1 and f"refusing {shared}: " in refused.output, refused.output
    assert ebpf_state(ebpf_running) == before
    forced = load(testbed, shared, "--backend", "ebpf", "--force")
    assert forced.exit_code == 0 and "used anyway (--force)" in forced.output, forced.output
    again = load(testbed, SEED, "--backend", "ebpf")
    assert again.exit_code == 0, again.output


STATUS_KEYS = {"backend", "netns", "digest", "policy", "loaded_at", "generation", "rules", "overlays",
               "on_failure", "failure", "attachments", "layout", "compile_seconds", "counters",
               "connections", "maps", "programs", "ok", "problems", "carried", "audit"}


def test_status_shows_the_policy_counters_and_our_objects_only(
    testbed: Testbed, ebpf_running: Scope, tmp_path: Path,
) -> None:
    commented = tmp_path / "commented.yaml"
    commented.write_text("# deploy token: hunter2-secret\n" + SEED.read_text())
    other = Scope("isoebpf-other-tenant")
    other.write({"backend": "ebpf", "policy": "/tenant/secret-policy.yaml", "digest": "f" * 64})
    try:
        assert load(testbed, commented, "--backend", "ebpf").exit_code == 0
        testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)
        shown = CliRunner().invoke(main, ["status", "--netns", testbed.router, "--json"]).output
        record = json.loads(shown)
        assert set(record) <= STATUS_KEYS, set(record) - STATUS_KEYS
        ir = pipeline.read(SEED).ir
        assert [c["rule"] for c in record["counters"]] == [r.name for r in ir.rules]
        assert {a["ifname"] for a in record["attachments"]} == {testbed.veth(h.name) for h in testbed.hosts}
        for secret in ("hunter2", "tenant", "10.250.1.10", "192.168.1.10"):
            assert secret not in shown, f"status shows {secret}"
        assert isinstance(record["connections"], int)
    finally:
        other.forget()
        load(testbed, SEED, "--backend", "ebpf")
