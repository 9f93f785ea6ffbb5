"""`isoebpf graph`: the policy as overlays and edges, in DOT, with a node's counts."""

from __future__ import annotations

import html
import re
from pathlib import Path

from click.testing import CliRunner

from isoebpf import pipeline
from isoebpf.cli import main
from isoebpf.ir.graph import RULES_SHOWN, Edge, Line, dot, picture

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "it-hr.yaml"
DOCS = ROOT / "docs"

# Every kind of edge and node: an isolated overlay, an exception, rules between CIDRs,
# two rules on one pair, a rule inside an isolated overlay.
EVERY_KIND = """\
version: 1
default: deny
deny_action: drop
overlays:
  it: {subnets: [10.250.0.0/16]}
  hr: {subnets: [192.168.0.0/16, "fd00:4852::/48"]}
  lab: {subnets: [172.20.0.0/16], isolated: true}
exceptions:
  - {from: 10.250.7.0/24, to: 192.168.9.0/24}
allow:
  - {from: hr, to: it, ports: [tcp/80]}
  - {from: 192.168.5.0/24, to: 10.250.3.0/24}
  - {from: it, to: lab, ports: [udp/5000-5010, icmp, tcp/443]}
  - {from: lab, to: lab, ports: [tcp/22]}
"""


def drawn(text: str, packets: dict[str, int] | None = None) -> tuple[str, list[Edge]]:
    compiled = pipeline.loads(text)
    shown = picture(compiled.policy, compiled.ir, packets)
    return dot(shown), list(shown.edges)


def statement(text: str, head: str) -> str:
    """The one DOT statement that starts with `head` (a node or an edge)."""
    found = [line.strip() for line in text.splitlines() if line.strip().startswith(head + " [")]
    assert len(found) == 1, (head, text)
    return found[0]


def label(text: str, head: str) -> list[str]:
    said = re.search(r'label="((?:[^"\\]|\\.)*)"', statement(text, head))
    assert said
    return said[1].split("\\n")


def test_the_guides_example() -> None:
    text, edges = drawn(SEED.read_text())
    assert label(text, '"it"') == ["it", "10.250.0.0/16"]
    assert label(text, '"hr"') == ["hr", "192.168.0.0/16"]
    assert label(text, '"hr" -> "it"') == ["tcp/80"]
    assert [(e.kind, e.src, e.dst) for e in edges] == [
        ("hairpin", "it", "it"), ("hairpin", "hr", "hr"), ("allow", "hr", "it")]
    assert '"it" -> "hr"' not in text  # IT may not open connections to HR
    legend = re.search(r'graph \[.*label="([^"]*)"', text)
    assert legend and legend[1].startswith(
        "default deny (reject): traffic between overlays that no rule allows is rejected\\l")
    assert "packets" not in text  # no node's counts were asked for


def test_isolated_overlays_exceptions_and_cidr_rules_are_drawn_apart() -> None:
    text, edges = drawn(EVERY_KIND)
    lab = statement(text, '"lab"')
    assert "peripheries=2" in lab and label(text, '"lab"') == ["lab", "172.20.0.0/16", "isolated"]
    assert "peripheries" not in statement(text, '"it"')
    assert label(text, '"hr"') == ["hr", "192.168.0.0/16", "fd00:4852::/48"]
    # No free hairpin inside lab: only its rule's loop, drawn as an allow edge.
    kinds = {(e.src, e.dst): e.kind for e in edges}
    assert kinds[("lab", "lab")] == "allow" and kinds[("it", "it")] == "hairpin"
    assert "style=dotted" in statement(text, '"it" -> "it"')
    assert "style" not in statement(text, '"lab" -> "lab"')
    exception = statement(text, '"it" -> "hr"')
    assert "style=dashed" in exception
    assert label(text, '"it" -> "hr"') == ["never filtered 10.250.7.0/24 → 192.168.9.0/24"]
    # Two rules of one pair: one edge, a line each, in file order.
    assert label(text, '"hr" -> "it"') == ["tcp/80", "192.168.5.0/24 → 10.250.3.0/24: any"]
    assert [line.rule for line in next(e for e in edges if e.kind == "allow" and e.src == "hr").lines] == [
        "allow:0", "allow:1"]
    assert label(text, '"it" -> "lab"') == ["udp/5000-5010, icmp, tcp/443"]
    assert "default deny (drop): traffic between overlays that no rule allows is dropped" in text


def test_default_allow_is_said() -> None:
    text, _ = drawn(SEED.read_text().replace("default: deny", "default: allow"))
    assert 'label="default allow: traffic between overlays that no rule names passes\\l' in text


