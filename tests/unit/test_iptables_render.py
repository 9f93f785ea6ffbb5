"""The iptables layouts, without a kernel: exact text for the seed, and verdicts and rule
names that agree with the reference evaluator for random policies, in both layouts.

`Netfilter` models what the layouts rely on: iptables rule order, RETURN /
REJECT / DROP, and ipset's lookup (a hash:net* set answers with the element
of the most specific source, then the most specific destination). It reads
the rendered text back through the importer's parsers, so the text itself
is what is checked.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import netaddr
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isoebpf import pipeline
from isoebpf.backends.iptables import backend as iptables_backend
from isoebpf.backends.iptables.layout import (
    DEGRADED,
    FULL,
    NET,
    NET_NET,
    NET_PORT_NET,
    SET_TYPES,
    build,
    iptables_restore,
    render,
)
from isoebpf.backends.iptables.saved import Notes, Rule, SavedSet, parse_ipset_save, parse_iptables_save
from isoebpf.cli import main
from isoebpf.errors import BackendError
from isoebpf.ir.evaluate import IPPROTO_ICMPV6, Classifier, Packet, decide
from isoebpf.ir.tables import IR, PROTO_ICMP, PROTO_TCP, PROTO_UDP
from tests.policygen import random_first_packet, random_policy

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "it-hr.yaml"
LAYOUTS = {FULL: SET_TYPES, DEGRADED: (NET,)}
PROTOCOLS = {"tcp": PROTO_TCP, "udp": PROTO_UDP, "icmp": PROTO_ICMP, "ipv6-icmp": IPPROTO_ICMPV6}


def compiled(text: str) -> IR:
    return pipeline.loads(text, "test.yaml").ir


class Netfilter:
    """FORWARD, our chain and our sets, judging the first packet of a connection."""

    def __init__(self, ipset_text: str, v4: str, v6: str) -> None:
        notes = Notes()
        self.sets = parse_ipset_save(ipset_text, "ipset", notes)
        self.tables = {v: parse_iptables_save(t, f"ip{v}", notes) for v, t in ((4, v4), (6, v6)) if t}
        assert not notes.found, notes.found
        self.index = {name: self._index(s) for name, s in self.sets.items()}

    @staticmethod
    def _index(saved: SavedSet) -> dict[tuple[object, ...], str | None]:
        table: dict[tuple[object, ...], str | None] = {}
        for element in saved.elements:
            nets = [netaddr.IPNetwork(f) for f in (element.fields[0], element.fields[-1])]
            if len(element.fields) == 1:
                table[(nets[0],)] = element.comment
            elif len(element.fields) == 2:
                table[(nets[0], nets[1])] = element.comment
            else:
                proto, _, ports = element.fields[1].partition(":")
                low, _, high = ports.partition("-")
                for port in range(int(low), int(high or low) + 1):
                    table[(nets[0], nets[1], PROTOCOLS[proto], port)] = element.comment
        return table

    def lookup(self, name: str, dims: int, pkt: Packet) -> tuple[bool, str | None]:
        """ipset's answer: most specific source first, then most specific destination."""
        table = self.index[name]
        lengths = [sorted({k[d].prefixlen for k in table}, reverse=True) for d in range(min(dims, 2))]
        for combo in itertools.product(*lengths):
            key: tuple[object, ...] = tuple(
                netaddr.IPNetwork(f"{addr}/{length}").cidr
                for addr, length in zip((pkt.src, pkt.dst), combo, strict=False))
            if dims == 3:
                key = (*key, pkt.proto, pkt.dport)
            if key in table:
                return True, table[key]
        return False, None

    def matches(self, rule: Rule, pkt: Packet) -> tuple[bool, str | None]:
        """(does the rule match, the comment of the set element that answered)."""
        assert not rule.unknown, rule
        if rule.ctstate:
            return False, None  # first packets are NEW
        if rule.src and pkt.src not in netaddr.IPNetwork(rule.src):
            return False, None
        if rule.dst and pkt.dst not in netaddr.IPNetwork(rule.dst):
            return False, None
        if rule.proto and PROTOCOLS[rule.proto] != pkt.proto:
            return False, None
        if rule.dports and not any(lo <= pkt.dport <= hi for lo, hi in rule.dports):
            return False, None
        if rule.icmp_type and int(rule.icmp_type) != pkt.icmp_type:
            return False, None
        answer = None
        for match in rule.sets:
            if len(match.dirs) == 1:
                addr = pkt.src if match.dirs == ("src",) else pkt.dst
                found = any(addr in net for (net,) in self.index[match.name])
                note = None
            else:
                found, note = self.lookup(match.name, len(match.dirs), pkt)
            if found == match.negated:
                return False, note
            answer = note or answer
        return True, answer

    def verdict(self, pkt: Packet) -> tuple[str, str]:
        chains = self.tables.get(pkt.src.version)
        for rule in (chains or {}).get("FORWARD", []):
            if rule.target is None:
                continue
            hit, note = self.matches(rule, pkt)
            if hit:
                assert chains is not None
                return self.run(chains[rule.target], pkt)
            if note:
                return "allow", note  # an exception element answered the negated match
        return "allow", "unfiltered"

    def run(self, chain: list[Rule], pkt: Packet) -> tuple[str, str]:
        for rule in chain:
            hit, note = self.matches(rule, pkt)
            if not hit:
                continue
            name = note or rule.tag
            assert name is not None, rule
            return {"RETURN": "allow", "REJECT": "reject", "DROP": "drop"}[str(rule.target)], name
        raise AssertionError("fell off the end of the chain")


