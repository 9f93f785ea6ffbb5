"""The command line: output, JSON, exit codes (0 ok, 1 failure or invalid policy, 2 usage)."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from isoebpf import cli, pipeline
from isoebpf.backends import enforcer, state
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


WARNED = (  # valid, with one warning: tcp/80 listed twice
    "version: 1\ndefault: deny\noverlays:\n  it: {subnets: [10.250.0.0/16]}\n"
    "  hr: {subnets: [192.168.0.0/16]}\nallow:\n  - {from: hr, to: it, ports: [tcp/80, tcp/80]}\n"
)


def one_document(out: str) -> dict[str, Any]:
    """--json's stdout: exactly one JSON object, on one line."""
    assert out.endswith("\n") and out.count("\n") == 1, out
    document = json.loads(out)
    assert isinstance(document, dict)
    return document


@pytest.fixture
def warned(tmp_path: Path) -> str:
    path = tmp_path / "warned.yaml"
    path.write_text(WARNED)
    return str(path)


@pytest.fixture
def no_state_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """State roots in tmp_path, so a test sees whatever a command would write."""
    monkeypatch.setattr(state, "RUN_DIR", tmp_path / "run")
    monkeypatch.setattr(state, "BPFFS", tmp_path / "bpffs")
    return tmp_path


def test_validate_json_has_the_summary_and_structured_warnings(warned: str) -> None:
    code, out, err = run("validate", warned, "--json")
    assert code == 0
    summary = one_document(out)
    assert summary["ok"] is True and summary["file"] == warned
    assert (summary["overlays"], summary["exceptions"], summary["rules"]) == (2, 0, 1)
    assert (summary["default"], summary["deny_action"]) == ("deny", "reject")
    assert summary["digest"] == pipeline.read(warned).ir.digest
    assert summary["warnings"] == [{"file": warned, "line": 7, "column": 40, "severity": "warning",
                                    "message": "'tcp/80' is listed twice"}]
    assert f"{warned}:7:40: warning: 'tcp/80' is listed twice" in err  # for people, still


def test_validate_json_errors_are_located_objects_and_exit_1() -> None:
    code, out, err = run("validate", BAD, "--json")
    assert code == 1
    failed = one_document(out)
    assert failed["ok"] is False and failed["error"] == "7 errors; nothing was applied"
    assert len(failed["diagnostics"]) == 7
    assert failed["diagnostics"][0] == {"file": BAD, "line": 1, "column": 10, "severity": "error",
                                        "message": "unknown version 3: this tool reads version 1"}
    assert err.splitlines()[-1] == "7 errors; nothing was applied"


@pytest.mark.parametrize("extra", [[], ["--proto", "tcp"]])
def test_explain_json_asking_for_a_port_answers_in_json(extra: list[str]) -> None:
    code, out, err = run("explain", SEED, "--src", "192.168.1.5", "--dst", "10.250.0.7", "--json",
                         *extra)
    assert code == 1
    failed = one_document(out)
    assert failed["ok"] is False and "give --dport" in failed["error"]
    assert failed["by_port"] == [{"dport": 1, "action": "reject", "rule": "default"},
                                 {"dport": 80, "action": "allow", "rule": "allow:0"},
                                 {"dport": 81, "action": "reject", "rule": "default"}]
    assert "isoebpf: error: the verdict depends on the port; give --dport" in err


def test_explain_json_keeps_warnings_off_stdout(warned: str) -> None:
    code, out, err = run("explain", warned, "--src", "192.168.1.5", "--dst", "10.250.0.7",
                         "--proto", "udp", "--json")
    assert code == 0 and "warning: 'tcp/80' is listed twice" in err
    answer = one_document(out)
    assert (answer["ok"], answer["action"], answer["rule"]) == (True, "reject", "default")
    assert [w["message"] for w in answer["warnings"]] == ["'tcp/80' is listed twice"]


@pytest.mark.parametrize(
    "args",
    [
        ["explain", SEED, "--json", "--src", "10.1", "--dst", "10.250.0.7"],
        ["explain", SEED, "--src", "10.0.0.1", "--json"],
        ["explain", SEED, "--src", "10.0.0.1", "--dst", "10.250.0.7", "--proto", "icmp",
         "--dport", "80", "--json"],
        ["load", SEED, "--backend", "bogus", "--json"],
        ["status", "--json", "--netns", "a/b", "--bogus"],
    ],
)
def test_usage_errors_exit_2_with_json_when_asked(args: list[str]) -> None:
    code, out, err = run(*args)
    assert code == 2 and "Usage:" in err
    failed = one_document(out)
    assert failed["ok"] is False and failed["exit_code"] == 2 and failed["error"]


def test_usage_errors_without_json_print_nothing_on_stdout() -> None:
    assert run("explain", SEED, "--src", "10.0.0.1")[:2] == (2, "")


def test_load_dry_run_json_says_what_would_be_done(no_state_here: Path) -> None:
    code, out, err = run("load", SEED, "--dry-run", "--backend", "iptables", "--iface", "v-*",
                         "--json")
    assert code == 0 and "backend iptables: asked for" in err
    would = one_document(out)
    assert would["ok"] is True and would["dry_run"] is True
    assert (would["backend"], would["netns"], would["interfaces"]) == ("iptables", None, ["v-*"])
    assert would["digest"] == pipeline.read(SEED).ir.digest
    assert "generation" not in would, "nothing was loaded"
    assert not (no_state_here / "run").exists() and not (no_state_here / "bpffs").exists()


