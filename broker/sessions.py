"""Persistent MQTT sessions in SQLite: the subscriptions and undelivered QoS 1/2 messages of every client
that connected with clean session 0, and the retained messages, kept across broker restarts in the OTA
service's database.

amqtt keeps sessions in memory only, so a restart forgot every persistent session and the notices queued
for offline devices with it. Writes go through one ordered queue and are committed in short batches, so
the routing path never waits for the disk and a burst of queued messages costs one transaction.

What survives what: subscriptions and messages queued for an offline session are written as they happen;
messages a connected client had not acknowledged are written at a clean shutdown with their packet id
(and whether a QoS 2 PUBREC came), so after the restart they are sent again as what they are: the same
message, with DUP set and its original packet id (MQTT-4.4.0-1), never as a new one. After a crash, those
in-flight messages are lost (amqtt kept none at all), the rest is there: a retained message (or its
removal) is written like a queued message, as it happens, so a crash loses at most the batch not yet
committed, milliseconds' worth.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

log = logging.getLogger("ota.broker")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mqtt_session (
    client_id TEXT PRIMARY KEY,
    username TEXT,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS mqtt_subscription (
    client_id TEXT NOT NULL REFERENCES mqtt_session(client_id) ON DELETE CASCADE,
    topic_filter TEXT NOT NULL,
    qos INTEGER NOT NULL,
    PRIMARY KEY (client_id, topic_filter)
);
CREATE TABLE IF NOT EXISTS mqtt_message (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client_id TEXT NOT NULL REFERENCES mqtt_session(client_id) ON DELETE CASCADE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    packet_id INTEGER,  -- set: sent and not acknowledged when the broker stopped
    received INTEGER NOT NULL DEFAULT 0  -- 1: a QoS 2 message whose PUBREC came (PUBREL is next)
);
CREATE INDEX IF NOT EXISTS mqtt_message_client ON mqtt_message(client_id, id);
CREATE TABLE IF NOT EXISTS mqtt_retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL
);
"""

_BATCH = 500  # statements per transaction at most


@dataclass
class StoredSession:
    client_id: str
    username: str | None
    seen_at: float
    subscriptions: list[tuple[str, int]] = field(default_factory=list)
    messages: list[tuple[str, bytes, int]] = field(default_factory=list)  # topic, payload, qos; in order
    in_flight: list[InFlight] = field(default_factory=list)  # in the order they were first sent


@dataclass
class Saved:
    """What `SessionStore.open` found: the persistent sessions and the retained messages."""

    sessions: list[StoredSession]
    retained: list[tuple[str, bytes, int]]  # topic, payload, qos


@dataclass(frozen=True, slots=True)
class InFlight:
    """A QoS 1/2 message sent to the client and not acknowledged when the broker stopped."""

    packet_id: int
    topic: str
    payload: bytes
    qos: int
    received: bool  # QoS 2: PUBREC came, PUBREL is next


