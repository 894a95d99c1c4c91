-- 7: device groups (labels such as "canary" or "eu-west"): a device is in any number of them, a job may
-- target one
CREATE TABLE device_groups (
    product_key TEXT NOT NULL,
    device_name TEXT NOT NULL,
    grp         TEXT NOT NULL,
    PRIMARY KEY (product_key, device_name, grp),
    FOREIGN KEY (product_key, device_name) REFERENCES devices (product_key, device_name) ON DELETE CASCADE
);
CREATE INDEX device_groups_by_group ON device_groups (grp, product_key);
