"""Device identity for the broker: Aliyun one-device-one-secret login and per-device topic isolation.

`signing` (pure) parses and checks Aliyun MQTT CONNECT credentials; `acl` (pure) decides which topics a
device or an application account may use; `plugin` holds the two amqtt plugins, `DeviceAuthPlugin` and
`DeviceTopicPlugin`, which ask a `DeviceDirectory` (the OTA plugin) for devices' secrets.
"""