def test_a_nodes_counts_go_to_the_rules_by_identity() -> None:
    """Counts of the policy in force find the rules of the file drawn by what each rule
    is: here the file has a rule above `hr -> it tcp/80`, which is allow:1 in it."""
    above = SEED.read_text().replace("allow:\n", "allow:\n  - {from: it, to: hr, ports: [udp/53]}\n")
    packets = {"allow hr -> it tcp/80": 1234, "hairpin it": 7, "default": 5, "established": 40,
               "unfiltered": 3, "fragment": 1, "malformed": 1}
    text, edges = drawn(above, packets)
    assert label(text, '"hr" -> "it"') == ["tcp/80 (1234 packets)"]
    assert label(text, '"it" -> "hr"') == ["udp/53 (0 packets)"]
    assert label(text, '"it" -> "it"') == ["inside: any (7 packets)"]
    assert "penwidth=4.1" in statement(text, '"hr" -> "it"')  # 1 + log10(1234)
    assert "penwidth" not in statement(text, '"it" -> "hr"')
    web = next(e for e in edges if (e.src, e.dst) == ("hr", "it"))
    assert web.lines == (Line("allow:1", "tcp/80", 1234),) and web.packets == 1234
    assert "rejected (5 packets denied)\\l" in text
    assert ("tracked connections: 40 packets; not between overlays (unfiltered): 3; "
            "dropped as fragment or malformed: 2\\l") in text


def test_in_audit_mode_the_defaults_packets_are_would_be_denials() -> None:
    compiled = pipeline.loads(SEED.read_text())
    text = dot(picture(compiled.policy, compiled.ir, {"default": 5}, audit=True))
    assert "rejected (5 packets that enforcing would deny; audit mode denies nothing)\\l" in text


def test_an_edge_of_many_rules_shows_the_first_and_sums_the_rest() -> None:
    rules = "".join(f"  - {{from: hr, to: it, ports: [tcp/{port}]}}\n" for port in range(1, 11))
    text, _ = drawn(SEED.read_text().replace("  - {from: hr, to: it, ports: [tcp/80]}\n", rules),
                    {f"allow hr -> it tcp/{port}": port for port in range(1, 11)})
    shown = [f"tcp/{port} ({port} packets)" for port in range(1, RULES_SHOWN + 1)]
    rest = sum(range(RULES_SHOWN + 1, 11))
    assert label(text, '"hr" -> "it"') == [*shown, f"+{10 - RULES_SHOWN} more rules ({rest} packets)"]


def test_the_readme_picture_is_the_command_s_drawing_of_the_example() -> None:
    """docs/it-hr-graph.dot is what `isoebpf graph` draws today, and the committed SVG
    shows its every line of text and colour (`make graph-picture` redraws both)."""
    compiled = pipeline.read(SEED)
    expected = dot(picture(compiled.policy, compiled.ir))
    stale = "the graph changed: run 'make graph-picture' and commit docs/it-hr-graph.*"
    assert (DOCS / "it-hr-graph.dot").read_text() == expected, stale
    svg = (DOCS / "it-hr-graph.svg").read_text()
    texts = {html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)}
    lines = {line for said in re.findall(r'label="((?:[^"\\]|\\.)*)"', expected)
             for line in re.split(r"\\[nl]", said) if line}
    assert texts == lines, stale
    colours = set(re.findall(r'"(#[0-9a-f]{6})"', expected))
    assert colours and colours <= set(re.findall(r'"(#[0-9a-f]{6})"', svg)), stale


def test_the_command_writes_dot_svg_and_png(tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(main, ["graph", str(SEED)])
    assert done.exit_code == 0 and done.stdout.startswith("digraph policy {")
    for form, magic in (("svg", b"<?xml"), ("png", b"\x89PNG")):
        out = tmp_path / f"g.{form}"
        done = runner.invoke(main, ["graph", str(SEED), "--format", form, "-o", str(out)])
        assert done.exit_code == 0, done.output
        assert out.read_bytes().startswith(magic)
    assert b"tcp/80" in (tmp_path / "g.svg").read_bytes()


def test_the_command_says_what_is_wrong(tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(main, ["graph", str(SEED), "--netns", "x"])
    assert done.exit_code == 2 and "--netns goes with --node" in done.stderr
    done = runner.invoke(main, ["graph", str(SEED), "--format", "svg"], env={"PATH": str(tmp_path)})
    assert done.exit_code == 1 and "Graphviz's dot is not installed" in done.stderr
    done = runner.invoke(main, ["graph", str(ROOT / "tests" / "policies" / "bad" / "many-errors.yaml")])
    assert done.exit_code == 1 and done.stdout == ""
