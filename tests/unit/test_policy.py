"""Valid policies: what the loader makes of them, and its warnings."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import netaddr
import yaml

from isoebpf import pipeline
from isoebpf.errors import PolicyError
from isoebpf.policy import parse
from isoebpf.policy.model import ANY_PORT, PortSpec

ROOT = Path(__file__).resolve().parents[2]

CONTRACT_EXAMPLE = """\
version: 1
default: deny            # deny | allow
deny_action: reject      # reject | drop
overlays:
  it:
    subnets: [10.250.0.0/16]
  hr:
    subnets: [192.168.0.0/16, "fd00:4852::/48"]
  lab:
    subnets: [172.20.0.0/16]
    isolated: true
exceptions:
  - {from: 10.250.7.0/24, to: 192.168.9.0/24}
allow:
  - {from: hr, to: it, ports: [tcp/80]}
  - {from: 192.168.5.0/24, to: 10.250.3.0/24}
  - {from: it, to: lab, ports: [udp/5000-5010, icmp, tcp/443]}
interfaces: ["veth*", "vxlan*"]
"""


def test_the_contracts_example_loads_as_written() -> None:
    loaded = parse.loads(CONTRACT_EXAMPLE, "policy.yaml")
    assert (loaded.default, loaded.deny_action) == ("deny", "reject")
    assert [o.name for o in loaded.overlays] == ["it", "hr", "lab"]
    assert loaded.overlay("hr").subnets == (netaddr.IPNetwork("192.168.0.0/16"),
                                            netaddr.IPNetwork("fd00:4852::/48"))
    assert loaded.overlay("lab").isolated and not loaded.overlay("it").isolated
    assert loaded.rules[1].ports == (ANY_PORT,)
    assert loaded.rules[2].ports == (PortSpec("udp", 5000, 5010), PortSpec("icmp"),
                                     PortSpec("tcp", 443, 443))
    assert loaded.rules[1].src.overlay == "hr" and loaded.rules[1].dst.overlay == "it"
    assert loaded.interfaces == ("veth*", "vxlan*")
    assert loaded.warnings == ()


def test_omitted_keys_take_the_guides_defaults() -> None:
    loaded = parse.loads("version: 1\noverlays:\n  it: {subnets: [10.250.0.0/16]}\n")
    assert (loaded.default, loaded.deny_action, loaded.interfaces) == ("allow", "reject", None)
    assert loaded.timeouts == {"tcp": 21600, "tcp_closing": 10, "udp": 60, "icmp": 30}


def test_bare_addresses_are_host_routes_and_timeouts_are_settable() -> None:
    loaded = parse.loads(
        "version: 1\noverlays:\n  it: {subnets: [10.250.0.0/16]}\n"
        "allow:\n  - {from: 10.250.0.1, to: it}\ntimeouts: {udp: 5}\n"
    )
    assert loaded.rules[0].src.cidrs == (netaddr.IPNetwork("10.250.0.1/32"),)
    assert loaded.timeouts["udp"] == 5


def test_warnings_are_located_and_do_not_fail() -> None:
    loaded = parse.loads(
        "version: 1\ndefault: deny\noverlays:\n"
        "  it: {subnets: [10.250.0.0/16, 10.250.1.0/24]}\n"
        "  hr: {subnets: [192.168.0.0/16]}\n"
        "allow:\n  - {from: hr, to: it, ports: [tcp/80, tcp/80, any]}\n",
        "w.yaml",
    )
    assert [str(w) for w in loaded.warnings] == [
        "w.yaml:4:33: warning: subnet 10.250.1.0/24 lies inside 10.250.0.0/16, "
        "already in overlay 'it'",
        "w.yaml:7:31: warning: 'any' already covers every protocol and port; the others add nothing",
        "w.yaml:7:40: warning: 'tcp/80' is listed twice",
    ]


def test_alias_bombs_are_refused_without_expanding_them() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    try:
        parse.loads("\n".join(lines) + "\n")
    except PolicyError as err:
        assert "expands to more than" in str(err)
    else:
        raise AssertionError("an alias bomb was accepted")


def test_seed_example_file_is_valid() -> None:
    loaded = pipeline.read(ROOT / "examples" / "it-hr.yaml")
    assert loaded.warnings == () and [r.index for r in loaded.policy.rules] == [0]


def test_reading_a_policy_leaves_no_cycle_for_a_paused_collector_to_keep() -> None:
    """pipeline.collector_paused freezes what loading made: garbage in a cycle (an
    exception holding the frames that held the document) would stay for good."""
    text = CONTRACT_EXAMPLE.replace("subnets: [10.250.0.0/16]", 'subnets: [10.250.0.0/16, "fd00:1::/32"]')
    for name, body in (("p.yaml", text), ("p.json", json.dumps(yaml.safe_load(text)))):
        gc.collect()
        enabled = gc.isenabled()
        gc.disable()
        try:
            assert pipeline.parse_policy(body, name).overlays
            assert gc.collect() == 0, name
        finally:
            if enabled:
                gc.enable()
