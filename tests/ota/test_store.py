"""The stores' schemas: numbered SQL scripts shipped with the package, one folder per dialect."""

from __future__ import annotations

import fnmatch
import importlib.resources
import tomllib
from pathlib import Path

import pytest

from plugins.ota.store import postgres, schema
from plugins.ota.store.sqlite import MIGRATIONS, _statements

ROOT = Path(__file__).resolve().parents[2]


def test_migrations_are_numbered_sql_files_shipped_as_package_data() -> None:
    """Every `store/migrations/NNNN_*.sql` is numbered 1, 2, 3... in order, is run, and is package data."""
    folder = importlib.resources.files("plugins.ota.store").joinpath("migrations")
    names = sorted(f.name for f in folder.iterdir() if f.name.endswith(".sql"))
    assert [int(n[:4]) for n in names] == list(range(1, len(names) + 1))
    assert len(MIGRATIONS) == len(names)
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data.get("plugins.ota.store", [])
    assert all(any(fnmatch.fnmatch(f"migrations/{n}", g) for g in globs) for n in names)


def test_comment_lines_of_a_script_are_not_statements() -> None:
    """A `--` comment line, semicolons in it included, is dropped; a trigger's body stays one statement."""
    script = "-- 9: one; two\nCREATE TABLE t (a);\nCREATE TRIGGER x AFTER UPDATE ON t BEGIN\n  SELECT 1;\nEND"
    assert [s.split()[1] for s in _statements(script)] == ["TABLE", "TRIGGER"]


def test_postgres_migrations_mirror_sqlite_ones_and_are_package_data() -> None:
    """`store/migrations_pg/` has one script per SQLite migration, with the same number and name, shipped too."""
    store = importlib.resources.files("plugins.ota.store")
    names = sorted(f.name for f in store.joinpath("migrations").iterdir() if f.name.endswith(".sql"))
    pg_names = sorted(f.name for f in store.joinpath("migrations_pg").iterdir() if f.name.endswith(".sql"))
    assert pg_names == names
    assert len(postgres.MIGRATIONS) == len(MIGRATIONS)
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data.get("plugins.ota.store", [])
    assert all(any(fnmatch.fnmatch(f"migrations_pg/{n}", g) for g in globs) for n in pg_names)


def test_a_schema_newer_than_the_migrations_is_refused_with_the_reason() -> None:
    """check_version accepts a database at or below the known version and names both numbers above it."""
    schema.check_version("db", 3, 4)
    schema.check_version("db", 4, 4)
    with pytest.raises(
        schema.SchemaTooNew, match=r"db: its schema is version 5, newer than this release knows \(4\)"
    ):
        schema.check_version("db", 5, 4)
