"""The environment misbehaving under us: bpffs gone, another tool's programs in our place,
interfaces vanishing mid-load, locks held by others, a full connection table, and a
change that cannot be applied (--on-failure closed or open)."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bcc import BPF

from isoebpf.backends import enforcer, links
from isoebpf.backends.ebpf import program
from isoebpf.backends.iptables import backend as iptables_backend
from isoebpf.backends.state import Scope
from isoebpf.ir.tables import IR
from isoebpf.lab.testbed import Testbed, default_prefix
from isoebpf.service.agent import Stats
from isoebpf.service.metrics import StatusCollector
from tests.integration.conftest import ROOT, assert_clean, isoebpf
from tests.integration.test_crash import ebpf_in_force, fork_cli, fully, load_args, probed

CLI = f"{shlex.quote(sys.executable)} -m isoebpf.cli"  # for shell scripts: this interpreter's CLI


@pytest.fixture(scope="module", autouse=True)
def nothing_left(testbed: Testbed) -> Iterator[None]:
    yield
    isoebpf("unload", "--netns", testbed.router)
    assert_clean(testbed)


@pytest.fixture
def enforcing_a(testbed: Testbed, policies: dict[str, tuple[Path, IR]]) -> None:
    """Policy A in force with eBPF; compiled only when the test before left nothing loaded."""
    isoebpf(*load_args(policies["A"][0], testbed, "ebpf"))


def test_bpffs_unmounted_under_us(testbed: Testbed, policies: dict[str, tuple[Path, IR]],
                                  unloaded: None, tmp_path: Path) -> None:
    """In a private mount namespace (the host's bpffs is untouched): load, unmount bpffs
    (the pins vanish, the programs stay attached), then status says so and load
    remounts, tears down the orphaned attachments and enforces again."""
    args = " ".join(load_args(policies["A"][0], testbed, "ebpf"))
    status = tmp_path / "status.json"
    script = textwrap.dedent(f"""\
        set -u
        umount /sys/fs/bpf; umount /sys/fs/bpf 2>/dev/null  # our copy of the host's mounts
        mount -t bpf bpf /sys/fs/bpf
        {CLI} {args} >/dev/null || exit 10
        umount /sys/fs/bpf
        mountpoint -q /sys/fs/bpf && exit 11
        {CLI} status --netns {testbed.router}; echo "status exit $?"
        {CLI} {args}; echo "load exit $?"
        {CLI} status --netns {testbed.router} --json > {status}
        python3 - {status} <<'EOF'
        import json, sys; record = json.load(open(sys.argv[1]))
        print("attached", sorted(a["state"] for a in record["attachments"]))
        EOF
        {CLI} unload --netns {testbed.router}; echo "unload exit $?"
        """)
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, cwd=ROOT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "pins under" in out and "are gone (was bpffs unmounted?)" in out, out
    assert "status exit 1" in out, out
    assert "load exit 0" in out and "without its pins" in out, out
    assert f"attached {['attached'] * fully(testbed)}" in out, out
    assert "unload exit 0" in out, out


def _foreign_xdp() -> BPF:
    bpf = program.bcc_compile(b"int foreign_xdp(struct xdp_md *ctx) { return XDP_PASS; }", [])
    bpf.load_func(b"foreign_xdp", BPF.XDP)
    return bpf


def test_another_xdp_program_is_refused_unless_forced(
        testbed: Testbed, policies: dict[str, tuple[Path, IR]], unloaded: None) -> None:
    foreign = _foreign_xdp()
    fd = foreign.funcs[b"foreign_xdp"].fd
    veth = testbed.veth("it1")
    link: links.Link | None = None
    theirs: tuple[int, str | None] | None = None
    try:
        with links.netlink(testbed.router) as sock:
            link = next(x for x in links.links(sock) if x.name == veth)
            links.attach_xdp(sock, link, fd, "xdpgeneric", replace=False)
            theirs = links.xdp_state(sock, link.index)
        refused = isoebpf(*load_args(policies["A"][0], testbed, "ebpf")[:-2], "--mode", "xdp",
                          check=False)
        assert refused.returncode == 1
        assert f"{veth} already has an XDP program that is not isoebpf's" in refused.stderr
        assert "--force" in refused.stderr
        with links.netlink(testbed.router) as sock:
            assert links.xdp_state(sock, link.index) == theirs, "clobbered silently"
        assert not Scope(testbed.router).pin_dir.exists() and Scope(testbed.router).read() is None
        forced = isoebpf(*load_args(policies["A"][0], testbed, "ebpf")[:-2], "--mode", "xdp",
                         "--force")
        assert "generation 1" in forced.stdout
        with links.netlink(testbed.router) as sock:
            assert links.xdp_state(sock, link.index)[0] != theirs[0]
    finally:
        # Theirs first, whatever failed: still attached (never displaced by ours, or no id
        # read back, when ours was not loaded yet), it goes; then ours, which `unloaded` checks.
        try:
            if link is not None:
                with links.netlink(testbed.router) as sock:
                    if theirs is None or links.xdp_state(sock, link.index)[0] == theirs[0]:
                        links.detach_xdp(sock, link, "xdpgeneric")
        finally:
            foreign.cleanup()
            isoebpf("unload", "--netns", testbed.router, check=False)


def _foreign_tc_filter(testbed: Testbed, veth: str, fd: int, prio: int) -> None:
    with links.netlink(testbed.router) as sock:
        (index,) = sock.link_lookup(ifname=veth)
        sock.tc("add-filter", "bpf", index, 1, fd=fd, name="foreign_tc",
                parent=links.CLSACT_INGRESS, prio=prio, classid=1, direct_action=True)


def _filters(testbed: Testbed, veth: str) -> str:
    return testbed.run_in(testbed.router, "tc", "filter", "show", "dev", veth, "ingress").stdout


def test_another_tc_filter_in_our_place_is_refused_unless_forced(
        testbed: Testbed, policies: dict[str, tuple[Path, IR]], unloaded: None) -> None:
    """A filter at our priority would be replaced: refused without --force. One at another
    priority is left alone: ours goes beside it, and unload leaves it there."""
    veth = testbed.veth("hr1")
    foreign = program.bcc_compile(b"int foreign_tc(struct __sk_buff *skb) { return 0; }", [])
    try:
        fd = foreign.load_func(b"foreign_tc", BPF.SCHED_CLS).fd
        testbed.run_in(testbed.router, "tc", "qdisc", "add", "dev", veth, "clsact")
        _foreign_tc_filter(testbed, veth, fd, 7)
        refused = isoebpf(*load_args(policies["A"][0], testbed, "ebpf"), check=False)
        assert refused.returncode == 1
        assert f"{veth} already has a TC ingress filter that is not isoebpf's" in refused.stderr
        assert "foreign_tc" in _filters(testbed, veth), "clobbered silently"
        assert not Scope(testbed.router).pin_dir.exists()
        isoebpf(*load_args(policies["A"][0], testbed, "ebpf"), "--force")
        assert ebpf_in_force(testbed, policies) == ("A", fully(testbed))
        assert "foreign_tc" not in _filters(testbed, veth)
        # Another priority is another tool's business: ours goes beside it, unload leaves it.
        _foreign_tc_filter(testbed, veth, fd, 3)
        isoebpf(*load_args(policies["B"][0], testbed, "ebpf"))
        shown = _filters(testbed, veth)
        assert "foreign_tc" in shown and "isoebpf" in shown, shown
        isoebpf("unload", "--netns", testbed.router)
        shown = _filters(testbed, veth)
        assert "foreign_tc" in shown and "isoebpf" not in shown, shown
    finally:
        # Theirs first, whatever failed (the qdisc takes every filter on it along); then
        # ours, which `unloaded` checks.
        try:
            testbed.run_in(testbed.router, "tc", "qdisc", "del", "dev", veth, "clsact", check=False)
        finally:
            foreign.cleanup()
            isoebpf("unload", "--netns", testbed.router, check=False)


def test_xtables_lock_held_by_someone_else(testbed: Testbed, policies: dict[str, tuple[Path, IR]],
                                           tmp_path: Path) -> None:
    """iptables-nft does not use the xtables lock (nf_tables transactions serialize in
    the kernel): a load proceeds while another process holds it. Held only inside a
    private mount namespace, whose /run is a tmpfs of its own, so nobody else is
    disturbed and the host's /run/xtables.lock (absent until iptables first runs) is
    neither needed nor touched."""
    args = " ".join(load_args(policies["A"][0], testbed, "iptables"))
    (tmp_path / "host-run").mkdir()
    host = shlex.quote(str(tmp_path / "host-run"))
    script = textwrap.dedent(f"""\
        set -u
        mount --rbind /run {host} && mount -t tmpfs -o mode=0755 run /run || exit 10
        # What the CLI and `ip netns exec` use under /run: the host's own.
        mkdir -p -m 0700 {host}/isoebpf; mkdir /run/isoebpf /run/netns
        mount --bind {host}/isoebpf /run/isoebpf && mount --rbind {host}/netns /run/netns || exit 10
        touch /run/xtables.lock
        flock --no-fork -x /run/xtables.lock sleep 60 </dev/null >/dev/null 2>&1 & holder=$!
        sleep 0.3; flock -n /run/xtables.lock true; echo "lock free $?"
        timeout 60 {CLI} {args}; echo "load exit $?"
        {CLI} unload --netns {testbed.router} >/dev/null; echo "unload exit $?"
        kill $holder
        """)
    try:
        done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, cwd=ROOT)
    finally:
        isoebpf("unload", "--netns", testbed.router)
    out = done.stdout + done.stderr
    assert iptables_backend.flavour() == "nft", "iptables-legacy waits -w 10 s, then fails"
    assert "lock free 1" in out and "load exit 0" in out and "unload exit 0" in out, out


def test_full_connection_table_keeps_allowed_directions_flowing(
        testbed: Testbed, policies: dict[str, tuple[Path, IR]], unloaded: None) -> None:
    """The conntrack map is an LRU of 64 entries here: a flood of allowed flows fills it
    and evicts the oldest; an open session whose entry went is re-admitted by its
    initiator's next packet, and new allowed connections still open."""
    isoebpf(*load_args(policies["A"][0], testbed, "ebpf"), env={"ISOEBPF_MAX_CONNECTIONS": "64"})
    session = testbed.session("hr1", "it1", 80)
    try:
        assert session.exchange() == "echoed"
        flood = subprocess.Popen(
            ["ip", "netns", "exec", testbed.netns("it1"), sys.executable, "-m",
             "isoebpf.lab.probe", "loop", "--try", "udp", testbed.address_of("it2"), "53",
             "--try", "tcp", testbed.address_of("it2"), "22", "--pause", "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        assert flood.stdin is not None and flood.stdout is not None
        flood.stdin.close()
        attempts = [json.loads(line) for line in flood.stdout]
        flood.wait()
        flood.stdout.close()
        assert len(attempts) > 4 * 64 and all(a["outcome"] == "connected" for a in attempts)
        record = json.loads(isoebpf("status", "--netns", testbed.router, "--json").stdout)
        fill = record["maps"]["conntrack"]
        assert fill["max_entries"] == 64 and 0 < fill["entries"] <= 64, fill  # evicting, full
        assert session.exchange() == "echoed"  # initiator's packet re-admits the session
        assert probed(testbed, policies) == {"A"}
    finally:
        session.close()


def test_interface_deleted_mid_load(testbed: Testbed, policies: dict[str, tuple[Path, IR]],
                                    enforcing_a: None) -> None:
    """An interface matching the globs is deleted at a random point of a load: the load
    succeeds on the interfaces that remain, and the next one too."""
    rng = random.Random(8)
    current = "A"
    for round_ in range(12):
        name = f"v-gone{round_}"
        subprocess.run(["ip", "-n", testbed.router, "link", "add", name, "type", "veth", "peer",
                        "name", f"p-gone{round_}"], check=True)
        subprocess.run(["ip", "-n", testbed.router, "link", "set", name, "up"], check=True)
        current = "B" if current == "A" else "A"
        pid = fork_cli(load_args(policies[current][0], testbed, "ebpf"))
        time.sleep(rng.uniform(0, 0.08))
        subprocess.run(["ip", "-n", testbed.router, "link", "del", name], check=True)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"round {round_}"
        assert ebpf_in_force(testbed, policies) == (current, fully(testbed))
    isoebpf(*load_args(policies["A"][0], testbed, "ebpf"))
    record = Scope(testbed.router).read()
    assert record is not None and len(record["attachments"]) == fully(testbed)


def test_our_lock_held_by_another_command(testbed: Testbed,
                                          policies: dict[str, tuple[Path, IR]],
                                          enforcing_a: None) -> None:
    """A command waits for the scope's lock, at most ISOEBPF_LOCK_WAIT seconds, then says
    who holds it and changes nothing."""
    scope = Scope(testbed.router)
    holder = subprocess.Popen(["flock", "--no-fork", "-x", str(scope.lock_path), "sleep", "30"])
    try:
        time.sleep(0.3)
        started = time.monotonic()
        done = isoebpf(*load_args(policies["B"][0], testbed, "ebpf"), check=False,
                       env={"ISOEBPF_LOCK_WAIT": "1"})
        assert done.returncode == 1
        assert time.monotonic() - started < 10
        assert "has held" in done.stderr and "nothing was changed" in done.stderr, done.stderr
        assert "fail-closed: the policy in force" in done.stderr
        assert ebpf_in_force(testbed, policies) == ("A", fully(testbed))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# -- failure mode -------------------------------------------------------------------------


def metrics(scope: Scope, on_failure: str) -> dict[str, float]:
    collector = StatusCollector(lambda: enforcer.status(scope), Stats(), lambda: "deny", on_failure)
    return {f"{m.name}{dict(s.labels) or ''}": s.value for m in collector.collect()
            for s in m.samples if m.name.startswith(("isoebpf_failure_mode", "isoebpf_change",
                                                     "isoebpf_failed"))}


@pytest.mark.parametrize("on_failure", ["closed", "open"])
def test_a_change_that_cannot_be_applied(testbed: Testbed, policies: dict[str, tuple[Path, IR]],
                                         enforcing_a: None, on_failure: str) -> None:
    """closed: the policy in force stays, whole. open: all enforcement is removed. Either
    way status (text and JSON) and the metrics say what happened, until a change works."""
    scope = Scope(testbed.router)
    isoebpf(*load_args(policies["A"][0], testbed, "ebpf"), "--on-failure", on_failure)  # update
    status = isoebpf("status", "--netns", testbed.router).stdout
    assert f"on failure: {on_failure}" in status
    failing = load_args(policies["B"][0], testbed, "ebpf")
    failing[failing.index("v-*")] = "v-none*"
    done = isoebpf(*failing, "--on-failure", on_failure, check=False)
    assert done.returncode == 1 and "no interface in namespace" in done.stderr
    shown = isoebpf("status", "--netns", testbed.router, "--json", check=False)
    record = json.loads(shown.stdout)
    text = isoebpf("status", "--netns", testbed.router, check=False).stdout
    assert shown.returncode == 1 and record["ok"] is False  # until a change succeeds
    assert record["failure"]["on_failure"] == on_failure
    assert "LAST CHANGE FAILED" in text
    gauges = metrics(scope, on_failure)
    assert gauges["isoebpf_change_failed"] == 1
    assert gauges[f"isoebpf_failure_mode{{'mode': '{on_failure}'}}"] == 1
    if on_failure == "closed":
        assert "fail-closed: the policy in force" in done.stderr
        assert ebpf_in_force(testbed, policies) == ("A", fully(testbed))
        assert record["digest"] == policies["A"][1].digest
        assert probed(testbed, policies) == {"A"}
        assert gauges["isoebpf_failed_open"] == 0
    else:
        assert "fail-open: enforcement removed" in done.stderr
        assert ebpf_in_force(testbed, policies) == ("none", 0)
        assert record["backend"] is None and "nothing loaded" in text
        assert probed(testbed, policies) == {"none"}
        assert gauges["isoebpf_failed_open"] == 1
    isoebpf(*load_args(policies["B"][0], testbed, "ebpf"), "--on-failure", on_failure)
    assert "failure" not in json.loads(isoebpf("status", "--netns", testbed.router,
                                               "--json").stdout)
    assert metrics(scope, on_failure)["isoebpf_change_failed"] == 0
    assert not scope.failure_path.exists()


@pytest.mark.parametrize("name", ["ebpf", "iptables"])
def test_unload_after_the_namespace_was_deleted(policies: dict[str, tuple[Path, IR]],
                                                name: str) -> None:
    """`ip netns del` takes the interfaces and rules with it but not our pins and
    records: unload still removes those, and says why there was nothing to detach."""
    netns = f"{default_prefix()}-gone"
    scope = Scope(netns)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:  # whatever fails, nothing stays: no pins under /sys/fs/bpf/isoebpf, no record under /run
        try:
            subprocess.run(["ip", "-n", netns, "link", "add", "v-a", "type", "veth", "peer", "name",
                            "v-b"], check=True)
            isoebpf("load", str(policies["A"][0]), "--backend", name, "--netns", netns, "--iface",
                    "v-*", "--mode", "tc")
            assert scope.read() is not None
            assert scope.pin_dir.exists() == (name == "ebpf")
        finally:
            subprocess.run(["ip", "netns", "del", netns], check=False)
        shown = isoebpf("status", "--netns", netns, check=False)
        assert shown.returncode == 1 and f"no network namespace {netns}" in shown.stderr
        assert (f"isoebpf still holds state of it (deleted with 'ip netns del'?): "
                f"'isoebpf unload --netns {netns}' removes it") in shown.stderr, shown.stderr
        done = isoebpf("unload", "--netns", netns)
        assert f"namespace {netns} is gone" in done.stdout
        assert "nothing was loaded" not in done.stdout
        assert not scope.pin_dir.exists()
        assert scope.read() is None
        assert not scope.run_dir.exists()
        assert not scope.lock_path.exists()
        again = isoebpf("unload", "--netns", netns, check=False)
        assert again.returncode == 1 and f"no network namespace {netns}" in again.stderr, again
    finally:
        isoebpf("unload", "--netns", netns, check=False)
