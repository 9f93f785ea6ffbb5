"""The scope's lock: one holder at a time, also while holders delete the lock file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from isoebpf.backends import state
from isoebpf.backends.state import Scope
from isoebpf.errors import StateError


@pytest.fixture
def scope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Scope:
    monkeypatch.setattr(state, "RUN_DIR", tmp_path / "run")
    monkeypatch.setattr(state, "BPFFS", tmp_path / "bpffs")
    return Scope("isoebpf-lock-test")


def test_deleting_the_lock_file_never_lets_two_commands_hold_it(scope: Scope) -> None:
    """The scope stays empty, so every holder deletes the lock file as it leaves, while
    others wait on that file: each must start over on the new one, never hold the old."""
    holding: list[int] = []
    most = 0
    count = threading.Lock()

    def command() -> None:
        nonlocal most
        for _ in range(40):
            with scope.locked():
                with count:
                    holding.append(threading.get_ident())
                    most = max(most, len(holding))
                time.sleep(0.001)
                with count:
                    holding.remove(threading.get_ident())

    threads = [threading.Thread(target=command) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 1, f"{most} commands held the lock at once"
    assert not scope.lock_path.exists()


def test_the_lock_file_stays_while_the_scope_holds_state(scope: Scope) -> None:
    with scope.locked():
        scope.write({"backend": "iptables"})
    assert scope.lock_path.exists()
    with scope.locked():
        scope.forget()
    assert not scope.lock_path.exists() and not scope.run_dir.exists()


def test_a_held_lock_is_waited_for_then_refused_naming_its_holder(
        scope: Scope, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOEBPF_LOCK_WAIT", "0.2")
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with scope.locked():
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        held.wait()
        with pytest.raises(StateError, match=r"\(pid \d+\) has held .* nothing was changed"), \
                scope.locked():
            pass
    finally:
        release.set()
        thread.join()
    assert not scope.lock_path.exists()
