-- 1: the seed flow
CREATE TABLE devices (
    product_key   TEXT NOT NULL,
    device_name   TEXT NOT NULL,
    device_secret TEXT NOT NULL,
    enabled       INTEGER NOT NULL DEFAULT 1,
    online        INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    last_seen     REAL,
    PRIMARY KEY (product_key, device_name)
);
CREATE TABLE device_modules (
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    module      TEXT NOT NULL,
    version     TEXT NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (product_key, device_name, module),
    FOREIGN KEY (product_key, device_name) REFERENCES devices ON DELETE CASCADE
);
CREATE TABLE firmware (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    product_key TEXT NOT NULL,
    module      TEXT NOT NULL,
    version     TEXT NOT NULL,
    src_version TEXT,
    size        INTEGER NOT NULL,
    md5         TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    sign_method TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    status      TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE UNIQUE INDEX firmware_identity ON firmware (product_key, module, version, IFNULL(src_version, ''));
CREATE TABLE jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    firmware_id INTEGER NOT NULL REFERENCES firmware (id),
    type        TEXT NOT NULL,
    state       TEXT NOT NULL,
    options     TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE tasks (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id         INTEGER NOT NULL REFERENCES jobs (id),
    firmware_id    INTEGER NOT NULL REFERENCES firmware (id),
    product_key    TEXT NOT NULL,
    device_name    TEXT NOT NULL,
    module         TEXT NOT NULL,
    target_version TEXT NOT NULL,
    state          TEXT NOT NULL,
    progress       INTEGER NOT NULL DEFAULT 0,
    desc           TEXT NOT NULL DEFAULT '',
    attempts       INTEGER NOT NULL DEFAULT 0,
    timeout_s      REAL,
    notified_at    REAL,
    noticed_at     REAL,
    started_at     REAL,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL,
    rev            INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tasks_by_device ON tasks (product_key, device_name, module, state);
CREATE INDEX tasks_by_job ON tasks (job_id, state);
CREATE TABLE task_history (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id  INTEGER NOT NULL REFERENCES tasks (id),
    at       REAL NOT NULL,
    state    TEXT NOT NULL,
    progress INTEGER NOT NULL,
    desc     TEXT NOT NULL
);
CREATE INDEX task_history_by_task ON task_history (task_id, id);
