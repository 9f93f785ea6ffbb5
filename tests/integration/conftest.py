"""Integration tier: real traffic between namespaces. Needs root and `ip netns`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from isoebpf import policy
from isoebpf.compiler import compile_policy
from isoebpf.ir import IR
from isoebpf.testbed import Testbed, it_hr
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "it-hr.yaml"
# Policy B swaps which of HR's services IT hosts may reach, and opens IT -> HR tcp/80:
# tries that A and B answer differently tell which one is in force.
POLICY_B = SEED.read_text().replace(
    "  - {from: hr, to: it, ports: [tcp/80]}",
    "  - {from: hr, to: it, ports: [tcp/22, udp/53]}\n  - {from: it, to: hr, ports: [tcp/80]}")


def policy_files(folder: Path) -> dict[str, tuple[Path, IR]]:
    """Policies A (the seed) and B written into `folder`, with their compiled IRs."""
    found = {}
    for name, text in (("A", SEED.read_text()), ("B", POLICY_B)):
        path = folder / f"{name}.yaml"
        path.write_text(text)
        found[name] = (path, compile_policy(policy.load(path)))
    return found


@pytest.fixture
def policies(tmp_path: Path) -> dict[str, tuple[Path, IR]]:
    return policy_files(tmp_path)


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
