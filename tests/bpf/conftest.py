"""bpf tier set-up: one compiled program for the whole session.

The capability is tried, not assumed: compiling a trivial program tells
whether bcc, kernel headers and the bpf syscall all work here. Missing, the
tier is skipped, or fails under CI=true (tests.conftest.require).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from isoebpf.backends.ebpf import program
from isoebpf.errors import IsoebpfError
from tests.bpf.harness import Datapath
from tests.conftest import require


@pytest.fixture(scope="session")
def datapath() -> Iterator[Datapath]:
    try:
        program.probe_compile()
    except IsoebpfError as err:
        require("eBPF (bcc and the bpf syscall)", str(err))
    compiled = program.compile_program()
    try:
        yield Datapath(compiled)
    finally:
        compiled.close()
