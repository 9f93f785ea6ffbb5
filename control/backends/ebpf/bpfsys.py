"""eBPF backend, kernel half: the bpf(2) system call through ctypes, for what bcc does not wrap.

A later process (status, an update) works on maps it opened from pins, with no
bcc object at hand; and bcc 0.26 has no BPF_PROG_TEST_RUN. The attribute
structs below mirror the members of `union bpf_attr` and of `struct
bpf_map_info` / `struct bpf_prog_info` in include/uapi/linux/bpf.h that we
use; the kernel accepts a prefix of each (it zero-fills the rest).

Every errno becomes a BackendError that says what to do about it.

Used by `program`, `capacity` and `backend`; imports only `abi`'s map names.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import BackendError
from .abi import MAP_SIZE_MACROS

# __NR_bpf per architecture (asm/unistd_64.h and the generic table).
_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27
BPF_ENABLE_STATS = 32

BPF_STATS_RUN_TIME = 0

BPF_ANY = 0

# Room for a test run's output frame: a REJECT reply never outgrows the input
# by more than its own headers, and XDP frames are at most a page.
TEST_RUN_OUTPUT = 4096 + 256

_u8, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint64

# Anything with the bytes of a key or value: a ctypes struct, array or number, or bytes.
Buffer = ctypes.Structure | ctypes.Array[Any] | ctypes.c_uint32 | bytes


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", _u32), ("pad", _u32), ("key", _u64), ("value", _u64), ("flags", _u64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", _u64), ("out_batch", _u64), ("keys", _u64), ("values", _u64),
                ("count", _u32), ("map_fd", _u32), ("elem_flags", _u64), ("flags", _u64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", _u64), ("bpf_fd", _u32), ("file_flags", _u32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", _u32), ("info_len", _u32), ("info", _u64)]


class _GetFdByIdAttr(ctypes.Structure):
    _fields_ = [("id", _u32), ("next_id", _u32), ("open_flags", _u32)]


class _TestRunAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", _u32), ("retval", _u32), ("data_size_in", _u32), ("data_size_out", _u32),
        ("data_in", _u64), ("data_out", _u64), ("repeat", _u32), ("duration", _u32),
        ("ctx_size_in", _u32), ("ctx_size_out", _u32), ("ctx_in", _u64), ("ctx_out", _u64),
        ("flags", _u32), ("cpu", _u32), ("batch_size", _u32), ("pad", _u32),
    ]


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", _u32), ("id", _u32), ("key_size", _u32), ("value_size", _u32),
        ("max_entries", _u32), ("map_flags", _u32), ("name", ctypes.c_char * 16),
    ]


class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", _u32), ("id", _u32), ("tag", _u8 * 8), ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32), ("jited_prog_insns", _u64), ("xlated_prog_insns", _u64),
        ("load_time", _u64), ("created_by_uid", _u32), ("nr_map_ids", _u32), ("map_ids", _u64),
        ("name", ctypes.c_char * 16), ("ifindex", _u32), ("gpl_compatible", _u32),
        ("netns_dev", _u64), ("netns_ino", _u64), ("nr_jited_ksyms", _u32),
        ("nr_jited_func_lens", _u32), ("jited_ksyms", _u64), ("jited_func_lens", _u64),
        ("btf_id", _u32), ("func_info_rec_size", _u32), ("func_info", _u64),
        ("nr_func_info", _u32), ("nr_line_info", _u32), ("line_info", _u64),
        ("jited_line_info", _u64), ("nr_jited_line_info", _u32), ("line_info_rec_size", _u32),
        ("jited_line_info_rec_size", _u32), ("nr_prog_tags", _u32), ("prog_tags", _u64),
        ("run_time_ns", _u64), ("run_cnt", _u64),
    ]


class _EnableStatsAttr(ctypes.Structure):
    _fields_ = [("type", _u32)]


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str
    run_time_ns: int  # summed over its runs while run-time statistics were on
    run_cnt: int


@dataclass(frozen=True)
class TestRun:
    retval: int
    data: bytes  # the frame as the program left it
    duration_ns: int  # average per repetition


LIBC = ctypes.CDLL(None, use_errno=True)  # syscall(2), for the calls Python has no wrapper for
LIBC.syscall.restype = ctypes.c_long


def syscall_number(numbers: Mapping[str, int], name: str) -> int:
    """This machine's number for a system call, from a table per architecture."""
    nr: int | None = numbers.get(platform.machine())
    if nr is None:
        raise BackendError(f"{name}: no syscall number known for {platform.machine()}")
    return nr


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = syscall_number(_NR_BPF, "bpf(2)")
    ret = int(LIBC.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr),
                           ctypes.c_uint(ctypes.sizeof(attr))))
    if ret < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return ret


