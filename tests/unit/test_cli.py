"""The command line: output, JSON, exit codes (0 ok, 1 failure or invalid policy, 2 usage)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from isoebpf.cli import main

ROOT = Path(__file__).resolve().parents[2]
SEED = str(ROOT / "examples" / "it-hr.yaml")
BAD = str(ROOT / "tests" / "policies" / "bad" / "many-errors.yaml")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_validate_prints_a_summary() -> None:
    code, out, _ = run("validate", SEED)
    assert code == 0
    assert "valid: 2 overlays, 0 exceptions, 1 allow rule, default deny (reject)" in out


def test_validate_lists_every_error_and_exits_1() -> None:
    code, out, err = run("validate", BAD)
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len([line for line in lines if ": error: " in line]) == 7
    assert lines[0].startswith(f"{BAD}:1:10: error: unknown version 3")
    assert lines[-1] == "7 errors; nothing was applied"


def test_missing_file_is_a_located_error(tmp_path: Path) -> None:
    code, _, err = run("validate", str(tmp_path / "nope.yaml"))
    assert code == 1 and "cannot read policy" in err


@pytest.mark.parametrize(
    ("src", "dst", "extra", "action", "rule", "filtered"),
    [
        ("192.168.1.5", "10.250.0.7", ["--dport", "80"], "allow", "allow:0", True),
        ("10.250.0.7", "192.168.1.5", ["--dport", "80"], "reject", "default", True),
        ("10.250.0.7", "10.250.9.9", ["--dport", "22"], "allow", "hairpin:it", True),
        ("192.168.1.5", "192.168.2.5", ["--proto", "udp", "--dport", "53"], "allow",
         "hairpin:hr", True),
        ("203.0.113.1", "10.250.0.7", ["--proto", "icmp"], "allow", "unfiltered", False),
    ],
)
def test_explain_json(src: str, dst: str, extra: list[str], action: str, rule: str,
                      filtered: bool) -> None:
    code, out, _ = run("explain", SEED, "--src", src, "--dst", dst, "--json", *extra)
    assert code == 0
    answer = json.loads(out)
    assert (answer["action"], answer["rule"], answer["filtered"]) == (action, rule, filtered)


def test_explain_human_names_the_rule_and_its_line() -> None:
    code, out, _ = run("explain", SEED, "--src", "192.168.1.5", "--dst", "10.250.0.7",
                       "--dport", "80")
    assert code == 0
    assert out.splitlines() == [
        "192.168.1.5 (hr) -> 10.250.0.7 (it) tcp/80: allow",
        "  decided by allow:0 (hr -> it tcp/80, line 15): allowed by rule",
    ]


def test_explain_without_port_answers_when_the_port_does_not_matter() -> None:
    code, out, _ = run("explain", SEED, "--src", "10.250.0.7", "--dst", "192.168.1.5", "--json")
    assert code == 0 and json.loads(out)["action"] == "reject"


def test_explain_asks_for_a_port_when_it_matters() -> None:
    code, _, err = run("explain", SEED, "--src", "192.168.1.5", "--dst", "10.250.0.7")
    assert code == 1 and "the verdict depends on the port; give --dport" in err


@pytest.mark.parametrize(
    "args",
    [
        ["explain", SEED, "--src", "10.1", "--dst", "10.250.0.7"],
        ["explain", SEED, "--src", "10.0.0.1", "--dst", "10.250.0.7", "--dport", "0"],
        ["explain", SEED, "--src", "10.0.0.1", "--dst", "10.250.0.7", "--proto", "sctp"],
        ["explain", SEED, "--src", "10.0.0.1", "--dst", "10.250.0.7", "--proto", "icmp",
         "--dport", "80"],
        ["explain", SEED],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert run(*args)[0] == 2


def test_mixed_families_are_refused() -> None:
    code, _, err = run("explain", SEED, "--src", "fd00::1", "--dst", "10.250.0.7", "--dport", "1")
    assert code == 1 and "must both be IPv4 or both IPv6" in err


# -- --version, --json and exit codes on every command ---------------------------------

def test_version_comes_from_the_package_metadata() -> None:
    code, out, _ = run("--version")
    assert code == 0 and out == f"isoebpf {importlib.metadata.version('isoebpf')}\n"
