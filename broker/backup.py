"""`ota-broker backup` and `restore`: the embedded broker's whole state, copied while it runs, restorable on
another machine.

A backup is a folder: `ota.db`, a consistent copy of the database made with SQLite's online backup API (one
read transaction: every device, secret, firmware, job, task and history row as of one instant, while the
broker goes on writing), the firmware files that copy refers to (`firmware/<ab>/<sha256>`, each checked
against its sha256 as it is copied), the data folder's other files (the link-signing key, the tokens, the
TLS keys and certificates), and `backup.json`, which lists what is in it.

`restore` checks all of that (the manifest, the database's integrity and schema version, every firmware
file's digest) before anything lands, builds the data folder beside its destination and moves it into place
in one rename: an interrupted restore leaves no half-filled data folder that a broker would start on.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.datadir import DATABASE

MANIFEST = "backup.json"
FORMAT = 1
FIRMWARE = "firmware"
# Left out of a backup: the live database's own files (the copy replaces them), the firmware folder (only
# the files the copy refers to go, not an upload in progress nor an orphan), and the TLS files' lock.
_NOT_COPIED = {DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm", f"{DATABASE}-journal", FIRMWARE, ".lock"}
_READ = 1024 * 1024


class BackupError(RuntimeError):
    """A backup or a restore that cannot be made; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Summary:
    """What a backup holds (rows per table, firmware files and their bytes)."""

    folder: Path
    rows: dict[str, int]
    blobs: int
    blob_bytes: int


