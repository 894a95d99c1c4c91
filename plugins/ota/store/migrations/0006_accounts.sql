-- 6: operator accounts with roles, their API tokens (kept as sha256 only), and the audit log of changes
CREATE TABLE accounts (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL,
    password_hash TEXT,
    created_at    REAL NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE api_tokens (
    id           INTEGER PRIMARY KEY,
    account      TEXT NOT NULL REFERENCES accounts (name) ON DELETE CASCADE,
    token_sha256 TEXT NOT NULL UNIQUE,
    label        TEXT NOT NULL,
    created_at   REAL NOT NULL,
    revoked_at   REAL
);
CREATE INDEX api_tokens_by_account ON api_tokens (account);
CREATE TABLE audit (
    id     INTEGER PRIMARY KEY,
    at     REAL NOT NULL,
    actor  TEXT NOT NULL,
    role   TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    status INTEGER NOT NULL,
    remote TEXT NOT NULL
);
