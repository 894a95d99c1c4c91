"""The OTA service's app layer: it carries out the core's decisions against a `Repository`, the firmware
store and a `DeviceChannel`, one small class per job.

- `events.DeviceEvents`: what devices send (inform, progress, pull) and their sessions coming and going.
- `tasks.TaskDriver`: applies an event to a task through the core, stores it (compare-and-set), sends
  the notices it calls for.
- `rollout.Dispatcher`: the periodic step (timeouts, job phases, pacing, completion) and who may be
  notified now.
- `jobs.JobAdmin`, `devices.DeviceAdmin`, `firmware.FirmwareAdmin`: what operators do and read, for the
  HTTP API.
- `downloads.DownloadGate` (may this device download this file now) and `downloads.BlockServer`
  (firmware blocks over MQTT).
- `housekeeping`: per-device locks, background work, rejection counters; `catalog.Catalog`: the
  read-mostly facts cached in memory.

`ota_app.OtaApp` builds them over one repository; `plugins.ota.runtime` builds the `OtaApp`.
"""
