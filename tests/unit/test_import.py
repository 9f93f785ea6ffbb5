"""`isoebpf import`: hand-built layouts back into policies, with the warnings they deserve."""

from __future__ import annotations

import random
from pathlib import Path

import netaddr
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isoebpf import pipeline
from isoebpf.backends.iptables.importer import Imported, LayoutError, import_layout
from isoebpf.backends.iptables.layout import NET, SET_TYPES, render
from isoebpf.cli import main
from isoebpf.ir.evaluate import ICMP_ECHO_REQUEST, TCP_SYN, Classifier, Packet, decide
from isoebpf.ir.tables import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from tests.policygen import random_first_packet, random_policy

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
SEED = ROOT / "examples" / "it-hr.yaml"
GUIDE_RULES = DATA / "guide-iptables.save"
GUIDE_SETS = DATA / "guide-ipset.save"

JUMP = "-A FORWARD -m set --match-set overlays src -m set --match-set overlays dst -j iso\n"


def run_import(rules: str, sets: str, rules6: str | None = None) -> Imported:
    files = [("rules.save", 4, rules)] + ([("rules6.save", 6, rules6)] if rules6 else [])
    return import_layout(files, ("sets.save", sets))


def table(*lines: str) -> str:
    return "*filter\n:FORWARD ACCEPT [0:0]\n:iso - [0:0]\n" + "".join(f"{x}\n" for x in lines) + "COMMIT\n"


def messages(imported: Imported) -> list[str]:
    return [f"{w.file}:{w.line}: {w.message}" for w in imported.warnings]


def first_packets() -> list[Packet]:
    """Both directions between and within IT and HR, and to the outside, by protocol."""
    hosts = ["10.250.1.10", "10.250.2.20", "192.168.1.10", "192.168.2.20", "203.0.113.10"]
    found = []
    for src in hosts:
        for dst in hosts:
            if src == dst:
                continue
            s, d = netaddr.IPAddress(src), netaddr.IPAddress(dst)
            found += [Packet(s, d, PROTO_TCP, sport=40000, dport=port, tcp_flags=TCP_SYN)
                      for port in (22, 80, 443)]
            found += [Packet(s, d, PROTO_UDP, sport=40000, dport=53),
                      Packet(s, d, PROTO_ICMP, icmp_type=ICMP_ECHO_REQUEST[PROTO_ICMP], icmp_id=1)]
    return found


def test_the_guides_own_example_means_the_seed_policy_and_says_what_is_broken() -> None:
    imported = import_layout([(str(GUIDE_RULES), 4, GUIDE_RULES.read_text())],
                             (str(GUIDE_SETS), GUIDE_SETS.read_text()))
    meant = Classifier(pipeline.loads(imported.text, "imported.yaml").ir)
    seed = Classifier(pipeline.read(SEED).ir)
    for pkt in first_packets():
        assert decide(meant, pkt).action == decide(seed, pkt).action, pkt
    assert "  - {from: hr, to: it, ports: [tcp/80]}" in imported.text.splitlines()
    warnings = [(Path(w.file).name, w.line, w.message) for w in imported.warnings]
    dead = "can never be reached: it comes after the unconditional REJECT at line 11"
    assert warnings == [
        ("guide-ipset.save", 6, "set 'overlays' is empty: the FORWARD jump never matches, so this "
         "layout filters nothing today; the imported policy filters between its overlays"),
        ("guide-iptables.save", 12, f"this rule {dead}; the imported policy applies it, so what "
         "it allows will pass"),
        ("guide-ipset.save", 11, "'192.168.0.0./16' in set 'simple_allowed' is malformed "
         "('192.168.0.0./16' is not a valid CIDR: remove the trailing dot ('192.168.0.0')); "
         "ipset refuses it, so it is left out"),
        ("guide-iptables.save", 13, f"this rule {dead}; the imported policy applies it, so what "
         "it allows will pass"),
        ("guide-iptables.save", 14, f"the RELATED,ESTABLISHED rule {dead}: replies of allowed "
         "connections are refused today; isoebpf lets them pass"),
        ("<imported>", 12, "allow[0] never decides a packet: earlier rules, hairpins or "
         "exceptions cover all it allows"),
    ]


