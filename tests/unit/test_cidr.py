"""The canonical-IPv4 shortcut of parse_cidr gives exactly what the strict path gives."""

from __future__ import annotations

import random

import pytest

from isoebpf.policy import cidr

SAMPLES = ["10.0.0.0/8", "10.1.2.3", "0.0.0.0/0", "0.0.0.0", "255.255.255.255/32",
           "192.168.1.128/25", "10.1.2.3/24", "1.2.3.4/0", "256.1.1.1", "10.0.0.300",
           "1.2.3.4/33", "1.2.3.4/", "010.1.2.3", "10.0.0.0/08", "10.1", "10.1.2.3.",
           "::/0", "fd00::/8", "::ffff:10.0.0.0/104"]


def _outcome(text: str) -> str:
    try:
        net = cidr.parse_cidr(text)
    except ValueError as err:
        return f"error: {err}"
    return f"{net} v{net.version} {net.value} /{net.prefixlen}"


def test_shortcut_agrees_with_the_strict_path(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    texts = SAMPLES + [
        ".".join(str(rng.choice([0, 1, 99, 255, 256, rng.randrange(256)])) for _ in range(4))
        + rng.choice(["", f"/{rng.randrange(34)}"])
        for _ in range(3000)
    ]
    fast = [_outcome(t) for t in texts]
    assert sum(cidr._plain_ipv4(t) is not None for t in texts) > 100  # the shortcut is taken
    monkeypatch.setattr(cidr, "_plain_ipv4", lambda text: None)
    assert fast == [_outcome(t) for t in texts]
