"""The agent keeps the policy in force compiled, and compiles a changed file as a difference."""

from __future__ import annotations

import io
import threading
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


class _StopSetBySignal(threading.Event):
    """The agent's stop event, which the SIGTERM handler sets on the main thread: the
    handler would wait forever for the event's lock if the interrupted loop held it, in
    wait() (Python's Event.set takes the lock wait() holds)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.looks = after

    def wait(self, timeout: float | None = None) -> bool:
        raise AssertionError("the agent's loop waits on the event its signal handler sets")

    def is_set(self) -> bool:
        self.looks -= 1
        return self.looks < 0


def test_the_main_loop_never_holds_the_lock_its_signal_handler_takes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Agent, "check_policy", lambda self: None)
    agent = Agent(str(tmp_path / "policy.yaml"), log_stream=io.StringIO(), poll_interval=0.001)
    stop = _StopSetBySignal(after=3)
    agent.run(stop)
    assert stop.looks < 0
    assert '"event": "stopped"' in agent.log_stream.getvalue()  # type: ignore[attr-defined]