@pytest.mark.parametrize("set_types", [SET_TYPES, (NET,)], ids=["full", "degraded"])
def test_our_own_layout_reads_back_as_the_same_policy(set_types: tuple[str, ...]) -> None:
    """render, then import: every first packet gets the verdict the original policy gives."""
    checked = 0

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        nonlocal checked
        generated = random_policy(rng)
        original = pipeline.loads(generated.text, "generated.yaml").ir
        ipset_text, v4, v6 = render(original, set_types=set_types)
        files = [(name, v, text) for name, v, text in (("v4", 4, v4), ("v6", 6, v6)) if text]
        imported = import_layout(files, ("sets", ipset_text))
        assert not [w for w in imported.warnings if w.file != "<imported>"], imported.warnings
        again = Classifier(pipeline.loads(imported.text, "imported.yaml").ir)
        before = Classifier(original)
        for _ in range(40):
            pkt = random_first_packet(rng, generated)
            assert decide(again, pkt).action == decide(before, pkt).action, \
                f"{pkt}\n{generated.text}\n{imported.text}"
            checked += 1

    check()
    assert checked >= 2400


def test_a_rule_in_one_family_stays_in_that_family() -> None:
    """dcos6.o0 in the IPv6 file alone is o0's IPv6 subnets, not all of o0; a rule
    read in both families is the rule between the overlays again."""
    text = ("version: 1\ndefault: deny\noverlays:\n"
            "  o0: {subnets: [10.0.0.0/12, 'fd00:1::/32'], isolated: true}\n"
            "  o1: {subnets: [10.16.0.0/12, 'fd00:2::/32'], isolated: true}\n"
            "allow:\n  - {from: 'fd00:1::/32', to: o1}\n  - {from: o1, to: o0, ports: [tcp/80]}\n")
    ipset_text, v4, v6 = render(pipeline.loads(text, "dual.yaml").ir, set_types=(NET,))
    imported = import_layout([("v4", 4, v4), ("v6", 6, v6)], ("sets", ipset_text))
    assert imported.text.split("allow:\n")[1] == (
        '  - {from: "fd00:1::/32", to: "fd00:2::/32"}\n'
        "  - {from: o1, to: o0, ports: [tcp/80]}\n")


def test_overlays_set_missing_members_and_strays_are_reported() -> None:
    rules = table(JUMP.strip(),
                  "-A iso -m set --match-set it src -m set --match-set it dst -j RETURN",
                  "-A iso -m set --match-set hr src -m set --match-set it dst -p tcp --dport 80 -j RETURN",
                  "-A iso -j DROP")
    sets = ("create it hash:net family inet\nadd it 10.250.0.0/16\n"
            "create hr hash:net family inet\nadd hr 192.168.0.0/16\n"
            "create overlays hash:net family inet\nadd overlays 10.250.0.0/16\n"
            "add overlays 172.20.0.0/16\n")
    imported = run_import(rules, sets)
    assert messages(imported)[:2] == [
        "sets.save:7: 172.20.0.0/16 is in 'overlays' but in no overlay set: imported as "
        "overlay 'overlay-3'",
        "sets.save:5: set 'overlays' is missing 192.168.0.0/16 (overlay 'hr'): its traffic is "
        "not filtered today",
    ]
    text = imported.text
    assert "default: deny\ndeny_action: drop\n" in text
    assert "  hr:\n    subnets: [192.168.0.0/16]\n    isolated: true\n" in text, "no hairpin"
    assert "  it:\n    subnets: [10.250.0.0/16]\n  hr:" in text
    assert "  - {from: hr, to: it, ports: [tcp/80]}" in text

    listed = sets.replace("create overlays hash:net family inet\nadd overlays 10.250.0.0/16\n"
                          "add overlays 172.20.0.0/16\n",
                          "create overlays list:set size 8\nadd overlays it\n")
    assert messages(run_import(rules, listed))[0] == (
        "sets.save:5: set 'overlays' is missing 'hr': overlay 'hr' is not filtered today")


