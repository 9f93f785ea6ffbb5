"""Backends stage, shared floor: where enforcement state lives, and the lock that serializes commands.

One state root per network namespace ("scope"): eBPF pins under bpffs, and a
small JSON record (what was loaded, when, where it is attached) under /run.
Both live as long as the kernel does, which is as long as the enforcement they
describe. A scope's lock file lives as long as its state: the command that
leaves the scope empty deletes it while holding it, and a command that then
wins the lock on the deleted file sees that and takes the new one, so two
commands can never hold different locks for the same scope.

Every backend and the `enforcer` keep their records here; the CLI and the agent name scopes with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StateError

# Bumped whenever pins or the record change shape; older state is torn down, never reused.
LAYOUT = 2  # 2: events is a ring buffer, event_tokens counts lost events, conntrack holds flow_entry
BPFFS = Path(os.environ.get("ISOEBPF_BPFFS", "/sys/fs/bpf/isoebpf"))
RUN_DIR = Path(os.environ.get("ISOEBPF_RUN_DIR", "/run/isoebpf"))
NETNS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
NETNS_DIR = Path("/run/netns")  # where `ip netns` keeps named namespaces
# State is root's alone: directories 0700, pins, records and locks 0600.
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
# The backend each state record names, by the identity of the record file it was
# read from (every write renames a new file into place): `backend.loaded` asks
# several times a command, and a 100k-rule record takes about 70 ms to parse.
_backends_seen: dict[Path, tuple[tuple[int, int, int], str]] = {}
# The scopes whose lock this thread holds (Scope.locked), per thread: the agent's
# threads must still exclude each other.
_locks_held = threading.local()


@dataclass(frozen=True)
class Scope:
    """The state root of one network namespace (None: the one we run in)."""

    netns: str | None

    def __post_init__(self) -> None:
        if self.netns is not None and (not NETNS_NAME.match(self.netns) or self.netns in (".", "..")):
            raise StateError(f"'{self.netns}' is not a network namespace name")

    @property
    def name(self) -> str:
        return "root" if self.netns is None else f"netns-{self.netns}"

    @property
    def namespace_gone(self) -> bool:
        """A named namespace deleted since (`ip netns del`): its interfaces and
        firewall went with it, and only our state (pins, records) is left."""
        return self.netns is not None and not (NETNS_DIR / self.netns).exists()

    @property
    def holds_state(self) -> bool:
        """Anything of ours is left for this scope: pins, the record, a failure
        record, slot files (the lock file does not count: it goes with the last)."""
        if self.pin_dir.exists():
            return True
        try:
            return any(self.run_dir.iterdir())
        except FileNotFoundError:
            return False

    @property
    def pin_dir(self) -> Path:
        return BPFFS / self.name

    @property
    def run_dir(self) -> Path:
        """The record's directory, with the failure record and the slot files."""
        return RUN_DIR / self.name

    @property
    def record_path(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def failure_path(self) -> Path:
        return self.run_dir / "failure.json"

    @property
    def switch_path(self) -> Path:
        """Present while a backend switch is under way (backend.load): a command
        killed midway leaves it, and the next one finishes or undoes the switch."""
        return self.run_dir / "switch.json"

    @property
    def lock_path(self) -> Path:
        return RUN_DIR / f"{self.name}.lock"

    def make_pin_dir(self) -> None:
        private_dir(BPFFS)
        private_dir(self.pin_dir)

    def make_run_dir(self) -> Path:
        private_dir(RUN_DIR)
        private_dir(self.run_dir)
        return self.run_dir

    def read(self) -> dict[str, Any] | None:
        """The record of what is loaded here, or None."""
        try:
            with self.record_path.open("rb") as saved:
                identity = _identity(os.fstat(saved.fileno()))
                record: dict[str, Any] = json.loads(saved.read())
        except FileNotFoundError:
            return None
        except PermissionError as err:
            raise StateError(f"cannot read {self.record_path} ({err.strerror}): isoebpf's state "
                             "is root's alone; run as root") from err
        except (OSError, ValueError) as err:
            raise StateError(f"{self.record_path} is unreadable ({err}); "
                             "'isoebpf unload' removes it and whatever it described") from err
        if "backend" in record:
            _backends_seen[self.record_path] = (identity, str(record["backend"]))
        return record

    def backend(self) -> str | None:
        """The backend the record names (None: no record), parsed again only when
        the record changed since this process last read it."""
        try:
            identity = _identity(os.stat(self.record_path))
        except FileNotFoundError:
            return None
        except OSError:
            identity = None  # read() says why
        seen = _backends_seen.get(self.record_path)
        if seen is not None and seen[0] == identity:
            return seen[1]
        record = self.read()
        return str(record["backend"]) if record else None

    def write(self, record: dict[str, Any]) -> None:
        """Replace the record atomically: readers see the old one or the new one.
        A backend writes it last, when a change has succeeded: that ends the failure
        a change before it recorded."""
        self._write_json(self.record_path, {**record, "layout": LAYOUT})
        self.failure_path.unlink(missing_ok=True)

    def amend(self, record: dict[str, Any]) -> None:
        """Replace the record atomically with a corrected copy of itself (not a change of
        enforcement: a failure recorded stays)."""
        self._write_json(self.record_path, {**record, "layout": LAYOUT})

    def forget(self) -> None:
        self._remove(self.record_path)

    def _write_json(self, path: Path, content: dict[str, Any]) -> None:
        """Compact: with `indent`, json encodes in Python, not C (100k rules: 1 s, not 0.1)."""
        self.make_run_dir()
        write_atomically(path, json.dumps(content, sort_keys=True).encode())

    def _remove(self, path: Path) -> None:
        """Remove one of the scope's files, and its run directory once that is empty."""
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: someone else's files; leave them
            self.run_dir.rmdir()

    def _sweep_temporaries(self) -> None:
        """Remove the half-written files (`.state.json.*`, ...) of writers killed before
        their rename: `locked` does, when no writer can be running."""
        with contextlib.suppress(FileNotFoundError):
            for leftover in self.run_dir.glob(".*"):
                leftover.unlink(missing_ok=True)

    def read_failure(self) -> dict[str, Any] | None:
        """The last change that could not be applied, while no later one succeeded."""
        return _read_small(self.failure_path)

    def write_failure(self, failure: dict[str, Any]) -> None:
        self._write_json(self.failure_path, failure)

    def clear_failure(self) -> None:
        self._remove(self.failure_path)

    def read_switch(self) -> dict[str, Any] | None:
        """The backend switch a killed command left unfinished: {"from": ..., "to": ...}."""
        return _read_small(self.switch_path)

    def write_switch(self, old: str, new: str) -> None:
        self._write_json(self.switch_path, {"from": old, "to": new})

    def clear_switch(self) -> None:
        self._remove(self.switch_path)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the scope's lock for the duration. A concurrent command is waited for,
        at most LOCK_WAIT seconds; the holder's pid is in the lock file. Leaving the
        scope empty deletes the lock file, still holding it (see _lock). Re-entrant
        within a thread: a backend switch holds it across both backends' calls."""
        held: set[str] = vars(_locks_held).setdefault("scopes", set())
        if self.name in held:
            yield
            return
        held.add(self.name)
        try:
            with self._flocked():
                yield
        finally:
            held.discard(self.name)

    @contextmanager
    def _flocked(self) -> Iterator[None]:
        fd = self._lock()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._sweep_temporaries()
            try:
                yield
            finally:
                if not self.holds_state:
                    self.lock_path.unlink(missing_ok=True)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _lock(self) -> int:
        """An fd of the lock file, flocked. A command waiting on the file its holder
        then deleted wins a lock nobody else shares: it must start over on the file
        now at the path, or two commands would hold "the" lock at once."""
        private_dir(RUN_DIR)
        wait = lock_wait()
        deadline = time.monotonic() + wait
        while True:
            # CLOEXEC: a tool we run (iptables, tc) must not hold the lock after we die.
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
            try:
                os.fchmod(fd, PRIVATE_FILE)
                self._flock_by(fd, deadline, wait)
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.lock_path):
                return fd
            os.close(fd)

    def _flock_by(self, fd: int, deadline: float, wait: float) -> None:
        """flock `fd`, polling until `deadline`; then fail naming the holder."""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise StateError(
                        f"another isoebpf command (pid {holder}) has held {self.lock_path} "
                        f"for over {wait:g} s; nothing was changed") from None
                time.sleep(0.02)


