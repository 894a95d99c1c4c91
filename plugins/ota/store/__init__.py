"""Where the OTA service keeps its state: `repository.Repository` is the protocol the app layer depends
on; `sqlite.SqliteRepository` implements it on one SQLite file, its schema in numbered `migrations/*.sql`,
and `postgres.PostgresRepository` on PostgreSQL, its schema in `migrations_pg/*.sql` (the same numbers and
meaning), to drop in at `plugins.ota.runtime`. Both share `rows` (rows into domain values), `lookups`
(the methods derived from others) and `schema` (loading the scripts, refusing a database newer than them).
"""
