"""The agent keeps the policy in force compiled, and compiles a changed file as a difference."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from bench import policies
from isoebpf.ir.tables import IR
from isoebpf.service.agent import Agent


def test_a_changed_file_is_compiled_as_a_difference_of_the_policy_in_force(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[IR] = []
    monkeypatch.setattr(Agent, "apply", lambda self, ir, why, **_: applied.append(ir))
    path = tmp_path / "policy.yaml"
    path.write_text(policies.scaled_policy(1000))
    path.chmod(0o600)
    agent = Agent(str(path), log_stream=io.StringIO())
    agent.check_policy()
    assert agent._compiled is not None and agent._compiled.delta is None, "the first compiles afresh"
    path.write_text(policies.changed_policy(1000))
    agent.check_policy()
    delta = agent._compiled.delta
    assert delta is not None
    assert (len(delta.allowed_written), len(delta.allowed_deleted)) == (1, 1)
    first, second = applied
    assert {c.network: c.class_id for c in first.classes} == {c.network: c.class_id for c in second.classes}
    # A file the contract refuses leaves the policy in force compiled as it was.
    path.write_text("version: 1\noverlays: {}\n")
    agent.check_policy()
    assert len(applied) == 2 and agent._compiled.ir is second
