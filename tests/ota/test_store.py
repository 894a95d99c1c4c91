"""The store's schema: numbered SQL scripts shipped with the package."""

from __future__ import annotations

import fnmatch
import importlib.resources
import tomllib
from pathlib import Path

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