def test_load_json_with_an_invalid_policy_lists_the_errors() -> None:
    code, out, _ = run("load", BAD, "--dry-run", "--backend", "iptables", "--json")
    assert code == 1
    assert len(one_document(out)["diagnostics"]) == 7


def test_a_namespace_that_does_not_exist_is_an_error_and_writes_nothing(
        no_state_here: Path) -> None:
    for args in (["status"], ["load", SEED, "--dry-run", "--backend", "iptables"]):
        code, out, err = run(*args, "--netns", "isoebpf-no-such-ns")
        assert code == 1 and out == ""
        assert ("isoebpf: error: no network namespace isoebpf-no-such-ns "
                "('ip netns list' shows those there are)") in err
        code, out, _ = run(*args, "--netns", "isoebpf-no-such-ns", "--json")
        assert code == 1
        assert one_document(out)["error"].startswith("no network namespace isoebpf-no-such-ns")
    assert not (no_state_here / "run").exists() and not (no_state_here / "bpffs").exists()


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
    monkeypatch.setattr(enforcer, "status", lambda scope: copy.deepcopy(shown))
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


@pytest.mark.parametrize(("flags", "shown"), [((), True), (("--quiet",), False), (("--json",), False)])
def test_a_long_load_shows_its_phases_on_a_terminal_unless_quiet_or_json(
        monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...], shown: bool) -> None:
    monkeypatch.setattr(cli, "PROGRESS_AFTER", 0.0)  # every load is long: phases from the start
    monkeypatch.setattr(cli, "_on_terminal", lambda: True)
    done = CliRunner().invoke(main, ["load", str(SEED), "--dry-run", "--backend", "iptables", *flags])
    assert done.exit_code == 0, done.output
    phases = [line for line in done.stderr.splitlines() if " s  " in line]
    assert bool(phases) == shown, done.stderr
    if shown:
        said = [line.split(" s  ", 1)[1] for line in phases]
        assert said == [f"reading and checking {SEED}", "compiling 1 rules, 0 exceptions, 2 overlays"]


class _Compile:
    """Stands for the early compile of an eBPF first load: still running until told."""

    def __init__(self) -> None:
        self.still_running, self.abandoned, self.discarded = True, False, False

    def abandon(self) -> None:
        self.abandoned = True

    def discard(self) -> None:
        self.discarded = True

    def running(self) -> bool:
        return self.still_running


@pytest.mark.parametrize("ends_after", [True, False], ids=["the program", "in process"])
def test_a_failed_load_abandons_the_early_compile_only_where_the_process_ends(
        no_state_here: Path, monkeypatch: pytest.MonkeyPatch, ends_after: bool) -> None:
    early = _Compile()
    monkeypatch.setattr(cli, "require_privilege", lambda command: None)
    monkeypatch.setattr(enforcer, "compile_early", lambda *args: early)
    monkeypatch.setattr(cli, "_abandoned", [])
    monkeypatch.setattr(cli, "_program_ends_after_command", ends_after)
    code, _, err = run("load", BAD, "--backend", "ebpf")
    assert code == 1 and "nothing was applied" in err
    assert early.abandoned == ends_after and cli._abandoned == ([early] if ends_after else [])


def test_a_relative_policy_path_is_read_wherever_the_compile_moves_the_process(
        no_state_here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bcc moves the whole process into the kernel headers' directory while it
    compiles, beside the parse: the file named relative to where the command ran
    is the one read."""
    here = no_state_here / "here"
    here.mkdir()
    (here / "bad.yaml").write_text(Path(BAD).read_text())

    def compile_moving_the_process(*args: object) -> _Compile:
        os.chdir(no_state_here)
        return _Compile()

    monkeypatch.chdir(here)
    monkeypatch.setattr(cli, "require_privilege", lambda command: None)
    monkeypatch.setattr(enforcer, "compile_early", compile_moving_the_process)
    code, _, err = run("load", "bad.yaml", "--backend", "ebpf")
    assert code == 1 and "cannot read policy" not in err
    assert f"{here / 'bad.yaml'}:" in err and "7 errors; nothing was applied" in err


@pytest.mark.parametrize(("running", "status", "ends"), [
    (True, 1, "at once with 1"), (True, 2, "at once with 2"), (False, 1, "as usual")])
def test_the_program_ends_without_waiting_for_an_abandoned_compile(
        monkeypatch: pytest.MonkeyPatch, running: bool, status: int, ends: str) -> None:
    early = _Compile()
    early.still_running = running
    monkeypatch.setattr(cli, "_abandoned", [early])

    def main_failing() -> None:
        raise SystemExit(status)

    def exit_now(code: int) -> None:
        raise RuntimeError(f"at once with {code}")

    monkeypatch.setattr(cli, "main", main_failing)
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    try:
        cli.run()
    except RuntimeError as err:
        assert str(err) == ends
    except SystemExit as err:
        assert ends == "as usual" and err.code == status
    else:
        raise AssertionError("run() returned")
