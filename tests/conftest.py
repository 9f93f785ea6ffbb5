"""Shared test set-up: tiers by directory, and the rule that CI never skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"

_TIERS = {"unit": "unit", "bpf": "bpf", "integration": "integration"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test directory is a tier: tests/unit -> `unit`, and so on."""
    for item in items:
        tier = _TIERS.get(Path(str(item.fspath)).parent.name)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))


def require(capability: str, reason: str) -> None:
    """Skip for a missing capability, except in CI, where it is a failure."""
    message = f"{capability} unavailable: {reason}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing capability is a failure)")
    pytest.skip(message)
