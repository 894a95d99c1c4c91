"""Where the OTA service keeps its state: `repository.Repository` is the protocol the app layer depends
on; `sqlite.SqliteRepository` implements it on one SQLite file, its schema in numbered `migrations/*.sql`.
A second implementation (PostgreSQL) implements the same protocol and drops in at `plugins.ota.runtime`.
"""
