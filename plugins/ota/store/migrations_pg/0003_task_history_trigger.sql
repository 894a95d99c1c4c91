-- 3: a task change and its history row in one statement: every UPDATE that sets `note` (save_task does,
-- whatever the value) appends the row, in the statement's own transaction
ALTER TABLE tasks ADD COLUMN note TEXT NOT NULL DEFAULT '';
CREATE FUNCTION task_history_on_save() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_history (task_id, at, state, progress, "desc")
    VALUES (NEW.id, NEW.updated_at, NEW.state, NEW.progress, NEW.note);
    RETURN NULL;
END
$$;
CREATE TRIGGER task_history_on_save AFTER UPDATE OF note ON tasks
    FOR EACH ROW EXECUTE FUNCTION task_history_on_save();
