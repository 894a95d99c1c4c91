-- 3: a task change and its history row in one statement (one round trip to the database thread)
ALTER TABLE tasks ADD COLUMN note TEXT NOT NULL DEFAULT '';
CREATE TRIGGER task_history_on_save AFTER UPDATE OF note ON tasks
BEGIN
    INSERT INTO task_history (task_id, at, state, progress, desc)
    VALUES (NEW.id, NEW.updated_at, NEW.state, NEW.progress, NEW.note);
END
