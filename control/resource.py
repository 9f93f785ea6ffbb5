"""Ground: the shape of everything isoebpf opens for the length of a `with`: testbeds,
tracers. Opening either completes or is undone, and leaving always closes.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Resource:
    """Subclasses say how to `_open` and how to `close`; `close` must cope with
    a half-done `_open`, which is what it undoes when opening fails."""

    def _open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
