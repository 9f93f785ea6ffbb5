"""Shared test set-up: tiers by directory, and the rule that CI never skips."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from types import FrameType

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"

# What `--backend auto` chose on the running kernel, said at the end of the run:
# `make test-vm` shows it per kernel.
PATHS_TAKEN: list[str] = []

_PYTEST_PID = os.getpid()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _PYTEST_PID:
        # A fork of this process (pyroute2 forks to open sockets in namespaces)
        # must just die: unwinding pytest there would run teardowns twice.
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


# A terminated run (CI's time limit, `timeout`) still tears down its namespaces,
# pins and attachments: pytest runs fixture finalizers on KeyboardInterrupt.
signal.signal(signal.SIGTERM, _interrupt)

_TIERS = {"unit": "unit", "bpf": "bpf", "integration": "integration"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each test directory is a tier: tests/unit -> `unit`, and so on. The long
    `soak` variants run only when the marker expression names them (`make soak`)."""
    for item in items:
        tier = _TIERS.get(Path(str(item.fspath)).parent.name)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
    if "soak" not in config.getoption("markexpr", ""):
        long_runs = [item for item in items if item.get_closest_marker("soak")]
        if long_runs:
            config.hook.pytest_deselected(items=long_runs)
            items[:] = [item for item in items if not item.get_closest_marker("soak")]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in PATHS_TAKEN:
        terminalreporter.write_line(f"path taken on {os.uname().release}: {line}")


def require(capability: str, reason: str) -> None:
    """Skip for a missing capability, except in CI, where it is a failure."""
    message = f"{capability} unavailable: {reason}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing capability is a failure)")
    pytest.skip(message)


def require_program(name: str, package: str) -> str:
    """The path of program `name`; a missing capability (see require) when it is not there."""
    found = shutil.which(name)
    if found is None:
        require(name, f"not installed (scripts/setup.sh installs Debian's {package})")
    assert found
    return found
