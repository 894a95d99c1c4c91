"""The OTA service, hosted by the broker as the amqtt plugin `plugins.ota.plugin.OtaPlugin`.

Layers, inward first: `core` (topics, model, messages, the task state machine: no asyncio, amqtt, SQL or
clock) → `store` (the `Repository` protocol, SQLite) → `app` (the use cases, `OtaApp`) → `http` (the
management API, the console) → `runtime` (builds all of it) → `plugin` (amqtt); `cli` is a client of
the API.
"""
