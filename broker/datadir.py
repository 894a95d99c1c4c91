"""The data folder's rules, checked before anything in it is opened: it is private, writable, and its
database is intact.

The folder holds every device secret in clear (`ota.db`), the admin and metrics tokens, the link key,
TLS keys and firmware blobs, so:

- the process creates files with umask 077 (`restrict_umask`), whatever umask it was started with;
- the folder is created 0700, and what already exists in it is tightened to 0700 (folders) and 0600
  (files), except entries carrying a POSIX ACL: those were granted by the operator on purpose (nginx's
  read access to `firmware/` for the download offload) and are left as they are;
- a folder that group or others may write is refused: whoever can write there can swap the database or
  the keys, and tightening it afterwards would not undo that;
- a probe write proves the folder is writable and the disk is not full;
- `PRAGMA quick_check` proves `ota.db` is a SQLite database whose pages are sound, before any
  connection that would be left open by a failure is made.

Each failure is one `DataDirError` whose message names the path, the cause and what to do.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from pathlib import Path

__all__ = ["DATABASE", "UMASK", "DataDirError", "check_database", "prepare", "restrict_umask"]

UMASK = 0o077
DATABASE = "ota.db"
_ACL_XATTR = "system.posix_acl_access"
_PROBE_BYTES = 64 * 1024  # enough to need fresh blocks on a full disk, small enough to be instant


class DataDirError(RuntimeError):
    """The data folder, or something in it, cannot be used; the message says what to do."""


def restrict_umask() -> None:
    """Files and folders this process creates are its user's alone (databases, -wal/-shm, keys, blobs)."""
    os.umask(UMASK)


def prepare(data_dir: Path) -> None:
    """Create `data_dir` (0700) or check it: not writable by group or others, private, writable, and its
    database intact. Raises DataDirError."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = data_dir.stat()
    except OSError as e:
        raise DataDirError(f"data folder {data_dir}: cannot create it: {_why(e)}") from e
    if not stat.S_ISDIR(info.st_mode):
        raise DataDirError(f"data folder {data_dir}: not a folder")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DataDirError(
            f"data folder {data_dir} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o}): "
            f"it holds device secrets; make it private (chmod 700 {data_dir}) and check what is in it"
        )
    _tighten(data_dir)
    _probe_write(data_dir)
    check_database(data_dir / DATABASE)


def _tighten(data_dir: Path) -> None:
    """Everything from `data_dir` down: the owner's alone; symlinks and ACL'd entries left alone."""
    _tighten_one(data_dir)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            _tighten_one(Path(root, name))


def _tighten_one(path: Path) -> None:
    """Take group's and others' bits off `path` (0644 -> 0600, 0755 -> 0700)."""
    try:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode) or not info.st_mode & 0o077 or _has_acl(path):
            return
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o077)
    except FileNotFoundError:
        return  # gone meanwhile (an upload's temporary file)
    except OSError as e:
        raise DataDirError(f"{path}: cannot make it private: {_why(e)}") from e


def _has_acl(path: Path) -> bool:
    try:
        return _ACL_XATTR in os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False  # a filesystem without extended attributes has no ACLs


def _probe_write(data_dir: Path) -> None:
    probe = data_dir / f".write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"\0" * _PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        hint = {
            errno.ENOSPC: "the disk is full: free some space",
            errno.EDQUOT: "the disk quota is used up: free some space",
            errno.EROFS: "the file system is read-only",
        }.get(e.errno or 0, "give the broker's user write access to it")
        raise DataDirError(f"data folder {data_dir} is not writable: {_why(e)} ({hint})") from e
    finally:
        probe.unlink(missing_ok=True)


def check_database(path: Path) -> None:
    """`PRAGMA quick_check` on `path` when it exists (a missing database is created at start).

    quick_check reads every page once (seconds for a large database) and stops at the first error."""
    if not path.exists() and not path.is_symlink():
        return
    restore = f"stop the broker, move {path} aside and restore it from a backup (or start empty without it)"
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=5.0)
    except sqlite3.Error as e:
        raise DataDirError(f"database {path} cannot be opened: {e}") from e
    try:
        row = db.execute("PRAGMA quick_check(1)").fetchone()
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise DataDirError(f"database {path} is locked: is another broker running on it?") from e
        raise DataDirError(f"database {path} is damaged or not a database ({e}): {restore}") from e
    finally:
        db.close()
    result = str(row[0]) if row else "no answer"
    if result != "ok":
        raise DataDirError(f"database {path} is damaged (quick_check: {result}): {restore}")


def _why(e: OSError) -> str:
    return (e.strerror or str(e)).lower() if e.errno else str(e)
