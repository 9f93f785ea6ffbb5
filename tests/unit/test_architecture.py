"""The package's structure: stages that import only downward, no circle, confined imports."""

from __future__ import annotations

from pathlib import Path

from tests import architecture
from tests.architecture import graph

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_module_lies_in_a_stage() -> None:
    ours, _ = graph()
    assert len(ours) > 40
    for module in ours:
        architecture.room_of(module)  # raises for a module in no stage


def test_no_import_climbs_to_a_later_stage() -> None:
    ours, _ = graph()
    assert architecture.upward(ours) == []


def test_no_modules_import_each_other_in_a_circle() -> None:
    ours, _ = graph()
    assert architecture.circles(ours) == []


def test_only_the_backends_import_bcc_and_pyroute2_and_only_the_cli_click() -> None:
    _, others = graph()
    assert architecture.confined(others) == []
    assert "click" in others["isoebpf.cli"] and "bcc" in others["isoebpf.backends.ebpf.program"]


def test_the_reading_commands_need_no_backend_imported_at_module_level() -> None:
    """validate, explain and render work without bcc: the registry imports a backend in `get`."""
    registry = (architecture.CONTROL / "backends" / "registry.py").read_text()
    top_level = [line for line in registry.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top_level if ".ebpf" in line or ".iptables" in line]


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """An upward import, a circle, a side-by-side import and a stray click, planted."""
    root = tmp_path / "control"
    (root / "policy").mkdir(parents=True)
    (root / "backends" / "ebpf").mkdir(parents=True)
    (root / "backends" / "iptables").mkdir(parents=True)
    for package in ("", "policy", "backends", "backends/ebpf", "backends/iptables"):
        (root / package / "__init__.py").write_text("")
    (root / "policy" / "parse.py").write_text("from ..cli import main\nfrom . import model\n")
    (root / "policy" / "model.py").write_text("import click\nfrom .parse import loads\n")
    (root / "backends" / "ebpf" / "backend.py").write_text(
        "def f():\n    from ..iptables import backend\n")
    (root / "backends" / "iptables" / "backend.py").write_text("")
    (root / "cli.py").write_text("import click\n")
    ours, others = graph(root)
    assert architecture.upward(ours) == [
        "isoebpf.backends.ebpf.backend imports isoebpf.backends.iptables.backend: "
        "isoebpf.backends.ebpf and isoebpf.backends.iptables stand apart",
        "isoebpf.policy.parse (policy) imports isoebpf.cli (cli), a later stage",
    ]
    assert architecture.circles(ours) == [["isoebpf.policy.model", "isoebpf.policy.parse"]]
    assert architecture.confined(others) == [
        "isoebpf.policy.model imports click, which only isoebpf.cli may import"]


def test_the_picture_in_the_docs_is_drawn_from_the_code_as_it_is() -> None:
    """docs/architecture.dot is what `make architecture` writes today."""
    ours, _ = graph()
    assert (DOCS / "architecture.dot").read_text() == architecture.dot(ours), \
        "the import graph changed: run 'make architecture' and commit docs/architecture.*"