class SessionStore:
    """The `mqtt_*` tables of `<data_dir>/ota.db`; all writes are queued and applied in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[tuple[str, tuple[Any, ...]] | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    async def open(self) -> Saved:
        """Open the database and return the sessions and retained messages saved in it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")
        await db.executescript(_SCHEMA)
        columns = {row[1] for row in await db.execute_fetchall("PRAGMA table_info(mqtt_message)")}
        if "packet_id" not in columns:  # a database written before in-flight messages were kept apart
            await db.execute("ALTER TABLE mqtt_message ADD COLUMN packet_id INTEGER")
            await db.execute("ALTER TABLE mqtt_message ADD COLUMN received INTEGER NOT NULL DEFAULT 0")
        await db.commit()
        self._db = db
        sessions: dict[str, StoredSession] = {}
        for client_id, username, seen_at in await db.execute_fetchall(
            "SELECT client_id, username, seen_at FROM mqtt_session"
        ):
            sessions[client_id] = StoredSession(client_id, username, seen_at)
        for client_id, topic_filter, qos in await db.execute_fetchall(
            "SELECT client_id, topic_filter, qos FROM mqtt_subscription ORDER BY client_id, topic_filter"
        ):
            sessions[client_id].subscriptions.append((topic_filter, qos))
        for client_id, topic, payload, qos, packet_id, received in await db.execute_fetchall(
            "SELECT client_id, topic, payload, qos, packet_id, received FROM mqtt_message ORDER BY id"
        ):
            stored = sessions[client_id]
            if packet_id is None:
                stored.messages.append((topic, bytes(payload), qos))
            else:
                stored.in_flight.append(InFlight(packet_id, topic, bytes(payload), qos, bool(received)))
        retained = [
            (topic, bytes(payload), qos)
            for topic, payload, qos in await db.execute_fetchall(
                "SELECT topic, payload, qos FROM mqtt_retained ORDER BY topic"
            )
        ]
        self._writer = asyncio.create_task(self._write_loop())
        return Saved(list(sessions.values()), retained)

    # All writers below only queue the statement: the routing path never waits for SQLite.

    def save_session(self, client_id: str, username: str | None) -> None:
        self._put(
            "INSERT INTO mqtt_session (client_id, username, seen_at) VALUES (?, ?, ?) "
            "ON CONFLICT(client_id) DO UPDATE SET username = excluded.username, seen_at = excluded.seen_at",
            (client_id, username, time.time()),
        )

    def session_left(self, client_id: str) -> None:
        """The session's client disconnected now: its expiry counts from here, across a restart too."""
        self._put("UPDATE mqtt_session SET seen_at = ? WHERE client_id = ?", (time.time(), client_id))

    def delete_session(self, client_id: str) -> None:
        self._put("DELETE FROM mqtt_session WHERE client_id = ?", (client_id,))

    def add_subscription(self, client_id: str, topic_filter: str, qos: int) -> None:
        self._put(
            "INSERT INTO mqtt_subscription (client_id, topic_filter, qos) VALUES (?, ?, ?) "
            "ON CONFLICT(client_id, topic_filter) DO UPDATE SET qos = excluded.qos",
            (client_id, topic_filter, qos),
        )

    def remove_subscription(self, client_id: str, topic_filter: str) -> None:
        self._put(
            "DELETE FROM mqtt_subscription WHERE client_id = ? AND topic_filter = ?",
            (client_id, topic_filter),
        )

    def queue_message(self, client_id: str, topic: str, payload: bytes, qos: int) -> None:
        self._put(
            "INSERT INTO mqtt_message (client_id, topic, payload, qos) VALUES (?, ?, ?, ?)",
            (client_id, topic, bytes(payload), qos),
        )

    def save_in_flight(self, client_id: str, message: InFlight) -> None:
        self._put(
            "INSERT INTO mqtt_message (client_id, topic, payload, qos, packet_id, received)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                client_id,
                message.topic,
                message.payload,
                message.qos,
                message.packet_id,
                int(message.received),
            ),
        )

    def messages_taken(self, client_id: str) -> None:
        """The session's queued and in-flight messages were handed to its new connection (which keeps what
        it has not acknowledged in flight until it does, and writes it again at the next clean stop)."""
        self._put("DELETE FROM mqtt_message WHERE client_id = ?", (client_id,))

    def retain(self, topic: str, payload: bytes, qos: int) -> None:
        """The retained message of `topic` is now this one."""
        self._put(
            "INSERT INTO mqtt_retained (topic, payload, qos) VALUES (?, ?, ?) "
            "ON CONFLICT(topic) DO UPDATE SET payload = excluded.payload, qos = excluded.qos",
            (topic, bytes(payload), qos),
        )

    def forget_retained(self, topic: str) -> None:
        """`topic` has no retained message any more (MQTT-3.3.1-10)."""
        self._put("DELETE FROM mqtt_retained WHERE topic = ?", (topic,))

    def _put(self, sql: str, args: tuple[Any, ...]) -> None:
        if self._writer is not None and not self._writer.done():
            self._queue.put_nowait((sql, args))

    async def _write_loop(self) -> None:
        assert self._db is not None
        stop = False
        while not stop:
            item = await self._queue.get()
            batch = [item]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                for entry in batch:
                    if entry is None:
                        stop = True
                        break
                    await self._db.execute(*entry)
                await self._db.commit()
            except Exception:
                log.exception("could not save MQTT session state")

    async def close(self) -> None:
        """Write everything queued so far, then close."""
        if self._writer is not None and not self._writer.done():
            self._queue.put_nowait(None)
            await self._writer
        if self._db is not None:
            await self._db.close()
            self._db = None
