"""eBPF backend, kernel half: reading the program's `events` ring buffer by its map fd.

The program writes verdict events into a BPF ring buffer (BPF_MAP_TYPE_RINGBUF,
kernel 5.8). bcc's Python reader (`open_ring_buffer`, `ring_buffer_poll`) needs
the BPF object that compiled the program, and `isoebpf trace` has only the map's
pin; so it calls what that reader calls: libbcc's bpf_new_ringbuf,
bpf_poll_ringbuf and bpf_free_ringbuf (libbpf's ring_buffer__new, __poll and
__free), declared for ctypes by bcc itself (`bcc.libbcc.lib`). libbpf maps the
ring, waits on it with epoll, reads the producer's position with acquire and
publishes the consumer's with release semantics: memory ordering is the
library's, on every architecture.

One reader at a time: a ring buffer has one consumer position, which two
readers would both move.

Used by `backend`'s Tracer.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator

from bcc.libbcc import lib

from ...errors import BackendError

# The callback type bcc declared for bpf_new_ringbuf: int (*)(void *ctx, void *data, int size).
_CALLBACK = lib.bpf_new_ringbuf.argtypes[1]


class RingBuffer:
    """The records a ring buffer map receives while this is open; the map fd stays the caller's."""

    def __init__(self, map_fd: int) -> None:
        self._records: list[bytes] = []
        # Kept referenced for as long as libbpf may call it.
        self._callback = _CALLBACK(self._receive)
        self._ring: int | None = lib.bpf_new_ringbuf(map_fd, self._callback, None)
        if not self._ring:
            err = ctypes.get_errno() or errno.EINVAL
            raise BackendError(f"cannot read the events ring buffer: {os.strerror(err)} "
                               "(BPF ring buffers need kernel 5.8 or later)")

    def _receive(self, ctx: int | None, data: int, size: int) -> int:
        self._records.append(ctypes.string_at(data, size))
        return 0

    def poll(self, timeout: float) -> Iterator[bytes]:
        """The records that arrive within `timeout` seconds: waits until the first, then
        takes every one that is there."""
        if not self._ring:
            raise BackendError("the events ring buffer is closed")
        found = lib.bpf_poll_ringbuf(self._ring, int(timeout * 1000))
        if found < 0 and -found != errno.EINTR:
            raise BackendError(f"reading the events ring buffer failed: {os.strerror(-found)}")
        records, self._records = self._records, []
        yield from records

    def drain(self) -> int:
        """Drop what the ring holds now (what an earlier reader left unread); returns how much."""
        if self._ring:
            lib.bpf_consume_ringbuf(self._ring)
        dropped, self._records = len(self._records), []
        return dropped

    def close(self) -> None:
        if self._ring:
            lib.bpf_free_ringbuf(self._ring)
            self._ring = None
