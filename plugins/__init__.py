"""amqtt plugins of ota-broker: the OTA service (`plugins.ota`)."""
