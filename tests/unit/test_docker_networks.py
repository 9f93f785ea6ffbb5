"""Overlays named by Docker network: their subnets come from the engine, and every way
that can fail is a located error."""

from __future__ import annotations

import netaddr
import pytest

from isoebpf import pipeline
from isoebpf.cluster import layout as laid
from isoebpf.errors import PolicyError

NETWORKS = {"it": ["10.250.0.0/16"], "hr": ["192.168.0.0/16", "fd00:4852::/48"], "bare": []}


def networks(name: str) -> list[str]:
    if name not in NETWORKS:
        raise LookupError(f"no Docker network '{name}'")
    return NETWORKS[name]


def policy(overlays: str) -> str:
    return f"version: 1\ndefault: deny\noverlays:\n{overlays}allow:\n  - {{from: hr, to: it, ports: [tcp/80]}}\n"


def errors(text: str, given: object = networks) -> list[str]:
    with pytest.raises(PolicyError) as refused:
        pipeline.parse_policy(text, "p.yaml", given)  # type: ignore[arg-type]
    return [str(d) for d in refused.value.diagnostics if d.severity == "error"]


def test_an_overlay_takes_its_docker_networks_subnets_beside_its_own() -> None:
    read = pipeline.parse_policy(policy("  it: {docker_network: it}\n"
                                        "  hr: {docker_network: hr, subnets: [172.20.0.0/16]}\n"),
                                 "p.yaml", networks)
    it, hr = read.overlays
    assert it.subnets == (netaddr.IPNetwork("10.250.0.0/16"),) and it.docker_network == "it"
    assert [str(n) for n in hr.subnets] == ["172.20.0.0/16", "192.168.0.0/16", "fd00:4852::/48"]
    assert [str(n) for n in hr.from_docker] == ["192.168.0.0/16", "fd00:4852::/48"]
    # In etcd, the name stays and what this engine gave does not: each node asks its own.
    assert laid.parts(read).overlays["hr"] == {"isolated": False, "subnets": ["172.20.0.0/16"],
                                               "docker_network": "hr"}
    assert "subnets" not in laid.parts(read).overlays["it"]


def test_what_a_docker_network_cannot_give_is_said_where_it_is_named() -> None:
    said = errors(policy("  it: {docker_network: nope}\n  hr: {docker_network: bare}\n"))
    assert said == ["p.yaml:4:24: error: overlay 'it': no Docker network 'nope'",
                    "p.yaml:5:24: error: overlay 'hr': Docker network 'bare' has no subnet"]
    assert errors(policy("  it: {docker_network: '-x'}\n  hr: {subnets: [192.168.0.0/16]}\n")) == [
        "p.yaml:4:24: error: '-x' is no Docker network name (letters, digits, _ . -, starting with a "
        "letter or digit)"]
    assert errors(policy("  it: {docker_network: it}\n  hr: {subnets: [192.168.0.0/16]}\n"), None) == [
        "p.yaml:4:24: error: overlay 'it' names Docker network 'it', and no Docker engine is asked here"]


def test_a_docker_networks_subnets_may_not_overlap_another_overlay() -> None:
    said = errors(policy("  it: {docker_network: it}\n  hr: {subnets: [10.250.1.0/24]}\n"))
    assert any("overlaps 10.250.0.0/16 of overlay 'it'" in s for s in said), said