def expected(classifier: Classifier, pkt: Packet) -> tuple[str, str]:
    decision = decide(classifier, pkt)
    return decision.action, classifier.ir.rule(decision.rule).name


@pytest.mark.parametrize("kind", [FULL, DEGRADED])
def test_layouts_decide_like_the_evaluator(kind: str) -> None:
    """Random policies and first packets: same verdict, same rule counted."""
    checked = 0

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        nonlocal checked
        generated = random_policy(rng)
        ir = compiled(generated.text)
        classifier = Classifier(ir)
        kernel = Netfilter(*render(ir, set_types=LAYOUTS[kind]))
        for _ in range(40):
            pkt = random_first_packet(rng, generated)
            assert kernel.verdict(pkt) == expected(classifier, pkt), f"{pkt}\n{generated.text}"
            checked += 1

    check()
    assert checked >= 8000


NESTED = """
version: 1
default: deny
deny_action: drop
overlays:
  a: {subnets: [10.0.0.0/8, "fd00:a::/32"]}
  b: {subnets: [172.16.0.0/12]}
  c: {subnets: [192.168.0.0/16], isolated: true}
exceptions:
  - {from: 10.9.0.0/16, to: b}
allow:
  - {from: 10.1.0.0/16, to: 172.16.1.0/24, ports: [tcp/22]}
  - {from: a, to: b, ports: [tcp/1-1024, icmp]}
  - {from: 10.1.2.0/24, to: b}
  - {from: c, to: c, ports: [udp/5000-5010, tcp/443]}
"""


@pytest.mark.parametrize("kind", [FULL, DEGRADED])
def test_nested_rules_count_the_first_rule_in_file_order(kind: str) -> None:
    ir = compiled(NESTED)
    kernel = Netfilter(*render(ir, set_types=LAYOUTS[kind]))
    a = netaddr.IPAddress

    def tcp(src: str, dst: str, port: int) -> Packet:
        return Packet(a(src), a(dst), PROTO_TCP, sport=40000, dport=port, tcp_flags=2)

    cases = {
        tcp("10.1.2.3", "172.16.1.9", 22): ("allow", "allow:0"),  # innermost, and first
        tcp("10.1.2.3", "172.16.1.9", 80): ("allow", "allow:1"),  # allow:1 comes before allow:2
        tcp("10.1.2.3", "172.16.1.9", 2000): ("allow", "allow:2"),
        tcp("10.5.0.1", "172.16.1.9", 2000): ("drop", "default"),
        tcp("10.9.0.1", "172.16.9.9", 2000): ("allow", "exception:0"),
        tcp("192.168.1.1", "192.168.2.2", 443): ("allow", "allow:3"),  # isolated: rules decide
        tcp("192.168.1.1", "192.168.2.2", 80): ("drop", "default"),
        Packet(a("10.1.2.3"), a("172.16.0.1"), PROTO_ICMP, icmp_type=8): ("allow", "allow:1"),
        tcp("10.1.0.1", "10.2.0.1", 9): ("allow", "hairpin:a"),
        tcp("10.1.0.1", "8.8.8.8", 9): ("allow", "unfiltered"),
    }
    for pkt, want in cases.items():
        assert kernel.verdict(pkt) == want, pkt
        assert expected(Classifier(ir), pkt) == want, pkt


