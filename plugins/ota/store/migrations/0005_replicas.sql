-- 5: the replicas attached to one broker (PostgreSQL only: one service alone has no replicas); kept here so
-- both databases have the same tables
CREATE TABLE replicas (
    id INTEGER PRIMARY KEY,
    client_id TEXT NOT NULL UNIQUE,
    started_at REAL NOT NULL,
    seen_at REAL NOT NULL
);