def test_rules_it_cannot_model_are_named_and_left_out() -> None:
    rules = table(JUMP.strip(),
                  "-A iso -i eth0 -j RETURN",
                  "-A iso -j LOG --log-prefix iso",
                  "-A iso -m set --match-set nowhere src -m set --match-set nowhere dst -j RETURN",
                  "-A iso -m set --match-set it src -m set --match-set it dst -j RETURN",
                  "-A iso -m set --match-set pairs src,dst -p gre -j RETURN",
                  "-A iso -j REJECT")
    sets = ("create overlays list:set size 8\nadd overlays it\n"
            "create it hash:net family inet\nadd it 10.250.1.5/16\nadd it 10.9.0.0/16 nomatch\n"
            "create pairs hash:net,net family inet\nadd pairs 10.250.0.0/16,10.250.0.0/16\n"
            "bogus line\n")
    imported = run_import(rules, sets)
    assert messages(imported) == [
        "sets.save:5: 'nomatch' entries are not supported; 10.9.0.0/16 left out",
        "sets.save:8: 'bogus line' is not a create or add line; left out",
        "sets.save:4: '10.250.1.5/16' has host bits set: did you mean 10.250.0.0/16? (in set "
        "'it'); ipset stores 10.250.0.0/16, and so does this import",
        "rules.save:7: set 'nowhere' is not in sets.save; its rules are left out",
        "rules.save:5: rule not understood (-j RETURN, -i eth0); left out",
        "rules.save:6: rule not understood (-j LOG, --log-prefix iso); left out",
        "rules.save:9: a protocol that a policy cannot name; left out",
    ]
    assert "subnets: [10.250.0.0/16]" in imported.text


def test_ipv6_rules_and_our_set_names_merge_into_one_overlay() -> None:
    original = pipeline.loads(
        'version: 1\ndefault: deny\noverlays:\n  hr: {subnets: [192.168.0.0/16, "fd00::/48"]}\n',
        "p.yaml").ir
    ipset_text, v4, v6 = render(original, set_types=(NET,))
    imported = run_import(v4, ipset_text, v6)
    assert '  hr:\n    subnets: [192.168.0.0/16, "fd00::/48"]\n' in imported.text
    assert imported.warnings == []


def test_a_layout_without_an_isolation_jump_is_refused() -> None:
    with pytest.raises(LayoutError, match="not a DC/OS-style isolation layout"):
        run_import(table("-A FORWARD -j ACCEPT"), "")


def test_cli_prints_the_policy_and_the_warnings() -> None:
    runner = CliRunner()
    done = runner.invoke(main, ["import", "--iptables-save", str(GUIDE_RULES),
                                "--ipset-save", str(GUIDE_SETS)])
    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("# Imported by 'isoebpf import'")
    assert "version: 1" in done.stdout and "warning" not in done.stdout
    assert done.stderr.count("warning:") == 6
    missing = runner.invoke(main, ["import", "--ipset-save", str(GUIDE_SETS)])
    assert missing.exit_code == 2 and "--iptables-save FILE" in missing.output


def test_overlapping_overlay_sets_are_refused_with_the_policy_they_made() -> None:
    rules = table(JUMP.strip(),
                  "-A iso -m set --match-set a src -m set --match-set a dst -j RETURN",
                  "-A iso -m set --match-set b src -m set --match-set b dst -j RETURN",
                  "-A iso -m set --match-set empty src -m set --match-set a dst -j RETURN")
    sets = ("create overlays list:set size 8\nadd overlays a\nadd overlays b\n"
            "create a hash:net family inet\nadd a 10.0.0.0/8\n"
            "create b hash:net family inet\nadd b 10.1.0.0/16\ncreate empty hash:net family inet\n")
    with pytest.raises(LayoutError, match=r"(?s)overlap.*the policy it made:.*  b:") as caught:
        run_import(rules, sets)
    assert "empty" not in str(caught.value), "an overlay without subnets is left out with its rules"
