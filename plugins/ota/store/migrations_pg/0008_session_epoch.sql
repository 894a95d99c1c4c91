-- 8: an account's browser sessions carry this number; signing out, a new password or disabling the
-- account moves it on, and every session cookie made before stops working
ALTER TABLE accounts ADD COLUMN session_epoch INTEGER NOT NULL DEFAULT 0;
