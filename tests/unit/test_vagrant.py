"""The Vagrantfile stays valid (`vagrant validate`, without needing a provider here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import require

VAGRANT_DIR = Path(__file__).resolve().parents[2] / "vagrant"


def test_vagrantfile_validates() -> None:
    if shutil.which("vagrant") is None:
        require("vagrant", "Debian's vagrant package is not installed")
    done = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT_DIR,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Vagrantfile validated successfully" in done.stdout
