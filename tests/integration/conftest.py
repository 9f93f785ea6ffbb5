"""Integration tier: real traffic between namespaces. Needs root and `ip netns`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from isoebpf.testbed import Testbed, it_hr
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]


def isoebpf(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "isoebpf.cli", *args], capture_output=True,
                          text=True, cwd=ROOT)
    if check and done.returncode != 0:
        raise AssertionError(f"isoebpf {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout}{done.stderr}")
    return done


@pytest.fixture(scope="module")
def testbed() -> Iterator[Testbed]:
    probe = subprocess.run(["ip", "netns", "add", "isoebpf-capability-probe"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        require("network namespaces", probe.stderr.strip())
    subprocess.run(["ip", "netns", "del", "isoebpf-capability-probe"], check=True)
    with it_hr() as bed:
        yield bed
