"""Security properties that need no kernel: no shell, untrusted policy files, privilege."""

from __future__ import annotations

import ast
import io
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from isoebpf.backends import state
from isoebpf.cli import main
from isoebpf.policy import trust
from isoebpf.service.agent import Agent

CONTROL = Path(__file__).resolve().parents[2] / "control"
SEED = CONTROL.parent / "examples" / "it-hr.yaml"
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}
SHELL_FUNCTIONS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
                   ("subprocess", "getstatusoutput")} | {("os", f) for f in (
                       "execl", "execle", "execlp", "execlpe", "spawnl", "spawnlp", "spawnv", "spawnvp")}


def shell_uses(source: str, name: str) -> list[str]:
    """Every place in `source` that could hand a string to a shell."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if not isinstance(node, ast.Call):
            continue
        where = f"{name}:{node.lineno}"
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if (func.value.id, func.attr) in SHELL_FUNCTIONS:
                found.append(f"{where}: {func.value.id}.{func.attr}")
            # An argument list, or a name bound to one; never a string built here.
            if (func.value.id == "subprocess" and func.attr in SUBPROCESS_CALLS and node.args
                    and not isinstance(node.args[0], ast.List | ast.Name)):
                found.append(f"{where}: subprocess.{func.attr} with a {type(node.args[0]).__name__}")
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant)
                                               and keyword.value.value is False):
                found.append(f"{where}: shell=")
    return found


def test_no_shell_command_is_built_anywhere_in_the_control_plane() -> None:
    sources = sorted(CONTROL.rglob("*.py"))
    assert len(sources) > 20
    found = [use for path in sources for use in shell_uses(path.read_text(), str(path))]
    assert found == []


@pytest.mark.parametrize("code", [
    "import os\nos.system('ip netns add ' + name)",
    "import subprocess\nsubprocess.run(f'iptables -N {chain}', shell=True)",
    "import subprocess\nsubprocess.run('ipset list')",
    "import os\nos.popen('id')",
])
def test_the_audit_catches_shell_use(code: str) -> None:
    assert shell_uses(code, "x.py")


@pytest.fixture
def policy_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "policies"
    folder.mkdir(mode=0o755)
    path = folder / "policy.yaml"
    path.write_text(SEED.read_text())
    path.chmod(0o644)
    return path


def test_a_private_policy_file_is_trusted(policy_copy: Path) -> None:
    assert trust.untrusted(policy_copy) is None
    link = policy_copy.parent / "link.yaml"
    link.symlink_to(policy_copy)
    assert trust.untrusted(link) is None


@pytest.mark.parametrize(("file_mode", "dir_mode", "says"), [
    (0o666, 0o755, "writable by its group and everyone (mode 0666)"),
    (0o646, 0o755, "writable by everyone (mode 0646)"),
    (0o664, 0o755, "writable by its group (mode 0664)"),
    (0o644, 0o777, "directory .* is writable by its group and everyone (mode 0777)"),
])
def test_a_policy_others_can_change_is_untrusted(policy_copy: Path, file_mode: int, dir_mode: int,
                                                 says: str) -> None:
    policy_copy.chmod(file_mode)
    policy_copy.parent.chmod(dir_mode)
    problem = trust.untrusted(policy_copy)
    assert problem is not None
    assert re.search(says.replace("(", r"\(").replace(")", r"\)"), problem), problem


def test_a_sticky_directory_is_fine(policy_copy: Path) -> None:
    policy_copy.parent.chmod(0o1777)
    assert trust.untrusted(policy_copy) is None


def test_a_file_of_another_user_is_untrusted(policy_copy: Path) -> None:
    os.chown(policy_copy, 65534, 65534)
    assert "belongs to uid 65534" in str(trust.untrusted(policy_copy))


def test_load_refuses_an_untrusted_policy_unless_forced(policy_copy: Path) -> None:
    policy_copy.chmod(0o666)
    refused = CliRunner().invoke(main, ["load", str(policy_copy), "--dry-run", "--backend", "iptables"])
    assert refused.exit_code == 1
    assert f"refusing {policy_copy}: " in refused.output and "--force" in refused.output
    forced = CliRunner().invoke(main, ["load", str(policy_copy), "--dry-run", "--backend", "iptables",
                                       "--force"])
    assert forced.exit_code == 0, forced.output
    assert "used anyway (--force)" in forced.output and "nothing changed" in forced.output
    # Reading commands still read it.
    assert CliRunner().invoke(main, ["validate", str(policy_copy)]).exit_code == 0


@pytest.mark.parametrize("args", [["load", str(SEED)], ["unload"], ["agent", str(SEED)]])
def test_changing_state_needs_privilege(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setattr(state, "effective_capabilities", lambda: 1 << state.CAP_BPF)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert f"'{args[0]}' changes this host's packet filtering" in result.output
    assert "run it as root (or with CAP_NET_ADMIN and CAP_BPF)" in result.output


def test_the_agent_refuses_an_untrusted_policy_unless_forced(policy_copy: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[str] = []
    monkeypatch.setattr(Agent, "apply", lambda self, ir, why, **_: applied.append(ir.digest))
    policy_copy.chmod(0o666)
    log = io.StringIO()
    Agent(str(policy_copy), log_stream=log).check_policy()
    assert applied == [] and '"event": "policy_refused"' in log.getvalue()
    assert "writable by its group and everyone" in log.getvalue()
    Agent(str(policy_copy), force=True, log_stream=io.StringIO()).check_policy()
    assert len(applied) == 1
