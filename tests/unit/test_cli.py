"""The command line: output, JSON, exit codes (0 ok, 1 failure or invalid policy, 2 usage)."""

from __future__ import annotations

import copy
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from isoebpf import backend
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


def one_document(out: str) -> dict[str, Any]:
    """--json's stdout: exactly one JSON object, on one line."""
    assert out.endswith("\n") and out.count("\n") == 1, out
    document = json.loads(out)
    assert isinstance(document, dict)
    return document


def record(**more: Any) -> dict[str, Any]:
    """A status record as a backend returns it: one attachment, one counter."""
    return {"backend": "iptables", "policy": "/p.yaml", "digest": "d" * 64, "generation": 1,
            "loaded_at": "now", "on_failure": "closed", "connections": 0,
            "attachments": [{"ifname": "v-a", "mode": "tc", "state": "attached", "reason": "r"}],
            "counters": [{"rule": "allow:0", "text": "hr -> it", "packets": 5, "bytes": 300}],
            **more}


FAILURE = {"at": "then", "on_failure": "closed", "error": "no interface matches",
           "consequence": "fail-closed: the policy in force (digest dddddddddddd) stays"}


@pytest.mark.parametrize(
    ("shown", "code", "problems"),
    [
        (None, 0, []),
        (record(), 0, []),
        (record(failure=FAILURE), 1, ["the last change failed"]),
        ({"backend": None, "failure": FAILURE}, 1, ["the last change failed"]),
        (record(attachments=[{"ifname": "v-a", "mode": "tc", "state": "detached", "reason": "r"},
                             {"ifname": "v-b", "mode": "tc", "state": "interface gone",
                              "reason": "r"}]),
         1, ["v-a (tc) detached", "v-b (tc) interface gone"]),
    ],
)
def test_status_exit_code_says_whether_all_is_in_place(
        monkeypatch: pytest.MonkeyPatch, shown: dict[str, Any] | None, code: int,
        problems: list[str]) -> None:
    monkeypatch.setattr(backend, "status", lambda scope: copy.deepcopy(shown))
    text_code, text, err = run("status")
    assert text_code == code
    if shown and shown.get("failure"):
        assert text.startswith("LAST CHANGE FAILED at then (on-failure closed): fail-closed")
    if shown and shown.get("backend"):
        assert "allow:0" in text and "v-a" in text, "the whole view, whatever the exit code"
    assert err == (f"isoebpf: status: {'; '.join(problems)}\n" if problems else "")
    json_code, out, _ = run("status", "--json")
    document = one_document(out)
    assert json_code == code and document["ok"] is (code == 0)
    assert document["problems"] == problems
    assert document.get("error") == ("; ".join(problems) if problems else None)
    assert document["backend"] == (shown or {}).get("backend")