def test_seed_renders_the_documented_layout_in_working_order() -> None:
    ir = pipeline.read(SEED).ir
    ipset_text, v4, v6 = render(ir, set_types=(NET,))
    assert ipset_text == (
        "create dcos-overlays hash:net family inet\n"
        "add dcos-overlays 10.250.0.0/16\n"
        "add dcos-overlays 192.168.0.0/16\n"
        "create dcos.it hash:net family inet\n"
        "add dcos.it 10.250.0.0/16\n"
        "create dcos.hr hash:net family inet\n"
        "add dcos.hr 192.168.0.0/16\n")
    lines = v4.splitlines()
    assert lines[:2] == ["*filter", ":dcos-isolation - [0:0]"]
    assert lines[2] == '-I FORWARD 1 -m comment --comment "isoebpf forwarded"'
    assert lines[3] == ("-I FORWARD 2 -m set --match-set dcos-overlays src -m set --match-set "
                        'dcos-overlays dst -m comment --comment "isoebpf jump" -j dcos-isolation')
    chain = [line.removeprefix("-A dcos-isolation ") for line in lines[4:-1]]
    assert chain == [
        '-m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "isoebpf established" '
        "-j RETURN",
        "-m set --match-set dcos.it src -m set --match-set dcos.it dst "
        '-m comment --comment "isoebpf hairpin:it it -> it" -j RETURN',
        "-m set --match-set dcos.hr src -m set --match-set dcos.hr dst "
        '-m comment --comment "isoebpf hairpin:hr hr -> hr" -j RETURN',
        "-p tcp -m set --match-set dcos.hr src -m set --match-set dcos.it dst -m tcp --dport 80 "
        '-m comment --comment "isoebpf allow:0 hr -> it tcp/80" -j RETURN',
        '-p tcp -m comment --comment "isoebpf default" -j REJECT --reject-with tcp-reset',
        '-m comment --comment "isoebpf default" -j REJECT --reject-with icmp-admin-prohibited',
    ]
    assert lines[-1] == "COMMIT"
    assert v6 == '*filter\n-I FORWARD 1 -m comment --comment "isoebpf forwarded"\nCOMMIT\n', \
        "no IPv6 subnets: only the rule counting unfiltered packets"


def test_full_layout_puts_the_guides_sets_before_the_default() -> None:
    ir = pipeline.read(SEED).ir
    layout = build(ir, set_types=SET_TYPES)
    assert layout.kind == FULL
    assert {s.name: s.type for s in layout.sets} == {
        "dcos-overlays": NET, "dcos.it": NET, "dcos.hr": NET,
        "dcos-overlay-exceptions": NET_NET, "dcos-allowed-ports": NET_PORT_NET,
        "dcos-allowed-icmp": NET_NET, "dcos-allowed": NET_NET}
    assert layout.set_named("dcos-allowed-ports").elements == (
        ("192.168.0.0/16,tcp:80,10.250.0.0/16", "allow:0"),)
    assert "! --match-set dcos-overlay-exceptions src,dst" in layout.families[4].forward[1]
    chain = layout.families[4].chain
    assert [c.split("--comment ")[1].split('"')[1].split()[1] for c in chain] == [
        "established", "hairpin:it", "hairpin:hr", "allowed-ports", "allowed-icmp", "allowed",
        "default", "default"]
    assert "--match-set dcos-allowed-ports src,dst,dst" in chain[3]


def test_ipv6_gets_its_own_sets_and_lets_neighbour_discovery_through() -> None:
    ir = compiled("""
version: 1
default: deny
overlays:
  hr: {subnets: [192.168.0.0/16, "fd00:4852::/48"], isolated: true}
""")
    ipset_text, v4, v6 = render(ir, set_types=(NET,))
    assert "create dcos6.hr hash:net family inet6\nadd dcos6.hr fd00:4852::/48\n" in ipset_text
    assert "--reject-with icmp6-adm-prohibited" in v6 and "icmp-admin" not in v6
    kernel = Netfilter(ipset_text, v4, v6)
    a = netaddr.IPAddress
    for nd_type in (133, 134, 135, 136, 137):
        nd = Packet(a("fd00:4852::10"), a("fd00:4852::20"), IPPROTO_ICMPV6, icmp_type=nd_type)
        assert kernel.verdict(nd) == ("allow", "unfiltered")
    echo = Packet(a("fd00:4852::10"), a("fd00:4852::20"), IPPROTO_ICMPV6, icmp_type=128)
    assert kernel.verdict(echo) == ("reject", "default"), "isolated: no hairpin"


