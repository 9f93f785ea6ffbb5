"""`isoebpf graph --node`: after real traffic, each edge carries what its rule passed here."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from isoebpf.lab.testbed import Testbed
from tests.integration.conftest import SEED, SEED_RULE_ABOVE, isoebpf, packets_by_rule


@pytest.fixture
def loaded(testbed: Testbed, unloaded: None) -> Iterator[Testbed]:
    isoebpf("load", str(SEED), "--backend", "ebpf", "--netns", testbed.router, "--iface", "v-*")
    yield testbed


def edge_label(dot: str, src: str, dst: str) -> str:
    found = re.search(rf'^  "{src}" -> "{dst}" \[label="([^"]*)"', dot, re.M)
    assert found, dot
    return found[1]


def test_edges_carry_the_packets_each_rule_decided_here(loaded: Testbed, tmp_path: Path) -> None:
    router = loaded.router
    assert loaded.probe("hr1", "tcp", "it1", 80, timeout=1.0)["outcome"] == "connected"
    assert loaded.probe("hr2", "tcp", "it2", 80, timeout=1.0)["outcome"] == "connected"
    assert loaded.probe("it1", "tcp", "hr1", 80, timeout=1.0)["outcome"] == "refused"
    assert loaded.probe("it1", "tcp", "it2", 22, timeout=1.0)["outcome"] == "connected"
    # The file drawn numbers its rules otherwise than the policy in force: counts follow
    # each rule by identity, and the rule the file adds shows none.
    other = tmp_path / "above.yaml"
    other.write_text(SEED_RULE_ABOVE)
    drawn = isoebpf("graph", str(other), "--node", "--netns", router)
    packets = packets_by_rule(json.loads(isoebpf("status", "--netns", router, "--json").stdout))
    assert packets["allow:0"] >= 2 and packets["hairpin:it"] >= 1 and packets["default"] >= 1
    dot = drawn.stdout
    assert edge_label(dot, "hr", "it") == f"tcp/80 ({packets['allow:0']} packets)"
    assert edge_label(dot, "it", "hr") == "udp/53 (0 packets)"
    assert edge_label(dot, "it", "it") == f"inside: any ({packets['hairpin:it']} packets)"
    assert edge_label(dot, "hr", "hr") == f"inside: any ({packets['hairpin:hr']} packets)"
    assert f"rejected ({packets['default']} packets denied)" in dot
    assert "is in force, not" in drawn.stderr

    picture = tmp_path / "node.svg"
    isoebpf("graph", str(SEED), "--node", "--netns", router, "--format", "svg", "-o", str(picture))
    assert f"tcp/80 ({packets['allow:0']} packets)" in picture.read_text()


def test_nothing_loaded_is_an_error(testbed: Testbed, unloaded: None) -> None:
    done = isoebpf("graph", str(SEED), "--node", "--netns", testbed.router, check=False)
    assert done.returncode == 1 and f"nothing loaded in namespace {testbed.router}" in done.stderr
