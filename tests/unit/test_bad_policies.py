"""The bad-policy corpus: each file says, in `# expect:` lines, every error it must produce."""

from __future__ import annotations

from pathlib import Path

import pytest

from isoebpf import pipeline
from isoebpf.errors import PolicyError

CORPUS = sorted((Path(__file__).parent.parent / "policies" / "bad").glob("*.yaml"))


def expected(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [line.removeprefix("# expect: ") for line in lines if line.startswith("# expect: ")]


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 50


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_policy_reports_every_error_located(path: Path) -> None:
    want = expected(path)
    assert want, f"{path.name} has no '# expect:' line"
    with pytest.raises(PolicyError) as caught:
        pipeline.read(path)
    got = [
        f"{d.line}:{d.column}: {d.severity}: {d.message}"
        for d in caught.value.diagnostics
        if d.severity == "error"
    ]
    assert got == want
    assert all(d.file == str(path) for d in caught.value.diagnostics)