def test_defaults_allow_and_drop() -> None:
    for default, target in (("default: allow", "-j RETURN"), ("deny_action: drop", "-j DROP")):
        ir = compiled(f"version: 1\ndefault: deny\n{default}\noverlays:\n  a: {{subnets: [10.0.0.0/8]}}\n"
                      if default.startswith("deny") else
                      f"version: 1\n{default}\noverlays:\n  a: {{subnets: [10.0.0.0/8]}}\n")
        last = render(ir, set_types=(NET,))[1].splitlines()[-2]
        assert last == f'-A dcos-isolation -m comment --comment "isoebpf default" {target}'


def test_port_lists_use_multiport_fifteen_slots_at_a_time() -> None:
    ports = ", ".join(f"tcp/{1000 + 3 * i}" for i in range(20)) + ", tcp/2000-2100, udp/53"
    ir = compiled(f"""
version: 1
default: deny
overlays:
  a: {{subnets: [10.0.0.0/8]}}
  b: {{subnets: [172.16.0.0/12]}}
allow:
  - {{from: a, to: b, ports: [{ports}]}}
""")
    lines = [line for line in render(ir, set_types=(NET,))[1].splitlines() if "allow:0" in line]
    tcp = [line for line in lines if "-p tcp" in line]
    assert [line.split("--dports ")[1].split()[0].count(",") + 1 for line in tcp] == [15, 6]
    assert tcp[1].split("--dports ")[1].split()[0].endswith(",2000:2100")
    assert sum("-p udp -m set --match-set dcos.a src -m set --match-set dcos.b dst -m udp --dport 53"
               in line for line in lines) == 1


def test_set_names_fit_ipset_and_never_collide() -> None:
    name = "o" * 24
    ir = compiled(f"""
version: 1
overlays:
  {name}: {{subnets: [10.0.0.0/8, "fd00::/16"]}}
  overlays: {{subnets: [172.16.0.0/12]}}
""")
    layout = build(ir, set_types=SET_TYPES)
    names = [s.name for s in layout.sets]
    assert len(names) == len(set(names))
    assert max(len(n) for n in names) <= 31, names
    assert {"dcos.overlays", "dcos-overlays", f"dcos6.{name}"} <= set(names)


def test_chain_name_is_configurable_and_checked() -> None:
    ir = pipeline.read(SEED).ir
    assert "-j isolation-it-hr" in render(ir, chain="isolation-it-hr", set_types=(NET,))[1]
    for bad in ("FORWARD", "has space", "x" * 29, "-j"):
        with pytest.raises(BackendError, match="cannot name our chain"):
            build(ir, chain=bad)
    with pytest.raises(BackendError, match="no ipset type hash:net"):
        build(ir, set_types=(NET_NET,))


def test_forward_edits_and_renamed_sets_are_the_backends_to_choose() -> None:
    layout = build(pipeline.read(SEED).ir, set_types=(NET,))
    text = iptables_restore(layout, 4, ["-R FORWARD 7 x"], {"dcos.it": "isoebpf-tmp-0"})
    assert "-R FORWARD 7 x\n" in text and "-I FORWARD" not in text
    assert "--match-set isoebpf-tmp-0 src -m set --match-set isoebpf-tmp-0 dst" in text
    assert "dcos.it" not in text


def _docs_block(command: str) -> str:
    text = (ROOT / "docs" / "iptables.md").read_text()
    start = text.index(f"$ {command}\n") + len(command) + 3
    return text[start:text.index("```", start)]


@pytest.mark.parametrize("command", [
    "isoebpf render examples/it-hr.yaml --backend iptables",
    "isoebpf render examples/it-hr.yaml --backend iptables --layout full",
    "isoebpf import --iptables-save tests/data/guide-iptables.save "
    "--ipset-save tests/data/guide-ipset.save",
])
def test_the_iptables_page_shows_what_the_commands_print(command: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # What `load` finds on this project's machines: hash:net, but neither of the other two.
    monkeypatch.setattr(iptables_backend, "set_types", lambda: ((NET,), ()))
    monkeypatch.chdir(ROOT)
    done = CliRunner().invoke(main, command.split()[1:])
    assert done.exit_code == 0, done.output
    assert done.stderr + done.stdout == _docs_block(command)
