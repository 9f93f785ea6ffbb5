"""Oversized policies are refused before anything changes, saying what to raise."""

from __future__ import annotations

import pytest

from isoebpf import pipeline
from isoebpf.backends.ebpf import capacity
from isoebpf.backends.ebpf.abi import ISOEBPF_MAX_RULES, MAP_SIZE_MACROS
from isoebpf.backends.iptables import layout as iptables_layout
from isoebpf.errors import BackendError
from isoebpf.ir.tables import IR
from tests.policygen import many_overlays, many_ports


def overlays_ir(count: int, hairpin: bool = True) -> IR:
    return pipeline.loads(many_overlays(count, isolated=not hairpin), "big.yaml").ir


def ports_ir(count: int) -> IR:
    return pipeline.loads(many_ports(count), "ports.yaml").ir


PORTS_300 = ports_ir(300)  # compiled once, at collection, for the two cases below


def test_the_defaults_are_read_from_the_headers() -> None:
    sizes = capacity.default_sizes()
    assert set(MAP_SIZE_MACROS.values()) <= set(sizes)
    assert sizes["ISOEBPF_MAX_RULES"] == ISOEBPF_MAX_RULES


def test_a_policy_that_fits_has_no_problems() -> None:
    assert capacity.problems(ports_ir(10), capacity.sized(capacity.default_sizes()), {}) == []


@pytest.mark.parametrize(("ir", "macro", "limit", "needed"), [
    (overlays_ir(70), "ISOEBPF_MAX_CLASSES", 64, 70),
    (overlays_ir(20), "ISOEBPF_MAX_HAIRPINS", 16, 20),
    (PORTS_300, "ISOEBPF_MAX_ALLOWED", 256, 300),
    (PORTS_300, "ISOEBPF_MAX_RULES", 128, max(r.id for r in PORTS_300.rules) + 1),
], ids=["classes", "hairpins", "allowed", "rules"])
def test_too_big_names_the_map_the_count_the_limit_and_the_constant(
    ir: IR, macro: str, limit: int, needed: int,
) -> None:
    sizes = {**capacity.default_sizes(), macro: limit}
    found = capacity.problems(ir, capacity.sized(sizes), {})
    assert len(found) == 1, found
    assert f"needs {needed} " in found[0] and f"holds {limit}:" in found[0]
    assert f"raise {macro} (" in found[0] and f"{macro}={1 << (2 * needed - 1).bit_length()} isoebpf load" in found[0]
    with pytest.raises(BackendError, match="nothing was changed"):
        capacity.check(ir, capacity.sized(sizes), {})


def test_an_update_must_fit_beside_the_policy_in_force() -> None:
    ir = ports_ir(100)
    sizes = capacity.sized({**capacity.default_sizes(), "ISOEBPF_MAX_ALLOWED": 150})
    assert capacity.problems(ir, sizes, {}) == []
    found = capacity.problems(ir, sizes, {"allowed": 60})
    assert len(found) == 1 and "beside the 60 of the policy in force" in found[0]


def test_iptables_sets_are_sized_to_the_policy_not_limited() -> None:
    """The iptables backend has no fixed table: a set that outgrows ipset's default
    maxelem (65536) is created with room for every element (ipset counts each port
    of a range)."""
    text = ("version: 1\ndefault: deny\noverlays:\n  a:\n    subnets: [10.1.0.0/16]\n"
            "  b:\n    subnets: [10.2.0.0/16]\n  c:\n    subnets: [10.3.0.0/16]\nallow:\n"
            "  - {from: a, to: b, ports: [tcp/1-40000]}\n  - {from: a, to: c, ports: [tcp/1-40000]}\n")
    ipset_text, _, _ = iptables_layout.render(pipeline.loads(text, "big.yaml").ir,
                                              iptables_layout.DEFAULT_CHAIN, iptables_layout.SET_TYPES)
    creates = [line for line in ipset_text.splitlines() if line.startswith("create dcos-allowed-ports ")]
    assert creates == [creates[0]] and creates[0].endswith(" maxelem 80000"), creates