_NR_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "riscv64": 283, "ppc64le": 365, "s390x": 356}
MEMBARRIER_CMD_GLOBAL = 1  # the kernel's synchronize_rcu() on behalf of the caller
GRACE_FALLBACK_S = 0.05  # far longer than any one program run, where membarrier is refused


def wait_for_program_runs() -> None:
    """Return once every XDP and TC program run that had started has ended. Each runs
    inside an RCU read-side section, and a NAPI poll keeps the XDP program it read at
    its start for its whole batch, so a program just replaced can still be running (and
    counting) on another CPU: an RCU grace period (membarrier(MEMBARRIER_CMD_GLOBAL))
    waits it out."""
    nr = syscall_number(_NR_MEMBARRIER, "membarrier(2)")
    if int(LIBC.syscall(ctypes.c_long(nr), ctypes.c_int(MEMBARRIER_CMD_GLOBAL), ctypes.c_uint(0))) < 0:
        time.sleep(GRACE_FALLBACK_S)  # refused (nohz_full CPUs): a pause outlasts any run too


def permission_error(err: OSError, what: str) -> BackendError | None:
    """The error to raise when `err` is a refused permission, else None."""
    if err.errno in (errno.EPERM, errno.EACCES):
        return BackendError(f"{what}: {err.strerror}: run as root (or with CAP_BPF and "
                            "CAP_NET_ADMIN)")
    return None


def _buffer(data: Buffer) -> ctypes.Array[ctypes.c_char]:
    raw = bytes(data)
    return (ctypes.c_char * max(len(raw), 1)).from_buffer_copy(raw or b"\0")


def _address(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def _read_only(data: bytes) -> int:
    """The address of bytes the kernel only reads: the object's own contents, valid
    while it lives, no copy (a 100k-entry batch is megabytes; the bpf tier runs
    millions of frames)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    try:
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    except OSError as err:
        raise permission_error(err, "reading map info") or BackendError(
            f"fd {fd} is not a BPF map: {err.strerror}") from err
    return MapInfo(info.type, info.id, info.key_size, info.value_size, info.max_entries,
                   info.name.decode(errors="replace"))


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    try:
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    except OSError as err:
        raise permission_error(err, "reading program info") or BackendError(
            f"fd {fd} is not a BPF program: {err.strerror}") from err
    return ProgInfo(info.type, info.id, info.name.decode(errors="replace"), info.run_time_ns,
                    info.run_cnt)


def prog_info_by_id(prog_id: int) -> ProgInfo | None:
    """A loaded program's info by id; None if it is gone."""
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, _GetFdByIdAttr(id=prog_id))
    except OSError as err:
        if err.errno == errno.ENOENT:
            return None
        raise permission_error(err, f"opening program {prog_id}") or BackendError(
            f"cannot open program {prog_id}: {err.strerror}") from err
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


def prog_name(prog_id: int) -> str:
    """The name of a loaded program by id ("" if it is gone): whose XDP program is this?"""
    info = prog_info_by_id(prog_id)
    return info.name if info else ""


def run_time_statistics() -> int:
    """An fd that has the kernel count every program's run time while it is open
    (BPF_ENABLE_STATS: the sysctl kernel.bpf_stats_enabled, undone by closing)."""
    try:
        return _bpf(BPF_ENABLE_STATS, _EnableStatsAttr(type=BPF_STATS_RUN_TIME))
    except OSError as err:
        raise permission_error(err, "enabling run-time statistics") or BackendError(
            f"cannot enable run-time statistics: {err.strerror}") from err