def _identity(found: os.stat_result) -> tuple[int, int, int]:
    return found.st_ino, found.st_mtime_ns, found.st_size


def _read_small(path: Path) -> dict[str, Any] | None:
    """A small JSON record of ours, or None where it is absent or unreadable."""
    try:
        found: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open at `fd`."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)


def lock_wait() -> float:
    """Seconds a command waits for the scope's lock (ISOEBPF_LOCK_WAIT, default 300)."""
    text = os.environ.get("ISOEBPF_LOCK_WAIT", "300")
    try:
        return float(text)
    except ValueError:
        raise StateError(f"ISOEBPF_LOCK_WAIT={text!r}: give a number of seconds") from None


def write_atomically(path: Path, data: bytes) -> None:
    """Replace the file at `path` by `data`: readers see the old file or the new one,
    and a writer killed midway leaves only a dot-file (Scope.locked sweeps them)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def private_dir(path: Path) -> None:
    """Make `path` (its parent must exist) a directory only its owner, root, can
    enter: 0700 whatever the umask, also when it was there before."""
    path.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    os.chmod(path, PRIVATE_DIR)


def make_private(path: Path) -> None:
    """A pin or a record: readable and writable by root only."""
    os.chmod(path, PRIVATE_FILE)


# Capability bits (linux/capability.h) a command that changes enforcement needs.
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def require_privilege(command: str) -> None:
    """Only root (or a process with CAP_NET_ADMIN and CAP_BPF) may change enforcement."""
    caps = effective_capabilities()
    if caps >> CAP_NET_ADMIN & 1 and (caps >> CAP_BPF & 1 or caps >> CAP_SYS_ADMIN & 1):
        return
    raise StateError(f"'{command}' changes this host's packet filtering, and uid {os.geteuid()} "
                     "may not: run it as root (or with CAP_NET_ADMIN and CAP_BPF)")


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf when nothing is mounted there (no systemd does it here)."""
    mount_point = Path("/sys/fs/bpf")
    if os.path.ismount(mount_point):
        return
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "bpf", "bpf", str(mount_point)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise StateError(f"cannot mount bpffs at {mount_point}: {done.stderr.strip()}")
