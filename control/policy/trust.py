"""Policy stage: whether a policy file can be trusted, before it is read.

Whoever can write a policy file decides what the firewall lets through, so
`load` and `agent` refuse one that others could change (`isoebpf.pipeline`
asks here first). Reads only file modes and owners.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def untrusted(path: str | Path) -> str | None:
    """Why the policy at `path` could be changed by someone other than its owner,
    root or us (None: it cannot). Whoever can write a policy file decides what
    the firewall lets through, so `load` and `agent` refuse such a file unless
    forced. Follows symlinks (a ConfigMap's), judging the file and its directory."""
    try:
        real = os.path.realpath(path)
        info = os.stat(real)
        folder = os.stat(os.path.dirname(real))
    except OSError:
        return None  # unreadable: loading it reports that, located
    who = (0, os.geteuid())
    if info.st_uid not in who:
        return f"{path} belongs to uid {info.st_uid}, who could change it"
    if info.st_mode & 0o022:
        return f"{path} is writable by {_others(info.st_mode)} (mode {stat.S_IMODE(info.st_mode):04o})"
    where = os.path.dirname(real)
    if folder.st_uid not in who:
        return f"its directory {where} belongs to uid {folder.st_uid}, who could replace it"
    if folder.st_mode & 0o022 and not folder.st_mode & stat.S_ISVTX:
        return (f"its directory {where} is writable by {_others(folder.st_mode)} "
                f"(mode {stat.S_IMODE(folder.st_mode):04o}), who could replace it")
    return None


def refusal(path: str | Path, problem: str) -> str:
    """What `load` and `agent` say when they refuse a file `untrusted` found a problem with."""
    return (f"refusing {path}: {problem}; whoever can write it decides what this firewall lets "
            "through: 'chmod go-w' it (and its directory), or --force to use it anyway")


def _others(mode: int) -> str:
    return {0o020: "its group", 0o002: "everyone"}.get(mode & 0o022, "its group and everyone")
