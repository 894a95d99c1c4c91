-- 5: the replicas attached to one broker, each with its persistent MQTT session (the client id it connects
-- with); a replica that dies leaves its row, and the one that adopts its session deletes it
CREATE TABLE replicas (
    id BIGSERIAL PRIMARY KEY,
    client_id TEXT NOT NULL UNIQUE,
    started_at DOUBLE PRECISION NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL
);
