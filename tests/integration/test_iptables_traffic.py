"""The iptables backend with real sockets: the shared verdict suite, per-rule counters,
updates, Docker's chains beside ours, connection revocation, and nothing left behind."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isoebpf import pipeline
from isoebpf.backends.iptables import backend as iptables_backend
from isoebpf.backends.iptables.layout import DEGRADED, FULL, NET_NET, NET_PORT_NET
from isoebpf.backends.state import Scope
from isoebpf.ir.evaluate import decide
from isoebpf.ir.tables import IR
from isoebpf.lab.testbed import Testbed
from tests.conftest import require
from tests.integration.conftest import (
    DOCKER,
    SEED,
    SEED_RULE_ABOVE,
    WEB,
    Trace,
    counts_by_identity,
    filtered_trace,
    flood_udp,
    flush_iptables,
    isoebpf,
    packets_by_rule,
    suppressed,
)
from tests.scenarios import IT_HR_TRIES, expected_outcome, first_packet
from tests.unit.test_import import first_packets

PROMPT_MS = 500  # a rejected try is answered at once, not by a timeout

# HR gains an IPv6 subnet and is isolated; one exception; rules that differ from the seed's.
UPDATED = """\
version: 1
default: deny
deny_action: reject
overlays:
  it:
    subnets: [10.250.0.0/16]
  hr:
    subnets: [192.168.0.0/16, "fd00:4852::/48"]
    isolated: true
exceptions:
  - {from: 10.250.2.0/24, to: hr}
allow:
  - {from: hr, to: it, ports: [tcp/22, udp/53, icmp]}
  - {from: 192.168.2.0/24, to: 192.168.1.0/24, ports: [udp/53]}
"""


@pytest.fixture(scope="module", autouse=True)
def tools_present() -> None:
    for tool in ("iptables", "ipset"):
        try:
            subprocess.run([tool, "--version"], capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError) as err:
            require(tool, str(err))


@pytest.fixture(scope="module", autouse=True)
def br_netfilter() -> Iterator[None]:
    """Traffic within one bridge reaches iptables only through br_netfilter, a module a
    freshly booted stock kernel has not loaded (without it, `load` refuses UPDATED's
    isolated overlay): loaded for these tests, and removed after if it was not there."""
    if Path("/proc/sys/net/bridge").exists():  # built in, or loaded already (Docker loads it)
        yield
        return
    try:
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        require("br_netfilter", getattr(err, "stderr", None) or str(err))
    try:
        yield
    finally:
        subprocess.run(["modprobe", "-r", "br_netfilter"], check=True)


@pytest.fixture
def updated(tmp_path: Path) -> Path:
    path = tmp_path / "updated.yaml"
    path.write_text(UPDATED)
    return path


@pytest.fixture
def unloaded(testbed: Testbed) -> Iterator[None]:
    """Whatever a test loads is unloaded, and the router is left as it was found."""
    before = snapshot(testbed)
    try:
        yield
    finally:
        isoebpf("unload", "--netns", testbed.router)
    assert snapshot(testbed) == before, "unload left something behind"


def snapshot(testbed: Testbed) -> dict[str, list[str]]:
    """The router's rules and sets, without counters and the tools' comment lines.

    A table with no rules, no chains of its own and only ACCEPT policies counts
    as no table: iptables-nft leaves it behind once anything was in it, and it
    changes nothing.
    """
    found = {}
    for name, args in (("ipv4", ["iptables-save"]), ("ipv6", ["ip6tables-save"]),
                       ("sets", ["ipset", "save"])):
        text = testbed.run_in(testbed.router, *args).stdout
        lines = [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in text.splitlines()
                 if not line.startswith("#")]
        found[name] = [line for table in _tables(lines) for line in table
                       if any(not re.fullmatch(r"\*\S+|COMMIT|:\S+ ACCEPT \[0:0\]", x)
                              for x in table)]
    return found


def _tables(lines: list[str]) -> Iterator[list[str]]:
    table: list[str] = []
    for line in lines:
        table.append(line)
        if line == "COMMIT" or not line.startswith(("*", ":", "-")):
            yield table
            table = []
    if table:
        yield table


def load(testbed: Testbed, path: Path, *more: str) -> str:
    return isoebpf("load", str(path), "--backend", "iptables", "--netns", testbed.router,
                   *more).stdout


def status(testbed: Testbed) -> dict[str, object]:
    record: dict[str, object] = json.loads(
        isoebpf("status", "--netns", testbed.router, "--json").stdout)
    return record


def packets(testbed: Testbed) -> dict[str, int]:
    """Per-rule packet counters, from the status call the CLI's status makes."""
    record = iptables_backend.status(Scope(testbed.router))
    assert record is not None
    return packets_by_rule(record)


