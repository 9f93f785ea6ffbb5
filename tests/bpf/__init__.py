"""The bpf tier: the program through BPF_PROG_TEST_RUN (root and bcc).

Without bcc every module here is skipped, except under CI=true, where the
failed import is the failure.
"""

import os

import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("bcc", reason="bcc (Debian's python3-bpfcc) is not installed: scripts/setup.sh")