def _map_name(fd: int) -> str:
    try:
        return map_info(fd).name or f"fd {fd}"
    except BackendError:
        return f"fd {fd}"


def map_lookup(fd: int, key: Buffer, value_size: int) -> bytes | None:
    """The value under key, or None. Per-CPU maps: value_size covers every CPU."""
    key_buf = _buffer(key)
    value = ctypes.create_string_buffer(value_size)
    attr = _MapElemAttr(map_fd=fd, key=_address(key_buf), value=ctypes.addressof(value))
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr)
    except OSError as err:
        if err.errno == errno.ENOENT:
            return None
        raise permission_error(err, f"reading map {_map_name(fd)}") or BackendError(
            f"cannot read map {_map_name(fd)}: {err.strerror}") from err
    return value.raw


def map_lookup_range(fd: int, first: int, count: int, value_size: int) -> bytes:
    """The values of array indexes `first` to `first + count - 1`, packed back to
    back, in one BPF_MAP_LOOKUP_BATCH where the kernel has it (100k counters: one
    system call, not 100k). Per-CPU maps: value_size covers every CPU."""
    if count <= 0:
        return b""
    before_first = _u32(first - 1)  # a batch starts after the key it is given; none: at 0
    last = _u32()
    keys = ctypes.create_string_buffer(ctypes.sizeof(_u32) * count)
    values = ctypes.create_string_buffer(value_size * count)
    attr = _BatchAttr(in_batch=ctypes.addressof(before_first) if first else 0,
                      out_batch=ctypes.addressof(last), keys=ctypes.addressof(keys),
                      values=ctypes.addressof(values), count=count, map_fd=fd)
    try:
        _bpf(BPF_MAP_LOOKUP_BATCH, attr)
        done = count
    except OSError as err:
        # No batches here (done: 0), or the array ended early: the rest one by one,
        # which names any real problem.
        done = attr.count if err.errno == errno.ENOENT else 0
    rest = [map_lookup(fd, _u32(first + i), value_size) or bytes(value_size)
            for i in range(done, count)]
    return values.raw[:done * value_size] + b"".join(rest)


def map_update(fd: int, key: Buffer, value: Buffer, flags: int = BPF_ANY) -> None:
    key_buf, value_buf = _buffer(key), _buffer(value)
    attr = _MapElemAttr(map_fd=fd, key=_address(key_buf), value=_address(value_buf), flags=flags)
    try:
        _bpf(BPF_MAP_UPDATE_ELEM, attr)
    except OSError as err:
        if err.errno in (errno.E2BIG, errno.ENOSPC):
            info = map_info(fd)
            macro = MAP_SIZE_MACROS.get(info.name, "ISOEBPF_MAX_*")
            raise BackendError(
                f"map {info.name} is full ({info.max_entries} entries): raise {macro} "
                f"(e.g. 'isoebpf unload', then '{macro}={info.max_entries * 2} isoebpf load ...': "
                "sizes are fixed when the program is compiled), or simplify the policy") from err
        raise permission_error(err, f"writing map {_map_name(fd)}") or BackendError(
            f"cannot write map {_map_name(fd)}: {err.strerror}") from err


def _batch(cmd: int, fd: int, keys: bytes, values: bytes | None, count: int) -> int:
    """One batch command over `count` packed keys (and values); returns how many
    elements it did. Short of `count` (a kernel or map type without batches, a
    full map, a missing key), the caller does the rest one by one, which names
    any real problem."""
    attr = _BatchAttr(keys=_read_only(keys), count=count, map_fd=fd,
                      values=_read_only(values) if values is not None else 0)
    try:
        _bpf(cmd, attr)
    except OSError as err:
        # The kernel reports how far it got, except where it has no batches at all.
        return 0 if err.errno in (errno.EINVAL, errno.EOPNOTSUPP, 524) else min(attr.count, count)
    return count


