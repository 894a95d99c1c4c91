"""`plugins.device_auth.plugin.DeviceAuthPlugin`: who may connect to the embedded broker, and which topics
each client may use; amqtt's auth and topic hooks over `plugins.device_auth.gate.Gate`, which decides.

In `device-secret` mode a device logs in with Aliyun's one-device-one-secret signature; an application
(dashboard, script) logs in with an account from this plugin's configuration. In `open` mode (labs)
everyone may connect and use any topic. The device registry lives in the OTA service; the gate asks it
through the `DeviceDirectory` protocol, which the OTA plugin implements. An external MQTT broker asks the
same gate over HTTP (`plugins.device_auth.hooks`).
"""

from __future__ import annotations

from amqtt.broker import BrokerContext
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from plugins.broker_port import MqttBroker
from plugins.device_auth.gate import Access, DeviceAuthConfig, DeviceDirectory, Gate, Login

ACCESS = {Action.PUBLISH: Access.PUBLISH, Action.SUBSCRIBE: Access.SUBSCRIBE}


class DeviceAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
    Config = DeviceAuthConfig

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self._directory: DeviceDirectory | None = None
        self._broker: MqttBroker | None = None
        self.gate = Gate(self.config, self.directory)

    def bind_broker(self, broker: MqttBroker) -> None:
        """ota-broker's broker hands itself over; the device directory is found through it."""
        self._broker = broker

    def directory(self) -> DeviceDirectory | None:
        if self._directory is None and self._broker is not None:
            # a runtime-checkable protocol is what isinstance checks against; mypy wants a concrete class
            self._directory = self._broker.find_plugin(DeviceDirectory)  # type: ignore[type-abstract]
        return self._directory

    async def authenticate(self, *, session: Session) -> bool | None:
        login = Login(
            str(session.client_id or ""),
            session.username,
            session.password,
            str(session.remote_address),
            session.remote_port,
        )
        return await self.gate.login(login)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or topic is None:
            return self.gate.is_open()
        return self.gate.may(session.username, topic, ACCESS.get(action, Access.RECEIVE))
