"""The repositories' schemas: numbered migration scripts shipped with the package, one folder per SQL
dialect (`migrations/` for SQLite, `migrations_pg/` for PostgreSQL), with the same numbers and meaning.

A database records how many scripts it has run; one that has run more than the code knows was written by
a newer release, and is refused rather than used with a schema the code does not understand.
"""

from __future__ import annotations

import importlib.resources


class SchemaTooNew(RuntimeError):
    """The database's schema is newer than this release's migrations."""


def scripts(folder: str) -> tuple[str, ...]:
    """The migration scripts `<folder>/NNNN_<what>.sql`, in order; their numbers run 1, 2, 3... with no gap."""
    found = importlib.resources.files(__package__).joinpath(folder)
    named = sorted(
        (f.name, f.read_text(encoding="utf-8")) for f in found.iterdir() if f.name.endswith(".sql")
    )
    for number, (name, _) in enumerate(named, start=1):
        if not name.startswith(f"{number:04d}_"):
            raise RuntimeError(f"migration {folder}/{name}: expected number {number:04d}")
    return tuple(script for _, script in named)


def check_version(database: str, version: int, known: int) -> None:
    """Refuse a database at schema `version` when this release knows only `known` migrations."""
    if version > known:
        raise SchemaTooNew(
            f"{database}: its schema is version {version}, newer than this release knows ({known});"
            " run the release that wrote it, or a newer one"
        )
