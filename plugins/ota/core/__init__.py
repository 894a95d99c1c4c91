"""The OTA core (pure: no I/O, no asyncio, no amqtt, no SQL, no clock reads; time is an argument).

`topics` (the MQTT topic spellings and `DeviceRef`), `model` (firmware, jobs, tasks and their states),
`messages` (the wire format), `machine` (the task state machine and the campaign rules), `blocks`
(firmware over MQTT), `rate_limits` (token buckets), `device_csv` (the import format), `credentials`
and `errors` (the one error root).
"""
