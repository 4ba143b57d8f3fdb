"""Whether a file other users could change or read may be trusted, as ssh decides (StrictModes).

A configuration or discovery file decides where the exporter token is sent, so a file that
another local user can write is as good as that user choosing the token's destination; a file
holding the token that another user can read hands it out. The rules:

    writable    the file, and every directory above it, must be owned by root or by this
                process's user, and not writable by group or others -- except a group
                write bit for gid 0 or the owner's own primary group, and a directory with
                the sticky bit (/tmp: others cannot rename or remove what is not theirs).
                `own_dir_strict`: the file's own directory may not be world- or
                group-writable even with the sticky bit, because anyone could then add a
                file that a glob picks up (file_sd globs).
    readable    a file holding a secret must not be readable by others (mode o+r) when others
                can reach it (every directory above has o+x). Group read is allowed: that
                is how the service's group reads a root-owned file (0640 root:procfleet).

Only the mode bits and owners are looked at, never `access()`: the services may run as root,
for whom `access()` says yes to everything. Symbolic links are followed, and the directories
above both the link and its target are checked. Nothing here imports beyond the standard
library, so both services and the command line may use it.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path


def _owner_primary_gid(uid: int) -> int | None:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:  # a uid with no passwd entry has no primary group to trust
        return None


def _who_may_write(st: os.stat_result) -> str | None:
    """Who besides the owner may write, by the mode bits; None when nobody."""
    if st.st_mode & stat.S_IWOTH:
        return "every user"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0 \
            and st.st_gid != _owner_primary_gid(st.st_uid):
        return f"group {st.st_gid}"
    return None


def _owner_problem(path: str, st: os.stat_result, what: str) -> str | None:
    if st.st_uid not in (0, os.geteuid()):
        return (f"{path}: {what} is owned by uid {st.st_uid}, neither root nor this "
                f"service's user (uid {os.geteuid()})")
    return None


def _chain(path: str) -> list[str]:
    """The directories above `path`, nearest first, for both the path and its target."""
    dirs: list[str] = []
    for resolved in (os.path.abspath(path), os.path.realpath(path)):
        for parent in Path(resolved).parents:
            text = str(parent)
            if text not in dirs:
                dirs.append(text)
    return dirs


def write_problems(path: str, *, own_dir_strict: bool = False) -> list[str]:
    """Why other users could change `path` (or put another file in its place); [] if none."""
    problems: list[str] = []
    try:
        st = os.stat(path)
    except OSError as exc:
        return [f"{path}: cannot stat: {exc.strerror or exc}"]
    if problem := _owner_problem(path, st, "the file"):
        problems.append(problem)
    if who := _who_may_write(st):
        problems.append(f"{path}: writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}); "
                        f"chmod go-w it")
    own_dirs = {os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))}
    for directory in _chain(path):
        try:
            dst = os.stat(directory)
        except OSError as exc:
            problems.append(f"{directory}: cannot stat: {exc.strerror or exc}")
            continue
        if problem := _owner_problem(directory, dst, "the directory"):
            problems.append(f"{problem} (it holds {path})")
        who = _who_may_write(dst)
        if who is None:
            continue
        sticky = bool(dst.st_mode & stat.S_ISVTX)
        if sticky and not (own_dir_strict and directory in own_dirs):
            continue
        mode = f"{stat.S_IMODE(dst.st_mode):04o}"
        if sticky:
            problems.append(f"{directory}: writable by {who} (mode {mode}), so anyone may add "
                            f"files the pattern for {path} picks up; keep discovery files in "
                            "a directory only root or this service's user can write")
        else:
            problems.append(f"{directory}: writable by {who} (mode {mode}) without the sticky "
                            f"bit, so anyone may replace {path}; chmod go-w it")
    return problems


def read_problems(path: str) -> list[str]:
    """Why users other than the owner and its group could read `path`; [] if they cannot."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return [f"{path}: cannot stat: {exc.strerror or exc}"]
    if not st.st_mode & stat.S_IROTH:
        return []
    for directory in Path(os.path.realpath(path)).parents:  # the way others would go
        try:
            if not os.stat(directory).st_mode & stat.S_IXOTH:
                return []  # others cannot get past this directory
        except OSError:
            return []
    return [f"{path}: holds a secret (an exporter token) and is readable by every user "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod o-r it (0600, or 0640 with the "
            "service's group)"]