def backup(data_dir: Path, destination: Path, schema_known: int) -> Summary:
    """Copy the data folder's state into `destination` (a new folder, or an empty one)."""
    database = data_dir / DATABASE
    if not database.is_file():
        raise BackupError(f"{database} does not exist: nothing to back up (is the data folder right?)")
    _new_folder(destination)
    copy = destination / DATABASE
    try:
        source = sqlite3.connect(database, timeout=30)  # it only reads; the broker's busy timeout, as its own
        try:
            target = sqlite3.connect(copy)
            try:
                source.backup(target)  # every page in one step: one read transaction, one instant
                # a file of its own, readable read-only anywhere (the broker turns WAL on again when it opens it)
                target.execute("PRAGMA journal_mode = DELETE")
            finally:
                target.close()
        finally:
            source.close()
        version, rows, blobs = _read_copy(copy, schema_known)
        blob_bytes = 0
        for sha256, size in sorted(blobs.items()):
            _copy_blob(data_dir / FIRMWARE, destination / FIRMWARE, sha256, size, "backup")
            blob_bytes += size
        files = _copy_other_files(data_dir, destination)
        manifest = {
            "format": FORMAT,
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "source": str(data_dir),
            "schema_version": version,
            "rows": rows,
            "blobs": [{"sha256": sha, "size": size} for sha, size in sorted(blobs.items())],
            "files": files,
        }
        (destination / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    except (OSError, sqlite3.Error) as e:
        raise BackupError(f"backup to {destination} failed: {type(e).__name__}: {e}") from e
    return Summary(destination, rows, len(blobs), blob_bytes)


def restore(source: Path, data_dir: Path, schema_known: int) -> Summary:
    """Make `data_dir` (absent, or an empty folder) from the backup in `source`."""
    manifest = _manifest(source)
    if (data_dir / DATABASE).exists() or (data_dir.is_dir() and any(data_dir.iterdir())):
        raise BackupError(
            f"{data_dir} is not empty: restore into a new or empty data folder (move the old one away first)"
        )
    _, rows, blobs = _read_copy(source / DATABASE, schema_known)
    listed = {b["sha256"]: b["size"] for b in manifest.get("blobs", [])}
    if blobs != listed:
        raise BackupError(f"{source}: the database's firmware files differ from {MANIFEST}'s list")
    staging = data_dir.with_name(f".{data_dir.name}.restoring-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _new_folder(staging)
        for sha256, size in sorted(blobs.items()):
            _copy_blob(source / FIRMWARE, staging / FIRMWARE, sha256, size, "restore")
        for name in manifest.get("files", []):
            _copy_entry(source / name, staging / name)
        shutil.copy2(source / DATABASE, staging / DATABASE)
        if data_dir.is_dir():
            data_dir.rmdir()  # empty, checked above
        staging.rename(data_dir)
    except OSError as e:
        raise BackupError(f"restore into {data_dir} failed: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Summary(data_dir, rows, len(blobs), sum(blobs.values()))


def _manifest(source: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BackupError(f"{source} is not a backup: it has no {MANIFEST}") from e
    except (OSError, ValueError) as e:
        raise BackupError(f"{source / MANIFEST} cannot be read: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{source / MANIFEST}: not a backup of format {FORMAT} (made by a newer release?)")
    for name in manifest.get("files", []):
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise BackupError(f"{source / MANIFEST}: {name!r} is not a file inside the backup")
    return manifest


def _read_copy(database: Path, schema_known: int) -> tuple[int, dict[str, int], dict[str, int]]:
    """The copy's schema version, rows per table and firmware files (sha256 -> size), after checking it."""
    if not database.is_file():
        raise BackupError(f"{database} does not exist")
    try:
        db = sqlite3.connect(database.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
            if verdict != "ok":
                raise BackupError(f"{database} is damaged: {verdict}")
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > schema_known:
                raise BackupError(
                    f"{database} has schema version {version}, newer than this release's {schema_known}: "
                    "use the release that made it, or a later one"
                )
            rows = {
                table: int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608 - fixed names
                for table in ("devices", "firmware", "jobs", "tasks", "task_history")
            }
            blobs: dict[str, int] = {}
            for sha256, size, files in db.execute("SELECT sha256, size, files FROM firmware"):
                package = json.loads(files or "[]")
                for f in package or [{"sha256": sha256, "size": size}]:
                    blobs[str(f["sha256"])] = int(f["size"])
        finally:
            db.close()
    except sqlite3.Error as e:
        raise BackupError(f"{database} cannot be read as the broker's database: {e}") from e
    return version, rows, blobs


def _copy_blob(source: Path, target: Path, sha256: str, size: int, doing: str) -> None:
    """Copy one firmware file, checking its size and sha256 on the way."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise BackupError(f"{doing}: {sha256!r} is not a sha256")
    src = source / sha256[:2] / sha256
    dst = target / sha256[:2] / sha256
    dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    digest, copied = hashlib.sha256(), 0
    try:
        with src.open("rb") as r, dst.open("wb") as w:
            while block := r.read(_READ):
                digest.update(block)
                copied += len(block)
                w.write(block)
    except FileNotFoundError as e:
        raise BackupError(
            f"{doing}: the firmware file {src} is missing"
            + (" (the firmware was deleted while the backup ran? run it again)" if doing == "backup" else "")
        ) from e
    if copied != size or digest.hexdigest() != sha256:
        dst.unlink(missing_ok=True)
        raise BackupError(f"{doing}: {src} does not match its sha256 and size: it is damaged")


def _copy_other_files(data_dir: Path, destination: Path) -> list[str]:
    copied = []
    inside = destination.resolve()
    for entry in sorted(data_dir.iterdir()):
        if entry.name in _NOT_COPIED or entry.name.startswith(".") or entry.is_symlink():
            continue
        if inside == entry.resolve() or entry.resolve() in inside.parents:
            continue  # the backup itself, or the folder of backups it is in: not backed up into itself
        _copy_entry(entry, destination / entry.name)
        copied.append(entry.name)
    return copied


def _copy_entry(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, symlinks=False, dirs_exist_ok=False)
    else:
        shutil.copy2(source, target)


def _new_folder(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise BackupError(f"{folder} exists and is not an empty folder: give a new one")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        folder.chmod(0o700)