def map_update_packed(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """Write `count` entries, their keys and values packed back to back, in one
    BPF_MAP_UPDATE_BATCH where the kernel has it (a 100k-entry policy: one system
    call, not 100k)."""
    if not count:
        return
    done = _batch(BPF_MAP_UPDATE_BATCH, fd, keys, values, count)
    key_size, value_size = len(keys) // count, len(values) // count
    for i in range(done, count):
        map_update(fd, keys[i * key_size:(i + 1) * key_size], values[i * value_size:(i + 1) * value_size])


def map_delete_many(fd: int, keys: Sequence[bytes]) -> int:
    """Delete keys (BPF_MAP_DELETE_BATCH where the kernel has it); returns how many went."""
    if not keys:
        return 0
    done = _batch(BPF_MAP_DELETE_BATCH, fd, b"".join(keys), None, len(keys))
    return done + sum(map_delete(fd, key) for key in keys[done:])


def map_delete(fd: int, key: Buffer) -> bool:
    """Delete key; False if it was not there."""
    key_buf = _buffer(key)
    attr = _MapElemAttr(map_fd=fd, key=_address(key_buf))
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr)
    except OSError as err:
        if err.errno == errno.ENOENT:
            return False
        raise permission_error(err, f"writing map {_map_name(fd)}") or BackendError(
            f"cannot delete from map {_map_name(fd)}: {err.strerror}") from err
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key of a hash or LPM map (a snapshot-free walk: entries may come and go)."""
    current: ctypes.Array[ctypes.c_char] | None = None
    while True:
        following = ctypes.create_string_buffer(key_size)
        attr = _MapElemAttr(map_fd=fd, key=_address(current) if current is not None else 0,
                            value=ctypes.addressof(following))
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr)
        except OSError as err:
            if err.errno == errno.ENOENT:
                return
            raise permission_error(err, f"reading map {_map_name(fd)}") or BackendError(
                f"cannot walk map {_map_name(fd)}: {err.strerror}") from err
        yield following.raw
        current = following


def obj_pin(fd: int, path: str) -> None:
    name = ctypes.create_string_buffer(os.fsencode(path))
    try:
        _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(name), bpf_fd=fd))
    except OSError as err:
        if err.errno == errno.EEXIST:
            raise BackendError(f"cannot pin {path}: it exists already (run 'isoebpf unload' "
                               "to clear stale state)") from err
        raise permission_error(err, f"pinning {path}") or BackendError(
            f"cannot pin {path}: {err.strerror} (is bpffs mounted at /sys/fs/bpf?)") from err


def obj_get(path: str) -> int:
    """Open a pinned map or program; the caller closes the fd."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    try:
        return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(name)))
    except OSError as err:
        if err.errno == errno.ENOENT:
            raise BackendError(f"no pinned object at {path}: is isoebpf loaded here? "
                               "('isoebpf status' tells)") from err
        raise permission_error(err, f"opening {path}") or BackendError(
            f"cannot open {path}: {err.strerror}") from err


def prog_test_run(prog_fd: int, frame: bytes, repeat: int = 1) -> TestRun:
    """Run a program on one frame in the kernel (BPF_PROG_TEST_RUN), maps and all."""
    data_out = ctypes.create_string_buffer(TEST_RUN_OUTPUT)
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(frame), data_size_out=TEST_RUN_OUTPUT,
                        data_in=_read_only(frame), data_out=ctypes.addressof(data_out), repeat=repeat)
    try:
        _bpf(BPF_PROG_TEST_RUN, attr)
    except OSError as err:
        raise permission_error(err, "running a test") or BackendError(
            f"BPF_PROG_TEST_RUN failed on a {len(frame)}-byte frame: {err.strerror}") from err
    return TestRun(attr.retval, data_out.raw[:attr.data_size_out], attr.duration)


@functools.cache
def possible_cpus() -> int:
    """How many CPUs a per-CPU map holds a value for (the kernel's cpu_possible_mask,
    fixed from boot: read once), from /sys/devices/system/cpu/possible: "0-3,8"."""
    with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count
