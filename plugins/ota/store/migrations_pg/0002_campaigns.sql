-- 2: campaigns (phases, retries, schedules)
ALTER TABLE tasks ADD COLUMN group_no INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN not_before DOUBLE PRECISION;
ALTER TABLE tasks ADD COLUMN retry_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN retry_interval_s DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN current_group INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN schedule_at DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN end_at DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN pause_reason TEXT NOT NULL DEFAULT '';
CREATE INDEX jobs_by_state ON jobs (state);
CREATE INDEX tasks_by_job_group ON tasks (job_id, state, group_no);
