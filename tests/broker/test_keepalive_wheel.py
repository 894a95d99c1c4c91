"""`KeepAliveWheel`: each connection is looked at no earlier than its deadline and at most one slot after
it, in deadline order; a disarmed one never; one that arms again from its callback is looked at again; a
closed wheel looks at nothing. Real event loop, short deadlines."""

from __future__ import annotations

import asyncio

from broker.keepalive import RESOLUTION_S, KeepAliveWheel


class _Connection:
    def __init__(self, name: str, seen: list[tuple[str, float, float]], again: float | None = None) -> None:
        self.name, self.seen, self.again, self.wheel, self.slot = name, seen, again, None, None

    def _keep_alive_due(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        self.seen.append((self.name, due, loop.time()))
        if self.again is not None and self.wheel is not None:
            self.slot = self.wheel.arm(self, loop.time() + self.again)
            self.again = None


async def test_connections_are_looked_at_after_their_deadline_in_order_and_not_when_disarmed() -> None:
    loop = asyncio.get_running_loop()
    wheel = KeepAliveWheel(loop)
    seen: list[tuple[str, float, float]] = []
    start = loop.time()
    # two slots apart at least: within one slot, connections are looked at in the order they were armed
    deadlines = {"late": 1.2, "early": 0.2, "middle": 0.7, "dropped": 0.45}
    connections = {name: _Connection(name, seen) for name in deadlines}
    slots = {name: wheel.arm(connections[name], start + d) for name, d in deadlines.items()}
    assert len(wheel) == 4
    wheel.disarm(connections["dropped"], slots["dropped"])
    await asyncio.sleep(1.2 + 2 * RESOLUTION_S)
    assert [name for name, _, _ in seen] == ["early", "middle", "late"]
    for name, due, at in seen:
        deadline = start + deadlines[name]
        assert deadline <= due < deadline + RESOLUTION_S + 1e-9  # the slot's time, at or after the deadline
        assert at >= deadline
    assert len(wheel) == 0
    wheel.close()


async def test_a_connection_that_arms_again_is_looked_at_again_and_close_forgets_all() -> None:
    loop = asyncio.get_running_loop()
    wheel = KeepAliveWheel(loop)
    seen: list[tuple[str, float, float]] = []
    again = _Connection("again", seen, again=0.2)
    again.wheel = wheel  # type: ignore[assignment]
    wheel.arm(again, loop.time() + 0.1)
    await asyncio.sleep(0.3 + 2 * RESOLUTION_S)
    assert [name for name, _, _ in seen] == ["again", "again"]
    forgotten = _Connection("forgotten", seen)
    wheel.arm(forgotten, loop.time() + 0.1)
    wheel.close()
    await asyncio.sleep(0.1 + 2 * RESOLUTION_S)
    assert [name for name, _, _ in seen] == ["again", "again"]
