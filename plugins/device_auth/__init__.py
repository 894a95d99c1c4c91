"""Device identity for the broker: Aliyun one-device-one-secret login and per-device topic isolation.

`signing` (pure) parses and checks Aliyun MQTT CONNECT credentials; `acl` (pure) decides which topics a
device or an application account may use; `gate` makes the decisions (logins, topic access) over a
`DeviceDirectory` (the OTA plugin) and the configured accounts; `plugin` is the embedded broker's amqtt
plugin over the gate, and `hooks` the HTTP endpoints an external broker (EMQX, mosquitto-go-auth) asks.
"""
