"""The ota-broker process: configuration, the amqtt `Broker` with the OTA plugin, signals.

This is the composition root; the OTA rules live in `plugins.ota`.
"""
