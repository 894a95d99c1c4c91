"""`ota-broker simulate`: a fleet of simulated Aliyun-SDK devices for rehearsing a campaign and for driving load.

Each simulated device does what a device built on Aliyun's SDKs does, over real MQTT and real HTTPS:

1. connects (open mode: username `<dn>&<pk>`; with a secrets file: the signed Aliyun login), subscribes
   to `/ota/device/upgrade/{pk}/{dn}` and informs its version on `/ota/device/inform/{pk}/{dn}`;
2. on an upgrade notice, downloads `data.url` with HTTP Range requests (resuming after an interruption),
   throttled to `download_speed` bytes/s if asked, verifies the size and the `sign` by `signMethod`
   (`Md5` or `SHA256`), and reports progress every 10 % on `/ota/device/progress/{pk}/{dn}`;
3. "flashes", reboots (a new MQTT connection) and informs the notice's version: upgraded. A simulated
   failure (probability `fail_rate`, from a seeded RNG per device and attempt) reports step `-2`
   (download failed), `-3` (verification failed: a byte really is corrupted) or `-4` (flash failed).

When a run ends (first match wins):

- `all_final`: every device is `upgraded` or `offline` (it could not log in); a device that `failed` may
  be notified again by its job's retries, so failures end a run by `idle` instead;
- `idle`: at least one notice arrived, no device is busy (booting, downloading, installing, rebooting),
  and `idle_exit` seconds passed since the last notice, boot or finished upgrade; devices that never got
  a notice stay `idle`. So `simulate` may start before the operator launches the job (it waits up to
  `duration_limit` for the first notice) or after (devices inform at boot, which brings pending notices);
- `duration_limit`: that long after the start; busy devices are reported as they are (`unfinished`).

Each device is a task on one asyncio loop; its MQTT connection is a paho-mqtt 1.x client without a
thread of its own: the loop calls `loop_read`/`loop_write` when `client.socket()` is readable/writable
(`add_reader`/`add_writer`, the pattern of asyncio-mqtt/aiomqtt) and `loop_misc` once a second for
keep-alive. Only paho's blocking `connect()` (TCP connect and TLS handshake) runs on a small shared
thread pool. `processes > 1` spawns worker processes that each run a slice of the fleet; the parent
merges their counters live and their results at the end.

The simulator is a client of the broker like any device, so it is a package of its own beside the broker:
`model` (options, states, results), `mqtt_link` (paho on the asyncio loop: the only module that needs
paho-mqtt, installed by the `simulator` extra), `fleet` (the devices, the fleet, worker processes) and
`display` (the live table and the summary). `ota-broker simulate` is its command line.
"""
