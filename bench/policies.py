"""Policies with N allow rules, for the scaling benchmarks.

Every policy is the datapath table's policy (tests/bpf/cases.py POLICY: its
overlays, exception and three rules, so the table's frames keep their verdicts)
with filler rules ahead of those three, plus one rule for the benchmark's own
allowed traffic at the end. Fillers live between two overlays of their own
(`fa`, `fb`): a filler allows one fa host to one fb /24 on one TCP port, so no
benchmark packet matches a filler, yet under iptables' plain layout every
packet walks all of them first, which is the cost the scaling benchmarks show.
Inside it/hr they would multiply with the overlay-wide rules: the compiler
lists a rule once per (source class, destination class) pair.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import yaml

from isoebpf.backends.ebpf import capacity
from tests.bpf.cases import POLICY

# The benchmark's own allowed traffic: iperf3's port, TCP and UDP, HR to IT.
BENCH_PORT = 5201
# The port of the denied SYNs (B2, B4): no rule allows it from HR to IT.
DENIED_PORT = 22
BENCH_RULE = f"  - {{from: hr, to: it, ports: [tcp/{BENCH_PORT}, udp/{BENCH_PORT}]}}"
CASE_RULES = 3  # the allow rules POLICY brings

_FILLER_SOURCES = 256 * 250  # 10.100.0.1 .. 10.100.255.250
CHANGED_PORT_OFFSET = 60000  # changed_policy moves the first filler's port by this
FILLER_OVERLAYS = """\
  fa:
    subnets: [10.100.0.0/16]
  fb:
    subnets: [10.101.0.0/16]
"""


@dataclass(frozen=True)
class Filler:
    """One filler rule: src host, dst /24, TCP port."""

    src: str
    dst: str
    port: int


def filler(i: int) -> Filler:
    host = i % _FILLER_SOURCES
    src = f"10.100.{host // 250}.{1 + host % 250}"
    dst = f"10.101.{i % 256}.0/24"
    return Filler(src, dst, 1000 + i // _FILLER_SOURCES)


def fillers(count: int) -> Iterator[Filler]:
    return (filler(i) for i in range(count))


def filler_count(rules: int) -> int:
    """Fillers in a policy of `rules` allow rules in all."""
    return max(0, rules - CASE_RULES - 1)


def scaled_policy(rules: int) -> str:
    """POLICY with `rules` allow rules in all (at least the four it always has)."""
    head, _, case_rules = POLICY.partition("allow:\n")
    overlays, _, exceptions = head.partition("exceptions:\n")
    lines = [overlays + FILLER_OVERLAYS + "exceptions:", exceptions.rstrip("\n"), "allow:"]
    lines += [f"  - {{from: {f.src}, to: {f.dst}, ports: [tcp/{f.port}]}}"
              for f in fillers(filler_count(rules))]
    lines += [case_rules.rstrip("\n"), BENCH_RULE]
    return "\n".join(lines) + "\n"


def map_sizes(rules: int) -> dict[str, int]:
    """The map sizes `isoebpf load` compiles for a policy of `rules` rules (capacity.sizes_for),
    from what the generator knows it names, without compiling it."""
    classes = min(filler_count(rules), _FILLER_SOURCES) + 300
    sizes: dict[str, int] = capacity.sizes_for(
        {"classes_v4": classes, "allowed": rules + 64, "counters": rules + 16}, environ={})
    return sizes


def changed_policy(rules: int) -> str:
    """scaled_policy(rules) with one rule changed: the first filler's port, or
    the benchmark rule's when there are no fillers."""
    text = scaled_policy(rules)
    if filler_count(rules):
        first = filler(0)
        old = f"ports: [tcp/{first.port}]}}"
        return text.replace(old, f"ports: [tcp/{first.port + CHANGED_PORT_OFFSET}]}}", 1)
    return text.replace(f"tcp/{BENCH_PORT},", f"tcp/{BENCH_PORT + 1},", 1)


def scaled_policy_json(rules: int, changed: bool = False) -> str:
    """scaled_policy(rules) as JSON (or changed_policy(rules), when `changed`): the same
    document, so the same IR, for the programs' format. The fillers a line each, as in
    the YAML, ahead of the policy's own rules; the rest indented."""
    count = filler_count(rules)
    # The policy's own rules, from the YAML without fillers (with its change, if no filler takes it).
    document = yaml.safe_load(changed_policy(rules) if changed and not count else scaled_policy(CASE_RULES + 1))
    # Written out directly: a million rules are not read back through YAML.
    ports = [f.port for f in fillers(count)]
    if changed and ports:
        ports[0] += CHANGED_PORT_OFFSET
    lines = [f'  {{"from": "{f.src}", "to": "{f.dst}", "ports": ["tcp/{port}"]}}'
             for f, port in zip(fillers(len(ports)), ports, strict=True)]
    lines += [f"  {json.dumps(rule)}" for rule in document.pop("allow")]
    head = json.dumps(document, indent=1)
    return head[:-2] + ',\n "allow": [\n' + ",\n".join(lines) + "\n ]\n}\n"


FORMATS = (".yaml", ".json")


def policy_text(rules: int, suffix: str = ".yaml", changed: bool = False) -> str:
    """scaled_policy(rules), or changed_policy(rules) when `changed`, written as a file
    ending in `suffix`: ".yaml" as above, ".json" by scaled_policy_json."""
    if suffix == ".yaml":
        return (changed_policy if changed else scaled_policy)(rules)
    if suffix != ".json":
        raise ValueError(f"no policy format {suffix!r}; known: {', '.join(FORMATS)}")
    return scaled_policy_json(rules, changed)
