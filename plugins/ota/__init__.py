"""The OTA service, hosted by the broker as the amqtt plugin `plugins.ota.plugin.OtaPlugin`.

Layers, inward first: `topics`, `model`, `messages`, `machine` (the pure core: no asyncio, amqtt, SQL or
clock) → `service` (carries out the core's decisions) → adapters: `repository` (SQLite), `plugin`
(amqtt), `api` (HTTP), `cli` (a client of the API).
"""
