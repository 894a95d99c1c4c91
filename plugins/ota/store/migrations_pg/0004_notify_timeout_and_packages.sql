-- 4: notified tasks time out; multi-file packages (each file's name, size and digests, as JSON)
ALTER TABLE tasks ADD COLUMN notify_timeout_s DOUBLE PRECISION;
ALTER TABLE firmware ADD COLUMN files JSON NOT NULL DEFAULT '[]';
CREATE INDEX tasks_by_state ON tasks (state);
