"""Every amqtt internal the broker relies on, in one place: the private methods `HardenedBroker`,
`TlsListeners`, `StrictHandler` and `LeanSession` override or call (with the parameters they pass), and the
private attributes they read or write. An amqtt upgrade that drops or renames one fails here by name,
instead of silently bypassing a fix. Also: amqtt's own classes are left as they are (nothing is patched)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import pytest
from amqtt.broker import Broker, BrokerContext, RetainedApplicationMessage, Server
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.plugins.manager import PluginManager
from amqtt.session import OutgoingApplicationMessage, Session

from broker.handler import StrictHandler
from broker.hardened import HardenedBroker
from broker.session_state import LeanSession
from broker.tls_listeners import TlsListeners
from tests.broker.rawmqtt import RawClient
from tests.broker.test_bare_broker import bare_broker, bare_config

# (class, method, its parameters after self): what the broker overrides or calls.
METHODS: list[tuple[type, str, list[str]]] = [
    # HardenedBroker and TlsListeners override these
    (Broker, "_client_connected", ["listener_name", "reader", "writer"]),
    (Broker, "_cleanup_session", ["client_id"]),
    (Broker, "_delete_session", ["client_id"]),
    (Broker, "_session_monitor", []),  # started by amqtt's start(): the broker's expiry runs in its place
    (Broker, "_authenticate", ["session", "_"]),
    (Broker, "_del_subscription", ["a_filter", "session"]),
    (Broker, "_del_all_subscriptions", ["session"]),
    (Broker, "_topic_filtering", ["session", "topic", "action"]),
    (Broker, "_broadcast_message", ["session", "topic", "data", "force_qos"]),
    (Broker, "_publish_retained_messages_for_subscription", ["subscription", "session"]),
    (Broker, "_create_server_instance", ["listener_name", "listener_type", "address", "port", "ssl_context"]),
    (Broker, "_create_ssl_context", ["listener"]),
    (Broker, "_start_listeners", []),
    (Broker, "add_subscription", ["subscription", "session"]),
    (Broker, "retain_message", ["source_session", "topic_name", "data", "qos"]),
    (Broker, "create_offline_session", ["client_id"]),
    (Broker, "shutdown", []),
    # ... and call these
    (Broker, "_stop_handler", ["handler"]),
    (Server, "close_instance", []),
    (PluginManager, "is_topic_filtering_enabled", []),
    (PluginManager, "fire_event", ["event_name", "wait", "method_kwargs"]),
    # StrictHandler overrides these
    (ProtocolHandler, "_init_session", ["session"]),
    (ProtocolHandler, "_handle_qos1_message_flow", ["app_message"]),
    (ProtocolHandler, "_handle_qos2_message_flow", ["app_message"]),
    (ProtocolHandler, "_retry_deliveries", []),
    (BrokerProtocolHandler, "start", []),
    (BrokerProtocolHandler, "stop", []),
    (BrokerProtocolHandler, "handle_read_timeout", []),
    # ... and calls these
    (ProtocolHandler, "attach", ["session", "reader", "writer"]),
    (ProtocolHandler, "_is_attached", []),
    (ProtocolHandler, "_stop_waiters", []),
    (BrokerProtocolHandler, "handle_disconnect", ["disconnect"]),
    (BrokerProtocolHandler, "handle_connection_closed", []),
    (BrokerProtocolHandler, "mqtt_connack_authorize", ["authorize"]),
    (BrokerProtocolHandler, "mqtt_acknowledge_subscription", ["packet_id", "return_codes"]),
    (BrokerProtocolHandler, "mqtt_acknowledge_unsubscription", ["packet_id"]),
    (ProtocolHandler, "mqtt_publish", ["topic", "data", "qos", "retain", "ack_timeout"]),
    # LeanSession overrides and calls these
    (Session, "_init_states", []),
    (Session, "_on_enter_connected", []),
    (Session, "_on_enter_disconnected", []),
    (Session, "clear_queues", []),
]


def _method_id(case: tuple[type, str, list[str]]) -> str:
    return f"{case[0].__name__}.{case[1]}"


@pytest.mark.parametrize("case", METHODS, ids=[_method_id(c) for c in METHODS])
def test_amqtt_still_has_each_method_the_broker_overrides_or_calls(case: tuple[type, str, list[str]]) -> None:
    """amqtt still defines each method the broker overrides or calls, with the parameters it passes."""
    owner, name, params = case
    method = inspect.getattr_static(owner, name, None)
    assert method is not None, f"amqtt's {owner.__name__} no longer has {name}: the broker relies on it"
    method = getattr(owner, name)
    signature = [p for p in inspect.signature(method).parameters if p != "self"]
    assert signature == params, f"amqtt's {owner.__name__}.{name} now takes {signature}, not {params}"


# (what to build, attribute): private or undocumented attributes the broker reads or writes.
async def _broker() -> Broker:
    return Broker(bare_config())


async def _handler() -> BrokerProtocolHandler:
    return BrokerProtocolHandler((await _broker()).plugins_manager)


async def _session() -> Session:
    return Session()


async def _message() -> OutgoingApplicationMessage:
    return OutgoingApplicationMessage(1, "t", 1, b"", False)


ATTRIBUTES: list[tuple[Callable[[], Any], str]] = [
    (_broker, "_servers"),  # the bound listeners (also read by broker.app)
    (_broker, "_sessions"),  # client id -> (session, handler)
    (_broker, "_subscriptions"),  # replaced by a TopicIndex
    (_broker, "_retained_messages"),  # restored from SQLite at start
    (_broker, "listeners_config"),
    (_broker, "plugins_manager"),
    (_broker, "transitions"),  # broker.app: started or not, when a start fails
    (_broker, "_loop"),  # the running loop, asked once (asyncio.get_running_loop() is a getpid() each time)
    (_handler, "_pubrec_waiters"),  # the reader answers the outgoing QoS 2 flows' waiters itself
    (_handler, "_pubcomp_waiters"),
    (_handler, "_reader_task"),  # StrictHandler.run and stop: the connection's task, while it reads
    (_handler, "_reader_stopped"),  # an Event StrictHandler lets go of
    (_handler, "_pending_subscriptions"),  # replaced by an empty stand-in (never used)
    (_handler, "_pending_unsubscriptions"),
    (_handler, "_loop"),
    (_handler, "reader"),
    (_handler, "writer"),
    (_session, "inflight_out"),
    (_session, "inflight_in"),
    (_session, "retained_messages"),  # the offline queue, replaced by a LightQueue
    (_session, "delivered_message_queue"),  # replaced by an empty stand-in (never used)
    (_session, "next_packet_id"),
    (_session, "authenticated_since"),  # not amqtt's: LeanSession declares it (must not be amqtt's)
    (_message, "publish_packet"),
    (_message, "pubrec_packet"),
    (_message, "pubrel_packet"),
    (_message, "pubcomp_packet"),
]


@pytest.mark.parametrize(
    ("build", "name"), ATTRIBUTES, ids=[f"{b.__name__.strip('_')}.{n}" for b, n in ATTRIBUTES]
)
async def test_amqtt_still_has_each_attribute_the_broker_uses(build: Callable[[], Any], name: str) -> None:
    """amqtt's objects still carry each attribute the broker reads or writes (and none of the broker's
    own: those are declared by its subclasses)."""
    built = await build()
    if name == "authenticated_since":
        assert not hasattr(built, name), "amqtt's Session now has authenticated_since: rename LeanSession's"
        assert hasattr(LeanSession(), name)
        return
    assert hasattr(built, name), f"amqtt's {type(built).__name__} no longer has {name}: the broker uses it"


async def test_the_broker_s_session_and_handler_carry_every_attribute_amqtt_s_do() -> None:
    """LeanSession and StrictHandler set amqtt's attributes themselves instead of calling amqtt's __init__ (it
    made queues, an Event and a Lock they never use): whatever amqtt's own objects carry, theirs carry too,
    so an amqtt upgrade that adds one fails here instead of at the first read of it."""
    broker = HardenedBroker(bare_config())
    for amqtt_object, own in (
        (Session(), LeanSession()),
        (
            BrokerProtocolHandler(broker.plugins_manager),
            StrictHandler(broker.plugins_manager, broker, broker.limits),
        ),
    ):
        missing = {name for name in vars(amqtt_object) if not hasattr(own, name)} - {"keepalive_timeout"}
        assert not missing, (
            f"{type(own).__name__} lacks amqtt's {sorted(missing)}"
        )  # (set with a session only)
        assert all(hasattr(own, name) for name in own.__slots__)  # type: ignore[attr-defined]


async def test_amqtt_still_has_the_plugin_manager_internals_the_broker_reads() -> None:
    """The broker calls the plugins' event handlers, topic checks and authentication itself, in the calling
    task, from the plugin manager's `_event_plugin_callbacks`, `_topic_plugins` and `_auth_plugins`; its
    plugins come from `plugins`."""
    manager = HardenedBroker(bare_config()).plugins_manager
    assert isinstance(manager._event_plugin_callbacks, dict), "PluginManager._event_plugin_callbacks changed"
    assert isinstance(manager._topic_plugins, list), "PluginManager._topic_plugins changed"
    assert isinstance(manager._auth_plugins, list), "PluginManager._auth_plugins changed"
    assert isinstance(manager.plugins, list), "PluginManager.plugins changed"


def test_amqtt_still_has_the_module_level_names_the_broker_uses() -> None:
    """The names the broker builds on."""
    assert RetainedApplicationMessage(None, "t", b"", 0).topic == "t"
    # Still read by plugins/ (until they use `bind_broker`): the broker behind a plugin's context.
    assert "_broker_instance" in inspect.getsource(BrokerContext.__init__), "BrokerContext._broker_instance"


async def test_a_listeners_server_still_counts_connections_in_the_attributes_the_broker_updates() -> None:
    """The broker takes and gives back a listener's place itself (amqtt's `acquire_connection` formats a log
    line per connection): `semaphore` (None without `max_connections`) and `conn_count`."""
    limited, unlimited = Server("a", None, max_connections=2), Server("b", None)  # type: ignore[arg-type]
    assert isinstance(limited.semaphore, asyncio.Semaphore) and unlimited.semaphore is None
    assert limited.conn_count == unlimited.conn_count == 0
    await limited.acquire_connection()
    assert limited.conn_count == 1 and limited.semaphore._value == 1
    limited.release_connection()
    assert limited.conn_count == 0 and limited.semaphore._value == 2


def test_the_broker_builds_its_own_handler_and_session_classes() -> None:
    """HardenedBroker builds StrictHandler and LeanSession, subclasses of amqtt's, and TlsListeners'
    _create_ssl_context and _create_server_instance come before amqtt's in its MRO."""
    assert issubclass(StrictHandler, BrokerProtocolHandler) and issubclass(LeanSession, Session)
    assert HardenedBroker._create_ssl_context is TlsListeners._create_ssl_context
    after = super(HardenedBroker, HardenedBroker)
    assert after._create_server_instance is TlsListeners._create_server_instance  # type: ignore[misc]


_AMQTT_CLASSES = (
    Broker,
    BrokerContext,
    Server,
    ProtocolHandler,
    BrokerProtocolHandler,
    Session,
    PluginManager,
)


def _definitions() -> dict[str, dict[str, object]]:
    return {cls.__qualname__: dict(vars(cls)) for cls in _AMQTT_CLASSES}


async def test_running_brokers_leave_amqtt_classes_untouched() -> None:
    """Starting brokers and serving a connection changes no attribute of amqtt's classes: the hardening
    lives in the broker's own subclasses, not in patches applied to the whole process."""
    before = _definitions()
    async with bare_broker(max_packet_size_kb=8) as port, RawClient.open(port) as client:
        assert (await client.connect("c")).return_code == 0
        assert await client.subscribe(1, ("t", 1)) == [1]
    after = _definitions()
    for name, attributes in before.items():
        changed = sorted(
            k for k in attributes.keys() | after[name].keys() if attributes.get(k) is not after[name].get(k)
        )
        assert not changed, f"amqtt's {name} was changed at run time: {changed}"
        for value in after[name].values():
            module = getattr(value, "__module__", None) or ""
            assert not module.startswith("broker"), f"amqtt's {name} holds the broker's {value!r}"