def run_suite(testbed: Testbed, path: Path) -> None:
    """Every try of the shared suite: the outcome the evaluator implies, and its rule counted."""
    ir = pipeline.read(path).ir
    before = packets(testbed)
    bridged = bridged_traffic_counted(testbed)
    for client, proto, target, port in IT_HR_TRIES:
        same_network = testbed.host(client).network == testbed.host_of(target).network
        want = expected_outcome(ir, testbed, client, proto, target, port)
        rule = _first_rule(ir, testbed, client, proto, target, port)
        seen = testbed.probe(client, proto, target, port, timeout=1.0)
        assert seen["outcome"] == want, (client, proto, target, port, seen)
        if want in ("refused", "unreachable"):
            assert float(str(seen["ms"])) < PROMPT_MS, (client, proto, target, port, seen)
        after = packets(testbed)
        if bridged or not same_network:
            assert after[rule] > before[rule], f"{client}->{target} {proto}/{port}: {rule} did not move"
        before = after


def bridged_traffic_counted(testbed: Testbed) -> bool:
    """Whether traffic within one bridge crosses FORWARD: without br_netfilter (a
    module on stock kernels) same-network tries pass as they should, but uncounted."""
    return testbed.run_in(testbed.router, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables",
                          check=False).stdout.strip() == "1"


def _first_rule(ir: IR, testbed: Testbed, client: str, proto: str, target: str,
                port: int) -> str:
    """The rule the evaluator names for the try's first packet."""
    return ir.rule(decide(ir, first_packet(testbed, client, proto, target, port)).rule).name


def kernel_has_full_types() -> bool:
    found, _ = iptables_backend.set_types()
    return {NET_NET, NET_PORT_NET} <= set(found)


@pytest.mark.parametrize("forced", [pytest.param(False, marks=pytest.mark.vm), True],
                         ids=["kernel-types", "forced-degraded"])
