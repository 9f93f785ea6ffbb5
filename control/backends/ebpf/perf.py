"""eBPF backend, kernel half: reading a pinned BPF_MAP_TYPE_PERF_EVENT_ARRAY from a process that did not load it.

bcc reads perf buffers only of maps it created; `isoebpf trace` opens the
program's `events` map from its pin instead. Per online CPU it opens a perf
event of type PERF_COUNT_SW_BPF_OUTPUT, maps its ring, and stores the event's
fd in the map at that CPU's index; the program's bpf_perf_event_output then
writes there. The kernel drops those map entries when our map fd closes, so an
ended trace leaves nothing behind.

The ring layout follows include/uapi/linux/perf_event.h: a control page
(data_head, data_tail) then 2^n data pages of records, each a perf_event_header
{u32 type; u16 misc; u16 size}; PERF_RECORD_SAMPLE with PERF_SAMPLE_RAW carries
{u32 size; raw bytes}, PERF_RECORD_LOST carries {u64 id; u64 lost}.

Used by `backend`'s Tracer; built on `bpfsys`.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import select
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ...errors import BackendError
from . import bpfsys

_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "ppc64le": 319,
                       "s390x": 331}
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
ATTR_SIZE = 112  # PERF_ATTR_SIZE_VER5; the kernel zero-fills what we leave out
# data_head and data_tail in struct perf_event_mmap_page.
DATA_HEAD, DATA_TAIL = 1024, 1032
RING_PAGES = 64  # per CPU, a power of two: 256 KiB holds thousands of events
RING_BYTES = RING_PAGES * mmap.PAGESIZE

def _attr() -> bytes:
    """perf_event_attr: a BPF output event, one sample per write, woken on each."""
    head = struct.pack("=IIQQQQQI", PERF_TYPE_SOFTWARE, ATTR_SIZE, PERF_COUNT_SW_BPF_OUTPUT,
                       1, PERF_SAMPLE_RAW, 0, 0, 1)
    return head.ljust(ATTR_SIZE, b"\0")


def _open_event(cpu: int) -> int:
    number = bpfsys.syscall_number(_NR_PERF_EVENT_OPEN, "perf_event_open")
    attr = ctypes.create_string_buffer(_attr(), ATTR_SIZE)
    fd = bpfsys.LIBC.syscall(number, attr, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        raise bpfsys.permission_error(err, f"perf_event_open on CPU {cpu}") or BackendError(
            f"perf_event_open on CPU {cpu} failed: {err.strerror}")
    return int(fd)


@dataclass
class _Ring:
    fd: int
    area: mmap.mmap  # a header page, then RING_BYTES of data

    def records(self) -> Iterator[tuple[int, bytes]]:
        """(type, body) of every record written since the last call; frees their room."""
        head = struct.unpack_from("=Q", self.area, DATA_HEAD)[0]
        tail = struct.unpack_from("=Q", self.area, DATA_TAIL)[0]
        while tail < head:
            kind, _, size = struct.unpack("=IHH", self._copy(tail, 8))
            yield kind, self._copy(tail + 8, size - 8)
            tail += size
        struct.pack_into("=Q", self.area, DATA_TAIL, tail)

    def _copy(self, offset: int, length: int) -> bytes:
        """`length` bytes at ring offset `offset`, across the ring's end if need be."""
        start = offset % RING_BYTES
        first = self.area[mmap.PAGESIZE + start:mmap.PAGESIZE + min(start + length, RING_BYTES)]
        return first + self.area[mmap.PAGESIZE:mmap.PAGESIZE + length - len(first)]


class PerfEventArray:
    """The events a pinned perf event array receives, for as long as this is open."""

    def __init__(self, pin: str) -> None:
        self._map_fd = bpfsys.obj_get(pin)
        self._rings: list[_Ring] = []
        self._poller = select.poll()
        self.lost = 0
        try:
            slots = bpfsys.map_info(self._map_fd).max_entries
            for cpu in bpfsys.cpu_list("online"):
                if cpu >= slots:
                    continue
                fd = _open_event(cpu)
                try:
                    area = mmap.mmap(fd, mmap.PAGESIZE + RING_BYTES, mmap.MAP_SHARED,
                                     mmap.PROT_READ | mmap.PROT_WRITE)
                except OSError:
                    os.close(fd)
                    raise
                self._rings.append(_Ring(fd, area))
                self._poller.register(fd, select.POLLIN)
                fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
                bpfsys.map_update(self._map_fd, ctypes.c_uint32(cpu), ctypes.c_uint32(fd))
        except BaseException:
            self.close()
            raise

    def poll(self, timeout: float) -> Iterator[bytes]:
        """The raw samples that arrive within `timeout` seconds (at least one wait)."""
        self._poller.poll(int(timeout * 1000))
        for ring in self._rings:
            for kind, body in ring.records():
                if kind == PERF_RECORD_SAMPLE:
                    (size,) = struct.unpack_from("=I", body)
                    yield body[4:4 + size]
                elif kind == PERF_RECORD_LOST:
                    self.lost += struct.unpack_from("=QQ", body)[1]

    def close(self) -> None:
        for ring in self._rings:
            ring.area.close()
            os.close(ring.fd)
        self._rings.clear()
        if self._map_fd >= 0:
            os.close(self._map_fd)  # the kernel removes the entries we stored
            self._map_fd = -1