def test_shared_suite_verdicts_counters_and_status(
    testbed: Testbed, unloaded: None, forced: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    if forced:
        monkeypatch.setenv(iptables_backend.TEST_MISSING_TYPES, f"{NET_NET} {NET_PORT_NET}")
    natural = FULL if kernel_has_full_types() else DEGRADED
    said = load(testbed, SEED)
    assert "generation 1" in said
    assert "forced" not in said and (f"{natural if not forced else DEGRADED} layout" in said)
    run_suite(testbed, SEED)
    record = status(testbed)
    assert record["backend"] == "iptables" and record["chain"] == "dcos-isolation"
    assert record["iptables_layout"] == (DEGRADED if forced else natural)
    assert record["flavour"] in ("nft", "legacy")
    assert set(record["set_types"]) >= {"hash:net"}  # type: ignore[arg-type]
    if forced:
        assert NET_NET not in record["set_types"]  # type: ignore[operator]
    attachments = record["attachments"]
    assert isinstance(attachments, list) and len(attachments) == 1, "IPv4 only: no IPv6 subnets"
    assert {k: attachments[0][k] for k in ("ifname", "mode", "state", "position")} == {
        "ifname": "FORWARD", "mode": "iptables", "state": "attached", "position": 2}
    assert record["sets"]["dcos-overlays"]["entries"] == 2  # type: ignore[index]
    moved = packets(testbed)
    hairpins = ("hairpin:it", "hairpin:hr") if bridged_traffic_counted(testbed) else ()
    for rule in ("allow:0", "default", *hairpins, "unfiltered", "established"):
        assert moved[rule] > 0, f"{rule} did not move: {moved}"
    # The operators' runbook commands name the rules: the chain's comments in the
    # degraded layout, the sets' element comments in the full one.
    if record["iptables_layout"] == DEGRADED:
        listing = testbed.run_in(testbed.router, "iptables", "-L", "dcos-isolation", "-v", "-n").stdout
        assert "/* isoebpf allow:0 hr -> it tcp/80 */" in listing
    else:
        listing = testbed.run_in(testbed.router, "ipset", "list").stdout
        assert 'comment "allow:0"' in listing
    again = load(testbed, SEED)
    assert "generation 1" in again, "loading the same policy again changes nothing"


def test_update_adds_ipv6_isolation_and_an_exception_atomically(
    testbed: Testbed, unloaded: None, updated: Path,
) -> None:
    load(testbed, SEED)
    said = load(testbed, updated)
    assert "generation 2" in said and "ip6tables" in said
    run_suite(testbed, updated)
    # The exception's first packet is unfiltered by the policy, and its replies pass.
    before = packets(testbed)
    assert testbed.probe("it2", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "connected"
    assert packets(testbed)["exception:0"] > before["exception:0"]
    assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"
    sets = status(testbed)["sets"]
    assert isinstance(sets, dict)
    assert sets["dcos6.hr"] == {"type": "hash:net", "family": "inet6", "entries": 1,
                                "max_entries": 65536}
    assert not [n for n in sets if n.startswith("isoebpf-tmp")]
    assert iptables_backend.drift(Scope(testbed.router), pipeline.read(updated).ir) == []
    # Back to the seed: IPv6 rules go, sets shrink, and the policy is the seed's again.
    load(testbed, SEED)
    run_suite(testbed, SEED)
    assert "dcos-isolation" not in testbed.run_in(testbed.router, "ip6tables-save").stdout


# it2 (10.250.2.20) to HR passes unfiltered: in the full layout the exception's
# element sits in a set an update of the allow rules leaves alone, counters and all.
EXCEPTION = "exceptions:\n  - {from: 10.250.2.0/24, to: hr}\n"


@pytest.mark.parametrize("forced", [False, True], ids=["kernel-types", "forced-degraded"])
def test_counters_survive_an_update_that_renames_the_rule(
    testbed: Testbed, unloaded: None, forced: bool, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    if forced:
        monkeypatch.setenv(iptables_backend.TEST_MISSING_TYPES, f"{NET_NET} {NET_PORT_NET}")
    seed, above = tmp_path / "seed.yaml", tmp_path / "above.yaml"
    seed.write_text(SEED.read_text() + EXCEPTION)
    above.write_text(SEED_RULE_ABOVE + EXCEPTION)
    load(testbed, seed)
    for client, target in (("hr1", "it1"), ("hr1", "it1"), ("it2", "hr1")):
        assert testbed.probe(client, "tcp", target, 80, timeout=1.0)["outcome"] == "connected"
    time.sleep(0.5)  # the last connection's closing packets
    before = counts_by_identity(status(testbed))
    assert before[WEB] == ("allow:0", 2), "each connection's first packet"
    assert before["exception 10.250.2.0/24 -> hr unfiltered"][1] > 0
    assert "generation 2" in load(testbed, above)
    after = counts_by_identity(status(testbed))
    assert after[WEB] == ("allow:1", 2)
    assert after["allow it -> hr udp/53"] == ("allow:0", 0), "a new rule starts at 0"
    # Kept counters are not carried again: no traffic between overlays since, so these
    # stayed as they were (`unfiltered` counts bridged neighbour discovery too).
    assert {rule: packets for rule, (_, packets) in after.items() if rule in before} == {
        rule: packets for rule, (_, packets) in before.items()} | {
        "unfiltered": after["unfiltered"][1]}
    assert after["unfiltered"][1] >= before["unfiltered"][1]
    assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
    assert "generation 2" in load(testbed, above), "the same policy again writes nothing"
    assert counts_by_identity(status(testbed))[WEB] == ("allow:1", 3)


def test_dockers_chains_stay_intact_and_in_order(
    testbed: Testbed, unloaded: None, updated: Path,
) -> None:
    subprocess.run(["ip", "netns", "exec", testbed.router, "iptables-restore"],
                   input=DOCKER.read_text(), text=True, check=True)
    try:
        with_docker = snapshot(testbed)

        def dockers_rules() -> list[str]:
            return [line for line in snapshot(testbed)["ipv4"] if "isoebpf" not in line
                    and line != ":dcos-isolation - [0:0]"]

        load(testbed, SEED)
        assert dockers_rules() == with_docker["ipv4"]
        # Ours go first in DOCKER-USER, where Docker leaves room for its users; FORWARD
        # stays exactly Docker's.
        def chain(name: str, rules: list[str]) -> list[str]:
            return [line for line in rules if line.startswith(f"-A {name} ")]

        user = chain("DOCKER-USER", snapshot(testbed)["ipv4"])
        assert "isoebpf forwarded" in user[0] and "-j dcos-isolation" in user[1]
        assert user[2:] == chain("DOCKER-USER", with_docker["ipv4"])
        assert chain("FORWARD", snapshot(testbed)["ipv4"]) == chain("FORWARD", with_docker["ipv4"])
        # What the policy allows is accepted there, before Docker's isolation could drop it.
        assert any("-j ACCEPT" in line and "allow" in line for line in chain("dcos-isolation",
                                                                            snapshot(testbed)["ipv4"]))
        assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
        assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "refused"
        load(testbed, updated)
        assert dockers_rules() == with_docker["ipv4"]
        run_suite(testbed, updated)
        isoebpf("unload", "--netns", testbed.router)
        assert snapshot(testbed) == with_docker, "unload removes exactly what isoebpf added"
    finally:
        flush_iptables(testbed)


def test_connections_the_new_policy_forbids_are_cut(
    testbed: Testbed, unloaded: None, tmp_path: Path,
) -> None:
    narrowed = tmp_path / "narrowed.yaml"
    narrowed.write_text(SEED.read_text().replace("ports: [tcp/80]", "ports: [tcp/22]"))
    load(testbed, SEED)
    cut = testbed.session("hr1", "it1", 80)
    kept = testbed.session("it1", "it2", 22)
    try:
        assert cut.exchange() == "echoed" and kept.exchange() == "echoed"
        load(testbed, narrowed)
        assert status(testbed)["revoked"] == 1
        assert cut.exchange() == "reset", "hr -> it tcp/80 is no longer allowed"
        assert kept.exchange() == "echoed", "a connection still allowed survives the update"
    finally:
        cut.close()
        kept.close()


def test_bridged_traffic_that_would_skip_iptables_is_refused(testbed: Testbed, unloaded: None,
                                                             updated: Path) -> None:
    sysctl = "net.bridge.bridge-nf-call-iptables"
    before = testbed.run_in(testbed.router, "sysctl", "-n", sysctl).stdout.strip()
    testbed.run_in(testbed.router, "sysctl", "-qw", f"{sysctl}=0")
    try:
        refused = isoebpf("load", str(updated), "--backend", "iptables", "--netns",
                          testbed.router, check=False)
        assert refused.returncode == 1
        assert f"{sysctl} is 0" in refused.stderr and "isolated overlay" in refused.stderr
        assert "isoebpf" not in testbed.run_in(testbed.router, "iptables-save").stdout
        load(testbed, SEED)  # no isolated overlay: bridged traffic is hairpin-allowed anyway
    finally:
        testbed.run_in(testbed.router, "sysctl", "-qw", f"{sysctl}={before}")


def test_unload_finds_our_rules_and_sets_without_the_state_record(
    testbed: Testbed, unloaded: None, updated: Path,
) -> None:
    load(testbed, updated, "--chain", "isolation")
    assert "-j isolation" in testbed.run_in(testbed.router, "iptables-save").stdout
    Scope(testbed.router).record_path.unlink()
    removed = isoebpf("unload", "--netns", testbed.router).stdout
    assert "removed iptables chain isolation" in removed
    assert "removed ip6tables chain isolation" in removed and "removed ipset dcos6.hr" in removed
    assert "nothing was loaded" in isoebpf("unload", "--netns", testbed.router).stdout


def test_importing_the_loaded_layout_gives_back_the_policy(testbed: Testbed, unloaded: None,
                                                           updated: Path, tmp_path: Path) -> None:
    load(testbed, updated)
    files = {}
    for name, args in (("v4", ["iptables-save"]), ("v6", ["ip6tables-save"]),
                       ("sets", ["ipset", "save"])):
        files[name] = tmp_path / name
        files[name].write_text(testbed.run_in(testbed.router, *args).stdout)
    done = isoebpf("import", "--iptables-save", str(files["v4"]), "--ip6tables-save",
                   str(files["v6"]), "--ipset-save", str(files["sets"]))
    assert "warning" not in done.stderr.replace("<imported>", "")
    again = pipeline.loads(done.stdout, "imported.yaml").ir
    meant = pipeline.read(updated).ir
    for pkt in first_packets():
        assert decide(again, pkt).action == decide(meant, pkt).action, pkt


def test_iptables_legacy_is_driven_with_its_own_tools(
    testbed: Testbed, unloaded: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node whose `iptables` is iptables-legacy: the legacy tools, the same layout."""
    monkeypatch.setattr(iptables_backend, "flavour", lambda: "legacy")
    scope = Scope(testbed.router)
    ir = pipeline.read(SEED).ir
    try:
        iptables_backend.load(ir, scope, [], "auto", str(SEED))
        legacy = testbed.run_in(testbed.router, "iptables-legacy-save").stdout
        assert "-j dcos-isolation" in legacy
        assert not any("isoebpf" in line for line in snapshot(testbed)["ipv4"]), "nft untouched"
        assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
        assert testbed.probe("hr1", "tcp", "it1", 22, timeout=1.0)["outcome"] == "refused"
        record = iptables_backend.status(scope)
        assert record is not None and record["flavour"] == "legacy"
        counted = packets_by_rule(record)
        assert counted["allow:0"] > 0 and counted["default"] > 0
    finally:
        iptables_backend.unload(scope)
    assert "isoebpf" not in testbed.run_in(testbed.router, "iptables-legacy-save").stdout


def trace_table(testbed: Testbed) -> bool:
    return "isoebpf-trace" in testbed.run_in(testbed.router, "nft", "list", "tables").stdout


def test_trace_names_the_iptables_rule_and_action_and_is_no_drift(
        testbed: Testbed, unloaded: None) -> None:
    load(testbed, SEED)
    scope, ir = Scope(testbed.router), pipeline.read(SEED).ir
    with Trace(testbed, "iptables", "--rule", "allow:0", "--rule", "default", "--count", "2") as tracing:
        assert trace_table(testbed)
        assert iptables_backend.drift(scope, ir) == [] and iptables_backend.canary(scope) == []
        assert testbed.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
        assert testbed.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"
        events, _ = tracing.finish()
    assert [(e["protocol"], e["src"], e["dst"], e["dport"], e["rule"], e["action"])
            for e in events] == [
        ("tcp", "192.168.1.10", "10.250.1.10", 80, "allow:0", "allow"),
        ("tcp", "10.250.1.10", "192.168.1.10", 80, "default", "reject")]
    assert events[0]["text"] == "hr -> it tcp/80"
    assert not trace_table(testbed), "the trace table outlived the trace"


def test_trace_filters_and_rate_limit_on_iptables(testbed: Testbed, unloaded: None) -> None:
    load(testbed, SEED)
    events = filtered_trace(testbed, "iptables")
    assert [(e["src"], e["dst"], e["rule"], e["action"]) for e in events] == [
        ("192.168.2.20", "10.250.2.20", "allow:0", "allow"),
        ("192.168.2.20", "10.250.1.10", "allow:0", "allow")]

    # 300 datagrams HR -> IT udp/53, each rejected: far more than the rate; then SIGTERM.
    rate = 5
    with Trace(testbed, "iptables", "--rate", str(rate)) as tracing:
        flood_udp(testbed, "hr1", "10.250.1.10", 53, 300)
        time.sleep(0.5)
        tracing.process.send_signal(signal.SIGTERM)
        events, summary = tracing.finish()
    rejected = [e for e in events if e["rule"] == "default"]
    # nftables' limit is per namespace, with a burst of 5 packets.
    assert 0 < len(rejected) <= len(events) <= rate * 4 + 5, len(events)
    assert suppressed(summary) >= 300 - len(events), summary
    assert not trace_table(testbed), "SIGTERM left the trace table behind"


def test_unload_removes_the_table_a_killed_trace_left(testbed: Testbed, unloaded: None) -> None:
    load(testbed, SEED)
    with Trace(testbed, "iptables") as tracing:
        tracing.process.kill()
        tracing.process.communicate(timeout=30)
    assert trace_table(testbed), "a SIGKILLed trace cannot delete its table"
    removed = isoebpf("unload", "--netns", testbed.router).stdout
    assert "removed nft table inet isoebpf-trace" in removed
    assert not trace_table(testbed)
